"""Size parsing and rendering the way qemu-img does it.

Pure module.  ``parse_size`` accepts qemu's suffixes (k/K, M, G, T, P, E as powers of 1024; ``b``/``B`` for
bytes) and decimal fractions ("1.5G").  ``human_size`` renders qemu's "64 MiB" / "1.5 GiB" style.
"""
from __future__ import annotations

import re

from engine.errors import InvalidArgument

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([bBkKmMgGtTpPeE]?)\s*$")


def parse_size(text: str, default_suffix: str = "") -> int:
    """Parse '64M', '1.5G', '512', '4k' into bytes.

    Raises InvalidArgument for anything else (negative numbers, unknown suffix, trailing garbage).
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgument(f"Invalid size '{text}'")
    num, suffix = m.group(1), (m.group(2) or default_suffix).lower()
    mult = _SUFFIX[suffix]
    if "." in num:
        value = int(float(num) * mult)
    else:
        value = int(num) * mult
    if value >= 1 << 63:
        raise InvalidArgument(f"Invalid size '{text}'")
    return value


def human_size(n: int) -> str:
    """qemu's size_to_str: '64 MiB', '0.954 MiB', '512 B'; switches unit once the integer part reaches 1000."""
    import math

    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _, exp = math.frexp(n / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C integer division truncates toward zero
    i = max(0, min(i, len(suffixes) - 1))
    val = n / (1 << (i * 10))
    return f"{_fmt_g3(val)} {suffixes[i]}B"


def _fmt_g3(val: float) -> str:
    """C's "%0.3g"."""
    return f"{val:.3g}"


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def round_down(n: int, align: int) -> int:
    return n // align * align
