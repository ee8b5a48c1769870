"""The GPU's limits and where xent's Triton path stands against them (needs CUDA and triton).

    python benchmarks/gpu_roofline.py [--part copy,ce,gemm,linear] [--shape llama3-8b,gemma2-2b]

- copy:   device-to-device bandwidth (bytes read + written per second) of ``copy_`` and of ``a + b``;
- ce:     the Triton cross-entropy kernel on N=16384 × V=128256 bf16 logits for each block size and warp count,
          as a fraction of the copy bandwidth for its 2 reads + 1 write (in place and not);
- gemm:   the bf16 matrix rate of the three GEMMs of a language-model head, whole and in the chunk shapes the fused
          linear cross-entropy uses (tokens chunks for the logits and d(input), with the d(weight) update);
- linear: xent's fused linear cross-entropy for each chunk size: time against the 6·N·D·V floor, peak memory above
          d(input) + d(weight).

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse

import torch
import triton
from triton.testing import do_bench

import xent
from xent.bench.problem import SHAPES
from xent.core.rowloss import RowLoss
from xent.kernels.triton import row_loss as triton_ce

GB = 1e9


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=5, rep=60, return_mode="median")


def copy_bandwidth(numel: int = 1 << 31) -> float:
    src = torch.randn(numel // 2, device="cuda", dtype=torch.float32).view(torch.bfloat16)
    dst, other = torch.empty_like(src), src.clone()
    nbytes = src.numel() * src.element_size()
    copy = 2 * nbytes / _median_ms(lambda: dst.copy_(src)) / 1e-3 / GB
    add = 3 * nbytes / _median_ms(lambda: torch.add(src, other, out=dst)) / 1e-3 / GB
    print(f"copy  {nbytes / GB:.1f} GB bf16: copy_ {copy:.0f} GB/s, a+b (2 reads + 1 write) {add:.0f} GB/s")
    return copy


def ce_sweep(copy_gbs: float, n: int = 16384, v: int = 128256) -> None:
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    grad = torch.empty_like(logits)
    target = torch.randint(v, (n,), device="cuda")
    scale = torch.full((n,), 1.0 / n, device="cuda")
    options = RowLoss()
    traffic = 3 * logits.numel() * logits.element_size()

    def report(name: str, ms: float) -> None:
        print(f"  {name}: {ms:6.2f} ms  {traffic / ms / 1e-3 / GB / copy_gbs:5.1%} of copy bandwidth")

    print(f"ce    {n}×{v} bf16, 2 reads + 1 write = {traffic / GB:.1f} GB; copy bandwidth {copy_gbs:.0f} GB/s")
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            if block // (32 * warps) < 1:
                continue
            ms = _median_ms(
                lambda b=block, w=warps: triton_ce.loss_and_grad_(
                    logits, grad, target, options, scale, block=b, num_warps=w
                )
            )
            report(f"BLOCK={block:5d} warps={warps:2d}", ms)
    report("default configuration", _median_ms(lambda: triton_ce.loss_and_grad_(logits, grad, target, options, scale)))
    report("in place", _median_ms(lambda: triton_ce.loss_and_grad_(logits, logits, target, options, scale)))


def _tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e-3 / 1e12


def gemm_sweep(shape: str) -> None:
    n, d, v = (SHAPES[shape][key] for key in "ndv")
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
    dw32 = torch.zeros(v, d, device="cuda", dtype=torch.float32)
    dw16 = torch.zeros(v, d, device="cuda", dtype=torch.bfloat16)
    print(f"gemm  {shape}: N={n} D={d} V={v}, floor 6NDV = {6 * n * d * v / 1e12:.1f} TFLOP")
    logits = x @ w.t()
    whole = {
        "logits X Wᵀ": lambda: torch.mm(x, w.t()),
        "dX = G W": lambda g=logits: torch.mm(g, w),
        "dW = Gᵀ X": lambda g=logits: torch.mm(g.t(), x),
    }
    total = 0.0
    for name, fn in whole.items():
        ms = _median_ms(fn)
        total += ms
        print(f"  whole {name:12s} {ms:7.2f} ms  {_tflops(2 * n * d * v, ms):5.0f} TFLOP/s")
    print(f"  floor (three whole GEMMs): {total:.2f} ms = {_tflops(6 * n * d * v, total):.0f} TFLOP/s")
    del logits
    for rows in (256, 512, 1024, 2048, 4096):
        xc = x[:rows]
        g = torch.mm(xc, w.t())
        parts = {
            "logits": _median_ms(lambda xc=xc: torch.mm(xc, w.t())),
            "dX": _median_ms(lambda g=g: torch.mm(g, w)),
            "dW fp32 +=": _median_ms(lambda g=g, xc=xc: dw32.add_(torch.mm(g.t(), xc, out_dtype=torch.float32))),
            "dW bf16 addmm": _median_ms(lambda g=g, xc=xc: dw16.addmm_(g.t(), xc)),
        }
        chunks = n / rows
        fp32 = chunks * (parts["logits"] + parts["dX"] + parts["dW fp32 +="])
        bf16 = chunks * (parts["logits"] + parts["dX"] + parts["dW bf16 addmm"])
        print(
            f"  chunk {rows:5d} ({rows * v * 2 / 2**20:5.0f} MiB): "
            + ", ".join(f"{k} {ms:.3f}" for k, ms in parts.items())
            + f" ms → GEMMs {fp32:.1f} ms ({fp32 / total:.2f}× floor) with fp32 dW, {bf16:.1f} ms"
            f" ({bf16 / total:.2f}×) with bf16 dW"
        )


def linear_sweep(shape: str) -> None:
    n, d, v = (SHAPES[shape][key] for key in "ndv")
    x = (torch.randn(n, d, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, d, device="cuda") * d**-0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(v, (n,), device="cuda")
    floor_bytes = (n * d + v * d) * 2
    print(f"linear {shape}: xent.linear_cross_entropy(impl='triton'), peak above inputs − (dX + dW)")
    runs = [(chunk, None) for chunk in (None, 256, 512, 1024, 2048)] + [(None, torch.float32)]
    for chunk, grad_dtype in runs:

        def step(chunk=chunk, grad_dtype=grad_dtype):
            x.grad = w.grad = None
            options = {"chunk_size": chunk, "weight_grad_dtype": grad_dtype}
            xent.linear_cross_entropy(x, w, target, impl="triton", **options).backward()

        step()
        ms = _median_ms(step)
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - floor_bytes
        rate = _tflops(6 * n * d * v, ms)
        summed = f"dW summed in {grad_dtype or w.dtype}"
        print(f"  chunk {chunk!s:>5}, {summed}: {ms:7.2f} ms  {rate:4.0f} TFLOP/s  +{extra / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="copy,ce,gemm,linear")
    parser.add_argument("--shape", default="llama3-8b,gemma2-2b")
    args = parser.parse_args()
    parts, shapes = args.part.split(","), args.shape.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth()
    if "ce" in parts:
        ce_sweep(copy_gbs)
    for shape in shapes:
        if "gemm" in parts:
            gemm_sweep(shape)
        if "linear" in parts:
            linear_sweep(shape)


if __name__ == "__main__":
    main()
