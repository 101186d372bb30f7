"""``ffnfusion heal``: distil a reduced model back toward its original (the paper's last stage)."""

from __future__ import annotations

import argparse
import json
import pathlib

from ffnfusion.cli.arguments import device_argument
from ffnfusion.cli.registry import arguments, command


def _heal_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.runtime.corpora import NAMES
    from ffnfusion.runtime.heal import DEFAULT_SOURCES, HealOptions

    defaults = HealOptions()
    parser.add_argument("model", help="the reduced model (attention or FFNs removed, groups fused, refitted)")
    parser.add_argument("--reference", required=True, metavar="ORIGINAL",
                        help="the model it was reduced from (its teacher)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="healed model (same graph, new weights), tokenizer, config, ffnfusion.json, heal.png")
    parser.add_argument("--calib", nargs="+", metavar="NAME|FILE",
                        help=f"calibration sources, one per name or text file; each keeps held-out windows "
                             f"(names: {', '.join(NAMES)}; default: {' '.join(DEFAULT_SOURCES)})")
    parser.add_argument("--token-ids", "--calib-ids", dest="calib_ids", nargs="+", metavar="IDS.npy",
                        help="token ids instead of text (integer .npy), one source per file")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, metavar="N",
                        help=f"fitting tokens, split over the sources (default {defaults.tokens})")
    parser.add_argument("--held-out-tokens", type=int, default=defaults.select_tokens, dest="select_tokens",
                        metavar="N",
                        help=f"held-out tokens per source: early stopping and the keep-or-not check "
                             f"(default {defaults.select_tokens})")
    parser.add_argument("--window", type=int, default=defaults.window, metavar="N",
                        help=f"tokens per window (default {defaults.window})")
    parser.add_argument("--stages", default="local,global", metavar="local,global",
                        help="local (each changed span alone on the original's streams), global (KL of "
                             "next-token distributions), or both (default local,global)")
    parser.add_argument("--train", choices=("changed", "all"), default=defaults.train,
                        help="global stage: the changed FFNs only (default) or every decoder weight")
    parser.add_argument("--epochs", type=int, default=defaults.global_epochs, dest="global_epochs", metavar="N",
                        help=f"global stage: passes over the fitting tokens (default {defaults.global_epochs})")
    parser.add_argument("--lr", type=float, default=defaults.global_lr, dest="global_lr", metavar="LR",
                        help=f"global stage: Adam learning rate (default {defaults.global_lr})")
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs, metavar="N",
                        help=f"local stage: passes per span (default {defaults.local_epochs})")
    parser.add_argument("--local-lr", type=float, default=defaults.local_lr, metavar="LR",
                        help=f"local stage: Adam learning rate (default {defaults.local_lr})")
    parser.add_argument("--hidden-weight", type=float, default=defaults.hidden_weight, metavar="W",
                        help="global stage: also match the original's final normed stream, weighted W beside KL "
                             f"(Puzzle's GKD; default {defaults.hidden_weight})")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default=defaults.compute_dtype,
                        help="training matrix products (autocast; weights and held-out checks stay float32): "
                             "bfloat16 halves a step's time on CPUs with AVX-512 BF16 or AMX and on GPUs; auto "
                             f"picks it where the hardware has it (default {defaults.compute_dtype})")
    device_argument(parser)
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="shuffling seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def heal_options(args):
    from ffnfusion.core.errors import InvalidArgumentError
    from ffnfusion.runtime.device import resolve_device
    from ffnfusion.runtime.heal import HealOptions

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    for name in ("tokens", "select_tokens", "global_epochs", "local_epochs"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
    return HealOptions(tokens=args.tokens, select_tokens=args.select_tokens, window=args.window,
                       local_epochs=args.local_epochs, local_lr=args.local_lr, global_epochs=args.global_epochs,
                       global_lr=args.global_lr, hidden_weight=args.hidden_weight, train=args.train,
                       stages=stages, device=resolve_device(args.device).name, compute_dtype=args.compute_dtype,
                       seed=args.seed)


@command("heal", "distil a reduced model back toward its original (same graph, new weights)",
         "Builds the reduced model and its reference as torch modules from their ONNX files, trains each "
         "changed span (fused groups, FFNs next to removed sublayers, refitted FFNs) alone to map the "
         "original's stream at its input to the original's at its output (local), then trains the changed "
         "FFNs on KL(original || model) of next-token distributions (global). Each calibration source keeps "
         "held-out windows: both stages stop early on them, and the trained weights are kept only where "
         "they lower KL to the original on every source's held-out windows; otherwise the input weights "
         "stay and the output says so. The output is the input graph with new initializer values.")
@arguments(_heal_arguments)
def run_heal(args) -> None:
    from ffnfusion.cli.progress import ProgressBar
    from ffnfusion.cli.report import plot_heal
    from ffnfusion.runtime.heal import heal_model_file

    options = heal_options(args)
    bars: dict[str, ProgressBar] = {}

    def progress(stage: str, done: int, total: int, loss: float) -> None:
        bar = bars.setdefault(stage, ProgressBar(f"heal: {stage}", "steps", lambda value: f"loss {value:.4f}"))
        bar(done, total, loss)

    summary, report = heal_model_file(args.model, args.reference, args.output, texts=args.calib or (),
                                      ids_files=args.calib_ids or (), options=options, progress=progress)
    out = pathlib.Path(args.output)
    plot_heal(report, out / "heal.png")
    if args.json:
        print(json.dumps({"output": summary["output"], **report.to_dict()}, indent=2))
    else:
        print(f"{report.describe()}\nwrote {summary['output']} (report in {out / 'ffnfusion.json'}, curves in "
              f"{out / 'heal.png'})")
