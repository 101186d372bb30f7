"""Run a decoder under any :class:`~ffnfusion.passes.depth_plan.DepthPlan`, incrementally.

The search needs thousands of "what if" forwards. They are cheap here because

* the model runs sublayer by sublayer: attention branches as ONNX Runtime pieces cut from the model
  (:meth:`BlockRunner.attention`), FFNs from their weights (:mod:`.ffns`: torch on a GPU, numpy on
  the CPU), so removing, fusing (the members' updates at one input, exact) or refitting a down
  projection needs no new graph;
* the streams of the current plan at every sublayer position are kept, for the fitting and the
  selection tokens: a candidate runs from the first position it changes, never from the embedding;
* the original model's next-token distributions on the selection tokens are kept: a candidate's score
  is its final stream through the head, and one KL;
* the fitting tokens' streams (eight times the selection's tokens) are brought up to date lazily:
  accepting a move only marks those after its first change stale, and a refit runs the plan forward
  only as far as the stream it reads — most accepted steps never pay for the rest of the model.

A *refit* (ReplaceMe's idea, arXiv 2505.02819, merged into existing weights): after a move, the down
projection of the last FFN before the cut gets ``W += Δ`` so that the stream after the cut matches the
*original* model's on the fitting tokens; ``Δ`` is a ridge least-squares solution whose strength is
chosen on held-out fitting windows (no repair when none helps; the solves: :mod:`.refits`). No step is
added.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging

import numpy as np

from ffnfusion.core.errors import InvalidArgumentError
from ffnfusion.passes.block_map import BlockMap, FFNBlock
from ffnfusion.passes.depth_plan import DepthPlan, Move
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.runtime.block_runner import BlockRunner
from ffnfusion.runtime.ffn_reference import post_norm_members
from ffnfusion.runtime.frontier import refits
from ffnfusion.runtime.frontier.ffns import DeviceFFNs, NumpyFFNs
from ffnfusion.runtime.frontier.moves import change_position, cut_position, first_difference, remap_deltas
from ffnfusion.runtime.numerics import CachedReference, windowed_perplexity

logger = logging.getLogger(__name__)

HEAD_ROWS = 1024  # rows of logits at a time
REFIT_CACHE_BYTES = 256 << 20  # refits kept for reuse, at most (one Δ of an 8B model: 235 MB)
HELD_OUT_CACHE_BYTES = 256 << 20  # the original's held-out streams kept for perplexities, at most


class KeptPositions(dict):
    """A capture (see :meth:`DepthEvaluator.run`) that keeps only the given positions' streams."""

    def __init__(self, positions):
        super().__init__()
        self.positions = frozenset(positions)

    def __setitem__(self, position: int, stream: np.ndarray) -> None:
        if position in self.positions:
            super().__setitem__(position, stream)


@dataclasses.dataclass
class Streams:
    """Stream at the input of every sublayer position ``0..2L`` (``2L``: the final stream) for one
    set of token windows under one plan. Positions a plan skips share the array before them. Only
    positions up to ``current`` are up to date with the plan (None: all of them)."""

    windows: np.ndarray
    at: list[np.ndarray]
    current: int | None = None


@dataclasses.dataclass(frozen=True)
class Refit:
    layer: int  # the FFN whose down projection moved (a member of ``span``)
    span: tuple[int, int]
    lam: float
    held_out_residual: float  # ‖AΔ − R‖ / ‖R‖ on the held-out fitting windows (1: no better than Δ = 0)

    def to_dict(self) -> dict:
        return {"ffn": self.layer, "lambda": self.lam, "held_out_residual": round(self.held_out_residual, 4)}


@dataclasses.dataclass
class State:
    plan: DepthPlan
    deltas: dict[int, np.ndarray]  # first layer of an FFN span -> ΔW_down [span width, hidden]
    fit: Streams
    select: Streams
    kl: float


@dataclasses.dataclass
class Candidate:
    move: Move
    plan: DepthPlan
    deltas: dict[int, np.ndarray]
    start: int  # first position that differs from the current state
    kl: float
    refit: Refit | None
    screen: int = 0  # scored on the first ``screen`` selection tokens of each window (0: all)
    # The selection streams it ran (positions ``start..2L``, earlier ones the state's), kept when asked
    # so that accepting it runs nothing; the search drops them once it cannot be chosen.
    streams: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def score(self, current_kl: float) -> float:
        return (self.kl - current_kl) / self.move.saved


def check_searchable(block_map: BlockMap) -> None:
    """The depth search runs FFNs from their weights, refits ``W_down`` and assumes sequential layers:
    refuse, before any text is read, a model where those do not hold."""
    for layer in block_map.layers:
        if layer.of_unknown_kind and layer.window is None:
            block_map.ffn(layer.index)  # refuses it as such (UnknownLayerError), before any budget is read
    DepthPlan.of(block_map)  # every layer with its own FFN, nothing fused
    unsupported = [layer.index for layer in block_map.layers if layer.ffn and layer.ffn.post_norm
                   and (layer.ffn.post_norm.centered or post_norm_members(layer.ffn) > 1)]
    if unsupported:  # the search fuses post-normed FFNs itself, and refits them as RMSNorms
        raise InvalidArgumentError(f"frontier: the FFNs of layers {format_ranges(unsupported)} have a LayerNorm "
                                   "or an already fused group of post-norms; the depth search handles single "
                                   "post-RMSNormed FFNs (Gemma 2/3) only")
    parallel = [layer.index for layer in block_map.layers if layer.parallel]
    if parallel:  # the sublayer runs assume attention, then the FFN on the stream after it
        raise InvalidArgumentError(f"frontier: layers {parallel} are parallel-residual (attention and FFN read "
                                   "the same input); the depth search handles sequential layers only")


class DepthEvaluator:
    """Incremental forwards and scores for depth plans of one model (see the module docstring).

    ``fit``: windows the refits fit on (a quarter of them held out to choose λ); ``select``: windows
    of another text whose KL(original ‖ candidate) scores candidates."""

    def __init__(self, runner: BlockRunner, fit: np.ndarray, select: np.ndarray, lazy_fit: bool = True,
                 reuse: bool = True):
        check_searchable(runner.block_map)
        self.runner = runner
        self.lazy_fit = lazy_fit  # False: every accepted move brings the fitting streams up to date (the old way)
        self.reuse = reuse  # False: no kept streams, no refit found again (the old way, for the cost benchmark)
        self.plan0 = DepthPlan.of(runner.block_map)
        self.num_layers = self.plan0.num_layers
        self.blocks: dict[int, FFNBlock] = {layer.index: layer.ffn for layer in runner.block_map.layers
                                            if layer.ffn is not None}
        self.unit_of = {unit.layer: unit.index for unit in runner.units}
        self.hidden = next(iter(self.blocks.values())).hidden
        device = runner.device
        self.ffns = DeviceFFNs(self.blocks, device.torch, keep=not runner.streamed) if device.torch_ffns \
            else NumpyFFNs(self.blocks, keep=not runner.streamed)
        self.token_positions = 0  # tokens × sublayer positions run: the search's cost
        self.cost_by_work: collections.Counter[str] = collections.Counter()  # ... split by what it was for
        self._work = "capture"
        original_fit = self.capture(self.plan0, {}, fit)
        original_select = self.capture(self.plan0, {}, select)
        self.original = original_fit.at
        self.reference = CachedReference(self._logits(original_select.at[-1]))
        self._screen_references: dict[int, CachedReference] = {}
        self._initial = State(self.plan0, {}, original_fit, original_select, 0.0)
        self.state = self._initial
        # move -> (refit, the FFN span's first layer, its total Δ, first position changed): valid while
        # nothing before the move's cut changes, the only positions a refit reads
        self._refits: dict[Move, tuple[Refit | None, int, np.ndarray | None, int]] = {}
        # The last quarter of the fitting windows chooses a refit's λ: at least one of two or three (with
        # none held out every λ looked perfect and the smallest was taken unchecked); one window: no refits.
        self.val_rows = (len(fit) // 4 or min(1, len(fit) - 1)) * fit.shape[1]
        if not self.val_rows:
            logger.warning("frontier: one fitting window, none to hold out for choosing a refit's lambda: no move is "
                           "refitted (give --tokens at least two windows)")
        self._held_out: tuple[np.ndarray, dict[int, np.ndarray]] | None = None  # see perplexity()

    # --- forwards ------------------------------------------------------------------------------------

    @property
    def positions(self) -> int:
        return 2 * self.num_layers

    def run(self, plan: DepthPlan, deltas: dict, stream: np.ndarray, windows: np.ndarray, start: int,
            stop: int | None = None, capture: list | dict | None = None) -> np.ndarray:
        """Positions ``start..stop-1`` under ``plan`` applied to ``stream`` (the input of ``start``)."""
        stop = self.positions if stop is None else stop
        self.token_positions += (stop - start) * windows.size
        self.cost_by_work[self._work] += (stop - start) * windows.size
        position = start
        while position < stop:
            if capture is not None:
                capture[position] = stream
            layer, is_ffn = divmod(position, 2)
            window = plan.window_of(layer)
            if window is not None:  # whole blocks side by side: one computation, its positions share the input
                assert position == 2 * window[0] and stop >= 2 * window[1] + 2, "a run starts or stops inside a window"
                for inside in range(position + 1, 2 * window[1] + 2):
                    if capture is not None:
                        capture[inside] = stream
                stream = self.window_output(window, deltas, stream, windows)
                position = 2 * window[1] + 2
                continue
            position += 1
            if not is_ffn:
                if layer not in plan.removed_attention:
                    with self.runner.attention(self.unit_of[layer]) as apply:
                        stream = apply(stream, windows).astype(np.float32, copy=False)
                continue
            span = plan.ffn_span(layer)
            if span is not None and span[0] == layer:
                stream = stream + self.ffn_update(span, stream, deltas.get(layer))
        if capture is not None:
            capture[stop] = stream
        return stream

    def window_output(self, window: tuple[int, int], deltas: dict, stream: np.ndarray,
                      windows: np.ndarray) -> np.ndarray:
        """``x + Σ_j (a_j(x) + f_j(x + a_j(x)))`` over the window's blocks (the parallel form)."""
        total = np.zeros_like(stream)
        for layer in range(window[0], window[1] + 1):
            middle = self.block_attention(layer, stream, windows)
            total += middle - stream
            total += self.ffn_update((layer, layer), middle, deltas.get(layer))
        return stream + total

    def block_attention(self, layer: int, stream: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """``x + a(x)`` of layer ``layer``'s attention."""
        with self.runner.attention(self.unit_of[layer]) as apply:
            return apply(stream, windows).astype(np.float32, copy=False)

    def capture(self, plan: DepthPlan, deltas: dict, windows: np.ndarray) -> Streams:
        at: list = [None] * (self.positions + 1)
        self.run(plan, deltas, self.runner.embed(windows).astype(np.float32), windows, 0, capture=at)
        return Streams(windows, at)

    def ffn_update(self, span: tuple[int, int], stream: np.ndarray, delta: np.ndarray | None) -> np.ndarray:
        """``Σ_j down_j(act_j(x))`` (``post_j(down_j(act_j(x)))`` for post-normed FFNs) over the span's
        members at one input (exactly the fused FFN), with ``delta`` added to the stacked down projection."""
        return self.ffns.update(span, stream, delta)

    def _logits(self, final: np.ndarray) -> np.ndarray:
        rows = final.reshape(-1, final.shape[-1])
        with self.runner.head() as head:
            return np.concatenate([head(rows[i:i + HEAD_ROWS]).astype(np.float32, copy=False)
                                   for i in range(0, len(rows), HEAD_ROWS)])

    def kl(self, final: np.ndarray, screen: int = 0) -> float:
        """Mean KL(original ‖ this) over the selection tokens (the first ``screen`` of each window
        when given), from a final stream."""
        if not screen:
            return self.reference.kl(self._logits(final))
        if screen not in self._screen_references:
            original = self._initial.select.at[-1][:, :screen]
            self._screen_references[screen] = CachedReference(self._logits(original))
        return self._screen_references[screen].kl(self._logits(final))

    def current_kl(self, screen: int = 0) -> float:
        """The current state's KL on the selection tokens (or the first ``screen`` of each window)."""
        if not screen:
            return self.state.kl
        return self.kl(self.state.select.at[-1][:, :screen], screen)

    def score_plan(self, plan: DepthPlan, deltas: dict, screen: int = 0) -> float:
        """KL(original ‖ plan) on the selection tokens (the first ``screen`` of each window when
        given), run from the plan's first change."""
        start = first_difference(self.plan0, plan, deltas)
        select = self._initial.select
        rows = slice(None, screen or None)
        return self.kl(self.run(plan, deltas, select.at[start][:, rows], select.windows[:, rows], start), screen)

    def perplexity(self, plan: DepthPlan, deltas: dict, windows: np.ndarray) -> float:
        """exp(mean next-token NLL) of ``plan`` on ``windows`` (e.g. a held-out text). The original
        model's streams on the windows last asked for are kept at evenly spaced positions (at most
        ``HELD_OUT_CACHE_BYTES``; none streamed): a plan runs from the last kept position at or before
        its first change, which is the same computation."""
        kept = self._held_out_streams(windows)
        start = first_difference(self.plan0, plan, deltas)
        position = max(p for p in kept if p <= start)
        final = kept[self.positions] if position == self.positions else \
            self.run(plan, deltas, kept[position], windows, position)
        with self.runner.head() as head:  # opened once: streamed, each opening rebuilds it
            return windowed_perplexity(final, windows, head)

    def _held_out_streams(self, windows: np.ndarray) -> dict[int, np.ndarray]:
        if self._held_out is not None and np.array_equal(self._held_out[0], windows):
            return self._held_out[1]
        per_position = windows.size * self.hidden * 4
        budget = 0 if self.runner.streamed else HELD_OUT_CACHE_BYTES
        stride = -(-self.positions // max(1, min(self.positions, budget // per_position)))
        kept = KeptPositions([*range(0, self.positions, stride), self.positions])
        self.run(self.plan0, {}, self.runner.embed(windows).astype(np.float32), windows, 0, capture=kept)
        self._held_out = (windows.copy(), kept)
        return kept

    def reset(self) -> None:
        """Back to the original model."""
        self.state = self._initial
        self._refits.clear()

    @contextlib.contextmanager
    def charging(self, work: str):
        """Count the forwards run inside under ``work`` (``cost_by_work``)."""
        previous, self._work = self._work, work
        try:
            yield
        finally:
            self._work = previous

    # --- candidates ----------------------------------------------------------------------------------

    def candidate(self, move: Move, refit: bool, screen: int = 0, keep_streams: bool = False) -> Candidate:
        """The current plan after ``move`` (and its refit), scored on the selection tokens — only the
        first ``screen`` tokens of each selection window when given (a cheaper, rougher score: causal
        attention makes them exactly what a ``screen``-token window would compute). ``keep_streams``
        (full scores only): keep the streams it ran, so that :meth:`accept` reuses them."""
        state = self.state
        plan = state.plan.apply(move)
        deltas = remap_deltas(state.plan, plan, state.deltas, self._width, self.hidden)
        start = change_position(move)
        fitted = None
        if refit:
            with self.charging("refit"):
                fitted, deltas, repair_start = self._reused_refit(move, plan, deltas)
            start = min(start, repair_start) if fitted else start
        rows = slice(None, screen or None)
        kept = list(state.select.at) if keep_streams and self.reuse and not screen else None
        with self.charging(("refit score" if refit else "score") + (" (screen)" if screen else "")):
            final = self.run(plan, deltas, state.select.at[start][:, rows], state.select.windows[:, rows], start,
                             capture=kept)
        return Candidate(move, plan, deltas, start, self.kl(final, screen), fitted, screen, kept)

    def accept(self, candidate: Candidate) -> None:
        """Make ``candidate`` the current state: its selection streams from its first change onwards;
        its fitting streams from there are stale until a refit reads one (:meth:`_fit_stream`)."""
        state = self.state
        if candidate.streams is not None:  # its score ran them already
            select = Streams(state.select.windows, candidate.streams)
        else:
            with self.charging("accept"):
                select = self._updated(state.select, candidate)
        if candidate.screen:  # its full score, from the final stream just brought up to date
            candidate = dataclasses.replace(candidate, kl=self.kl(select.at[-1]), screen=0)
        if self.lazy_fit:
            current = candidate.start if state.fit.current is None else min(state.fit.current, candidate.start)
            fit = Streams(state.fit.windows, list(state.fit.at), current)
        else:
            with self.charging("accept"):
                fit = self._updated(self._fit_streams_up_to_date(), candidate)
        self.state = State(candidate.plan, candidate.deltas, fit, select, candidate.kl)
        self._refits = {move: refit for move, refit in self._refits.items() if cut_position(move) <= candidate.start}

    def _fit_streams_up_to_date(self) -> Streams:
        fit = self.state.fit
        if fit.current is not None:
            self._fit_stream(self.positions)
        return fit

    def _fit_stream(self, position: int) -> np.ndarray:
        """The current plan's stream on the fitting tokens at ``position``, run forward from the last
        up-to-date position if needed (and kept)."""
        state = self.state
        fit = state.fit
        if fit.current is not None and position > fit.current:
            with self.charging("fit streams"):
                self.run(state.plan, state.deltas, fit.at[fit.current], fit.windows, fit.current, position,
                         capture=fit.at)
            fit.current = position
        return fit.at[position]

    def _updated(self, streams: Streams, candidate: Candidate) -> Streams:
        at = list(streams.at)
        self.run(candidate.plan, candidate.deltas, at[candidate.start], streams.windows, candidate.start, capture=at)
        return Streams(streams.windows, at)

    def _width(self, layer: int) -> int:
        return self.blocks[layer].width

    def _reused_refit(self, move: Move, plan: DepthPlan, deltas: dict) -> tuple[Refit | None, dict, int]:
        """:meth:`_refit`, or the same refit found at an earlier step when no accepted move has changed a
        position before this move's cut since (:meth:`accept` forgets the others): it reads only those."""
        if not self.reuse:
            return self._refit(move, plan, deltas)
        if move not in self._refits:
            fitted, refitted, start = self._refit(move, plan, deltas)
            layer = fitted.span[0] if fitted else -1
            self._refits[move] = (fitted, layer, refitted.get(layer), start)
            while sum(entry[2].nbytes for entry in self._refits.values() if entry[2] is not None) > REFIT_CACHE_BYTES:
                del self._refits[next(iter(self._refits))]  # the oldest first
            return fitted, refitted, start
        fitted, layer, total, start = self._refits[move]
        return fitted, deltas if fitted is None else {**deltas, layer: total}, start

    def _refit(self, move: Move, plan: DepthPlan, deltas: dict) -> tuple[Refit | None, dict, int]:
        """Refit the down projection of the last FFN before the cut toward the original stream after it."""
        cut = cut_position(move)
        if not self.val_rows:
            return None, deltas, cut
        span: tuple[int, int] | None
        windows = self.state.fit.windows
        if move.kind == "parallel":  # the window's last block: its FFN reads x + a(x), not a stream position
            member = move.layers[-1]
            start = change_position(move)
            x_in = self._fit_stream(start)
            self.token_positions += windows.size  # the member's attention, once more
            self.cost_by_work[self._work] += windows.size
            x = self.block_attention(member, x_in, windows)
            after = self.run(plan, deltas, x_in, windows, start, cut)
            span = (member, member)
        else:
            if move.kind == "fuse":
                span, member = (move.layers[0], move.layers[-1]), move.layers[-1]
            else:
                before = change_position(move)
                span = next((s for layer in range((before - 1) // 2, -1, -1)
                             if (s := plan.ffn_span(layer)) is not None), None)
                if span is None or plan.window_of(span[1]) is not None:  # none, or a window's (reads x + a(x))
                    return None, deltas, cut
                member = span[1]
            start = 2 * span[0] + 1
            x = self._fit_stream(start)
            after = self.run(plan, deltas, x, windows, start, cut)
        residual = (self.original[cut] - after).reshape(-1, self.hidden)
        a = self.ffns.activation(member, x.reshape(-1, self.hidden))
        offset = sum(self._width(layer) for layer in range(span[0], member))
        width = sum(self._width(layer) for layer in range(span[0], span[1] + 1))
        post_norm = self.blocks[member].post_norm
        if post_norm is None:
            chosen = refits.down_refit(a, residual, self.val_rows)
        else:  # what the member's output is now, with the deltas so far
            down, bias = self.ffns.down(member)
            if span[0] in deltas:
                down = down + deltas[span[0]][offset:offset + len(down)]
            chosen = refits.post_norm_down_refit(a, down, bias, post_norm, residual, self.val_rows)
        if chosen is None:
            return None, deltas, cut
        delta, lam, held_out_residual = chosen
        total = deltas.get(span[0], np.zeros((width, self.hidden), np.float32)).copy()
        total[offset:offset + len(delta)] += delta
        return Refit(member, span, lam, held_out_residual), {**deltas, span[0]: total}, start
