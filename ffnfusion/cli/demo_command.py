"""``ffnfusion demo``: the main job on the embedded default model (:mod:`ffnfusion.cli.demo`)."""

from __future__ import annotations

import argparse
import dataclasses

from ffnfusion.cli.registry import arguments, command, parse_int_list


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from ffnfusion.cli.demo import DemoOptions

    defaults = DemoOptions()
    parser.add_argument("--workdir", default=defaults.workdir, help=f"where models go (default {defaults.workdir})")
    parser.add_argument("--source", default=defaults.source, help="model source (default: the embedded SmolLM2-135M)")
    parser.add_argument("--count", type=int, default=defaults.drop_count, dest="drop_count",
                        help=f"attention layers to drop, least important first (default {defaults.drop_count})")
    parser.add_argument("--calib-tokens", type=int, default=defaults.calib_tokens,
                        help=f"calibration tokens of Python docs (default {defaults.calib_tokens})")
    parser.add_argument("--dependency-tokens", type=int, default=defaults.dependency_tokens,
                        help=f"tokens for the dependency matrix (default {defaults.dependency_tokens})")
    parser.add_argument("--verify-tokens", type=int, default=defaults.verify_tokens,
                        help=f"held-out tokens of license text (default {defaults.verify_tokens})")
    parser.add_argument("--threshold", type=float, help="planner threshold on M (default: the planner's)")
    parser.add_argument("--repair-tokens", type=int, default=defaults.repair_tokens,
                        help=f"fitting tokens of the repaired variant (default {defaults.repair_tokens})")
    parser.add_argument("--frontier-steps", type=lambda text: () if text == "none" else tuple(parse_int_list(text)),
                        default=defaults.frontier_steps,
                        help="budgets of the depth-reduction frontier that ends the demo, comma-separated, or "
                             f"'none' (default {','.join(map(str, defaults.frontier_steps))})")


@command("demo", "the main job on the embedded default model",
         "Export SmolLM2-135M, drop its least important attention layers, analyze dependencies, fuse by "
         "the automatic plan, check the fused graph against a torch reference of the parallel form, and "
         "compare perplexity/top-1 agreement with whole-run fusion and FFN removal on held-out text; then "
         "the depth-reduction frontier (see `ffnfusion frontier`), its middle model checked against torch "
         "and verified on the held-out text.")
@arguments(_demo_arguments)
def run_demo(args) -> None:
    from ffnfusion.cli import demo

    options = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(demo.DemoOptions)}}
    demo.run(demo.DemoOptions(**options))
