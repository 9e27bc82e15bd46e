"""Host cost of one SAUAdamW.step against the number of planned segments (kernel stubbed).

    TRITON_INTERPRET=1 python benchmarks/step_host.py                 # 100, 1000, 2904
    TRITON_INTERPRET=1 python benchmarks/step_host.py --experts 60 --layers 24 --profile

Problem: `--layers` layers, each with two fused experts tensors [E, 8, 16] and [E, 16, 8]
and one 2-D weight [16, 16], magnitude-pruned by half and planned by `plan_selection`
(k=0.5): 2 * E + 1 segments a layer (60 experts, 24 layers: 2,904). One float32 bias a
layer stays dense. The Triton launch (`_masked_adamw_multi_kernel`) is replaced by a
no-op, so what is timed is the host's work of a step: building the per-segment calls,
the launch tables and their copies. With --backend torch nothing is stubbed (the PyTorch
backend steps segment by segment: host work and kernel are one).

Prints median ms per step over --repeats steps (after two warm-up steps: the first one
creates the state). Needs TRITON_INTERPRET=1 (or a GPU) for the Triton backend.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

from sau import SAUAdamW, plan_selection
from sau_kernels import adamw as A


def build(layers: int, experts: int) -> tuple[list[nn.Parameter], object]:
    """The parameters (planned first, then dense biases) and their plan."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(experts, 8, 16), (experts, 16, 8), (16, 16)] * layers
    planned = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen)
        w[w.abs() <= w.abs().median()] = 0
        planned.append(nn.Parameter(w))
    dense = [nn.Parameter(torch.randn(16, generator=gen)) for _ in range(layers)]
    named = [(f"w{i}", p) for i, p in enumerate(planned)]
    saliency = {n: torch.rand(p.shape, generator=gen) for n, p in named}
    return planned + dense, plan_selection(named, saliency, k=0.5, alpha=1.0)


def time_steps(layers: int, experts: int, backend: str, repeats: int, profile: bool) -> float:
    """Median ms of one step; prints the top of a cProfile of the timed steps if asked."""
    params, plan = build(layers, experts)
    opt = SAUAdamW(params, plan=plan, lr=1e-3, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    times, prof = [], cProfile.Profile()
    for _ in range(repeats):
        t0 = time.perf_counter()
        if profile:
            prof.enable()
        opt.step()
        if profile:
            prof.disable()
        times.append(time.perf_counter() - t0)
    if profile:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[1, 8, 24])
    parser.add_argument("--experts", type=int, nargs="*", default=[49, 62, 60])
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if len(args.layers) != len(args.experts):
        parser.error("--layers and --experts pair up: give as many of each")
    if args.backend == "triton":  # the host's work only: the kernel does nothing
        type(A._masked_adamw_multi_kernel).run = lambda *a, **k: None
    print(f"backend={args.backend} torch={torch.__version__} threads={torch.get_num_threads()}")
    for layers, experts in zip(args.layers, args.experts):
        ms = time_steps(layers, experts, args.backend, args.repeats, args.profile)
        print(
            f"layers={layers:3d} experts={experts:3d} segments={layers * (2 * experts + 1):5d} "
            f"host ms/step={ms:8.2f}"
        )


if __name__ == "__main__":
    main()
