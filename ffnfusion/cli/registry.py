"""The CLI's command registry: each command is an arguments function plus a run function."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from ffnfusion.core.errors import InvalidArgumentError


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, description: str = ""):
    """Register ``run`` (decorated) with the arguments function it names as ``arguments``."""
    def register(run):
        COMMANDS[name] = Command(name, help, description or help, run.arguments, run)
        return run
    return register


def arguments(add: Callable[[argparse.ArgumentParser], None]):
    def attach(run):
        run.arguments = add
        return run
    return attach


def parse_layer_list(text: str) -> list[int]:
    from ffnfusion.passes.layer_ranges import parse_layers

    try:
        return parse_layers(text)
    except InvalidArgumentError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
