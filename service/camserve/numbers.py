"""Whole numbers written as text in requests and headers: ASCII digits only, and not too many of them.

`str.isdigit` also takes "²" and other scripts' digits, which `int()` then refuses; and `int()` refuses text of
more than 4300 digits. Both used to surface as 500s; here both are simply not a number.
"""

from __future__ import annotations

import re

#: More digits than any count, size or class index needs (and than a 64-bit integer holds).
MAX_DIGITS = 18

_UNSIGNED = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_SIGNED = re.compile(rf"-?[0-9]{{1,{MAX_DIGITS}}}")


def whole_number(text: str, *, signed: bool = False) -> int | None:
    """The integer `text` writes (surrounding whitespace allowed), or None when it is not one."""
    stripped = text.strip()
    return int(stripped) if (_SIGNED if signed else _UNSIGNED).fullmatch(stripped) else None
