"""Sequential k FFNs vs one fused FFN of width k·I on a GPU (torch CUDA), side by side in one run.

For each model shape and k ∈ {2, 4, 8}: k pre-norm SwiGLU FFNs run one after another
(``x += down(silu(gate(n_j(x))) ⊙ up(n_j(x)))``, gate and up in one [H, 2I] GEMM as vLLM and
TensorRT-LLM store them) against the fused block ffnfusion writes (norm gains folded, one [H, 2kI]
GEMM, one [kI, H] GEMM, one residual add). Decode at B ∈ {1, 8, 64} runs inside CUDA graphs (no
launch overhead on either side); prefill is one S=2048 sequence. At B=1 the FFN is a weight read, so
each time is also shown as achieved memory bandwidth next to the device's measured copy rate.

    python -m ffnfusion.benchmarks.gpu                 # H200: Llama-8B, Llama-70B, 405B/TP8 slice, bf16
    python -m ffnfusion.benchmarks.gpu --smoke         # tiny shapes on the CPU (CI runs this)

The shapes are the paper's targets: Llama-3.1-8B (H 4096, I 14336), Llama-3.1-70B (8192, 28672) and
the per-GPU slice of Llama-3.1-405B at tensor parallelism 8 (16384, 53248 / 8 = 6656).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

SHAPES = {"llama-8b": (4096, 14336), "llama-70b": (8192, 28672), "405b-tp8": (16384, 53248 // 8)}
SMOKE_SHAPES = {"tiny": (64, 96)}
GROUP_SIZES = (2, 4, 8)
DECODE_BATCHES = (1, 8, 64)
PREFILL_TOKENS = 2048
EPS = 1e-5


@dataclasses.dataclass
class Row:
    shape: str
    k: int
    phase: str  # "decode B=N" | "prefill S=N"
    sequential_ms: float
    fused_ms: float
    weight_gib: float
    sequential_gbs: float | None = None  # achieved weight-read bandwidth (B=1 decode only)
    fused_gbs: float | None = None

    @property
    def speedup(self) -> float:
        return self.sequential_ms / self.fused_ms


def make_group(torch, hidden: int, width: int, k: int, dtype, device, seed: int = 0):
    """k random SwiGLU FFNs (norm gains, merged gate|up [H, 2I], down [I, H]) and their fused form."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    gains = [(1 + 0.1 * torch.randn(hidden, generator=generator)).to(device=device, dtype=torch.float32)
             for _ in range(k)]
    gate_up = [randn(hidden, 2 * width, scale=hidden ** -0.5) for _ in range(k)]
    down = [randn(width, hidden, scale=width ** -0.5) for _ in range(k)]
    # Fused: [diag(s_1)G_1 | … | diag(s_k)G_k | diag(s_1)U_1 | … ] (gates first, then ups), D* = [D_1; …; D_k].
    gates = [(s[:, None] * w[:, :width].float()).to(dtype) for s, w in zip(gains, gate_up)]
    ups = [(s[:, None] * w[:, width:].float()).to(dtype) for s, w in zip(gains, gate_up)]
    fused_gate_up = torch.cat(gates + ups, dim=1)
    fused_down = torch.cat(down, dim=0)
    return (gains, gate_up, down), (fused_gate_up, fused_down)


def _unit_rms(torch, x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS).to(x.dtype)


def sequential(torch, x, layers):
    gains, gate_up, down = layers
    width = down[0].shape[0]
    for s, w, d in zip(gains, gate_up, down):
        u = _unit_rms(torch, x) * s.to(x.dtype)
        h = u @ w
        x = x + (torch.nn.functional.silu(h[..., :width]) * h[..., width:]) @ d
    return x


def fused(torch, x, weights):
    gate_up, down = weights
    width = down.shape[0]
    h = _unit_rms(torch, x) @ gate_up
    return x + (torch.nn.functional.silu(h[..., :width]) * h[..., width:]) @ down


def parallel_reference(torch, x, layers):
    """x + Σ_j FFN_j(n_j(x)): what the fused block must equal (in float32)."""
    gains, gate_up, down = layers
    width = down[0].shape[0]
    total = x.float()
    for s, w, d in zip(gains, gate_up, down):
        u = _unit_rms(torch, x.float()) * s
        h = u @ w.float()
        total = total + (torch.nn.functional.silu(h[..., :width]) * h[..., width:]) @ d.float()
    return total


class Timer:
    """Median milliseconds of ``fn``: CUDA graphs + events on a GPU, wall clock on the CPU."""

    def __init__(self, torch, device: str, iters: int, graphs: bool):
        self.torch, self.device, self.iters, self.graphs = torch, device, iters, graphs

    def __call__(self, fn, x) -> float:
        torch = self.torch
        if self.device != "cuda":
            fn(x)
            times = []
            for _ in range(self.iters):
                start = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[len(times) // 2]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x)  # warm-up (cuBLAS picks its kernels) before capture
        torch.cuda.current_stream().wait_stream(stream)
        if self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(x)
            run = graph.replay
        else:
            def run():
                fn(x)
        times = []
        for _ in range(self.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def copy_rate_gbs(torch, device: str, gib: float = 4.0) -> float:
    """Device memory bandwidth as a large device-to-device copy measures it (read + write), GB/s."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start_s = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start_s)
    return 2 * src.numel() * src.element_size() / sorted(times)[len(times) // 2] / 1e9


def run(shapes: dict, group_sizes, batches, prefill: int, *, device: str, dtype_name: str, iters: int,
        log=lambda message: print(message, file=sys.stderr, flush=True)) -> tuple[list[Row], dict]:
    import torch

    dtype = getattr(torch, dtype_name)
    timer = Timer(torch, device, iters, graphs=device == "cuda")
    rows, exactness = [], {}
    for name, (hidden, width) in shapes.items():
        for k in group_sizes:
            layers, weights = make_group(torch, hidden, width, k, dtype, device)
            weight_bytes = sum(t.numel() * t.element_size() for t in layers[1] + layers[2])
            x = torch.randn(4, hidden, device=device, dtype=torch.float32).to(dtype)
            reference = parallel_reference(torch, x, layers)
            exactness[f"{name} k={k}"] = float((fused(torch, x, weights).float() - reference).norm() / reference.norm())
            phases = [(f"decode B={b}", b, 1) for b in batches] + [(f"prefill S={prefill}", 1, prefill)]
            for phase, batch, seq in phases:
                x = torch.randn(batch * seq, hidden, device=device, dtype=torch.float32).to(dtype)
                with torch.inference_mode():
                    seq_ms = timer(lambda v, group=layers: sequential(torch, v, group), x)
                    fused_ms = timer(lambda v, block=weights: fused(torch, v, block), x)
                row = Row(name, k, phase, seq_ms, fused_ms, weight_bytes / 2**30)
                if batch == 1 and seq == 1:
                    row.sequential_gbs = weight_bytes / (seq_ms / 1e3) / 1e9
                    row.fused_gbs = weight_bytes / (fused_ms / 1e3) / 1e9
                rows.append(row)
                log(f"{name} k={k} {phase}: sequential {seq_ms:.3f} ms, fused {fused_ms:.3f} ms, "
                    f"x{row.speedup:.2f}")
            del layers, weights
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, exactness


def format_table(rows: list[Row], copy_gbs: float) -> str:
    lines = ["| model | k | phase | sequential ms | fused ms | fused speedup | sequential GB/s (% copy) "
             "| fused GB/s (% copy) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bandwidth = ("| |" if r.sequential_gbs is None else
                     f"| {r.sequential_gbs:.0f} ({r.sequential_gbs / copy_gbs:.0%}) | "
                     f"{r.fused_gbs:.0f} ({r.fused_gbs / copy_gbs:.0%}) |")
        lines.append(f"| {r.shape} | {r.k} | {r.phase} | {r.sequential_ms:.3f} | {r.fused_ms:.3f} | "
                     f"**{r.speedup:.2f}x** {bandwidth}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, float32 (a CI check)")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="model shape(s) (default: all)")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per case (median; default 50)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", metavar="FILE", help="also write rows, copy rate and exactness as JSON")
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        device, dtype, shapes, groups, batches, prefill, iters = "cpu", "float32", SMOKE_SHAPES, (2,), (1,), 16, 3
    else:
        if not torch.cuda.is_available():
            print("ffnfusion.benchmarks.gpu: error: no CUDA device (use --smoke for the CPU check)", file=sys.stderr)
            return 1
        device, dtype, groups, batches, prefill, iters = "cuda", args.dtype, GROUP_SIZES, DECODE_BATCHES, \
            PREFILL_TOKENS, args.iters
        shapes = {name: SHAPES[name] for name in (args.shape or SHAPES)}
    copy_gbs = copy_rate_gbs(torch, device, gib=0.01 if args.smoke else 4.0)
    rows, exactness = run(shapes, groups, batches, prefill, device=device, dtype_name=dtype, iters=iters)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{device_name}, {dtype}, torch {torch.__version__}; measured copy rate {copy_gbs:.0f} GB/s; "
          f"decode in CUDA graphs: {device == 'cuda'}")
    print(format_table(rows, copy_gbs))
    print("fused vs parallel form (float32 reference), relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in exactness.items()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": device_name, "dtype": dtype, "copy_gbs": copy_gbs, "exactness": exactness,
                       "rows": [dataclasses.asdict(r) | {"speedup": r.speedup} for r in rows]}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
