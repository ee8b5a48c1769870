"""A narrow language model distilled from a wider one with ``xent.hf.distillation_loss``: neither model's logits formed.

    python examples/distill.py                             # ~30 s on 2 CPU cores
    python examples/distill.py --divergence jsd --beta 0.5
    python examples/distill.py --quick                     # a smoke test (~10 s)

Three models of the transformers ``LlamaForCausalLM`` class on the bytes of the Python standard library's source (a
vocabulary of 256, no tokenizer to train; every tenth file held out): a teacher of width 128 trained first on the
next byte (``xent.hf.patch``: fused cross-entropy), then two students of width 48 from the same initial weights, one
distilled from the teacher — the divergence of their next-byte distributions at temperature ``--temperature``, plus
``--hard-weight`` times the cross-entropy on the bytes, from both models' last hidden states and heads — and one
trained on the bytes alone, for comparison. The run ends with each model's validation cross-entropy (nats per byte).
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import xent.hf

VOCAB = 256  # bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=200, help="training steps of the teacher")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each student")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    parser.add_argument("--beta", type=float, default=None, help="JSD's beta in (0, 1) (default 0.5)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hard-weight", type=float, default=0.5, help="weight of the cross-entropy on the bytes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a smoke test: a few steps of each model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps, args.steps, args.batch, args.seq_len = 8, 8, 4, 64
    return args


def load_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's top-level ``*.py`` files as one stream of bytes each for training and validation."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(path.read_bytes() for index, path in enumerate(paths) if index % 10)
    val = b"".join(path.read_bytes() for path in paths[::10])
    return torch.frombuffer(bytearray(train), dtype=torch.uint8), torch.frombuffer(bytearray(val), dtype=torch.uint8)


def batches(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """Random windows of the stream, forever: (batch, seq_len) token ids."""
    while True:
        starts = torch.randint(len(stream) - seq_len, (batch,), generator=generator)
        yield torch.stack([stream[start : start + seq_len] for start in starts.tolist()]).long()


def build_model(width: int, seq_len: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def train(name: str, model: torch.nn.Module, loss_of, data, steps: int, lr: float) -> None:
    """AdamW on ``loss_of(input_ids)``; a line every fifth of the run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of(next(data))  # a scalar: no (batch · seq_len × 256) logits behind it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"{name:<20} step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
    model.eval()


@torch.no_grad()
def validation_cross_entropy(model: torch.nn.Module, windows: torch.Tensor, batch: int) -> float:
    """The next-byte cross-entropy of ``windows`` (n, seq_len): summed over every prediction, then divided."""
    total = 0.0
    for ids in windows.split(batch):
        logits = model(ids).logits[:, :-1]  # (B, seq_len - 1, 256): small enough here
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def main() -> None:
    args = parse_args()
    train_bytes, val_bytes = load_bytes()
    windows = val_bytes[: 64 * args.seq_len].view(-1, args.seq_len).long()

    def data():
        return batches(train_bytes, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))

    teacher = xent.hf.patch(build_model(128, args.seq_len, args.seed))  # its training loss: fused cross-entropy
    train(
        "teacher (width 128)", teacher, lambda ids: teacher(ids, labels=ids).loss, data(), args.teacher_steps, args.lr
    )

    distilled = build_model(48, args.seq_len, args.seed + 1)
    from_bytes = xent.hf.patch(build_model(48, args.seq_len, args.seed + 1))  # the same initial weights

    def distillation(ids: torch.Tensor) -> torch.Tensor:
        # the student's forward with gradients, the teacher's under no_grad; scales and caps read from the models
        return xent.hf.distillation_loss(
            distilled,
            teacher,
            ids,
            labels=ids,
            divergence=args.divergence,
            beta=args.beta,
            temperature=args.temperature,
            hard_weight=args.hard_weight,
        )

    train("student, distilled", distilled, distillation, data(), args.steps, args.lr)
    train("student, from bytes", from_bytes, lambda ids: from_bytes(ids, labels=ids).loss, data(), args.steps, args.lr)
    models = {"teacher": teacher, "distilled": distilled, "from bytes": from_bytes}
    scores = ", ".join(f"{name} {validation_cross_entropy(m, windows, args.batch):.3f}" for name, m in models.items())
    print(f"summary: validation cross-entropy (nats/byte): {scores}")


if __name__ == "__main__":
    main()
