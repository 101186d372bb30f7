"""``run_frontier``: how much depth a model can lose, at what quality, and how.

For each requested number of sequential steps saved, the chosen method's model (a runnable directory),
its KL on the selection tokens, its perplexity on a held-out text, its ONNX Runtime latency against the
original, and the single-method baselines at the same budgets, side by side. The search and the
baselines run on one :class:`~.evaluator.DepthEvaluator`; each written model is the plan applied to
the original file by :class:`~ffnfusion.passes.depth_plan.DepthReductionPass`, and its perplexity is
measured again on the written file (the search's numpy FFNs and ONNX Runtime agree to ~1e-6).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.core.model_io import model_file
from ffnfusion.passes.block_map import BlockMap
from ffnfusion.passes.depth_plan import DepthPlan
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed
from ffnfusion.runtime.device import Device, resolve_device
from ffnfusion.runtime.frontier import search
from ffnfusion.runtime.frontier.evaluator import DepthEvaluator
from ffnfusion.runtime.frontier.moves import change_position
from ffnfusion.runtime.frontier.search import FrontierPoint
from ffnfusion.runtime.numerics import windowed_perplexity

logger = logging.getLogger(__name__)

BASELINES = ("block-removal", "attention-removal", "ffn-removal", "fusion", "block-parallel")
# The lazy search after its first step (which scores every legal move once: its queue starts empty),
# measured: SmolLM2 at 8/14/20 steps, 4,096 + 512 tokens, cost 207.0 full-forward equivalents of a
# 1,820 bound, 46.0 of them the first step's scores; the rest took 9.1% of the bound's rest. (Before
# accepted moves and refits were reused, 219.1 and 9.8%; predicted at 10%, measured: Qwen2.5-Coder-0.5B
# at 8/14/20, 197 and 213.7; the streamed llama-8b preset at 2 steps, 56.9 and 50.7; with reuse, the preset
# attention-free in 12-27 at 18 steps, two moves: 49.6 and 46.2.)
TYPICAL_SHARE_AFTER_FIRST_STEP = 0.09


@dataclasses.dataclass
class FrontierResult:
    method: str
    original_steps: int
    original_ppl: float
    points: list[FrontierPoint]
    baselines: dict[str, list[FrontierPoint]]
    tokens: dict[str, int]
    seconds: dict[str, float]
    full_forward_equivalents: float  # the search's sublayer forwards, in full forwards of its tokens
    cost_by_work: dict[str, float] = dataclasses.field(default_factory=dict)  # ... split by what they were for
    search_options: dict = dataclasses.field(default_factory=dict)
    device: str = "cpu"  # where torch computed the search's FFNs (its ONNX Runtime pieces: see the log)

    def to_dict(self) -> dict:
        return {"original_steps": self.original_steps, "original_ppl": round(self.original_ppl, 3),
                "method": self.method, "tokens": self.tokens, "seconds": self.seconds, "device": self.device,
                "search_full_forward_equivalents": round(self.full_forward_equivalents, 1),
                "search_cost_by_work": {k: round(v, 1) for k, v in self.cost_by_work.items()},
                "search_options": self.search_options,
                "points": [p.to_dict() for p in self.points],
                "baselines": {name.replace("-", "_"): [p.to_dict() for p in points]
                              for name, points in self.baselines.items()}}


def search_cost_bound(plan: DepthPlan, steps: Sequence[int], fit_tokens: int, select_tokens: int,
                      refit: bool = True, parallel_window: int = 0) -> float:
    """At most the greedy search's work, in full forwards of the selection tokens (the unit of
    ``search_full_forward_equivalents``): one step saved per move from the steps ``plan`` already
    saves (attention removed before the search), every legal move of the start scored at every step
    (later plans have fewer: a move takes its own away; the lazy queue scores fewer still), the
    ``REFITTED`` best refitted and the chosen one advanced on the fitting and selection tokens from
    the furthest-back change."""
    positions = 2 * plan.num_layers
    rests = _rests(plan, parallel_window)
    if not rests:
        return 0.0
    both = fit_tokens + select_tokens
    per_step = sum(rests) * select_tokens + ((search.REFITTED if refit else 0) + 1) * max(rests) * both
    return (max(steps) - plan.saved) * per_step / (positions * select_tokens)


def first_step_cost(plan: DepthPlan, parallel_window: int = 0) -> float:
    """The first step's plain scores, in full forwards of the selection tokens: every legal move once,
    from the position it changes to the end."""
    return sum(_rests(plan, parallel_window)) / (2 * plan.num_layers)


def _rests(plan: DepthPlan, parallel_window: int) -> list[int]:
    """Sublayer positions each legal move of ``plan`` runs, from its change to the end."""
    return [2 * plan.num_layers - change_position(move) for move in plan.legal_moves(parallel_window)]


def estimate_frontier(model_path: str | os.PathLike, *, fit: np.ndarray, select: np.ndarray,
                      steps: Sequence[int], method: str = "auto", threads: int | None = None,
                      stream: bool | None = None,
                      search_options: search.SearchOptions = search.DEFAULT_SEARCH,
                      device: str | Device = "auto") -> dict:
    """What a frontier run will cost, before it runs: the bound of :func:`search_cost_bound` and the
    seconds it stands for at the rate of one timed forward of the selection tokens (nothing is
    written)."""
    steps = sorted(set(int(s) for s in steps))
    path = model_file(model_path)
    runner = BlockRunner(path, streamed=choose_streamed(path, stream), threads=threads,
                         device=resolve_device(device))
    check_steps(runner.block_map, steps)
    runner.final_stream(select[:1])  # sessions built, caches warm: the timed pass is the forward alone
    clock = time.perf_counter()
    runner.final_stream(select)
    return _estimate(DepthPlan.of(runner.block_map), steps, method, select, fit.size,
                     time.perf_counter() - clock, search_options)


def _estimate(plan: DepthPlan, steps: Sequence[int], method: str, select: np.ndarray, fit_tokens: int,
              forward_seconds: float, options: search.SearchOptions) -> dict:
    bound = search_cost_bound(plan, steps, fit_tokens, select.size, refit=method == "auto",
                              parallel_window=options.parallel_window)
    window = select.shape[1]
    first_tokens = options.screen_tokens or options.guess_tokens  # the first step's moves all run on these
    screened = min(first_tokens, window) / window if method == "auto" and first_tokens else 1.0
    first = min(bound, screened * first_step_cost(plan, options.parallel_window))
    typical = bound if method == "greedy-plain" else first + TYPICAL_SHARE_AFTER_FIRST_STEP * (bound - first)
    return {"search_full_forward_equivalents_at_most": round(bound, 1),
            "search_full_forward_equivalents_typical": round(typical, 1),
            "search_seconds_at_most": round(bound * forward_seconds, 1),
            "search_seconds_typical": round(typical * forward_seconds, 1),
            "forward_seconds": round(forward_seconds, 3)}


def describe_estimate(method: str, estimate: dict) -> str:
    return (f"frontier: search {method}: at most {estimate['search_full_forward_equivalents_at_most']:.0f} full-forward "
            f"equivalents of the selection tokens, {estimate['search_seconds_at_most'] / 60:.1f} min at "
            f"{estimate['forward_seconds']:.2f} s a forward (every move scored at every step); typically "
            f"about {estimate['search_full_forward_equivalents_typical']:.0f} of them, "
            f"{estimate['search_seconds_typical'] / 60:.1f} min (the first step scores every move once, the lazy steps after it cost "
            f"{TYPICAL_SHARE_AFTER_FIRST_STEP:.0%} of the rest of the bound on SmolLM2); baselines and perplexities "
            "come on top")


def run_frontier(model_path: str | os.PathLike, *, fit: np.ndarray, select: np.ndarray, evaluation: np.ndarray,
                 steps: Sequence[int], method: str = "auto", baselines: Sequence[str] = BASELINES,
                 threads: int | None = None, stream: bool | None = None,
                 search_options: search.SearchOptions = search.DEFAULT_SEARCH,
                 device: str | Device = "auto") -> FrontierResult:
    """Search ``method``'s frontier at ``steps`` saved and score it with ``baselines``.

    ``fit``: windows the refits fit on; ``select``: windows of *another* text that score candidates;
    ``evaluation``: held-out windows for perplexity, used for nothing else."""
    if method not in search.METHODS:
        raise InvalidArgumentError(f"--method must be one of {', '.join(search.METHODS)}, not {method!r}")
    unknown = sorted(set(baselines) - set(search.METHODS) - {"greedy-plain"})
    if unknown:
        raise InvalidArgumentError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(search.METHODS[1:])}")
    steps = sorted(set(int(s) for s in steps))
    path = model_file(model_path)
    runner = BlockRunner(path, streamed=choose_streamed(path, stream), threads=threads,
                         device=resolve_device(device))
    check_steps(runner.block_map, steps)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    evaluator = DepthEvaluator(runner, fit, select, lazy_fit=search_options.lazy_fit,
                               reuse=search_options.reuse)
    seconds["capture"] = round(time.perf_counter() - clock, 1)
    plan0 = evaluator.plan0
    counted = f"{plan0.steps} sequential steps" + (f" ({plan0.original_steps} with attention in every layer)"
                                                   if plan0.saved else "")
    logger.info(f"frontier: {path}, {counted}; fit {fit.size} tokens, "
                f"selection {select.size}, held-out perplexity {evaluation.size} ({seconds['capture']} s to capture)")
    # The capture is one forward of the fitting and selection tokens: the rate of the estimate.
    forward_seconds = seconds["capture"] * select.size / max(1, fit.size + select.size)
    logger.info(describe_estimate(method, _estimate(evaluator.plan0, steps, method, select, fit.size,
                                                    forward_seconds, search_options)))
    forwards = 0.0
    by_work: dict[str, float] = {}

    def points_of(name: str) -> list[FrontierPoint]:
        clock = time.perf_counter()
        start_positions, start_by_work = evaluator.token_positions, dict(evaluator.cost_by_work)
        if name in ("auto", "greedy-plain"):
            found = search.greedy(evaluator, steps, refit=name == "auto", lazy=name == "auto", method=name,
                                  progress=logger.info, options=search_options)
        elif name == "fusion":
            found = search.fusion_runs(evaluator, steps, progress=logger.info)
        elif name == "block-parallel":
            found = search.block_parallel(evaluator, steps, progress=logger.info)
        else:
            found = search.ranked_removal(evaluator, steps, name.removesuffix("-removal"), progress=logger.info)
        seconds[name] = round(time.perf_counter() - clock, 1)
        if name == method:
            nonlocal forwards
            unit = evaluator.positions * select.size
            forwards = (evaluator.token_positions - start_positions) / unit
            by_work.update({work: (count - start_by_work.get(work, 0)) / unit
                            for work, count in evaluator.cost_by_work.items() if count > start_by_work.get(work, 0)})
        return found

    points = points_of(method)
    others = {name: points_of(name) for name in baselines if name != method}
    clock = time.perf_counter()
    original_ppl = evaluator.perplexity(evaluator.plan0, {}, evaluation)
    for point in [*points, *(p for found in others.values() for p in found)]:
        point.ppl = evaluator.perplexity(point.plan, point.deltas, evaluation)
        logger.info(f"{point.method}: {point.steps_saved} steps saved: KL {point.kl:.4f}, held-out perplexity "
                    f"{point.ppl:.2f} (original {original_ppl:.2f})")
    seconds["perplexity"] = round(time.perf_counter() - clock, 1)
    missing = sorted(set(steps) - {p.steps_saved for p in points})
    if missing:
        logger.warning(f"frontier: {method} found no point at {missing} steps saved")
    tokens = {"fit": int(fit.size), "select": int(select.size), "evaluation": int(evaluation.size)}
    logger.info(f"frontier: search {method}: {forwards:.1f} full-forward equivalents (" +
                ", ".join(f"{work} {value:.1f}" for work, value in sorted(by_work.items(), key=lambda kv: -kv[1])) + ")")
    return FrontierResult(method, evaluator.plan0.original_steps, original_ppl, points, others, tokens, seconds,
                          forwards, by_work, search_options.to_dict(), runner.device.name)


def check_steps(block_map: BlockMap, steps: Sequence[int]) -> None:
    """Budgets count steps saved against the same model with attention and an FFN in every layer
    (``2L`` sequential steps), so a model whose attention is already removed somewhere starts with
    those saved: refuse, before any work, a budget it is already past (the search would find no
    point there)."""
    num_layers = block_map.num_layers
    already = sum(not layer.attention for layer in block_map.layers)
    if min(steps) > already and max(steps) < 2 * num_layers:
        return
    got = ",".join(map(str, steps))
    if not already:
        raise InvalidArgumentError(f"--steps must be between 1 and {2 * num_layers - 1} for {num_layers} layers, "
                                   f"got {got}")
    dropped = format_ranges([layer.index for layer in block_map.layers if not layer.attention])
    raise InvalidArgumentError(f"--steps counts the steps saved against this model with attention in every layer "
                               f"({2 * num_layers} sequential steps); its attention is already removed in {dropped}, "
                               f"{already} steps saved: ask for budgets between {already + 1} and {2 * num_layers - 1}, "
                               f"not {got}")


def write_point_model(model_path: str | os.PathLike, point: FrontierPoint, out_dir: pathlib.Path, *,
                      target: str = "auto", validate: bool = True) -> pathlib.Path:
    """The point's plan applied to the original model, written to ``out_dir/model.onnx`` with the
    tokenizer, config and an ``ffnfusion.json`` that records the moves and refits."""
    from ffnfusion.passes.depth_plan import DepthReductionPass
    from ffnfusion.runtime.model_rewrite import resolve_target, rewrite_model_file

    layout, _ = resolve_target(target)
    reduction = DepthReductionPass(point.plan, point.deltas, target=layout)

    def record(metadata: dict) -> None:
        metadata["depth_reduction"] = {"method": point.method, "steps_saved": point.steps_saved,
                                       "moves": point.moves, "plan": point.plan.to_dict(),
                                       "refitted_ffns": sorted(point.deltas)}

    summary = rewrite_model_file(model_path, out_dir, reduction, f"{point.method}: {point.steps_saved} steps saved",
                                 record, validate)
    return pathlib.Path(summary["output"])


def file_perplexity(model_path: str | os.PathLike, windows: np.ndarray, *, threads: int | None = None,
                    stream: bool | None = None) -> float:
    """Perplexity of a model file on ``windows``, block by block through ONNX Runtime."""
    path = model_file(model_path)
    runner = BlockRunner(path, streamed=choose_streamed(path, stream), threads=threads)
    final = runner.final_stream(windows)
    with runner.head() as head:
        return windowed_perplexity(final, windows, head)
