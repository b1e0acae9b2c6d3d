"""Seed ranges: ``"0-99,200,300-303"`` -> ``[0, 1, ..., 99, 200, 300, 301, 302, 303]``.

Items are separated by commas; an item is one integer ``N`` or an inclusive range
``A-B`` with ``A <= B``. Seeds must be integers in ``[0, 2**63)``. Order is kept and
repeated seeds are an error (each seed names one output file).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import List, Sequence

from .errors import UserError

__all__ = ["parse_seeds", "format_seeds"]

#: A sanity bound on one request (10 million samples); larger requests are likely typos.
MAX_SEEDS = 10_000_000
_MAX_SEED = 2 ** 63 - 1
_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_seeds(text: str) -> List[int]:
    """The list of seeds that ``text`` names; `UserError` with the offending item."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("empty seed list; give seeds like '0-99' or '0-9,100,200-209'")
    out: List[int] = []
    for item in text.split(","):
        m = _ITEM.match(item)
        if m is None:
            raise UserError(f"bad seed item {item.strip()!r} in {text!r}: expected N or A-B "
                            f"with non-negative integers, e.g. '0-99,200'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise UserError(f"bad seed range {item.strip()!r}: the end {b} is below the start {a}")
        if b > _MAX_SEED:
            raise UserError(f"seed {b} is too large (seeds must be < 2**63)")
        if len(out) + (b - a + 1) > MAX_SEEDS:
            raise UserError(f"{text!r} names more than {MAX_SEEDS} seeds")
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        dup = next(s for s, count in Counter(out).items() if count > 1)
        raise UserError(f"seed {dup} appears more than once in {text!r}")
    return out


def format_seeds(seeds: Sequence[int]) -> str:
    """The shortest ``"A-B,C"`` text for a list of seeds (inverse of `parse_seeds`)."""
    parts, i, seeds = [], 0, list(seeds)
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)
