"""Crash-safe file writing and safetensors header reading, shared by every file the
package writes (params, checkpoints, samples, plots)."""
from __future__ import annotations

import json
import os
import struct
import tempfile

__all__ = ["temp_prefix", "write_atomic", "read_safetensors_metadata"]


def temp_prefix(path) -> str:
    """Name prefix of the temporary files `write_atomic` creates next to ``path``."""
    return ".tmp-" + os.path.basename(os.fspath(path)) + "."


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same folder, flushed
    and fsync'ed, then moved over ``path`` with ``os.replace`` (a process killed at any
    moment leaves the old file or the new one, never a torn one)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_safetensors_metadata(data: bytes, path: str, kind: str) -> dict:
    """The string metadata of a safetensors file, with clear errors for damaged headers.

    ``kind`` names the expected file ("an EPD params file") in the error for a file that
    carries no metadata.
    """
    if len(data) < 8:
        raise ValueError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or 8 + n > len(data):
        raise ValueError(f"{path}: truncated or corrupted safetensors file (header of {n} "
                         f"bytes, file of {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupted safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupted safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{path}: no epd_kernels metadata in the safetensors header: not "
                         f"{kind}")
    return meta
