"""One GRPO training step of TRL 1.16's GRPOTrainer, as TRL builds it and after ``xent.trl.patch(trainer)``.

    python benchmarks/grpo_step.py                      # 8 completions × (64 + 448) tokens, D = 256, V = 151,936
                                                        # ~3 minutes on 2 CPU cores
    python benchmarks/grpo_step.py --impl trl --repeat 5
    python benchmarks/grpo_step.py --batch 4 --prompt 16 --completion 48 --vocab 32768   # seconds: a smoke test

The step is ``trainer.compute_loss(model, batch)`` and its backward (no optimizer step) of a tiny Qwen2 — hidden
size ``--hidden`` (256), 2 layers, 4 heads (2 key-value heads), SwiGLU width 2 × hidden, untied head — with Qwen2's
vocabulary (``--vocab`` 151,936), so that the LM head holds most of the parameters and nearly all of the step's work,
as it holds most of the memory in real post-training. The batch is the one ``compute_loss`` takes after
``_generate_and_score_completions`` (generation bypassed): ``--batch`` completions, ``--generations`` per prompt,
prompts of ``--prompt`` tokens at most (left-padded), completions of ``--completion`` tokens at most (right-padded,
one of full length), group-normalised advantages, old log-probs near the model's and the completion tokens as
``num_items_in_batch``. TRL's defaults otherwise: loss ``dapo``, ``beta=0`` (no reference model), temperature 1,
activation checkpointing on (enabled as ``Trainer.train`` does), float32 on the CPU.

- ``trl``: the trainer as TRL builds it, its policy's forward replaced by ``trl.trainer.utils.add_fused_lm_head``
  (``ChunkedLogProbFunction``: log-probs and entropy in tiles of 4,096 tokens × 32,768 classes; without Triton, as on
  the CPU, it scores every position of the batch, prompts and padding included, not only the completion tokens);
- ``xent``: the same trainer after ``xent.trl.patch(trainer)``, xent's fused head in place of TRL's.

Each implementation runs in its own process (so that its peak memory is its own), one warm-up step, then
``--repeat`` steps, rounds interleaved across the processes; the table gives the median step time and the median
peak resident memory above what was resident before the step (model, trainer and batch loaded, no gradients), with
their ratios to TRL's, and the loss of each (they should agree to float32 rounding, ~1e-5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import traceback
import warnings
from typing import Any

import torch
from _rounds import interleaved_rounds, serve  # benchmarks/, the script's folder

from xent.bench.problem import Prepared
from xent.bench.worker import measure_once

NAMES = ("trl", "xent")
SIZES = ("batch", "generations", "prompt", "completion", "hidden", "vocab")  # the flags passed on to the workers


def qwen2(hidden: int, vocab: int, positions: int) -> torch.nn.Module:
    """The tiny Qwen2 policy, the same weights in every process."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def tokenizer(vocab: int) -> Any:
    """A word-level tokenizer of ``vocab`` ids (``<pad>``, ``<bos>``, ``<eos>``, ``t3`` …), built here: nothing
    downloaded (as tests/integrations/test_trl.py's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left"
    )


def batch(size: int, generations: int, prompt: int, completion: int, vocab: int) -> dict[str, torch.Tensor]:
    """What ``_compute_loss`` takes: ``size // generations`` prompts of ``prompt // 2`` to ``prompt`` tokens
    (left-padded), each repeated for its ``generations`` completions of ``completion // 2`` to ``completion`` tokens
    (right-padded after their end, the first of full length), advantages normalised within each group and the
    batch's completion tokens as ``num_items_in_batch``; the old log-probs are :func:`build`'s."""
    generator = torch.Generator().manual_seed(0)
    groups = size // generations
    prompt_ids = torch.randint(3, vocab, (groups, prompt), generator=generator)
    prompt_lengths = torch.randint(max(1, prompt // 2), prompt + 1, (groups,), generator=generator)
    prompt_mask = (torch.arange(prompt) >= prompt - prompt_lengths[:, None]).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0).repeat_interleave(generations, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(generations, dim=0)
    completion_lengths = torch.randint(max(1, completion // 2), completion + 1, (size,), generator=generator)
    completion_lengths[0] = completion  # the batch is padded to its longest completion
    completion_mask = (torch.arange(completion) < completion_lengths[:, None]).long()
    completion_ids = torch.randint(3, vocab, (size, completion), generator=generator)
    completion_ids[torch.arange(size), completion_lengths - 1] = 2  # each completion ends with <eos>
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    rewards = torch.rand(groups, generations, generator=generator)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages.reshape(size),
        "num_items_in_batch": completion_mask.sum().float(),
    }


def old_log_probs(trainer: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The policy's log-probs of the completions by TRL's fused head, as ``_generate_and_score_completions`` computes
    them (no grad) when the policy moves between generation and the step, moved by noise of 0.05 (a policy a few
    updates on: ratios ≈ 1 ± 5 %, rarely clipped); the same in every process (TRL's head, before any patch)."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        log_probs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, inputs["completion_ids"].size(1)
        )
    noise = 0.05 * torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(1))
    return (log_probs + noise) * inputs["completion_mask"]


def build(name: str, args: argparse.Namespace, output_dir: str) -> tuple[Any, Prepared, dict[str, float]]:
    """The trainer (patched by xent.trl for ``xent``), ready to step on the fixed batch; the dict receives each
    step's loss and entropy metric."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion,
        beta=0.0,
    )
    trainer = GRPOTrainer(
        model=qwen2(args.hidden, args.vocab, args.prompt + args.completion),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),  # never called: no generation
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["t3 t4 t5"] * args.batch}),
        processing_class=tokenizer(args.vocab),
    )
    model = trainer.model
    inputs = batch(args.batch, args.generations, args.prompt, args.completion, args.vocab)
    inputs["old_per_token_logps"] = old_log_probs(trainer, inputs)
    if name == "xent":
        import xent.trl

        xent.trl.patch(trainer)
    if config.activation_checkpointing:  # as Trainer.train does, before its first step
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=config.activation_checkpointing_kwargs)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop; the dapo loss reads it
    last: dict[str, float] = {}

    def step() -> None:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        last["loss"] = loss.item()
        last["entropy"] = trainer._metrics["train"]["entropy"][-1]

    def reset() -> None:
        model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()

    return trainer, Prepared(step, reset), last


def worker(name: str, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated")  # GRPOConfig's own field
    with tempfile.TemporaryDirectory(prefix="xent-grpo-step-") as output_dir:
        try:
            _trainer, prepared, last = build(name, args, output_dir)
            warmup_s, _ = measure_once(prepared)  # the first step: the large allocations fault in
        except Exception as error:  # reported in the table (xent.trl.patch may refuse the trainer), traced on stderr
            traceback.print_exc()
            print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
            return
        serve(prepared, {"warmup_s": warmup_s}, lambda: last)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="completions per step")
    parser.add_argument("--generations", type=int, default=None,
                        help="completions per prompt (default: min(8, --batch)); divides --batch")  # fmt: skip
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens, padded")
    parser.add_argument("--completion", type=int, default=448, help="completion tokens, padded")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeat", type=int, default=2, help="timed steps per implementation, after one warm-up")
    parser.add_argument("--impl", default=",".join(NAMES), help="comma-separated, among: " + ", ".join(NAMES))
    parser.add_argument("--worker", choices=NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.generations = args.generations or min(8, args.batch)
    args.impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    if unknown := [name for name in args.impls if name not in NAMES]:
        parser.error(f"--impl: unknown {', '.join(unknown)} (choose among {', '.join(NAMES)})")
    if args.generations < 2 or args.batch % args.generations:
        parser.error(f"--generations must be at least 2 and divide --batch ({args.batch}), got {args.generations}")
    if min(args.prompt, args.completion, args.repeat) < 1 or args.vocab < 4:
        parser.error("--prompt, --completion and --repeat must be at least 1, --vocab at least 4")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    sizes = [f"--{flag}={getattr(args, flag)}" for flag in SIZES]
    runs, failed = interleaved_rounds(__file__, args.impls, sizes, args.repeat, echo=True)
    summary = {}
    for name, measured in runs.items():
        peaks = [r["peak_bytes"] for r in measured if r["peak_bytes"] is not None]
        summary[name] = {
            "time_s": statistics.median(r["time_s"] for r in measured),
            "peak_mb": statistics.median(peaks) / 2**20 if peaks else float("nan"),
            "loss": measured[-1]["loss"],
            "entropy": measured[-1]["entropy"],
        }
    base = summary.get("trl")
    print(f"{'impl':<6} {'median s':>9} {'× trl':>6} {'peak MB':>8} {'× trl':>6} {'loss':>14} {'|Δ loss|':>9}")
    for name, row in summary.items():
        time_ratio = f"{row['time_s'] / base['time_s']:.2f}" if base else "-"
        peak_ratio = f"{row['peak_mb'] / base['peak_mb']:.2f}" if base else "-"
        delta = f"{abs(row['loss'] - base['loss']):.1e}" if base else "-"
        print(f"{name:<6} {row['time_s']:>9.2f} {time_ratio:>6} {row['peak_mb']:>8.0f} {peak_ratio:>6} "
              f"{row['loss']:>14.8f} {delta:>9}")  # fmt: skip
    for name, error in failed.items():
        print(f"{name:<6} did not run: {error}")


if __name__ == "__main__":
    main()
