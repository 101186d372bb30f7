"""Heal on SmolLM2's frontier points: perplexity of the original, the point and the healed point on
texts used neither to heal nor to choose the point, and the share of the gap to the original that
healing recovers, measured side by side in one run.

    python -m ffnfusion.benchmarks.heal_table FRONTIER_DIR --reference BASE [--steps 8,14,20]
        [--stages local,global] [--train changed|all] [--lr LR] [--epochs N] [--set FIELD=VALUE ...]
        [--calib NAME ...] [--name NAME] [--eval idle-news moby-dick] [--json FILE]

Each ``FRONTIER_DIR/steps-N`` is healed into ``FRONTIER_DIR/steps-N-healed`` (``-healed-local``
for ``--stages local``, ``-NAME`` with ``--name``) with heal's defaults and the options given
(``--set local_lr=1e-3``: any :class:`~ffnfusion.runtime.heal.HealOptions` field), unless it is
there already; the point's perplexity is
then measured on the written files with ONNX Runtime, and on each calibration source's held-out
windows heal reports KL(original ‖ model) before and after.

"gap recovered" = (ppl_point − ppl_healed) / (ppl_point − ppl_original).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

EVAL_TEXTS = ("idle-news", "moby-dick")
EVAL_TOKENS = 4096


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frontier", help="a frontier output folder (steps-N/ inside)")
    parser.add_argument("--reference", required=True, help="the original model the frontier started from")
    parser.add_argument("--steps", default="8,14,20", help="points to heal (default 8,14,20)")
    parser.add_argument("--stages", default="local,global", help="heal stages (default local,global)")
    parser.add_argument("--train", default="changed", help="heal --train: changed (default) or all")
    parser.add_argument("--lr", type=float, help="heal --lr (default: heal's)")
    parser.add_argument("--epochs", type=int, help="heal --epochs (default: heal's)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="other HealOptions fields, e.g. local_lr=1e-3 local_epochs=12")
    parser.add_argument("--calib", nargs="+", metavar="NAME|FILE",
                        help="heal --calib: calibration sources (default: heal's)")
    parser.add_argument("--name", help="output folder suffix (default healed, or healed-STAGES)")
    parser.add_argument("--eval", nargs="+", default=list(EVAL_TEXTS),
                        help=f"perplexity texts, names or files (default {' '.join(EVAL_TEXTS)})")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    from ffnfusion.cli.progress import configure_logging
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime import calibration
    from ffnfusion.runtime.frontier.frontier import file_perplexity
    from ffnfusion.runtime.heal import HealOptions, heal_model_file

    configure_logging()
    frontier = pathlib.Path(args.frontier)
    reference = model_file(args.reference)
    stages = tuple(args.stages.split(","))
    suffix = args.name or ("healed" if set(stages) == {"local", "global"} else "healed-" + "-".join(stages))
    overrides = _overrides(parser, args.set)
    tokenizer = calibration.load_tokenizer(reference.parent)
    evaluation = {name: calibration.windows_from_ids(tokenizer(calibration.read_text(name, EVAL_TOKENS * 16),
                                                               return_tensors="np")["input_ids"][0],
                                                     EVAL_TOKENS, calibration.DEFAULT_WINDOW)
                  for name in args.eval}
    original = {name: file_perplexity(reference, windows) for name, windows in evaluation.items()}
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        point = frontier / f"steps-{steps}"
        healed = frontier / f"steps-{steps}-{suffix}"
        if not (healed / "model.onnx").is_file():
            clock = time.perf_counter()
            options = HealOptions(stages=stages, train=args.train, **overrides)
            if args.lr:
                options = dataclasses.replace(options, global_lr=args.lr)
            if args.epochs:
                options = dataclasses.replace(options, global_epochs=args.epochs)
            heal_model_file(point, reference, healed, texts=args.calib or (), options=options)
            seconds = round(time.perf_counter() - clock, 1)
        else:
            seconds = None
        report = json.loads((healed / "ffnfusion.json").read_text())["heal"]
        row = {"steps": steps, "options": report["options"], "heal_seconds": seconds or sum(report["seconds"].values()),
               "held_out_kl": report["held_out_kl"], "kept_spans": report["kept_spans"],
               "spans": len(report["spans"]), "ppl": {}}
        for name, windows in evaluation.items():
            ppl_point, ppl_healed = file_perplexity(point, windows), file_perplexity(healed, windows)
            row["ppl"][name] = {"original": original[name], "point": ppl_point, "healed": ppl_healed,
                                "recovered": (ppl_point - ppl_healed) / (ppl_point - original[name])}
        rows.append(row)
        print(format_row(row), flush=True)
    print(f"\n| steps saved | text | original | point | healed ({args.stages}) | gap recovered |\n|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _overrides(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as HealOptions keyword arguments, each converted to its field's type."""
    from ffnfusion.runtime.heal import HealOptions

    overrides = {}
    for item in items:
        field, _, value = item.partition("=")
        kind = type(getattr(HealOptions(), field, None))
        if field not in HealOptions.__dataclass_fields__ or not value or kind not in (int, float, str):
            parser.error(f"--set {item}: not FIELD=VALUE for a number or text field of HealOptions")
        overrides[field] = kind(value)
    return overrides


def format_row(row: dict) -> str:
    return "\n".join(f"| {row['steps']} | {name} | {r['original']:.2f} | {r['point']:.2f} | {r['healed']:.2f} | "
                     f"{r['recovered']:.1%} |" for name, r in row["ppl"].items())


if __name__ == "__main__":
    sys.exit(main())
