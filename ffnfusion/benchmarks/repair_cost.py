"""Time and peak memory of the repair's linear algebra for one wide group, e.g. Llama-8B-shaped.

    python -m ffnfusion.benchmarks.repair_cost                       # 8 x (4096 -> 14336), 8192 + 2048 tokens
    python -m ffnfusion.benchmarks.repair_cost --hidden 576 --width 1536 --members 7

Random float32 weights and stream rows stand in for a real group; the steps are the ones
:class:`~ffnfusion.runtime.repair.RepairPass` runs after capturing the group's input: the sequential
target ``T`` (the members one after another), the kernel ``A·A_Fᵀ`` over column blocks, the ridge
solves for every λ on two held-out-source folds plus the final fit, and ``W_down + A_Fᵀα``. The
model's forward passes (capture, KL of candidates) are not included: they cost what ORT costs.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from ffnfusion.runtime import ridge
from ffnfusion.runtime.repair import down_refit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--width", type=int, default=14336, help="FFN width of one member")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--fit-tokens", type=int, default=8192)
    parser.add_argument("--held-out-tokens", type=int, default=2048)
    parser.add_argument("--block", type=int, default=2048, help="columns of A per block")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    d, w, k = args.hidden, args.width, args.members
    total = k * w
    scale = np.float32(1 / np.sqrt(d))

    def random(shape, std):
        out = np.empty(shape, np.float32)
        for start in range(0, shape[0], 1024):  # float32 straight away: no float64 temporaries
            out[start:start + 1024] = rng.standard_normal((min(1024, shape[0] - start), shape[1]), np.float32) * std
        return out

    gate, up = random((d, total), scale), random((d, total), scale)
    down = random((total, d), np.float32(1 / np.sqrt(total)))
    n_fit, n_all = args.fit_tokens, args.fit_tokens + args.held_out_tokens
    x = random((n_all, d), np.float32(1.0))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"group: {k} x ({d} -> {w}) = {total} columns, {gate.nbytes * 3 / 2**30:.1f} GiB of float32 weights; "
        f"{n_fit} fitting + {args.held_out_tokens} held-out tokens")

    def hidden(rows, columns):
        g = rows @ gate[:, columns]
        return g / (1 + np.exp(-g)) * (rows @ up[:, columns])

    blocks = [slice(s, min(total, s + args.block)) for s in range(0, total, args.block)]
    timings = {}

    start = time.perf_counter()
    stream = x.copy()
    for member in range(k):  # the sequential target T: each member on the stream the previous left
        columns = slice(member * w, (member + 1) * w)
        for rows in range(0, n_all, 2048):
            part = slice(rows, rows + 2048)
            stream[part] += hidden(stream[part], columns) @ down[columns]
    target = stream - x
    base = np.zeros_like(x)
    for columns in blocks:
        base += hidden(x, columns) @ down[columns]
    timings["target T and A·W0"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_rows = np.arange(n_fit)
    kernel = down_refit.kernel(x, fit_rows, [lambda rows, c=c: hidden(rows, c) for c in blocks])
    timings["kernel A·A_F^T"] = time.perf_counter() - start

    start = time.perf_counter()
    residual = target - base
    halves = [np.arange(0, n_fit // 2), np.arange(n_fit // 2, n_fit)]
    for lam in ridge.REPAIR_LAMBDAS:
        for fold in halves:
            ridge.solve_kernel(kernel[np.ix_(fold, fold)], residual[fold], lam, total)
    alpha = ridge.solve_kernel(kernel[:n_fit], residual[:n_fit], ridge.REPAIR_LAMBDAS[3], total)
    timings[f"{2 * len(ridge.REPAIR_LAMBDAS) + 1} ridge solves"] = time.perf_counter() - start

    start = time.perf_counter()
    down_refit.refit_down(down, x[:n_fit], alpha, [(c, lambda rows, c=c: hidden(rows, c)) for c in blocks])
    timings["W_down + A_F^T alpha"] = time.perf_counter() - start

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("| step | seconds |\n|---|---|")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.1f} |")
    print(f"| total | {sum(timings.values()):.1f} |\n\npeak RSS {peak:.2f} GiB "
          f"(weights {gate.nbytes * 3 / 2**30:.2f} GiB, kernel {kernel.nbytes / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
