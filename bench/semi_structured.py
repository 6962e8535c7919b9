"""2:4 masks as PyTorch semi-structured sparse tensors on CUDA: matmul speed of a pruned linear vs dense.

    python bench/semi_structured.py [--sizes 4096x4096,11008x4096] [--tokens 2048] [--repeats 50]

Semi-structured kernels need an NVIDIA GPU of compute capability ≥ 8.0 and fp16/bf16 weights; on a machine
without one the script says so and exits 0 (nothing is measured). The weights are masked 2:4 by magnitude
(``comp_core.math.sparsity.nm_mask``), the same layout every mask method here writes.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from comp_core.math.sparsity import nm_mask


def _time(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096x4096,11008x4096,4096x11008")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: semi-structured 2:4 speed not measured (needs an NVIDIA GPU, capability >= 8.0)")
        return 0
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        print(f"{torch.cuda.get_device_name()} has capability {major}.x < 8.0: no semi-structured kernels")
        return 0
    from torch.sparse import to_sparse_semi_structured

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, {args.tokens} tokens")
    print("| out × in | dense ms | 2:4 sparse ms | speed-up | max |Δ| |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        d_out, d_in = (int(v) for v in size.lower().split("x"))
        weight = torch.randn(d_out, d_in, device="cuda", dtype=torch.float16)
        weight = weight.masked_fill(nm_mask(weight.abs().float(), 2, 4), 0)
        x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.float16)
        sparse = to_sparse_semi_structured(weight)
        dense_s = _time(lambda: torch.nn.functional.linear(x, weight), args.repeats)
        sparse_s = _time(lambda: torch.nn.functional.linear(x, sparse), args.repeats)
        diff = (torch.nn.functional.linear(x, weight) - torch.nn.functional.linear(x, sparse)).abs().max().item()
        print(f"| {d_out} × {d_in} | {dense_s * 1e3:.3f} | {sparse_s * 1e3:.3f} | {dense_s / sparse_s:.2f}× | {diff:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
