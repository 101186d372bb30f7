"""Depth-reduction searches on a :class:`~.evaluator.DepthEvaluator`.

``auto``: greedy over every move (remove attention j, FFN j or block j; fuse neighbouring
attention-free FFNs), keeping at each step the smallest increase of KL(original ‖ candidate) per step saved on the
selection tokens. *Lazy*: a move's score from an earlier step is a good guess of its score now, so
moves are scored best-guess first and the step stops once no stale guess beats the best fresh score
(at least ``MIN_FRESH`` fresh; moves next to the last change are always fresh). The first step has no
earlier scores: every legal move is scored on the first ``guess_tokens`` of each selection window and
those scores, scaled to full ones by the smallest ratio of full to screened score among the moves
scored in full so far (so that a guess errs low, and a move is scored rather than passed over), are
its guesses. The ``REFITTED`` best are then scored again with their refit, which is kept only where it
lowers the selection KL (tokens held out from its fit).

``greedy-plain``: the prototype this project was measured against — every move scored afresh each
step, no refit. The single-method baselines remove whole blocks, attention or FFN sublayers in order
of an importance ranking (``1 − cos(x_in, x_out)`` on the fitting tokens, ShortGPT's for blocks), and
``fusion`` is ffnfusion's original recipe: attention removed in a run of layers and their FFNs fused
(plus the refit), the run chosen by KL (screened, then the best few scored in full).
``block-parallel`` is the paper's full-block parallelisation: windows of 4 whole blocks run side by
side, chosen on the full-block dependency matrix (lowest ``M_max``, ties by ``M_sum``), a smaller
window for what a budget has left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.depth_plan import DepthPlan, Move
from ffnfusion.runtime.analysis.dependency import cosine
from ffnfusion.runtime.frontier.evaluator import DepthEvaluator

logger = logging.getLogger(__name__)

METHODS = ("auto", "greedy-plain", "fusion", "block-removal", "attention-removal", "ffn-removal", "block-parallel")
MIN_FRESH = 4  # lazy greedy: moves scored afresh per step at least
NEAR = 1  # ... and every move within this many layers of the last change
PROGRESS_INTERVAL_S = 60.0  # within a step, a line at most this often (an 8B model's first step: an hour)
REFITTED = 4  # auto: the best plain candidates of a step that are tried again with their refit
FUSION_SCREEN_TOKENS = 128  # the fusion baseline: every run scored on this many tokens of each selection window,
FUSION_CONTENDERS = 4  # ... the best this many on all tokens, which decide


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How much the greedy search spends per step. ``screen_tokens``: score candidates on the first
    that many tokens of each selection window (0: all), then the ``contenders`` best of them on all
    tokens, which decide the step. ``refitted``: the best plain candidates (on all tokens) tried again
    with their refit. ``lazy_fit``: bring the fitting streams up to date only where a refit reads
    them. ``reuse``: accept a candidate without running it again, and reuse a refit while nothing
    before its cut has changed (both exact). ``guess_tokens``: the first step's lazy queue is ordered
    and cut by scores on the first that many tokens of each selection window (0: every legal move
    scored in full). ``parallel_window``: also search windows of 2..that many whole blocks run side by side (0:
    no such move)."""

    screen_tokens: int = 0
    contenders: int = 2
    refitted: int = REFITTED
    lazy_fit: bool = True
    reuse: bool = True
    guess_tokens: int = 0
    parallel_window: int = 0  # the largest window of whole blocks a "parallel" move runs side by side (0: none)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DEFAULT_SEARCH = SearchOptions()
# The search as it was measured before its cost was cut (issue 26): the frontier_cost benchmark's baseline.
UNSCREENED = SearchOptions(screen_tokens=0, refitted=REFITTED, lazy_fit=False, reuse=False)

Progress = Callable[[str], None]


@dataclasses.dataclass
class FrontierPoint:
    method: str
    steps_saved: int
    moves: list[dict]
    kl: float
    plan: DepthPlan
    deltas: dict[int, np.ndarray] = dataclasses.field(repr=False, default_factory=dict)
    ppl: float | None = None
    latency: dict | None = None
    model: str | None = None
    healed: dict | None = None  # frontier --heal: the healed model, its perplexity and held-out KL

    def to_dict(self) -> dict:
        entry = {"steps": self.steps_saved, "sequential_steps": self.plan.steps, "moves": self.moves,
                 "kl": round(self.kl, 5), "ppl": None if self.ppl is None else round(self.ppl, 3),
                 "plan": self.plan.to_dict(), "refitted_ffns": sorted(self.deltas)}
        if self.latency is not None:
            entry["latency"] = self.latency
        if self.model is not None:
            entry["model"] = self.model
        if self.healed is not None:
            entry["healed"] = self.healed
        return entry


def greedy(evaluator: DepthEvaluator, budgets: Sequence[int], *, refit: bool, lazy: bool, method: str,
           progress: Progress | None = None, options: SearchOptions = DEFAULT_SEARCH) -> list[FrontierPoint]:
    """The greedy path from the original model to ``max(budgets)`` steps saved; a point at each budget."""
    evaluator.reset()
    window = evaluator.state.select.windows.shape[1]
    screen = options.screen_tokens if 0 < options.screen_tokens < window else 0
    guess = options.guess_tokens if 0 < options.guess_tokens < window and not screen else 0
    budgets = sorted(set(budgets))
    stale: dict[Move, float] = {}
    path: list[dict] = []
    points = []
    clock = time.perf_counter()
    while evaluator.state.plan.saved < budgets[-1]:
        state = evaluator.state
        saved = state.plan.saved
        budget = min(b for b in budgets if b > saved)
        moves = [m for m in state.plan.legal_moves(options.parallel_window) if saved + m.saved <= budget]
        if not moves:
            break
        # Plain scores first (lazily: stale guesses in order), on the screen tokens when screening.
        guesses = FirstGuesses.of(evaluator, moves, guess) if lazy and guess and not stale else FirstGuesses()
        scored: list = []
        best_score, fresh = math.inf, 0
        current = evaluator.current_kl(screen)
        told = time.perf_counter()
        for move in sorted(moves, key=lambda m: stale.get(m, guesses.screened.get(m, -math.inf))):
            if lazy and fresh >= MIN_FRESH and stale.get(move, guesses.guess(move)) >= best_score:
                break
            candidate = evaluator.candidate(move, refit=False, screen=screen, keep_streams=True)
            stale[move] = score = candidate.score(current)
            guesses.observe(move, score)
            if score < best_score:  # only the leader can be taken as it is: only its streams are kept
                for _, other in scored:
                    other.streams = None
                best_score = score
            else:
                candidate.streams = None
            scored.append((score, candidate))
            fresh += 1
            if progress and time.perf_counter() - told >= PROGRESS_INTERVAL_S:
                told = time.perf_counter()
                leader = min(scored, key=lambda pair: pair[0])[1]
                progress(f"{method}: step {len(path) + 1}: scored {fresh} of at most {len(moves)} moves, best so "
                         f"far {leader.move} (KL {leader.kl:.4f}), {told - clock:.0f} s")
        scored.sort(key=lambda pair: pair[0])
        stale.update({move: guesses.guess(move) for move in guesses.screened if move not in stale})
        if screen:  # the race: the best few screened moves scored in full; the step is decided on those
            full = [evaluator.candidate(c.move, refit=False, keep_streams=True) for _, c in scored[:options.contenders]]
            contenders = sorted(((c.score(state.kl), c) for c in full), key=lambda pair: pair[0])
            for _, other in contenders[1:]:
                other.streams = None
        else:
            contenders = scored
        best = contenders[0][1]
        if refit:
            # A refit is kept only where it lowers the selection KL (tokens it was not fitted on).
            for _, plain in contenders[:options.refitted]:
                refitted = evaluator.candidate(plain.move, refit=True, keep_streams=True)
                if refitted.refit is not None and refitted.score(state.kl) < best.score(state.kl):
                    best.streams, best = None, refitted
                else:
                    refitted.streams = None
                del refitted  # its Δ (a fused 8B span's: 0.5 GB) is not kept alive through the next refit
        evaluator.accept(best)
        kl = evaluator.state.kl  # in full, also when the candidates were screened
        path.append({**best.move.to_dict(), "kl": round(kl, 5),
                     "refit": best.refit.to_dict() if best.refit else None})
        for move in [m for m in stale if _distance(m, best.move) <= NEAR]:
            del stale[move]
        done = evaluator.state.plan.saved
        if progress:
            progress(f"{method}: {best.move}{' + refit' if best.refit else ''} -> {done} steps saved, "
                     f"KL {kl:.4f} ({fresh} of {len(moves)} moves scored, {time.perf_counter() - clock:.0f} s)")
        if done in budgets:
            points.append(FrontierPoint(method, done, list(path), kl, evaluator.state.plan,
                                        dict(evaluator.state.deltas)))
    return points


@dataclasses.dataclass
class FirstGuesses:
    """The first step's guesses: every legal move's score on the first tokens of each selection window,
    scaled to a full score by the smallest full/screened ratio seen so far (a guess errs low)."""

    screened: dict[Move, float] = dataclasses.field(default_factory=dict)
    ratio: float | None = None

    @classmethod
    def of(cls, evaluator: DepthEvaluator, moves: Sequence[Move], tokens: int) -> FirstGuesses:
        current = evaluator.current_kl(tokens)
        return cls({move: evaluator.candidate(move, refit=False, screen=tokens).score(current) for move in moves})

    def observe(self, move: Move, score: float) -> None:
        screened = self.screened.get(move, 0.0)
        if screened > 0 and score > 0:
            self.ratio = score / screened if self.ratio is None else min(self.ratio, score / screened)

    def guess(self, move: Move) -> float:
        if move not in self.screened or self.ratio is None:
            return -math.inf
        return self.screened[move] * self.ratio


def _distance(a: Move, b: Move) -> int:
    return min(abs(x - y) for x in a.layers for y in b.layers)


def importances(evaluator: DepthEvaluator) -> dict[str, np.ndarray]:
    """``1 − mean cos(x_in, x_out)`` per layer on the fitting tokens, for blocks, attention and FFNs."""
    at = evaluator.original

    def one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(1 - cosine(a, b).mean())

    layers = range(evaluator.num_layers)
    return {"block": np.array([one_minus_cos(at[2 * j], at[2 * j + 2]) for j in layers]),
            "attention": np.array([one_minus_cos(at[2 * j], at[2 * j + 1]) for j in layers]),
            "ffn": np.array([one_minus_cos(at[2 * j + 1], at[2 * j + 2]) for j in layers])}


def ranked_removal(evaluator: DepthEvaluator, budgets: Sequence[int], kind: str,
                   progress: Progress | None = None) -> list[FrontierPoint]:
    """Remove ``kind`` ("block", "attention", "ffn") sublayers in order of least importance."""
    ranking = np.argsort(importances(evaluator)[kind], kind="stable")
    method = f"{kind}-removal"
    points = []
    for budget in sorted(set(budgets)):
        plan, moves = evaluator.plan0, []
        for layer in ranking:
            move = Move(kind, (int(layer),))
            if plan.saved + move.saved > budget:
                break
            if move in plan.legal_moves():
                plan = plan.apply(move)
                moves.append(move.to_dict())
        kl = evaluator.score_plan(plan, {})
        points.append(FrontierPoint(method, plan.saved, moves, kl, plan))
        if progress:
            progress(f"{method}: {plan.saved} steps saved, KL {kl:.4f}")
    return points


def fusion_runs(evaluator: DepthEvaluator, budgets: Sequence[int], *, refit: bool = True,
                progress: Progress | None = None, screen_tokens: int = FUSION_SCREEN_TOKENS,
                contenders: int = FUSION_CONTENDERS) -> list[FrontierPoint]:
    """Attention removed in layers ``a+1..a+k`` and FFNs ``a..a+k`` fused (2k steps; one more attention
    removed, layer ``a+k+1``, for an odd budget), ``a`` chosen by KL; then the fused group's refit.
    Every run is scored on the first ``screen_tokens`` of each selection window, the ``contenders``
    best of them on all tokens, which decide (``screen_tokens=0``: every run on all tokens)."""
    window = evaluator.state.select.windows.shape[1]
    screen = screen_tokens if 0 < screen_tokens < window else 0
    points = []
    for budget in sorted(set(budgets)):
        k = budget // 2
        runs = []
        for first in range(0, evaluator.num_layers - k - budget % 2):
            moves = [Move("attention", (layer,)) for layer in range(first + 1, first + k + 1 + budget % 2)]
            moves.append(Move("fuse", tuple(range(first, first + k + 1))))
            plan = evaluator.plan0
            for move in moves:
                plan = plan.apply(move)
            runs.append((evaluator.score_plan(plan, {}, screen), first, moves, plan))
        if not runs:
            raise InvalidArgumentError(f"fusion baseline: no run of {k + 1} FFNs fits {evaluator.num_layers} layers "
                                       f"for a budget of {budget} steps")
        if screen:
            runs = [(evaluator.score_plan(plan, {}), first, moves, plan)
                    for _, first, moves, plan in sorted(runs, key=lambda run: run[0])[:contenders]]
        kl, _, moves, _ = min(runs, key=lambda run: (run[0], run[1]))
        evaluator.reset()
        for move in moves[:-1]:
            evaluator.accept(evaluator.candidate(move, refit=False))
        last = evaluator.candidate(moves[-1], refit=False)
        if refit:
            refitted = evaluator.candidate(moves[-1], refit=True)
            last = refitted if refitted.kl < last.kl else last
        evaluator.accept(last)
        described = [m.to_dict() for m in moves]
        if last.refit:
            described[-1]["refit"] = last.refit.to_dict()
        state = evaluator.state
        points.append(FrontierPoint("fusion", state.plan.saved, described, state.kl, state.plan, dict(state.deltas)))
        if progress:
            progress(f"fusion: {moves[-1]} with attention removed in {moves[0].layers[0]}-{moves[-2].layers[0]} -> "
                     f"{state.plan.saved} steps saved, KL {state.kl:.4f}")
    return points


BLOCK_WINDOW = 4  # the paper's full-block windows
DEPENDENCY_TOKENS = 1024  # block-parallel: the fitting tokens its dependency matrix is measured on


def block_parallel(evaluator: DepthEvaluator, budgets: Sequence[int],
                   progress: Progress | None = None) -> list[FrontierPoint]:
    """Windows of whole blocks side by side, as the paper chose them (see the module docstring): the
    best windows of ``BLOCK_WINDOW`` blocks while they fit the budget, then the best window of the
    size that fills what is left (windows save 2k − 2 steps: an odd remainder stays unsaved)."""
    from ffnfusion.runtime.analysis import analyze, rank_block_windows

    fit = evaluator.state.fit.windows
    windows = fit[:max(1, DEPENDENCY_TOKENS // fit.shape[1])]
    report = analyze(evaluator.runner, windows, max_distance=BLOCK_WINDOW - 1, dependency_tokens=windows.size)
    ranked = {size: rank_block_windows(report, size) for size in range(2, BLOCK_WINDOW + 1)}
    points = []
    for budget in sorted(set(budgets)):
        plan, moves = evaluator.plan0, []
        for size in range(BLOCK_WINDOW, 1, -1):
            for window in ranked[size]:
                move = Move("parallel", tuple(range(window["layers"][0], window["layers"][1] + 1)))
                if plan.saved + move.saved <= budget and all(plan.whole(layer) for layer in move.layers):
                    plan = plan.apply(move)
                    moves.append({**move.to_dict(), "m_max": round(window["m_max"], 4)})
        kl = evaluator.score_plan(plan, {})
        points.append(FrontierPoint("block-parallel", plan.saved, moves, kl, plan))
        if progress:
            progress(f"block-parallel: windows {', '.join(str(m['layers']) for m in moves)} -> {plan.saved} steps "
                     f"saved, KL {kl:.4f}")
    return points
