"""Atomic output files (PNG, .npy, .npz, JSON; a killed process leaves no file or a complete
one), the clean-up of what a killed or failed command left, and the per-seed layout of
`epd sample`: ``seed-<seed:06d>.npy`` (the float32 sample) and, for images,
``seed-<seed:06d>.png``, written first, so a seed is finished when its .npy exists.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import struct
import tempfile
import zipfile
import zlib
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..fileio import write_atomic

from .errors import UserError

__all__ = ["write_png", "write_npy", "write_npz", "write_json", "load_array_file",
           "load_seed_files", "finished_seeds", "image_layout", "to_uint8_image"]

_TMP_PREFIX = ".tmp-"
_SEED_RE = re.compile(r"^seed-(\d+)\.npy$")
#: Files of a per-seed folder (`epd sample`), as a regex of names.
SAMPLE_FILES = r"seed-\d+\.(?:npy|png)|run\.json"
#: Settings file of a per-seed folder; a folder holding only it has no results.
MANIFEST = "run.json"


def remove_stale_temporaries(folder, names: str) -> None:
    """Deletes the temporaries a killed writer left in ``folder`` for files whose names
    match the regex ``names`` (and the write probe of `ensure_writable_dir`). Other
    ``.tmp-*`` files are not the package's and stay."""
    # the random tail is tempfile.mkstemp's: 8 characters of [a-z0-9_]
    own = re.compile(r"^" + re.escape(_TMP_PREFIX) + r"(?:" + names + r"|probe)\.[a-z0-9_]{8}$")
    folder = os.fspath(folder)
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if own.match(name):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def write_npy(path, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_atomic(path, buf.getvalue())


def write_npz(path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_atomic(path, buf.getvalue())


def write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    write_atomic(path, (text + "\n").encode("utf-8"))


def _json_default(o):
    if hasattr(o, "tolist"):   # numpy scalars and arrays, tensors
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


_created: List[str] = []   # folders made by ensure_writable_dir, in creation order


def ensure_writable_dir(path) -> str:
    """Creates ``path`` (and parents) if needed and checks files can be written there;
    the folders it creates are recorded for `new_folders`."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"cannot write to {path!r}: it exists and is not a folder")
    missing, p = [], os.path.abspath(path)
    while p and not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p) if os.path.dirname(p) != p else ""
    try:
        os.makedirs(path, exist_ok=True)
        _created.extend(reversed(missing))
        fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX + "probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path!r}: {e.strerror or e}") from None
    return path


def _remove_empty(start: int) -> None:
    """Removes the folders created since ``_created[start]`` that hold nothing but a
    settings file or temporaries, deepest first."""
    for folder in sorted(_created[start:], key=len, reverse=True):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        if all(n == MANIFEST or n.startswith(_TMP_PREFIX) for n in names):
            with contextlib.suppress(OSError):
                for n in names:
                    os.unlink(os.path.join(folder, n))
                os.rmdir(folder)


@contextlib.contextmanager
def new_folders():
    """``with new_folders() as remove_empty: ...``: ``remove_empty()`` removes the folders
    the block created that got no results; it is called by itself when the block raises
    (including Ctrl-C: finished results stay, empty folders go)."""
    start = len(_created)
    try:
        yield functools.partial(_remove_empty, start)
    except BaseException:
        _remove_empty(start)
        raise
    finally:
        del _created[start:]


def ensure_writable_file(path, force: Optional[bool] = None) -> str:
    """Checks that a file can be created at ``path`` (its folder is created if needed);
    with ``force=False`` an existing file is a `UserError` (None allows replacing it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a folder, expected a file name")
    if force is False and os.path.exists(path):
        raise UserError(f"--out {path} exists; give --force to replace it, or another --out")
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)))
    return path


# PNG: a small encoder (8-bit gray or RGB, no dependency)
def _chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))


def png_bytes(img: np.ndarray) -> bytes:
    """PNG file contents for a uint8 image ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB)."""
    img = np.ascontiguousarray(img)
    if img.dtype != np.uint8:
        raise ValueError("png_bytes expects a uint8 image")
    if img.ndim not in (2, 3) or img.shape[2:] not in ((), (3,)):
        raise ValueError(f"png_bytes expects [H, W] or [H, W, 3], got {list(img.shape)}")
    color, (h, w) = (0 if img.ndim == 2 else 2), img.shape[:2]   # gray or RGB
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def write_png(path, img: np.ndarray) -> None:
    write_atomic(path, png_bytes(img))


def image_layout(shape: Sequence[int]) -> Optional[tuple]:
    """``(H, W, C)`` for ``[C, H, W]`` with C in (1, 3), ``[H, W]`` (gray) or a flat vector
    of square length (a square gray image, e.g. the 64-dim models); else None."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape[1], shape[2], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 1:
        s = int(math.isqrt(shape[0]))
        if s * s == shape[0] and s > 1:
            return s, s, 1
    return None


def to_uint8_image(x, shape: Sequence[int], scale: int = 1, lo: float = -1.0,
                   hi: float = 1.0) -> np.ndarray:
    """One sample as a uint8 image ``[H*scale, W*scale(, 3)]``: ``[lo, hi]`` -> 0..255
    (clipped), upscaled by pixel repetition (nearest)."""
    layout = image_layout(shape)
    if layout is None:
        raise ValueError(f"samples of shape {list(shape)} are not images")
    h, w, c = layout
    a = np.asarray(x, dtype=np.float64).reshape((c, h, w) if len(shape) == 3 else (h, w))
    if len(shape) == 3:   # [C, H, W] -> [H, W] (gray) or [H, W, 3]
        a = a[0] if c == 1 else a.transpose(1, 2, 0)
    a = np.clip(np.round((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    if scale > 1:
        a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    return a


def seed_path(folder, seed: int, ext: str = ".npy") -> str:
    return os.path.join(os.fspath(folder), f"seed-{int(seed):06d}{ext}")


def finished_seeds(folder) -> Dict[int, str]:
    """``{seed: path of its .npy}`` for the seeds whose sample is complete in ``folder``."""
    folder = os.fspath(folder)
    names = os.listdir(folder) if os.path.isdir(folder) else ()
    return {int(m.group(1)): os.path.join(folder, m.group(0))
            for m in map(_SEED_RE.match, names) if m}


def load_seed_files(folder, seeds: Optional[Iterable[int]] = None):
    """``(seeds [N] int64, samples [N, ...])`` from the .npy files of ``folder``, sorted
    by seed (only the given seeds, if any)."""
    done = finished_seeds(folder)
    chosen: List[int] = sorted(done) if seeds is None else [int(s) for s in seeds]
    missing = [s for s in chosen if s not in done]
    if missing:
        raise UserError(f"{folder}: no sample file for seed(s) {missing[:10]}")
    if not chosen:
        raise UserError(f"{folder}: no per-seed sample files (seed-NNNNNN.npy)")
    arrays = [load_array_file(done[s]) for s in chosen]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"{folder}: sample files have different shapes {sorted(shapes)}")
    return np.asarray(chosen, dtype=np.int64), np.stack(arrays)


def load_array_file(path, keys: Sequence[str] = ()):
    """An .npy array, or for an .npz a dict of the arrays named ``keys`` that it holds
    (all its arrays when ``keys`` is empty); a damaged or foreign file is a one-line
    `UserError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: " + ("is a folder, expected a file" if os.path.isdir(path)
                                       else "not found"))
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            return np.load(path, allow_pickle=False)
        if magic[:4] == b"PK\x03\x04" or magic[:4] == b"PK\x05\x06":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in (keys or f.files) if k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path}: damaged .npy/.npz file "
                        f"({type(e).__name__})") from None
    raise UserError(f"cannot read {path}: not an .npy or .npz file")
