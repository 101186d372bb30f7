"""``ffnfusion`` command line: a registry of subcommands over a thin argparse front.

The CLI is the top layer: it parses arguments, calls the library, prints, and maps the library's
errors (:mod:`ffnfusion.core.errors`) to one line on stderr and an exit code (``EXIT_CODES``);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

import onnx_ir as ir

from ffnfusion.cli.progress import configure_logging
from ffnfusion.cli.registry import COMMANDS
from ffnfusion.core.errors import FFNFusionError, InvalidArgumentError, TensorRTUnavailableError

# Most specific first; every other FFNFusionError exits 1.
EXIT_CODES = ((InvalidArgumentError, 2), (TensorRTUnavailableError, 3), (FFNFusionError, 1))


def build_parser() -> argparse.ArgumentParser:
    from ffnfusion.cli import (  # noqa: F401  (register the commands)
        demo_command,
        frontier_command,
        heal_command,
        model_commands,
        runtime_commands,
    )

    parser = argparse.ArgumentParser(
        prog="ffnfusion",
        description="FFN Fusion for ONNX: find runs of attention-free FFN layers in an exported "
                    "LLM and fuse them into wide FFNs (arXiv 2503.18908).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.description))
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` removes half-written outputs."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a library's worker thread)
        pass


def user_error(err: BaseException) -> FFNFusionError | None:
    """The :class:`FFNFusionError` behind ``err``: itself, or the cause of an onnx-ir ``PassError``
    (pass managers wrap what a pass raises); None for anything else (a bug: show the traceback)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, FFNFusionError):
            return err
        if not isinstance(err, ir.passes.PassError):
            return None
        err = err.__cause__
    return None


def exit_code(err: FFNFusionError) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(err, kind))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    _interrupt_on_sigterm()
    try:
        COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("ffnfusion: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        error = user_error(err)
        if error is None or args.debug:
            raise
        print(f"ffnfusion: error: {error}", file=sys.stderr)
        return exit_code(error)
    return 0

