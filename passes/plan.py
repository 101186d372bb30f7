"""``FusionPlan``: which decoder layers to fuse, and its validation against a ``BlockMap``.

A group is a list of consecutive decoder-layer indices (0-based, as in ``model.layers.N``) that lie
inside one attention-free run. Groups must not overlap and need at least two layers.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

from ffnfusion.core.errors import InvalidArgumentError, InvalidPlanError, UnknownLayerError
from ffnfusion.core.files import write_json_atomically
from ffnfusion.passes.block_map import BlockMap, FFNBlock
from ffnfusion.passes.layer_ranges import format_ranges, parse_groups


@dataclasses.dataclass(frozen=True)
class FusionPlan:
    """Groups of decoder layers to fuse; ``reasons`` and ``settings`` explain an automatic plan."""

    groups: tuple[tuple[int, ...], ...]
    reasons: tuple[dict, ...] = ()
    settings: dict | None = None

    @classmethod
    def from_groups(cls, groups) -> FusionPlan:
        normalised = []
        for group in groups:
            if isinstance(group, str):
                raise InvalidArgumentError(f"group {group!r} must be a list of layer indices, not a string")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in group):
                raise InvalidArgumentError(f"group {group!r} must be a list of integer layer indices")
            layers = tuple(group)
            normalised.append(layers)
        return cls(tuple(normalised))

    @classmethod
    def coerce(cls, groups: FusionPlan | Sequence[Sequence[int]] | str) -> FusionPlan:
        """A plan from whatever form a caller holds: a plan, lists of layer indices, or ``"10-13,14-16"``."""
        if isinstance(groups, FusionPlan):
            return groups
        return cls.parse(groups) if isinstance(groups, str) else cls.from_groups(groups)

    @classmethod
    def parse(cls, text: str) -> FusionPlan:
        """From the CLI syntax ``10-13,14-16``."""
        return cls.from_groups(parse_groups(text))

    @classmethod
    def load(cls, path: str | pathlib.Path) -> FusionPlan:
        try:
            data = json.loads(pathlib.Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InvalidArgumentError(f"cannot read plan {path}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
            raise InvalidArgumentError(f"plan {path}: expected a JSON object with a 'groups' list of layer lists")
        if not all(isinstance(group, list) for group in data["groups"]):
            raise InvalidArgumentError(f"plan {path}: every group must be a list of layer indices, e.g. [10, 11, 12]")
        try:
            return cls.from_groups(data["groups"])
        except InvalidArgumentError as err:
            raise InvalidArgumentError(f"plan {path}: {err}") from None

    def to_dict(self) -> dict:
        data: dict = {"groups": [list(group) for group in self.groups]}
        if self.reasons:
            data["reasons"] = list(self.reasons)
        if self.settings is not None:
            data["settings"] = self.settings
        return data

    def save(self, path: str | pathlib.Path) -> None:
        write_json_atomically(pathlib.Path(path), self.to_dict())

    @property
    def steps_saved(self) -> int:
        """Sequential FFN steps removed: k layers fused into one save k - 1."""
        return sum(len(group) - 1 for group in self.groups)

    def describe(self) -> str:
        return ",".join(format_ranges(group) for group in self.groups)

    def resolve(self, block_map: BlockMap) -> list[tuple[tuple[int, ...], list[FFNBlock]]]:
        """Check every group against ``block_map``; returns ``(group, FFN blocks to fuse)`` pairs.

        A group may take in FFNs fused earlier (hierarchical fusion) if it covers them whole.
        """
        if not self.groups:
            raise InvalidPlanError("the plan has no groups")
        claimed: dict[int, tuple[int, ...]] = {}
        resolved = []
        for group in self.groups:
            label = format_ranges(group) if list(group) == sorted(group) else str(list(group))
            if len(group) < 2:
                raise InvalidPlanError(f"group {label} has one layer: a group fuses at least two")
            if list(group) != list(range(group[0], group[0] + len(group))):
                raise InvalidPlanError(f"group {label} is not a range of consecutive layers")
            for index in group:
                if index in claimed:
                    raise InvalidPlanError(
                        f"groups {format_ranges(claimed[index])} and {label} overlap at layer {index}"
                    )
                claimed[index] = group
            num_layers = block_map.num_layers
            missing = [i for i in group if not 0 <= i < num_layers]
            if missing:
                raise InvalidPlanError(
                    f"group {label} names layer {missing[0]}, but the model has layers 0-{num_layers - 1}"
                )
            # One FFN and the attention-free layers after it: the first member may keep the attention
            # before its FFN (it reads the stream after it), no attention may sit between members.
            windowed = next((block_map.layer(i) for i in group if block_map.layer(i).window is not None), None)
            if windowed is not None:
                raise InvalidPlanError(f"group {label}: layers {windowed.index}-{windowed.last} run side by side as "
                                       "whole blocks (a block-parallel window); FFN fusion takes sequential layers")
            first = block_map.layer(group[0])
            if first.ffn is None and first.unknown:
                raise UnknownLayerError(f"group {label}: layer {group[0]} is of a kind ffnfusion does not know "
                                        f"({first.unknown}); nothing was rewritten")
            if first.ffn is None:
                raise InvalidPlanError(f"group {label} starts at layer {group[0]}, which has no recognised FFN "
                                       f"({first.unknown}); attention-free runs: {_runs_text(block_map)}")
            if first.parallel and len(group) > 1:
                raise InvalidPlanError(f"group {label} starts at layer {group[0]}, a parallel-residual layer: its "
                                       "FFN reads the stream before its attention; drop that attention first "
                                       f"(attention-free runs: {_runs_text(block_map)})")
            for index in group[1:]:
                position = block_map.layer(index)
                if position.index != index:
                    continue  # inside an FFN fused earlier: nothing between its members
                if position.ffn is None and position.unknown:
                    raise UnknownLayerError(f"group {label}: layer {index} is of a kind ffnfusion does not know "
                                            f"({position.unknown}); nothing was rewritten")
                if position.attention or position.ffn is None:
                    why = "has attention" if position.attention else f"has no recognised FFN ({position.unknown})"
                    raise InvalidPlanError(
                        f"group {label}: layer {index} {why}, between FFNs {index - 1} and {index}; a group is "
                        f"one FFN and attention-free layers after it (attention-free runs: {_runs_text(block_map)})"
                    )
            positions = list(dict.fromkeys(block_map.layer(i) for i in group))
            for edge, position in ((group[0], positions[0]), (group[-1], positions[-1])):
                if position.last is not None and edge not in (position.index, position.last):
                    raise InvalidPlanError(
                        f"group {label} splits the FFN already fused from layers "
                        f"{position.index}-{position.last}"
                    )
            if len(positions) < 2:
                raise InvalidPlanError(f"group {label} is already one fused FFN")
            resolved.append((group, [block_map.ffn(p.index) for p in positions]))
        return resolved


def _runs_text(block_map: BlockMap) -> str:
    return ", ".join(f"{a}-{b}" for a, b in block_map.runs) or "none"
