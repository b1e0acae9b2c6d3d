"""Distillation checkpoints: atomic writes, resume, and a settings check.

A checkpoint is one ``torch.save`` file holding version, settings (compared on resume),
iteration (next to run), latent (the student's module state_dict: `LatentEPD`,
`LatentAMEDTable` or the `AMEDPredictor`; the key keeps its historical name), optimizer
(Adam), torch_rng (CPU RNG state), failures (consecutive skipped steps), losses (per
iteration) and elapsed (seconds). The settings include the method and, for AMED, the form
and feature source, so an AMED checkpoint is never resumed as EPD (or with other features).

The learning rate and the noise are pure functions of (seed, iteration, row), so nothing
else is needed to continue exactly. Files are written with `fileio.write_atomic` and the
folder is fsync'ed after the rename: a process killed (or a power loss) at any moment
leaves the previous or the new checkpoint, never a torn one. The next start removes the
stale temporaries of this checkpoint only (`remove_stale_temporaries`).
"""
from __future__ import annotations

import io
import os
import re
import stat
from typing import Optional

import torch

from ..fileio import temp_prefix, write_atomic

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "check_settings",
           "remove_stale_temporaries"]

CHECKPOINT_VERSION = 1


#: What `tempfile.mkstemp` appends to the prefix: 8 characters of its alphabet.
_MKSTEMP_TAIL = r"[a-z0-9_]{8}"


def _fsync_folder(folder: str) -> None:
    """Makes a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, state: dict) -> None:
    """Writes ``state`` (plus the format version) to ``path`` atomically and durably."""
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    write_atomic(path, buf.getvalue())
    _fsync_folder(os.path.dirname(os.path.abspath(os.fspath(path))))


def remove_stale_temporaries(path) -> int:
    """Deletes the temporaries a killed writer of ``path`` left behind: regular files named
    ``temp_prefix(path)`` + mkstemp's 8 characters, nothing else. Returns how many."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    own = re.compile(re.escape(temp_prefix(path)) + _MKSTEMP_TAIL)
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not own.fullmatch(name):
            continue
        full = os.path.join(folder, name)
        try:
            if stat.S_ISREG(os.lstat(full).st_mode):
                os.unlink(full)
                removed += 1
        except OSError:
            pass
    return removed


def load_checkpoint(path) -> Optional[dict]:
    """The saved state, or None when ``path`` does not exist. ValueError if unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise ValueError(f"distillation checkpoint {path} cannot be read ({e}); delete it to "
                         f"start afresh") from e
    if not isinstance(state, dict) or "settings" not in state or "version" not in state:
        raise ValueError(f"{path} is not an epd_kernels distillation checkpoint")
    if state["version"] > CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state['version']}, newer than this "
                         f"epd_kernels supports ({CHECKPOINT_VERSION})")
    return state


def check_settings(path, saved: dict, current: dict) -> None:
    """ValueError naming every setting that differs between a checkpoint and this call."""
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if diff:
        lines = "\n".join(f"  {k}: checkpoint {saved.get(k, '<absent>')!r}, "
                          f"this call {current.get(k, '<absent>')!r}" for k in diff)
        raise ValueError(f"the distillation checkpoint {os.fspath(path)} was written by a run "
                         f"with different settings, so it cannot be resumed:\n{lines}\n"
                         f"Use the same settings, another checkpoint path, or delete the file.")
