"""The params file format, shared by EPD, AMED and D-ODE params.

One safetensors file, written atomically: the tensors, plus one JSON-encoded header value
per field (the common ones of `base._COMMON_KEYS` and the family's own; ``kind`` names the
family, absent in EPD files). Every load error is a one-line ValueError starting with the
file's path, except FileNotFoundError and IsADirectoryError."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Dict, Iterable, Mapping, NoReturn, Optional, Sequence

import torch

from ..fileio import (MAX_JSON_DEPTH, json_depth, loads_bounded, read_safetensors_metadata,
                      write_atomic)

__all__ = []  # the file format is reached through the params classes' save / load

# kind -> (what it is called, the class that reads it), for the hint of a wrong-kind error.
_KINDS = {"d-ode": ("D-ODE", "DODEParams"), "amed": ("AMED", "AMEDParams")}


def checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names (sorted), dtypes, shapes and raw bytes (changing it
    makes every existing file unreadable)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _encode(fields: dict, owner: str) -> Dict[str, str]:
    """Each field as JSON (finite numbers, no deeper than readers accept) or ValueError."""
    out = {}
    for k, v in fields.items():
        try:
            out[k] = json.dumps(v, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"{owner}.meta / schedule must be JSON-serialisable (finite "
                             f"numbers, str, list, dict): {type(e).__name__}: {e}") from None
        if json_depth(out[k]) > MAX_JSON_DEPTH:
            raise ValueError(f"{owner}.{k} nests deeper than {MAX_JSON_DEPTH} levels, which "
                             f"readers refuse")
    return out


def write_params_file(path, tensors: Dict[str, torch.Tensor], fields: dict, owner: str, *,
                      overwrite: bool) -> None:
    """Writes `tensors` and `fields` (with ``package_version`` and ``checksum``) atomically."""
    from safetensors.torch import save as st_save

    from .. import __version__

    fields = {**fields, "package_version": __version__, "checksum": checksum(tensors)}
    write_atomic(path, st_save(tensors, metadata=_encode(fields, owner)), overwrite=overwrite)


@dataclasses.dataclass
class ParamsFile:
    """A read params file and the checks its reader applies (ValueErrors naming the file)."""

    path: str
    tensors: Dict[str, torch.Tensor]
    meta: dict

    def fail(self, msg: str) -> NoReturn:
        raise ValueError(f"{self.path}: " + " ".join(str(msg).split()))

    @contextlib.contextmanager
    def naming_errors(self):
        """Prefixes the file's path to a ValueError raised inside, unless it names it."""
        try:
            yield
        except ValueError as e:
            if str(e).startswith(str(self.path)):
                raise
            self.fail(str(e))

    def require_keys(self, keys: Iterable[str]) -> None:
        missing = [k for k in keys if k not in self.meta]
        if missing:
            self.fail(f"metadata is missing the keys {missing}")

    def require_int(self, *keys: str) -> None:
        for k in keys:
            v = self.meta[k]
            if not isinstance(v, int) or isinstance(v, bool):
                self.fail(f"metadata {k!r} must be an integer, got {v!r}")

    def require_bool(self, *keys: str) -> None:
        for k in keys:
            if not isinstance(self.meta[k], bool):
                self.fail(f"metadata {k!r} must be true/false, got {self.meta[k]!r}")

    def require_kind(self, kind: Optional[str], what: str) -> None:
        """The metadata ``kind`` is `kind` (None: absent); else say which class reads it."""
        found = self.meta.get("kind")
        if found == kind:
            return
        hint = ""
        if self.meta.get("solver") in ("epd", "epd-ipndm") and found is None:
            hint = " (it holds EPD params: use EPDParams.load)"
        elif found in _KINDS:
            hint = " (it holds {} params: use {}.load)".format(*_KINDS[found])
        expected = "none" if kind is None else repr(kind)
        self.fail(f"not {what}: metadata kind is {found!r}, expected {expected}{hint}")

    def require_solver(self, names: Sequence[str]) -> None:
        """``solver`` is one of `names` (plain, plugin) and agrees with ``plugin``."""
        solver = self.meta["solver"]
        if solver not in names:
            self.fail(f"solver must be {' or '.join(map(repr, names))}, got {solver!r}")
        self.require_bool("plugin")
        if (solver == names[1]) != self.meta["plugin"]:
            self.fail(f"solver {solver!r} contradicts plugin={self.meta['plugin']}")

    def require_tensors(self, shapes: Mapping[str, Sequence[int]], context: str) -> None:
        """Exactly the tensors of `shapes`, each of its shape; `context` ("K=2, S=3")
        explains them."""
        missing = [k for k in shapes if k not in self.tensors]
        if missing:
            self.fail(f"missing tensors {missing} (has {sorted(self.tensors)})")
        extra = sorted(set(self.tensors) - set(shapes))
        if extra:
            self.fail(f"unexpected tensors {extra}")
        for k, shape in shapes.items():
            if tuple(self.tensors[k].shape) != tuple(shape):
                self.fail(f"tensor {k!r} has shape {list(self.tensors[k].shape)}, expected "
                          f"{list(shape)} ({context})")


def _read(path, what: str) -> ParamsFile:
    """The file's tensors and JSON-decoded metadata, without checking what they hold."""
    from safetensors.torch import load as st_load

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not {what}")
    if not os.path.isfile(path):
        article, _, name = what.partition(" ")
        raise FileNotFoundError(f"{name if article in ('a', 'an') else what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    raw_meta = read_safetensors_metadata(data, path, what)
    pf = ParamsFile(path, {}, {})
    try:
        pf.tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        pf.fail(f"corrupted safetensors data: {e}")
    if "format_version" not in raw_meta:
        pf.fail(f"no 'format_version' in the metadata: not {what}")
    for k, v in raw_meta.items():
        try:
            pf.meta[k] = loads_bounded(v, f"metadata field {k!r}")
        except json.JSONDecodeError as e:
            pf.fail(f"metadata field {k!r} is not valid JSON ({e}): the file is corrupted")
        except ValueError as e:
            pf.fail(str(e))
    return pf


def open_params_file(path, what: str, *, kind: Optional[str], supported: int,
                     keys: Iterable[str]) -> ParamsFile:
    """Reads a params file and checks, first problem first: the `kind`, a format_version <=
    `supported`, all of `keys`, the checksum, and the common fields' types."""
    pf = _read(path, what)
    pf.require_kind(kind, what)
    version = pf.meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        pf.fail(f"invalid format_version {version!r}")
    if version > supported:
        pf.fail(f"format_version {version} is newer than this epd_kernels supports "
                f"({supported}); upgrade epd_kernels to read it")
    pf.require_keys(keys)
    if pf.meta["checksum"] != checksum(pf.tensors):
        pf.fail("checksum mismatch: the tensor data is corrupted")
    if not isinstance(pf.meta["meta"], dict):
        pf.fail(f"metadata 'meta' must be an object, got {type(pf.meta['meta']).__name__}")
    pf.require_int("S", "nfe", "max_order")
    pf.require_bool("afs")
    return pf
