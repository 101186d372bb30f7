"""FFN Fusion's dependency analysis on real tokens: ``analyze(runner, windows) -> DependencyReport``.

For each block (unit) with input ``X`` and output ``f(X)``, contribution ``h(X) = f(X) − X``:

* per block (paper Fig. 6): ``cosdist(X, f(X))`` and ``‖h(X)‖/‖X‖``; for attention, importance
  ``1 − cos(X, X + attn(n(X)))`` (Attention Drop); all per token, averaged over tokens;
* dependency (paper Sec. 3): ``M[i, j] = cosdist(h_j(X), h̃_j^i(X))`` for i < j, where ``h̃_j^i`` is
  block j's contribution when block i is skipped (``x̃_{i+1} = x_i``, blocks i+1..j recomputed).

Cost: block-major (:class:`~ffnfusion.runtime.block_runner.BlockRunner`): the stream of all tokens
advances one block at a time, and each skipped block's stream (on the first ``dependency_tokens``
tokens) advances with it until it leaves the block's reach, so every block is loaded once, streamed
from disk for models larger than RAM. ``M`` is computed for every pair inside an attention-free run
and for ``j − i ≤ max_distance`` elsewhere; other entries are None.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import resource
import time

import numpy as np

from ffnfusion.core.errors import InvalidPlanError
from ffnfusion.core.files import write_json_atomically
from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed
from ffnfusion.runtime.device import Device, resolve_device
from ffnfusion.runtime.units import Unit

logger = logging.getLogger(__name__)

EPS = 1e-12


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine similarity over the last axis (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + EPS)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.linalg.norm(num.astype(np.float64), axis=-1) / (np.linalg.norm(den.astype(np.float64), axis=-1) + EPS)


@dataclasses.dataclass
class DependencyReport:
    """What the analysis measured; indices of ``per_block``/``dependency`` follow ``blocks``."""

    blocks: list[dict]  # {"index", "layer", "kind", "width"}
    per_block: list[dict]  # {"cosdist", "h_ratio", ["importance"], ["ffn_h_ratio"]}
    dependency: list[list[float | None]]
    runs: list[list[int]]  # attention-free runs as [first_layer, last_layer]
    cost: dict = dataclasses.field(default_factory=dict)
    plan: dict | None = None
    # windows of whole blocks ranked as the paper chose its full-block windows (planner.rank_block_windows)
    block_windows: list[dict] | None = None

    def unit_of_layer(self, layer: int) -> int:
        for block in self.blocks:
            if block["layer"] <= layer <= block.get("last_layer", block["layer"]):
                return block["index"]
        raise KeyError(f"layer {layer} is not in the report")

    def window_metrics(self, first_layer: int, last_layer: int) -> tuple[float, float]:
        """``(M_max, M_sum)`` over all pairs i < j of the units covering the layer range."""
        units = range(self.unit_of_layer(first_layer), self.unit_of_layer(last_layer) + 1)
        found = [self.dependency[i][j] for i in units for j in units if i < j]
        values = [v for v in found if v is not None]
        if len(values) != len(found):
            raise InvalidPlanError(f"M was not computed for every pair in layers {first_layer}-{last_layer}")
        return (max(values), sum(values)) if values else (0.0, 0.0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | pathlib.Path) -> None:
        write_json_atomically(pathlib.Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | pathlib.Path) -> DependencyReport:
        data = json.loads(pathlib.Path(path).read_text())
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data})


def pairs_to_compute(units: list[Unit], runs: list[tuple[int, int]], max_distance: int) -> dict[int, int]:
    """For each skipped unit i, the last unit j whose M[i, j] is computed."""
    run_of_unit = {}
    for first, last in runs:
        members = [u.index for u in units if u.kind == "ffn" and first <= u.layer <= last]
        for index in members:
            run_of_unit[index] = members[-1]
    last_index = len(units) - 1
    reach = {}
    for unit in units[:-1]:
        end = min(unit.index + max_distance, last_index)
        end = max(end, run_of_unit.get(unit.index, end))
        if end > unit.index:
            reach[unit.index] = end
    return reach


def _add_block_metrics(sums: dict[str, np.ndarray], unit: Unit, x: np.ndarray, out: np.ndarray,
                       inside: dict[str, np.ndarray]) -> None:
    """Add one block's per-token metrics (summed over tokens): cosine distance and relative size of
    its update, the importance of its attention, and its FFN's relative update."""
    j = unit.index
    sums["cosdist"][j] += (1 - cosine(x, out)).sum()
    sums["h_ratio"][j] += _ratio(out - x, x).sum()
    if unit.attention_output:
        sums["importance"][j] += (1 - cosine(x, inside.get(unit.attention_output, x))).sum()
    if unit.kind == "layer":
        y = inside.get(unit.ffn_input, x) if unit.ffn_input is not None else x
        sums["ffn_h_ratio"][j] += _ratio(out - y, y).sum()


def _block_means(sums: dict[str, np.ndarray], unit: Unit, tokens: int) -> dict[str, float]:
    entry = {"cosdist": sums["cosdist"][unit.index] / tokens, "h_ratio": sums["h_ratio"][unit.index] / tokens}
    if unit.attention_output:
        entry["importance"] = sums["importance"][unit.index] / tokens
    if unit.kind == "layer":
        entry["ffn_h_ratio"] = sums["ffn_h_ratio"][unit.index] / tokens
    return {k: float(v) for k, v in entry.items()}


def analyze(runner: BlockRunner, windows: np.ndarray, *, max_distance: int = 8,
            dependency_tokens: int = 2048, with_dependency: bool = True, progress=None) -> DependencyReport:
    """Per-block metrics on all ``windows`` [n, window] and M on the first ``dependency_tokens``.

    Block-major: the stream of every window advances one block at a time, and so does, for every
    skipped block i still in reach, the stream with block i skipped (on the dependency windows). Each
    block is loaded once (``runner`` streamed) or kept (in RAM); the arithmetic is the same.
    ``with_dependency=False`` measures only the per-block metrics (one pass).
    ``progress(done_blocks, total_blocks, tokens)``, if given, is called after each block.
    """
    clock = time.perf_counter()
    units = runner.units
    count = len(units)
    sums = {key: np.zeros(count) for key in ("cosdist", "h_ratio", "importance", "ffn_h_ratio")}
    dep_sum = np.zeros((count, count))
    runs = runner.block_map.runs
    reach = pairs_to_compute(units, runs, max_distance) if with_dependency else {}
    dep_windows = max(1, min(len(windows), -(-dependency_tokens // windows.shape[1]))) if reach else 0
    dep_ids = windows[:dep_windows]
    tokens, dep_tokens = int(windows.size), int(dep_ids.size)
    capture_seconds = matrix_seconds = 0.0
    evaluations = 0
    start = time.perf_counter()
    stream = runner.embed(windows)
    capture_seconds += time.perf_counter() - start
    chains: dict[int, np.ndarray] = {}  # skipped unit i -> the stream without it, advanced to here
    for unit in units:
        j = unit.index
        with runner.unit(j, extras=True) as apply:
            start = time.perf_counter()
            out, *extras = apply(stream, windows)
            capture_seconds += time.perf_counter() - start
            x = stream
            _add_block_metrics(sums, unit, x, out, dict(zip(runner.extras(j), extras)))
            start = time.perf_counter()
            h = out[:dep_windows] - x[:dep_windows]
            for i in list(chains):  # a chain is dropped once its reach ends, so every one reaches j
                skipped = chains[i]  # x̃ entering block j, with block i skipped
                recomputed = apply(skipped, dep_ids)[0]
                dep_sum[i, j] += (1 - cosine(h, recomputed - skipped)).sum()
                evaluations += 1
                if reach[i] == j:
                    del chains[i]
                else:
                    chains[i] = recomputed
            if j in reach:
                chains[j] = x[:dep_windows]  # x̃_{j+1} = x_j: block j contributes nothing
            matrix_seconds += time.perf_counter() - start
        stream = out
        if progress is not None:
            progress(j + 1, count, tokens)

    per_block = [_block_means(sums, unit, tokens) for unit in units]
    dependency: list[list[float | None]] = [[None] * count for _ in range(count)]
    for i, last in reach.items():
        for j in range(i + 1, last + 1):
            dependency[i][j] = float(dep_sum[i, j] / max(dep_tokens, 1))
    blocks = []
    for unit, layer in zip(units, runner.block_map.layers):
        entry = unit.to_dict()
        entry["width"] = layer.ffn.width if layer.ffn else 0
        entry["post_norm"] = bool(layer.ffn and layer.ffn.post_norm)  # fused in the grouped form, not refitted
        blocks.append(entry)
    cost = {
        "tokens": tokens, "dependency_tokens": dep_tokens if reach else 0, "unit_evaluations": evaluations,
        "seconds": round(time.perf_counter() - clock, 2),
        "capture_seconds": round(capture_seconds, 2), "matrix_seconds": round(matrix_seconds, 2),
        "session_seconds": round(runner.session_seconds, 2), "streamed": runner.streamed,
        # Wall time of the whole analysis over one pass (~ one full forward over all tokens), and
        # what the matrix costs per token it is computed on, in full forwards of that token.
        "full_forward_equivalents": round(1 + matrix_seconds / max(capture_seconds, 1e-9), 2),
        "matrix_forwards_per_token": round(
            (matrix_seconds / max(dep_tokens, 1)) / max(capture_seconds / max(tokens, 1), 1e-12), 2) if reach else 0,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    return DependencyReport(blocks, per_block, dependency, [list(r) for r in runs], cost)


def least_important_attention(model_path: str | pathlib.Path, windows: np.ndarray, count: int,
                              stream: bool | None = None, progress=None,
                              device: str | Device = "auto") -> list[int]:
    """The ``count`` attention branches with the lowest importance 1 − cos(X, X + attn(n(X)))."""
    runner = BlockRunner(model_path, streamed=choose_streamed(model_path, stream), device=resolve_device(device))
    report = analyze(runner, windows, with_dependency=False, progress=progress)
    scored = sorted((m["importance"], b["layer"]) for b, m in zip(report.blocks, report.per_block)
                    if "importance" in m)
    if count > len(scored):
        raise InvalidPlanError(f"--count {count}: the model has only {len(scored)} attention layers")
    chosen = sorted(layer for _, layer in scored[:count])
    logger.info("drop-attention: least important attention: " + ", ".join(
        f"{layer} ({score:.4f})" for score, layer in sorted(scored[:count], key=lambda item: item[1])))
    return chosen
