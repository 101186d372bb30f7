"""Parse and print decoder-layer lists such as ``10-13,14-16`` (inclusive, 0-based)."""

from __future__ import annotations

from ffnfusion.core.errors import InvalidArgumentError


def parse_range(text: str) -> list[int]:
    """``"10-13"`` -> ``[10, 11, 12, 13]``; ``"7"`` -> ``[7]``."""
    text = text.strip()
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
        else:
            first = last = int(text)
    except ValueError:
        raise InvalidArgumentError(f"bad layer range {text!r}: expected N or N-M, e.g. 10-13") from None
    if first < 0 or last < first:
        raise InvalidArgumentError(f"bad layer range {text!r}: need 0 <= first <= last")
    return list(range(first, last + 1))


def parse_layers(text: str) -> list[int]:
    """``"3,10-12"`` -> ``[3, 10, 11, 12]`` (sorted, duplicates removed)."""
    return sorted({i for part in text.split(",") if part.strip() for i in parse_range(part)})


def parse_groups(text: str) -> list[list[int]]:
    """``"10-13,14-16"`` -> ``[[10..13], [14..16]]`` (one group per comma-separated range)."""
    groups = [parse_range(part) for part in text.split(",") if part.strip()]
    if not groups:
        raise InvalidArgumentError("no groups given: expected e.g. --groups 10-13,14-16")
    return groups


def format_ranges(layers) -> str:
    """``[10, 11, 12, 15]`` -> ``"10-12,15"``."""
    layers = sorted(layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(parts)
