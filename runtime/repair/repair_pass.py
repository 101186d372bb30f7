"""Training-free repair of fused groups: refit each group's down projection on calibration tokens,
keep a refit only where the end-to-end criterion says it helps. ``RepairPass`` -> ``RepairReport``.

Groups are repaired in residual order. For group i..j of the fused model:

1. ``x``: the stream at the group's input, captured from the model as fused *and repaired so far*
   (earlier groups fused and repaired, this one fused, later ones still sequential);
2. ``T(x)``: what the original layers i..j add when run one after another from ``x`` (numpy, from
   the original model's weights); ``A(x)·W₀``: what the fused block adds;
3. candidates: "no repair" and the refit (or per-channel scale, ``method="scale"``) for every λ of the
   grid (:mod:`ffnfusion.runtime.ridge`; the refit itself: :mod:`ffnfusion.runtime.repair.down_refit`);
4. criterion: mean ``KL(unfused ‖ candidate)`` of the final logits on held-out tokens. With several
   calibration sources each source is held out in turn: the candidate is fitted on the *other*
   sources' tokens and judged on this one's (a refit that only learned one domain loses here);
5. the chosen λ is refitted on every source's fitting tokens and kept only if it also lowers the KL
   on the held-out tokens of all sources; otherwise the group keeps ``W₀``.

Only the values of the fused ``W_down`` change: the repaired model is the same graph. A group whose
members normalise their output (Gemma 2/3's post-norms, fused in the grouped form) is not linear in
``W_down``; it is in the members' post-norm gains, and those are what it refits (``_PostNormGains``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from ffnfusion.core.errors import InvalidArgumentError, RepairError
from ffnfusion.core.model_io import load_model, model_file
from ffnfusion.passes.block_map import FFNBlock
from ffnfusion.passes.blocks import find_blocks
from ffnfusion.passes.canonical import RewritePass, rewriting
from ffnfusion.passes.ffn_fusion import FFNFusionPass
from ffnfusion.passes.layer_ranges import format_ranges
from ffnfusion.passes.streaming import read_rows
from ffnfusion.runtime import ridge
from ffnfusion.runtime.block_runner import BlockRunner, choose_streamed, forward_equivalents
from ffnfusion.runtime.calibration import CalibrationSource
from ffnfusion.runtime.device import Device, resolve_device
from ffnfusion.runtime.ffn_reference import (
    check_refittable,
    down_bias,
    ffn_activation,
    member_output,
    post_norm_members,
    sequential_update,
    unit_norm,
    update,
)
from ffnfusion.runtime.numerics import kl_sum, log_softmax
from ffnfusion.runtime.repair import down_refit

logger = logging.getLogger(__name__)

METHODS = ("refit", "scale")
COLUMN_BLOCK = 2048  # columns of A computed at a time


@dataclasses.dataclass
class GroupRepair:
    """What the repair measured and chose for one group."""

    layers: tuple[int, int]
    method: str
    candidates: list[dict]  # {"lambda": float | None (no repair), "kl": criterion, "kl_by_source": {...}}
    chosen: float | None  # λ kept, None when the group keeps W₀
    reason: str
    kl_before: float  # mean KL on every source's held-out tokens, fused without repair
    kl_after: float
    fit_error_before: float  # ‖A·W − T‖ / ‖T‖ on the held-out tokens
    fit_error_after: float
    fit_error_refit: float | None  # the best λ fitted on all sources, kept or not
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RepairReport:
    method: str
    lambdas: list[float]
    sources: list[dict]  # name, fit tokens, held-out tokens
    groups: list[GroupRepair]
    peak_rss_gib: float = 0.0
    streamed: bool = False
    full_forward_equivalents: float = 0.0  # sublayers run, in full forwards of the original on all calibration tokens
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "lambdas": self.lambdas, "sources": self.sources,
                "groups": [g.to_dict() for g in self.groups], "peak_rss_gib": self.peak_rss_gib,
                "streamed": self.streamed, "cost": {"full_forward_equivalents": round(self.full_forward_equivalents, 2),
                                                    "seconds": round(self.seconds, 2)}}

    def describe(self) -> str:
        parts = []
        for g in self.groups:
            label = format_ranges(range(g.layers[0], g.layers[1] + 1))
            choice = "no repair" if g.chosen is None else f"lambda {g.chosen:g}"
            parts.append(f"{label}: {choice} (KL {g.kl_before:.4f} -> {g.kl_after:.4f})")
        return "; ".join(parts)


@dataclasses.dataclass
class RepairResult(ir.passes.PassResult):
    """The pass's result: the model, plus what was measured and chosen for every group."""

    report: RepairReport | None = None


class RepairPass(RewritePass):
    """Refit the down projections of a fused model's groups (see the module docstring).

    ``original``: the model the groups were fused from (their layers' weights, reference logits);
    ``target``: the layout the groups were fused with (``FFNFusionPass``'s).
    """

    def __init__(self, original: str | pathlib.Path, groups: Sequence[Sequence[int]],
                 sources: Sequence[CalibrationSource], *, method: str = "refit",
                 lambdas: Sequence[float] = ridge.REPAIR_LAMBDAS, target: str = "gpu",
                 threads: int | None = None, stream: bool | None = None, device: str | Device = "auto"):
        super().__init__()
        if method not in METHODS:
            raise InvalidArgumentError(f"repair method must be one of {', '.join(METHODS)}, not {method!r}")
        if not sources:
            raise InvalidArgumentError("repair needs at least one calibration source")
        if any(not lam > 0 for lam in lambdas):
            raise InvalidArgumentError(f"repair lambdas must be positive, got {list(lambdas)}")
        self.original = model_file(original)
        self.groups = sorted((list(g) for g in groups), key=lambda g: g[0])
        self.sources = list(sources)
        self.method = method
        self.lambdas = [float(lam) for lam in lambdas]
        self.target = target  # the fused layout, as FFNFusionPass was given it
        self.threads = threads
        self.stream = stream  # run block by block (None: when the original would not fit in memory)
        self.device = device  # where the models' pieces run (resolved when the pass runs)

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        clock = time.perf_counter()
        original_blocks = find_blocks(load_model(self.original))
        streamed = choose_streamed(self.original, self.stream)
        device = resolve_device(self.device)
        reference = _Reference(BlockRunner(self.original, streamed=streamed, threads=self.threads,
                                            device=device), self.sources)
        runners = [reference.runner]
        repaired: dict[int, np.ndarray] = {}  # first layer of a group -> its refitted W_down
        groups = []
        for index, group in enumerate(self.groups):
            # Earlier groups fused and repaired, this one fused, later ones still sequential: the
            # criterion then measures this group's candidates alone. Built in memory, never saved.
            partial = functools.partial(_partial_model, self.original, self.groups[:index + 1], self.target,
                                        dict(repaired))
            members = [original_blocks.ffn(layer) for layer in group]
            for member in members:
                check_refittable(member)
            runner = BlockRunner(partial, streamed=streamed, threads=self.threads, base_dir=self.original.parent,
                                 device=device)
            runners.append(runner)
            result, weight = self._repair_group(runner, group, members, reference)
            groups.append(result)
            if weight is not None:
                repaired[group[0]] = weight
        fused_blocks = find_blocks(model)
        for first, weight in repaired.items():
            _write(fused_blocks.ffn(first), weight)
        sources = [{"name": s.name, "fit_tokens": int(s.fit.size), "held_out_tokens": int(s.select.size)}
                   for s in self.sources]
        tokens = sum(s.fit.size + s.select.size for s in self.sources)
        report = RepairReport(self.method, self.lambdas, sources, groups,
                              round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), streamed,
                              forward_equivalents(runners, reference.runner, tokens), time.perf_counter() - clock)
        logger.info(f"repair: {report.full_forward_equivalents:.1f} full-forward equivalents of the original on "
                    f"{tokens} calibration tokens, {report.seconds:.1f} s")
        return RepairResult(model, bool(repaired), report)

    def _repair_group(self, runner: BlockRunner, group: list[int], members: list[FFNBlock],
                      reference: _Reference) -> tuple[GroupRepair, np.ndarray | None]:
        start = time.perf_counter()
        label = format_ranges(group)
        layer = runner.block_map.layer(group[0])
        if list(layer.span) != list(group) or layer.ffn is None:
            raise RepairError(f"repair: layer {group[0]} of the fused model is not the fused group {label}")
        if layer.attention:  # its unit's input is before the attention, not the group's input
            raise RepairError(f"repair: group {label} starts at a layer that keeps its attention; fuse --repair "
                              "refits groups of attention-free layers (ffnfusion frontier refits any)")
        fused = layer.ffn
        unit = next(u for u in runner.units if u.layer == group[0])

        # Rows: every source's fitting windows, then every source's held-out windows.
        windows = np.concatenate([s.fit for s in self.sources] + [s.select for s in self.sources])
        stream = runner.run_units(0, unit.index - 1, runner.embed(windows), windows)
        x = stream.reshape(-1, stream.shape[-1]).astype(np.float32)
        del stream
        fit_counts = [s.fit.size for s in self.sources]
        n_fit = sum(fit_counts)
        true_update = sequential_update(members, x)  # what the sequential layers add
        logger.info(f"repair {label}: width {fused.width}, {n_fit} fitting tokens, "
                 f"{x.shape[0] - n_fit} held out, {len(self.sources)} source(s)")

        fit_offsets = np.cumsum([0] + fit_counts)
        select_offsets = n_fit + np.cumsum([0] + [s.select.size for s in self.sources])
        source_fit = [np.arange(fit_offsets[i], fit_offsets[i + 1]) for i in range(len(self.sources))]
        source_select = [np.arange(select_offsets[i], select_offsets[i + 1]) for i in range(len(self.sources))]
        all_fit = np.arange(n_fit)
        # Folds: hold each source out in turn (one source: fit on its fitting tokens, judge on its held-out).
        folds = ([(np.concatenate([r for j, r in enumerate(source_fit) if j != i]), i) for i in range(len(self.sources))]
                 if len(self.sources) > 1 else [(all_fit, 0)])
        fit_class = _PostNormGains if fused.post_norm is not None else _Refit if self.method == "refit" else _Scale
        fit = fit_class(fused, x, true_update, all_fit)

        def kl_on(source: int, group_update: np.ndarray) -> float:
            """Mean KL(unfused ‖ candidate) on one source's held-out windows."""
            ids = self.sources[source].select
            stream = (x[source_select[source]] + group_update).reshape(*ids.shape, -1)
            final = runner.run_units(unit.index + 1, len(runner.units) - 1, stream, ids)
            return reference.kl(source, runner, final.reshape(-1, final.shape[-1]))

        candidates: list[dict[str, Any]] = []
        for lam in [None, *self.lambdas]:
            by_source = {}
            for fit_rows, held_out in folds:
                rows = source_select[held_out]
                group_update = fit.base[rows] if lam is None else fit.update(fit_rows, rows, lam)
                by_source[self.sources[held_out].name] = kl_on(held_out, group_update)
            candidates.append({"lambda": lam, "kl": float(np.mean(list(by_source.values()))), "kl_by_source": by_source})
        best = min(candidates, key=lambda c: c["kl"])

        all_held_out = np.concatenate(source_select)

        def fit_error(updates: np.ndarray) -> float:
            truth = true_update[all_held_out]
            return float(np.linalg.norm(updates - truth) / np.linalg.norm(truth))

        def judged(lam: float) -> tuple[float, float]:
            """Mean held-out KL over all sources and held-out fit error, fitted on every source."""
            updates = [fit.update(all_fit, rows, lam) for rows in source_select]
            kl = float(np.mean([kl_on(i, u) for i, u in enumerate(updates)]))
            return kl, fit_error(np.concatenate(updates))

        # "no repair" was already judged on every source's held-out tokens (each fold holds one out)
        kl_before, error_before = candidates[0]["kl"], fit_error(fit.base[all_held_out])
        chosen, reason, kl_after, error_after = None, "no candidate beats no repair on held-out sources", kl_before, error_before
        weight = None
        best_fitted = min(candidates[1:], key=lambda c: c["kl"])["lambda"]
        kl_refit, error_refit = judged(best_fitted)
        if best["lambda"] is not None:
            if kl_refit < kl_before:
                chosen, kl_after, error_after = best["lambda"], kl_refit, error_refit
                reason = "lowest held-out-source KL"
                weight = fit.weight(chosen)
            else:
                reason = f"lambda {best['lambda']:g} fitted on all sources raised the held-out KL: rejected"
        result = GroupRepair((group[0], group[-1]), self.method, candidates, chosen, reason, kl_before, kl_after,
                             error_before, error_after, error_refit, round(time.perf_counter() - start, 2))
        logger.info(f"repair {label}: {'no repair' if chosen is None else f'lambda {chosen:g}'} ({reason}); "
                 f"held-out KL {kl_before:.4f} -> {kl_after:.4f}, fit error {error_before:.3f} -> "
                 f"{error_after:.3f}, {result.seconds:.1f} s")
        return result, weight


class _Reference:
    """The original model's next-token distributions on each source's held-out windows: its final
    streams are kept (small); log-probabilities come from its head, kept when they fit in
    ``CACHE_BYTES`` and recomputed slice by slice otherwise (a 128k vocabulary)."""

    CACHE_BYTES = 512 * 2**20
    SLICE_BYTES = 64 * 2**20  # float64 log-probabilities per slice of rows

    def __init__(self, runner: BlockRunner, sources: Sequence[CalibrationSource]):
        self.runner = runner
        self.finals = []
        for source in sources:
            final = runner.final_stream(source.select)
            self.finals.append(final.reshape(-1, final.shape[-1]))
        vocab = runner.vocab or 0
        self.cached = None
        if vocab and sum(len(f) for f in self.finals) * vocab * 4 <= self.CACHE_BYTES:
            with runner.head() as head:
                self.cached = [log_softmax(head(f)).astype(np.float32) for f in self.finals]

    def kl(self, source: int, candidate: BlockRunner, final: np.ndarray) -> float:
        """Mean KL(original ‖ candidate) over the rows of one source, from the candidate's final stream."""
        step = max(1, self.SLICE_BYTES // (8 * (self.runner.vocab or 1)))
        total = 0.0
        # Both heads stay open over the slices (streamed, each would otherwise be rebuilt per slice).
        with self.runner.head() as ref_head, candidate.head() as head:
            for start in range(0, len(final), step):
                rows = slice(start, start + step)
                ref = (self.cached[source][rows].astype(np.float64) if self.cached is not None
                       else log_softmax(ref_head(self.finals[source][rows])))
                logp = log_softmax(head(final[rows]))
                total += kl_sum(ref, logp)
        return total / len(final)


class _Refit:
    """Ridge refit of ``W_down`` in kernel form; ``base`` is the unrepaired update ``A·W₀ + b``."""

    def __init__(self, fused: FFNBlock, x: np.ndarray, true_update: np.ndarray, fit_rows: np.ndarray):
        self.fused, self.x, self.fit_rows = fused, x, fit_rows
        self.base = update(fused, x)
        self.residual = true_update - self.base
        self.kernel = down_refit.kernel(x, fit_rows, (block for _, block in _column_blocks(fused)))
        self.column = {row: i for i, row in enumerate(fit_rows)}
        self._last: tuple[tuple, tuple] | None = None

    def _alpha(self, fit_rows, lam):
        # The chosen λ on every fitting row is solved for its judgement, then again for the weight:
        # the largest system of the repair (N×N, N all fitting tokens), kept once solved.
        key = (fit_rows.tobytes(), lam)
        if self._last is None or self._last[0] != key:
            columns = [self.column[r] for r in fit_rows]
            k_fit = self.kernel[np.ix_(fit_rows, columns)]  # a copy (fancy indexing), solved in place
            alpha = ridge.solve_kernel(k_fit, self.residual[fit_rows], lam, self.fused.width, scratch=True)
            self._last = key, (columns, alpha)
        return self._last[1]

    def update(self, fit_rows, eval_rows, lam) -> np.ndarray:
        columns, alpha = self._alpha(fit_rows, lam)
        return down_refit.refit_update(self.kernel[np.ix_(eval_rows, columns)], self.base[eval_rows], alpha)

    def weight(self, lam) -> np.ndarray:
        """The refitted ``W_down``, held as the model stores it."""
        _, alpha = self._alpha(self.fit_rows, lam)
        return down_refit.refit_down(functools.partial(read_rows, self.fused.down), self.x[self.fit_rows], alpha,
                                     _column_blocks(self.fused)).astype(self.fused.down.tensor.dtype.numpy())


class _Scale:
    """Per-output-channel scale of ``W_down`` (the cheap baseline)."""

    def __init__(self, fused: FFNBlock, x: np.ndarray, true_update: np.ndarray, fit_rows: np.ndarray):
        self.fused, self.fit_rows = fused, fit_rows
        self.bias = down_bias(fused)
        self.plain = update(fused, x) - self.bias  # A·W₀
        self.base = self.plain + self.bias
        self.true_update = true_update - self.bias

    def _scales(self, fit_rows, lam):
        return down_refit.channel_scales(self.plain[fit_rows], self.true_update[fit_rows], lam).astype(np.float32)

    def update(self, fit_rows, eval_rows, lam) -> np.ndarray:
        return self.plain[eval_rows] * self._scales(fit_rows, lam) + self.bias

    def weight(self, lam) -> np.ndarray:
        scaled = read_rows(self.fused.down, 0, self.fused.width).astype(np.float32) * self._scales(self.fit_rows, lam)
        return scaled.astype(self.fused.down.tensor.dtype.numpy())


class _PostNormGains:
    """A post-normed group's refit: its update ``Σ_j g_j ⊙ n_j`` (``n_j = d_j / rms(d_j)``, member j's
    normalised output) is not linear in ``W_down`` but is in the gains. Per output channel c it is a
    k-feature regression, ridged toward the gains as they are (λ relative to the mean feature energy):

        (N_cᵀN_c + λ'I)·Δg_c = N_cᵀ(T_c − N_c·g_c),   λ' = λ · mean_c trace(N_cᵀN_c) / k.
    """

    def __init__(self, fused: FFNBlock, x: np.ndarray, true_update: np.ndarray, fit_rows: np.ndarray):
        self.fit_rows = fit_rows
        post_norm = fused.post_norm
        assert post_norm is not None and post_norm.gain is not None and post_norm.gain.const_value is not None
        self.stored = post_norm.gain.const_value  # check_refittable: an RMSNorm with a gain
        count = post_norm_members(fused)
        self.gains = self.stored.numpy().astype(np.float64).reshape(count, -1)  # [k, H]
        self.units = np.stack([unit_norm(post_norm, member_output(fused, x, j)) for j in range(count)],
                              axis=-1)  # [N, H, k]
        self.base = self._apply(slice(None), self.gains)
        self.residual = true_update - self.base

    def _apply(self, rows, gains: np.ndarray) -> np.ndarray:
        return np.einsum("nhk,kh->nh", self.units[rows], gains).astype(np.float32)

    def _gains(self, fit_rows, lam) -> np.ndarray:
        units = self.units[fit_rows].astype(np.float64)
        gram = np.einsum("nhk,nhl->hkl", units, units)
        cross = np.einsum("nhk,nh->hk", units, self.residual[fit_rows].astype(np.float64))
        count = gram.shape[-1]
        shift = lam * float(np.trace(gram, axis1=1, axis2=2).mean()) / count
        if not shift > 0:
            raise RepairError(f"lambda must be positive and the post-norm outputs non-zero (lambda {lam})")
        delta = np.linalg.solve(gram + shift * np.eye(count), cross[..., None])[..., 0]  # [H, k]
        return self.gains + delta.T

    def update(self, fit_rows, eval_rows, lam) -> np.ndarray:
        return self._apply(eval_rows, self._gains(fit_rows, lam))

    def weight(self, lam) -> np.ndarray:
        """The stacked gains ``[k, 1, H]``, held as the model stores them."""
        return self._gains(self.fit_rows, lam).reshape(self.stored.shape.numpy()).astype(self.stored.dtype.numpy())


def _partial_model(original: pathlib.Path, groups: list[list[int]], target: str,
                   repaired: dict[int, np.ndarray]) -> ir.Model:
    """The original with ``groups`` fused and the ``repaired`` down projections set (lazy weights)."""
    model = load_model(original)
    with rewriting(model):
        FFNFusionPass(groups, target)(model)
        for first, weight in repaired.items():
            _write(find_blocks(model).ffn(first), weight)
    return model


def _write(block: FFNBlock, weight: np.ndarray) -> None:
    """A group's repair into the model: its ``W_down``, or a post-normed group's stacked gains."""
    if block.post_norm is None:
        block.down.set_in_out(weight)
        return
    gain = block.post_norm.gain
    assert gain is not None and gain.const_value is not None  # check_refittable
    gain.const_value = ir.tensor(weight.astype(gain.const_value.dtype.numpy()), name=gain.name)


def _column_blocks(block: FFNBlock):
    """(rows of W_down, A restricted to those columns) in blocks of ``COLUMN_BLOCK`` columns."""
    for start in range(0, block.width, COLUMN_BLOCK):
        columns = slice(start, min(block.width, start + COLUMN_BLOCK))
        yield columns, (lambda x, columns=columns: ffn_activation(block, x, columns))


def lambda_grid(value: str | float | None) -> list[float]:
    """``auto``/None -> the default grid; a number -> just that λ (still compared with no repair)."""
    if value is None or value == "auto":
        return list(ridge.REPAIR_LAMBDAS)
    lam = float(value)
    if not lam > 0 or math.isinf(lam) or math.isnan(lam):
        raise InvalidArgumentError(f"--repair-lambda must be a positive number or 'auto', not {value!r}")
    return [lam]
