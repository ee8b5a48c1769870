"""A small language model learns to count by GRPO, its policy loss through xent without the logits.

    python examples/grpo.py             # ~3 minutes on 2 CPU cores
    python examples/grpo.py --no-xent   # the same run on materialised logits: the same rewards, a higher peak
    python examples/grpo.py --quick     # a smoke test (~15 s)

The task is verifiable: the prompt is ``<bos> d`` (a random digit), the model writes ``--digits`` tokens, and the
reward of a completion is the fraction of them that are one more (mod 10) than the token before them — ``7 8 9 0 1 2``
after ``<bos> 6`` scores 1. The model is a randomly initialised ``LlamaForCausalLM`` (2 layers, hidden size 64)
whose vocabulary is padded to ``--vocab`` tokens (Llama 2's 32,000 by default) so that its head costs what a real
one does; a short supervised warm-up on random digits teaches it the answer's format only (digits, at random: the
reward starts at chance, 0.1), then GRPO (Shao et al. 2024) learns the task in a plain PyTorch loop:

1. sample ``--group`` completions of every prompt at temperature ``--temperature``, keeping each token's
   log-probability under the sampling policy (``old_log_probs``);
2. score them; the advantage of a completion is its reward minus its group's mean, over the group's std;
3. the policy loss from the model's last hidden states and its head's weight: ``xent.linear_policy_loss``
   (``xent.linear_log_probs`` then ``xent.policy_loss``), which never forms the (completions × tokens × vocabulary)
   logits; ``--no-xent`` computes the same loss from the logits (log_softmax, gather, entropy) for comparison.

A terminal shows a progress bar; a line every tenth of the run gives the mean reward. The run ends with the time and
peak memory of the loss step (forward and backward; on the CPU the peak of the resident memory above what was in use
before, read from Linux's /proc; on the GPU the allocator's) and saves the reward curve as a PNG.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import resident_bytes, return_freed_memory
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import LlamaConfig, LlamaForCausalLM

import xent

BOS = 10  # token ids 0-9 are the digits; ids 11 and up exist only in the embedding and the head
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    task = parser.add_argument_group("task and model")
    task.add_argument("--digits", type=int, default=6, help="tokens the model writes after the prompt")
    task.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the model (at least 12)")
    task.add_argument("--width", type=int, default=64, help="hidden size of the model")
    training = parser.add_argument_group("training")
    training.add_argument("--warmup-steps", type=int, default=30, help="supervised steps on the answer's format")
    training.add_argument("--steps", type=int, default=150, help="GRPO steps")
    training.add_argument("--prompts", type=int, default=16, help="prompts per step")
    training.add_argument("--group", type=int, default=8, help="completions sampled per prompt (GRPO's G)")
    training.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    training.add_argument("--epsilon", type=float, default=0.2, help="the ratio's clip range")
    training.add_argument("--entropy-coef", type=float, default=0.0, help="weight of the entropy bonus")
    training.add_argument("--lr", type=float, default=3e-3)
    run = parser.add_argument_group("run")
    run.add_argument("--no-xent", action="store_true", help="compute the policy loss from materialised logits")
    run.add_argument("--quick", action="store_true", help="a smoke test: a few steps, a smaller vocabulary")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out", type=Path, default=Path("runs/grpo/reward.png"), help="PNG file of the reward curve")
    args = parser.parse_args()
    if args.quick:
        args.warmup_steps, args.steps, args.vocab = 20, 10, 4096
    if args.vocab <= BOS:
        parser.error(f"--vocab must be at least {BOS + 1} (ten digits and <bos>), got {args.vocab}")
    for flag, value in (("--digits", args.digits), ("--steps", args.steps), ("--prompts", args.prompts)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.group < 2:
        parser.error(
            f"--group must be at least 2 (GRPO's advantages compare completions of a prompt), got {args.group}"
        )
    return args


def build_model(vocab: int, width: int, length: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=length,
        tie_word_embeddings=False,
        bos_token_id=BOS,
    )
    return LlamaForCausalLM(config)


def sample_prompts(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` prompts ``<bos> d``, d a random digit: (count, 2)."""
    return torch.cat([torch.full((count, 1), BOS), torch.randint(10, (count, 1), generator=generator)], dim=1)


def reward(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """The fraction of the completion's digits that are one more (mod 10) than the token before them — the prompt's
    digit before the first: (N, 2) prompts and (N, k) completions → (N,) in [0, 1]. A rule checked token by token,
    so a completion that slips once still scores for the rest of its count."""
    previous = torch.cat([prompts[:, -1:], completions[:, :-1]], dim=1)  # (N, k)
    return (completions == (previous + 1) % 10).float().mean(1)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's std (+1e-4, TRL's; a group whose
    completions all score the same teaches nothing and gets 0)."""
    grouped = rewards.view(-1, group)  # (prompts, G)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()


@torch.no_grad()
def sample(
    model: LlamaForCausalLM, prompts: torch.Tensor, length: int, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``length`` tokens after each prompt at ``temperature``, and their log-probabilities under the sampling policy
    (the ``old_log_probs`` of the loss): (N, length) each. A whole forward per token: the sequences are a few tokens
    long, and no cache keeps the sampling code simple and deterministic."""
    sequences, old_log_probs = prompts, []
    for _ in range(length):
        logits = model(input_ids=sequences, logits_to_keep=1).logits[:, -1].float() / temperature  # (N, V)
        log_probs = logits.log_softmax(-1)
        tokens = torch.multinomial(log_probs.exp().cpu(), 1, generator=generator).to(prompts.device)  # (N, 1)
        old_log_probs.append(log_probs.gather(1, tokens))
        sequences = torch.cat([sequences, tokens], dim=1)
    return sequences[:, prompts.shape[1] :], torch.cat(old_log_probs, dim=1)


def log_probs_from_logits(
    model: LlamaForCausalLM, sequences: torch.Tensor, completions: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline (``--no-xent``): per-token log-probabilities and entropies (N, k) of the completions from the
    (N, k, V) logits, kept for the backward pass with their log_softmax (only the completion's positions, as TRL's
    ``logits_to_keep``)."""
    logits = model(input_ids=sequences[:, :-1], logits_to_keep=completions.shape[1]).logits.float() / temperature
    log_probs = logits.log_softmax(-1)  # (N, k, V)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, completions.unsqueeze(-1)).squeeze(-1), entropy


def hidden_states(model: LlamaForCausalLM, sequences: torch.Tensor, length: int) -> torch.Tensor:
    """The last hidden states (N, k, D) at the positions that predict the ``length`` completion tokens: the base
    model's output, before the head."""
    return model.model(input_ids=sequences[:, :-1]).last_hidden_state[:, -length:]


def policy_loss(model, sequences, completions, advantages, old_log_probs, args) -> xent.PolicyLoss:
    """GRPO's loss of the completions (N, k) with their advantages (N,), through xent or (``--no-xent``) the logits."""
    mask = torch.ones_like(completions, dtype=torch.float32)  # every completion is k tokens: no padding
    options = dict(old_log_probs=old_log_probs, loss_type="grpo", epsilon=args.epsilon, entropy_coef=args.entropy_coef)
    if args.no_xent:
        log_probs, entropy = log_probs_from_logits(model, sequences, completions, args.temperature)
        return xent.policy_loss(log_probs, advantages, mask, entropy=entropy, **options)
    hidden, head = hidden_states(model, sequences, completions.shape[1]), model.lm_head.weight  # (N, k, D), (V, D)
    return xent.linear_policy_loss(hidden, head, completions, advantages, mask, temperature=args.temperature, **options)


@dataclass
class Step:
    reward: float  # mean over the step's completions
    entropy: float  # mean per token
    seconds: float  # the loss step: forward, loss, backward
    peak_bytes: int  # the loss step's peak above what was in use before it


def train_step(model, optimizer, prompts, args, generator) -> Step:
    """Sample, score, and one optimizer step on the GRPO loss, whose forward and backward are timed and measured:
    CUDA's allocated bytes, or on the CPU the resident memory, whose high-water mark writing 5 to
    /proc/self/clear_refs resets (Linux)."""
    prompts = prompts.repeat_interleave(args.group, dim=0)  # (N = prompts · G, 2): a group's rows adjacent
    completions, old_log_probs = sample(model, prompts, args.digits, args.temperature, generator)
    rewards = reward(prompts, completions)  # (N,)
    advantages = group_advantages(rewards, args.group)
    sequences = torch.cat([prompts, completions], dim=1)  # (N, k + 2)

    cuda = sequences.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(sequences.device)
        torch.cuda.reset_peak_memory_stats(sequences.device)
        before = torch.cuda.memory_allocated(sequences.device)
    else:
        gc.collect()
        before = resident_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    out = policy_loss(model, sequences, completions, advantages, old_log_probs, args)
    out.loss.backward()
    entropy = out.entropy.item()  # waits for the GPU
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(sequences.device) if cuda else resident_bytes("VmHWM")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return Step(rewards.mean().item(), entropy, seconds, peak - before)


def warm_up(model, optimizer, args, generator) -> float:
    """Supervised steps on prompts followed by *random* digits, not the answers: the model learns to answer with
    digits (the format), not which ones. Returns the last step's loss."""
    for _ in range(args.warmup_steps):
        prompts = sample_prompts(args.prompts * args.group, generator)
        digits = torch.randint(10, (len(prompts), args.digits), generator=generator)
        sequences = torch.cat([prompts, digits], dim=1).to(args.device)
        digits = digits.to(args.device)
        if args.no_xent:
            log_probs, _ = log_probs_from_logits(model, sequences, digits, 1.0)
        else:
            hidden = hidden_states(model, sequences, args.digits)
            log_probs, _ = xent.linear_log_probs(hidden, model.lm_head.weight, digits)
        loss = -log_probs.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def save_curve(rewards: list[float], path: Path, title: str) -> None:
    """The mean reward of each step and its running mean over 10 steps, as a PNG (matplotlib's object API: no
    global state, no display needed)."""
    from matplotlib.figure import Figure

    steps = range(1, len(rewards) + 1)
    smooth = [sum(rewards[max(0, i - 9) : i + 1]) / len(rewards[max(0, i - 9) : i + 1]) for i in range(len(rewards))]
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward of the step")
    axes.plot(steps, smooth, color="tab:blue", label="running mean (10 steps)")
    axes.axhline(0.1, color="gray", linestyle=":", label="chance (0.1)")
    axes.set(xlabel="GRPO step", ylabel="reward (fraction of right tokens)", ylim=(0, 1), title=title)
    axes.legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        return_freed_memory()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # prompts and sampling: the same in both modes
    model = build_model(args.vocab, args.width, args.digits + 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mode = "no-xent" if args.no_xent else "xent"
    loss_name = "from the logits" if args.no_xent else "xent, without the logits"
    print(f"count on {args.digits} digits; {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary "
          f"{args.vocab:,}, {args.prompts} prompts × {args.group} a step; policy loss {loss_name}")  # fmt: skip

    warmup_loss = warm_up(model, optimizer, args, generator)
    print(f"warm-up: {args.warmup_steps} steps on the format, loss {warmup_loss:.3f} (ln 10 = 2.303: digits at chance)")

    console = Console()
    columns = (TextColumn("GRPO"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())  # fmt: skip
    steps: list[Step] = []
    line_every = max(1, args.steps // 10)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=args.steps, status="")
        for index in range(1, args.steps + 1):
            step = train_step(model, optimizer, sample_prompts(args.prompts, generator).to(device), args, generator)
            steps.append(step)
            status = (
                f"reward {step.reward:.3f}  loss step {step.seconds * 1e3:.0f} ms  peak {step.peak_bytes / MIB:.0f} MiB"
            )
            bar.update(task, advance=1, status=status)
            if index % line_every == 0 or index == 1:
                recent = steps[-line_every:]
                console.print(f"step {index:4d}  reward {sum(s.reward for s in recent) / len(recent):.3f}  "
                              f"entropy {step.entropy:.3f}  ({time.perf_counter() - start:.1f} s)")  # fmt: skip

    save_curve([s.reward for s in steps], args.out, f"GRPO: counting on {args.digits} digits ({mode})")
    first, last = steps[: max(1, len(steps) // 10)], steps[-max(1, len(steps) // 10) :]
    timed = steps[1:] or steps  # the first step pays for one-time allocations
    print(f"saved {args.out}")
    print(f"summary ({mode}): reward {sum(s.reward for s in first) / len(first):.3f} → "
          f"{sum(s.reward for s in last) / len(last):.3f} (first and last tenth of the steps)  "
          f"loss step {sum(s.seconds for s in timed) / len(timed) * 1e3:.1f} ms  "
          f"peak loss-step memory {max(s.peak_bytes for s in steps) / MIB:.1f} MiB  "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
