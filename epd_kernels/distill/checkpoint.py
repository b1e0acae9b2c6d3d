"""Distillation checkpoints: atomic writes, resume, and a settings check.

A checkpoint is one ``torch.save`` file holding

    version, settings (the run's settings, compared on resume), iteration (next to run),
    latent (the student's module state_dict: `LatentEPD` for EPD, `LatentAMEDTable` or
    the `AMEDPredictor` for AMED; the key keeps its historical name), optimizer (Adam
    state_dict), torch_rng (CPU RNG state), failures (consecutive skipped steps), losses
    (per iteration), elapsed (seconds so far)

The settings include the method and, for AMED, the form and the feature source, so an
AMED checkpoint is never resumed as EPD (or with other features) and vice versa.

The learning rate is a pure function of the iteration and the noise a pure function of
(seed, iteration, row), so nothing else is needed to continue exactly. Files are written
with `epd_kernels.params.write_atomic` (temporary file, fsync, ``os.replace``), so a
process killed at any moment leaves either the previous or the new checkpoint, never a
torn one (stale temporaries are removed on the next start).
"""
from __future__ import annotations

import glob
import io
import os
from typing import Optional

import torch

from ..fileio import temp_prefix, write_atomic

__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "check_settings",
           "remove_stale_temporaries"]

CHECKPOINT_VERSION = 1


def save_checkpoint(path, state: dict) -> None:
    """Writes ``state`` (plus the format version) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    write_atomic(path, buf.getvalue())


def remove_stale_temporaries(path) -> None:
    """Deletes temporaries a killed writer of ``path`` left behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(temp_prefix(path)) + "*")):
        try:
            os.unlink(tmp)
        except OSError:
            pass


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
