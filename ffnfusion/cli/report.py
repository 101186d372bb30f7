"""What the CLI writes and prints: an analysis folder (report.json, plan.json, dependency.png,
per_layer.png, report.md), the frontier's and heal's plots and tables, the block table, the
verification lines."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from ffnfusion.core.files import atomic_path, write_text_atomically
from ffnfusion.passes.plan import FusionPlan
from ffnfusion.runtime.analysis.dependency import DependencyReport


def _block_label(block: dict) -> str:
    return f"{block['layer']}{'' if block['kind'] == 'ffn' else '*'}"


def plot_dependency(report: DependencyReport, path: pathlib.Path) -> None:
    """Log-scale heatmap of M (paper Fig. 2); attention-free runs outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    matrix = np.array([[np.nan if v is None else v for v in row] for row in report.dependency], dtype=float)
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    n = len(report.blocks)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(matrix.T, origin="lower", cmap="viridis",
                      norm=LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None)
    fig.colorbar(image, ax=ax, label="M[i, j] = cosdist(h_j, h_j with block i skipped)")
    for first, last in report.runs:
        a, b = report.unit_of_layer(first), report.unit_of_layer(last)
        ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a + 1, b - a + 1, fill=False, edgecolor="red", lw=1.5))
    ticks = list(range(0, n, max(1, n // 15)))
    ax.set_xticks(ticks, [_block_label(report.blocks[t]) for t in ticks])
    ax.set_yticks(ticks, [_block_label(report.blocks[t]) for t in ticks])
    ax.set_xlabel("skipped block i (decoder layer; * = with attention)")
    ax.set_ylabel("affected block j")
    ax.set_title("Dependency between blocks (red: attention-free runs)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_per_layer(report: DependencyReport, path: pathlib.Path) -> None:
    """Per-block metrics (paper Fig. 6) and attention importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [b["layer"] for b in report.blocks]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, label in (("cosdist", "cosdist(X, f(X))"), ("h_ratio", "‖h(X)‖ / ‖X‖"),
                       ("importance", "attention importance 1 − cos(X, X + attn)")):
        xs = [layer for layer, m in zip(layers, report.per_block) if key in m]
        ax.plot(xs, [m[key] for m in report.per_block if key in m], marker="o", ms=3, label=label)
    for first, last in report.runs:
        ax.axvspan(first - 0.5, last + 0.5, color="red", alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (shaded: attention-free runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_analysis(report: DependencyReport, plan: FusionPlan, out_dir: str | pathlib.Path, model: str) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.plan = plan.to_dict()
    report.save(out / "report.json")
    plan.save(out / "plan.json")
    plot_dependency(report, out / "dependency.png")
    plot_per_layer(report, out / "per_layer.png")
    rows = "\n".join(
        f"| {reason['layers'][0]}-{reason['layers'][1]} | {reason['width']} | {reason['m_max']:.4f} | {reason['m_sum']:.4f} |"
        for reason in plan.reasons
    ) or "| (none) | | | |"
    windows = "\n".join(f"| {w['layers'][0]}-{w['layers'][1]} | {w['m_max']:.4f} | {w['m_sum']:.4f} |"
                        for w in report.block_windows or []) or "| (none: no run of 4 whole blocks, or M not computed that far) | | |"
    cost = report.cost
    text = f"""# ffnfusion analysis of `{model}`

Attention-free runs: {', '.join(f'{a}-{b}' for a, b in report.runs) or 'none'}.
Measured on {cost['tokens']} tokens (dependency matrix on {cost['dependency_tokens']}); cost
{cost['full_forward_equivalents']} full-forward equivalents over the calibration tokens
({cost['capture_seconds']} s capture, {cost['matrix_seconds']} s matrix; the matrix costs
{cost.get('matrix_forwards_per_token', '?')} full forwards per token it is computed on).

## Plan (`plan.json`)

Settings: {plan.settings}. Fusing saves {plan.steps_saved} sequential FFN steps.

| layers | width | M_max | M_sum |
|---|---|---|---|
{rows}

## Whole-block windows (`block_windows`)

Windows of whole blocks (attention kept) ranked as the paper chose its full-block windows, lowest
`M_max` first, ties by `M_sum`, none overlapping a better one; `ffnfusion parallelize --windows`
runs them side by side. A ranking, not a verdict: on SmolLM2 the best-ranked window alone multiplies
perplexity by 154 (README); `ffnfusion frontier --parallel-window` scores windows by KL instead.

| layers | M_max | M_sum |
|---|---|---|
{windows}

## Figures

![dependency matrix](dependency.png)

![per-block metrics](per_layer.png)

`report.json` holds `blocks`, `per_block`, `dependency` (null where not computed), `runs`, `cost`,
`plan` and `block_windows`.
"""
    write_text_atomically(out / "report.md", text)
    return out


# --- frontier -------------------------------------------------------------------------------------

def _frontier_rows(result) -> list[tuple[str, object]]:
    rows = [(result.method, p) for p in result.points]
    for name, points in result.baselines.items():
        rows += [(name, p) for p in points]
    return sorted(rows, key=lambda row: (row[1].steps_saved, row[1].ppl or float("inf")))


def write_frontier_markdown(result, path: pathlib.Path) -> None:
    """All methods at every budget, sorted by held-out perplexity; losing rows stay in."""
    lines = [f"# Depth-reduction frontier ({result.original_steps} sequential steps, held-out perplexity "
             f"{result.original_ppl:.2f} before)", "",
             f"Fitting tokens {result.tokens['fit']}, selection tokens {result.tokens['select']} (another text), "
             f"held-out tokens {result.tokens['evaluation']} (used for nothing but this table). "
             f"Search: {result.seconds.get(result.method, 0):.0f} s, "
             f"{result.full_forward_equivalents:.1f} full-forward equivalents of the selection tokens.", "",
             "| steps saved | method | KL (selection) | held-out perplexity | prefill vs original | decode vs original | moves |",
             "|---|---|---|---|---|---|---|"]
    for method, point in _frontier_rows(result):
        latency = point.latency or {}
        moves = ", ".join(_move_text(m) for m in point.moves)
        lines.append(f"| {point.steps_saved} | {method} | {point.kl:.4f} | "
                     f"{'-' if point.ppl is None else f'{point.ppl:.2f}'} | "
                     f"{latency.get('prefill_vs_original', '-')} | {latency.get('decode_vs_original', '-')} | {moves} |")
        if point.healed is not None:
            lines.append(f"| {point.steps_saved} | {method} + heal | - | {point.healed['ppl']:.2f} | - | - | "
                         f"{point.healed['summary']} |")
    write_text_atomically(path, "\n".join(lines) + "\n")


def _move_text(move: dict) -> str:
    layers = move["layers"]
    text = (f"{move['move']} {layers[0]}-{layers[1]}" if move["move"] in ("fuse", "parallel")
            else f"{move['move']} {layers}")
    return text + ("+r" if move.get("refit") else "")


def plot_frontier(result, path: pathlib.Path) -> None:
    """KL and held-out perplexity against steps saved, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {result.method: result.points, **result.baselines}
    fig, (kl_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, points in methods.items():
        points = sorted(points, key=lambda p: p.steps_saved)
        xs = [p.steps_saved for p in points]
        style = dict(marker="o", lw=2.5 if name == result.method else 1.2, label=name)
        kl_ax.plot(xs, [p.kl for p in points], **style)
        ppl_ax.plot(xs, [p.ppl for p in points], **style)
    kl_ax.set(xlabel="sequential steps saved", ylabel="KL(original || model), selection text", yscale="log")
    ppl_ax.set(xlabel="sequential steps saved", ylabel="perplexity, held-out text", yscale="log")
    ppl_ax.axhline(result.original_ppl, color="gray", ls=":", label="original")
    ppl_ax.legend(fontsize=8)
    fig.suptitle(f"Depth-reduction frontier ({result.original_steps} steps originally)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_heal(report, path: pathlib.Path) -> None:
    """Training and held-out loss of every local span and of the global stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (local_ax, global_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for index, curve in report.local.items():
        line, = local_ax.plot(range(1, len(curve.train) + 1), curve.train, lw=0.8, alpha=0.6,
                              label=f"span {index}: train")
        local_ax.plot(*zip(*curve.held_out), marker="o", color=line.get_color(), label=f"span {index}: held out")
    local_ax.set(xlabel="step", ylabel="normalised span error", yscale="log", title="local distillation")
    if report.local:
        local_ax.legend(fontsize=7)
    if report.global_curve is not None:
        curve = report.global_curve
        global_ax.plot(range(1, len(curve.train) + 1), curve.train, lw=0.8, alpha=0.6, label="train (batch KL)")
        global_ax.plot(*zip(*curve.held_out), marker="o", label="held out (mean over sources)")
        global_ax.axvline(curve.best_step, color="gray", ls=":", label=f"kept: step {curve.best_step}")
        global_ax.legend(fontsize=8)
    global_ax.set(xlabel="step", ylabel="KL(original || model)", yscale="log", title="global distillation")
    fig.suptitle(report.describe(), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def format_block_table(block_map) -> str:
    from ffnfusion.passes.layer_ranges import format_ranges

    runs = block_map.runs
    lines = [f"{'layer':>5}  {'attention':<9}  {'ffn width':>9}  {'norm':<20}  {'epsilon':>8}  run"]
    for layer in block_map.layers:
        run = block_map.run_of(layer.index) if layer.ffn and not layer.attention else None
        ffn = layer.ffn
        what = "blocks side by side" if layer.window is not None else (layer.unknown or "-")
        lines.append(
            f"{format_ranges(layer.span):>5}  {'yes' if layer.attention else 'no':<9}  "
            f"{ffn.width if ffn else '-':>9}  {ffn.norm_description if ffn else what:<20}  "
            f"{f'{ffn.norm.epsilon:.0e}' if ffn else '-':>8}  {f'{run[0]}-{run[1]}' if run else ''}"
        )
    described = [f"{format_ranges(range(a, b + 1))} ({b - a + 1} layer{'s' if b > a else ''})" for a, b in runs]
    lines.append(f"attention-free runs: {', '.join(described) or 'none'}")
    windows = [f"{layer.index}-{layer.last} ({layer.last - layer.index + 1} blocks)" for layer in block_map.layers
               if layer.window is not None and layer.last is not None]
    if windows:
        lines.append(f"block-parallel windows: {', '.join(windows)}")
    lines.append(f"sequential steps: {block_map.sequential_steps} (attention branches + FFNs)")
    return "\n".join(lines)


def describe_blocks(model_path: str, as_json: bool) -> str:
    """``inspect``'s output: the block table, or the block map as JSON."""
    from ffnfusion.core.model_io import load_model
    from ffnfusion.passes.blocks import find_blocks

    block_map = find_blocks(load_model(model_path))
    return json.dumps(block_map.to_dict(), indent=2) if as_json else format_block_table(block_map)


def format_verification(result: dict) -> str:
    return (f"ref  ppl {result['ref']['ppl']:.3f}  ({result['ref']['path']})\n"
            f"new  ppl {result['new']['ppl']:.3f}  ({result['new']['path']})\n"
            f"top-1 agreement {result['top1_agreement']:.4f}   KL(ref||new) {result['kl']:.4f}   "
            f"final hidden cosine {result['hidden_cosine']:.4f}   ({result['tokens']} tokens)")
