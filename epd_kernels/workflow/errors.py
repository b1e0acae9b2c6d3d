"""`UserError`: a problem with what the user asked for (bad model, budget, seeds, paths...),
which `epd_kernels.cli` prints as one line; anything else that escapes is a bug and keeps
its traceback."""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error in the user's request; ``str(e)`` is the message shown."""


def one_line(msg) -> str:
    """The message on one line (library messages sometimes list details on several)."""
    parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
    return "; ".join(parts) if parts else "unknown error"
