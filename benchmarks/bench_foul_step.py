"""Benchmark: FOUL server step and FedOSD direction on flattened LoRA gradients.

Times ``fed_unlearn.methods.foul.geometry.cagrad_direction`` (Gram matrix + SLSQP dual solve +
direction) for U clients x d parameters (fp32, CPU), median over repeats after a
warm-up, with a breakdown (Gram matmul alone, SLSQP alone), and the FedOSD
direction ``orthogonal_direction`` for 1 target against the remaining clients.
Goal: <= 50 ms for 20 clients x 1M parameters.

    python benchmarks/bench_foul_step.py [--dim 1000000] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from fed_unlearn.methods.fedosd import orthogonal_direction
from fed_unlearn.methods.foul.geometry import cagrad_direction


def _grads(n_retain: int, n_forget: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Correlated toy pseudo-gradients: shared + per-group + per-client parts."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=gen)
    group_f = torch.randn(dim, generator=gen)
    rows = []
    for i in range(n_retain + n_forget):
        own = torch.randn(dim, generator=gen)
        g = shared + 0.5 * own
        if i >= n_retain:  # forget clients share a "domain" component
            g = g + 1.5 * group_f
        rows.append(1e-3 * g)  # LoRA pseudo-gradient scale
    return torch.stack(rows)


def _time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _ms(xs: list[float]) -> str:
    return f"median {1e3 * statistics.median(xs):7.1f} ms  (min {1e3 * min(xs):6.1f})"


def bench_foul(n_retain: int, n_forget: int, dim: int, repeats: int, kappa: float):
    grads = _grads(n_retain, n_forget, dim)
    signs = [1] * n_retain + [-1] * n_forget
    weights = [1.0] * n_retain + [0.0] * n_forget
    solves: list[float] = []
    last = {}

    def step():
        st = cagrad_direction(grads, signs, weights, kappa)
        solves.append(st.solve_seconds)
        last["step"] = st

    total = _time(step, repeats)
    solves = solves[-repeats:]
    gram = _time(lambda: grads @ grads.T, repeats)
    st = last["step"]
    label = f"FOUL {n_retain + n_forget:2d} clients ({n_retain} retain + {n_forget} forget) x {dim:,}"
    print(f"{label}:  step {_ms(total)}")
    print(f"    Gram matmul {_ms(gram)};  SLSQP {_ms(solves)}")
    print(
        f"    kappa={kappa}: min retain <d,g>={st.min_retain_inner:+.3e}, "
        f"max forget <d,g>={st.max_forget_inner:+.3e}, degenerate={st.degenerate}"
    )
    return statistics.median(total)


def bench_fedosd(n_remaining: int, dim: int, repeats: int):
    grads = _grads(n_remaining, 1, dim)
    g_u, rows = grads[-1], grads[:-1]
    t = _time(lambda: orthogonal_direction(g_u, rows), repeats)
    print(f"FedOSD direction, 1 target vs {n_remaining} remaining x {dim:,}:  {_ms(t)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--kappa", type=float, default=0.5)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: default)"
    )
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads of "
        f"{os.cpu_count()} CPUs, fp32 CPU; load average before: {load}"
    )
    main_case = bench_foul(15, 5, args.dim, args.repeats, args.kappa)
    bench_foul(19, 1, args.dim, args.repeats, args.kappa)
    bench_foul(4, 1, args.dim, args.repeats, args.kappa)
    bench_fedosd(19, args.dim, args.repeats)
    verdict = "meets" if main_case <= 0.050 else "misses"
    print(f"20 x {args.dim:,} step {1e3 * main_case:.1f} ms {verdict} the 50 ms goal")


if __name__ == "__main__":
    main()
