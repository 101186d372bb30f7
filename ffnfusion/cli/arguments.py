"""Options shared by several commands: calibration text, token windows, streaming, the device."""

from __future__ import annotations

import argparse


def calibration_arguments(parser: argparse.ArgumentParser, flag: str, default_text: str, tokens: int) -> None:
    from ffnfusion.runtime.calibration import DEFAULT_WINDOW

    parser.add_argument(flag, nargs="+", metavar="FILE",
                        help=f"plain-text file(s), tokenised with the tokenizer beside the model "
                             f"(default: {default_text})")
    parser.add_argument("--token-ids", f"{flag}-ids", dest=f"{flag.lstrip('-')}_ids", metavar="IDS.npy",
                        help=f"token ids instead of text (integer .npy; {flag}-ids is the same option)")
    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens to use (default {tokens})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens per window (default {DEFAULT_WINDOW})")
    stream_arguments(parser)
    device_argument(parser)


def device_argument(parser) -> None:
    from ffnfusion.runtime.device import DEVICES

    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the models run: ONNX Runtime's pieces on its provider for the device, "
                             "ffnfusion's own FFN arithmetic in torch on it; auto (default): CUDA when torch sees "
                             "a GPU, else the CPU (the choice is logged)")


def stream_arguments(parser) -> None:
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_const", const=True, default=None,
                        help="run models block by block, loading one block's weights at a time (default: "
                             "when a model would not fit in the memory available; the choice is logged)")
    stream.add_argument("--no-stream", dest="stream", action="store_const", const=False,
                        help="keep whole models in memory")


def windows_from_args(args, model: str, flag: str, default=None):
    from ffnfusion.core.model_io import model_file
    from ffnfusion.runtime import calibration

    return calibration.calibration_windows(model_file(model).parent, texts=getattr(args, flag) or (),
                                           ids_file=getattr(args, f"{flag}_ids"), tokens=args.tokens,
                                           window=args.window, default=default or calibration.python_docs_text)
