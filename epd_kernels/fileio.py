"""Crash-safe file writing and safetensors header reading, shared by every file the
package writes (params, checkpoints, samples, plots)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile

__all__ = ["write_atomic"]

#: Deepest JSON nesting a file header may have. The package's own headers nest at most
#: a few levels; Python's json parser recurses per level and would end a deeper one
#: (a damaged or hostile file) in RecursionError.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def temp_prefix(path) -> str:
    """Name prefix of the temporary files `write_atomic` creates next to ``path``."""
    return ".tmp-" + os.path.basename(os.fspath(path)) + "."


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    # The rename lives in the folder's entries: without this a power loss can bring back
    # the old name (or none) although the file's bytes are on disk.
    # OSError: a platform without directory handles (Windows), or a file system that
    # cannot sync directories
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def write_atomic(path, data: bytes, *, overwrite: bool = True) -> None:
    """Writes ``data`` to ``path`` atomically (a fsync'ed temporary file in the same folder,
    moved onto ``path``; a killed process leaves the old or the new file). With
    ``overwrite=False`` an existing ``path`` is a FileExistsError, checked before writing and
    at the move (a hard link, which fails if the name exists): two writers cannot both win."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise _exists_error(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_new(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _move_new(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(path):
            raise _exists_error(path) from None
        os.replace(tmp, path)


def json_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar), counted
    without parsing so that it is safe on any input."""
    depth = deepest = 0
    for c in _JSON_STRING.sub("", text):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str, where: str):
    """`json.loads` that refuses nesting deeper than MAX_JSON_DEPTH with a ValueError
    naming ``where`` (json.JSONDecodeError, a ValueError, for invalid JSON)."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text)


def read_safetensors_metadata(data: bytes, path: str, kind: str) -> dict:
    """The string metadata of a safetensors file, with clear errors for damaged headers
    (``kind`` names the expected file, "an EPD params file", where there is none)."""
    if len(data) < 8:
        raise ValueError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or 8 + n > len(data):
        raise ValueError(f"{path}: truncated or corrupted safetensors file (header of {n} "
                         f"bytes, file of {len(data)} bytes)")
    try:
        header = loads_bounded(data[8:8 + n].decode("utf-8"), "the safetensors header")
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: corrupted safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: no epd_kernels metadata in the safetensors header: not "
                         f"{kind}")
    return meta
