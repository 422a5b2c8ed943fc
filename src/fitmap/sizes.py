"""Byte sizes: parsed once at the edge ("10GiB", "24GB", "512MiB") into ints."""

from __future__ import annotations

import re

from fitmap.errors import BadInput

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1 << 40,
    "k": KiB,
    "m": MiB,
    "g": GiB,
    "t": 1 << 40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, allow_zero: bool = False) -> int:
    """``"10GiB"`` -> 10737418240. Accepts GiB/GB/MiB/MB/KiB/KB/TiB/TB and plain bytes.

    A bare G/M/K is read as binary (GiB/MiB/KiB), as nvidia-smi users mean it.
    """
    if text.strip().startswith("-"):
        raise BadInput(f"size {text!r} is negative; give a positive size, e.g. 24GiB")
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise BadInput(f"cannot read size {text!r}: write a number and a unit, e.g. 24GiB, 10GB, 512MiB")
    value = float(m.group(1)) * _UNITS.get(unit, 1)
    if value < 0 or (value == 0 and not allow_zero):
        raise BadInput(f"size {text!r} must be positive")
    return int(value)


def fmt_bytes(n: int | float) -> str:
    """Human size in binary units with one decimal: 1.5 GiB, 820.0 MiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{int(n)} B"
