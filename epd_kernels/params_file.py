"""What every params file of the package shares: JSON metadata, format version, checksum.

A params file (EPD, D-ODE, AMED) is one safetensors file: the tensors, plus in the
header's string-to-string metadata one JSON-encoded value per field, among them
``format_version`` (readers refuse newer layouts), ``checksum`` (sha256 over the tensors'
names, dtypes, shapes and bytes, so that a corrupted data section is detected) and
``package_version``. Files are written atomically (`fileio.write_atomic`).

    metadata = encode_metadata(fields, "AMEDParams")               # save
    raw = read_params_file(path, "an AMED params file")            # load: tensors + decoded
    check_format_version(raw, supported)                           # metadata, clear errors
    check_checksum(raw)

Every error is a ValueError that names the file (`ParamsFile.fail`), except a missing
file (FileNotFoundError).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Dict, Iterable, NoReturn

import torch

from .fileio import read_safetensors_metadata

__all__ = ["checksum", "encode_metadata", "ParamsFile", "read_params_file",
           "check_format_version", "check_checksum"]


def checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names (sorted), dtypes, shapes and raw bytes.

    The same digest as the one `EPDParams` and `DODEParams` files carry.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_metadata(fields: dict, owner: str) -> Dict[str, str]:
    """Each field JSON-encoded (sorted keys, finite numbers only); ValueError naming
    `owner` if a value (meta, schedule, ...) cannot be serialised."""
    try:
        return {k: json.dumps(v, sort_keys=True, allow_nan=False) for k, v in fields.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{owner}.meta / schedule must be JSON-serialisable (finite numbers, "
                         f"str, list, dict): {e}") from e


@dataclasses.dataclass
class ParamsFile:
    """A read params file: its path, tensors and decoded metadata."""

    path: str
    tensors: Dict[str, torch.Tensor]
    meta: dict

    def fail(self, msg: str) -> NoReturn:
        raise ValueError(f"{self.path}: {msg}")

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


def read_params_file(path, kind: str) -> ParamsFile:
    """Reads a params file: FileNotFoundError if absent; ValueError for a truncated or
    corrupted file, a file without metadata (``kind`` names what was expected, e.g. "an
    AMED params file"), a field that is not JSON, or no ``format_version``."""
    from safetensors.torch import load as st_load

    path = os.fspath(path)
    if not os.path.isfile(path):
        article, _, what = kind.partition(" ")
        raise FileNotFoundError(f"{what if article in ('a', 'an') else kind} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    raw_meta = read_safetensors_metadata(data, path, kind)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{path}: corrupted safetensors data: {e}") from e
    pf = ParamsFile(path, tensors, {})
    if "format_version" not in raw_meta:
        pf.fail(f"no 'format_version' in the metadata: not {kind}")
    for k, v in raw_meta.items():
        try:
            pf.meta[k] = json.loads(v)
        except json.JSONDecodeError as e:
            pf.fail(f"metadata field {k!r} is not valid JSON ({e}): the file is corrupted")
    return pf


def check_format_version(pf: ParamsFile, supported: int) -> int:
    """The file's format_version; ValueError if invalid or newer than `supported`."""
    version = pf.meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        pf.fail(f"invalid format_version {version!r}")
    if version > supported:
        pf.fail(f"format_version {version} is newer than this epd_kernels supports "
                f"({supported}); upgrade epd_kernels to read it")
    return version


def check_checksum(pf: ParamsFile) -> None:
    """ValueError unless the stored checksum matches the tensors."""
    if "checksum" not in pf.meta:
        pf.fail("metadata is missing the keys ['checksum']")
    if pf.meta["checksum"] != checksum(pf.tensors):
        pf.fail("checksum mismatch: the tensor data is corrupted")
