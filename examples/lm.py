"""A small Llama-style language model trained from scratch, its loss through xent's fused linear cross-entropy.

    python examples/lm.py             # ~2.5 minutes on 2 CPU cores
    python examples/lm.py --no-xent   # the same run on transformers' own loss: the same losses, a higher peak
    python examples/lm.py --quick     # a smoke test (~20 s)

``xent.hf.patch(model)`` routes the training loss of a ``transformers`` causal LM through xent's fused linear
cross-entropy: the (tokens × vocabulary) logits are never formed, so a training step's peak memory drops while its
loss stays the same. With the same ``--seed`` both runs see the same batches from the same initial weights, so they
print the same losses (up to float32 rounding, which training slowly amplifies, as it would any reordering of the
sums); compare their peak step memory (on the GPU the allocator's peak, on the CPU the peak of the resident memory,
read from Linux's /proc) and tokens per second.

The text is the Python standard library's own source (its sorted top-level ``*.py`` files, every tenth held out for
validation), on which a byte-level BPE tokenizer is trained and cached under ``--out``. The model is a randomly
initialised ``LlamaForCausalLM`` (4 layers, hidden size 256, untied embeddings) trained with AdamW; the run ends with
a sample generated from the prompt ``def ``."""

from __future__ import annotations

import argparse
import gc
import math
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import resident_bytes, return_freed_memory
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

EOS = "<|endoftext|>"
VAL_BATCHES = 8
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25, help="training steps per epoch")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary size of the BPE tokenizer")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-xent", action="store_true", help="train on the unpatched model's own loss")
    parser.add_argument("--quick", action="store_true", help="a smoke test: a tiny vocabulary, short sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--out", type=Path, default=Path("runs/lm"), help="directory of the cached tokenizer")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps, args.vocab, args.seq_len = 2, 3, 512, 64
    return args


def load_sources() -> tuple[list[str], list[str]]:
    """The texts of the standard library's top-level ``*.py`` files, sorted: every tenth for validation, the rest to
    train on."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in paths]
    return [text for index, text in enumerate(texts) if index % 10], texts[::10]


def load_tokenizer(texts: list[str], vocab: int, out: Path) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts``, or the one an earlier run cached under ``out``."""
    path = out / f"tokenizer-{vocab}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def to_blocks(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Each text's tokens and an end-of-text token, all concatenated and cut into (n, seq_len) blocks."""
    eos = tokenizer.token_to_id(EOS)
    stream = torch.tensor([token for encoding in tokenizer.encode_batch(texts) for token in (*encoding.ids, eos)])
    count = len(stream) // seq_len
    return stream[: count * seq_len].view(count, seq_len)


def build_model(vocab: int, seq_len: int, eos: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return LlamaForCausalLM(config)


@dataclass
class Step:
    loss: float
    tokens: int
    seconds: float
    peak_bytes: int  # above what was in use before the step


def mean_loss(steps: list[Step]) -> float:
    return sum(step.loss for step in steps) / len(steps)


def tokens_per_second(steps: list[Step]) -> float:
    return sum(step.tokens for step in steps) / sum(step.seconds for step in steps)


def peak_mib(steps: list[Step]) -> float:
    return max(step.peak_bytes for step in steps) / MIB


def train_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> Step:
    """One forward, backward and optimizer step, with its peak memory above what was in use before it: CUDA's
    allocated bytes, or on the CPU the process's resident memory, whose high-water mark writing 5 to
    /proc/self/clear_refs resets (Linux)."""
    cuda = batch.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(batch.device)
        before = torch.cuda.memory_allocated(batch.device)
    else:
        gc.collect()
        before = resident_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()  # waits for the GPU
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(batch.device) if cuda else resident_bytes("VmHWM")
    return Step(value, batch.numel(), seconds, peak - before)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor, batch: int) -> float:
    """Mean loss per token over the first ``VAL_BATCHES`` batches of ``blocks``."""
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item() for x in blocks[: VAL_BATCHES * batch].split(batch)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def generate(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: str, seed: int) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=model.device)
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=True, top_k=10)
    return tokenizer.decode(output[0].tolist())


def train_epoch(
    model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], title: str, console: Console
) -> list[Step]:
    """Train on each batch in turn under a progress bar (in a terminal) of the loss, tokens/s and peak memory."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())  # fmt: skip
    steps: list[Step] = []
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(title, total=len(batches), status="")
        for batch in batches:
            step = train_step(model, optimizer, batch)
            rate, peak = tokens_per_second([step]), peak_mib([step])
            bar.update(task, advance=1, status=f"loss {step.loss:.4f}  {rate:,.0f} tokens/s  peak {peak:.0f} MiB")
            steps.append(step)
    return steps


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        return_freed_memory()
    start = time.perf_counter()
    train_texts, val_texts = load_sources()
    tokenizer = load_tokenizer(train_texts, args.vocab, args.out)
    train, val = (to_blocks(tokenizer, texts, args.seq_len).to(device) for texts in (train_texts, val_texts))
    print(f"{len(train_texts)} train / {len(val_texts)} validation files: {train.numel():,} / {val.numel():,} tokens, "
          f"vocabulary {tokenizer.get_vocab_size():,} ({time.perf_counter() - start:.1f} s)")  # fmt: skip

    torch.manual_seed(args.seed)
    model = build_model(tokenizer.get_vocab_size(), args.seq_len, tokenizer.token_to_id(EOS)).to(device, dtype)
    if not args.no_xent:
        import xent.hf

        model = xent.hf.patch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_name = "transformers' own" if args.no_xent else "xent's fused linear"
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {loss_name} cross-entropy, {device} {dtype}")

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    order = order[: len(order) // args.batch * args.batch].view(-1, args.batch)  # block indices, a row a batch
    console = Console()
    steps: list[Step] = []
    for epoch in range(args.epochs):
        batches = [train[order[(epoch * args.steps + step) % len(order)]] for step in range(args.steps)]
        epoch_steps = train_epoch(model, optimizer, batches, f"epoch {epoch + 1}/{args.epochs}", console)
        steps += epoch_steps
        val_loss = evaluate(model, val, args.batch)
        print(f"epoch {epoch + 1:3d}  train loss {mean_loss(epoch_steps):.4f}  val loss {val_loss:.4f}  "
              f"ppl {math.exp(val_loss):.2f}  {tokens_per_second(epoch_steps):,.0f} tokens/s  "
              f"peak step memory {peak_mib(epoch_steps):.1f} MiB")  # fmt: skip

    print(f"sample:\n{generate(model, tokenizer, 'def ', args.seed)}")
    print(f"summary ({'no-xent' if args.no_xent else 'xent'}): final train loss {mean_loss(epoch_steps):.4f}  "
          f"val loss {val_loss:.4f}  ppl {math.exp(val_loss):.2f}  {tokens_per_second(steps):,.0f} tokens/s  "
          f"peak step memory {peak_mib(steps):.1f} MiB  "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
