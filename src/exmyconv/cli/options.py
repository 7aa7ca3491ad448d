"""Option values shared by several commands."""
from __future__ import annotations

import re

from ..errors import ExmyError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ExmyError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (match[2] or "").lower().rstrip("b")
    return int(float(match[1]) * _UNITS[unit])
