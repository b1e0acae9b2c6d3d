"""What every params file and params object of the package shares.

A params file (EPD, D-ODE, AMED) is one safetensors file: the tensors, plus in the
header's string-to-string metadata one JSON-encoded value per field, among them
``format_version`` (readers refuse newer layouts), ``kind`` (absent for EPD files, the
first layout), ``checksum`` (sha256 over the tensors' names, dtypes, shapes and bytes, so
that a corrupted data section is detected), ``package_version`` and ``meta``. Files are
written atomically (`fileio.write_atomic`).

    write_params_file(path, tensors, fields, "AMEDParams")          # save
    pf = open_params_file(path, "an AMED params file", kind="amed",  # load: every check
                          supported=1, keys=_META_KEYS)              # the header needs
    pf.require_tensors(expected_shapes, "S=3")                       # then the owner's own
    with pf.naming_errors():
        params = AMEDParams(...).validate()

Every load error is a ValueError that names the file (`ParamsFile.fail`), except a missing
file (FileNotFoundError). The same wording serves all three owners, which the tests of
each check.

The checks every params OBJECT shares (the time grid, the free-form fields, the grid a
caller asks for) are here too, so that the three classes word them alike.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Dict, Iterable, Mapping, NoReturn, Optional, Sequence

import torch

from .fileio import read_safetensors_metadata, write_atomic

__all__ = ["FLOAT_DTYPES", "checksum", "encode_metadata", "write_params_file", "ParamsFile",
           "read_params_file", "open_params_file", "check_format_version", "check_checksum",
           "to_tensor", "check_grid_shape", "check_grid", "check_common_fields",
           "check_same_grid"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# kind -> (what it is called, the class that reads it), for the hint of a wrong-kind error.
_KINDS = {"d-ode": ("D-ODE", "DODEParams"), "amed": ("AMED", "AMEDParams")}


# ------------------------------------------------------------------------------- writing


def checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names (sorted), dtypes, shapes and raw bytes.

    Every params file written since the first layout carries this digest: changing it
    makes every existing file unreadable.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_metadata(fields: dict, owner: str) -> Dict[str, str]:
    """Each field JSON-encoded (sorted keys, finite numbers only: NaN is not JSON);
    ValueError naming `owner` if a value (meta, schedule, ...) cannot be serialised."""
    try:
        return {k: json.dumps(v, sort_keys=True, allow_nan=False) for k, v in fields.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{owner}.meta / schedule must be JSON-serialisable (finite numbers, "
                         f"str, list, dict): {e}") from e


def write_params_file(path, tensors: Dict[str, torch.Tensor], fields: dict, owner: str) -> None:
    """Writes `tensors` with `fields` plus ``package_version`` and ``checksum``, atomically:
    an unserialisable field raises before anything is written."""
    from safetensors.torch import save as st_save
    from . import __version__

    fields = {**fields, "package_version": __version__, "checksum": checksum(tensors)}
    write_atomic(path, st_save(tensors, metadata=encode_metadata(fields, owner)))


# ------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class ParamsFile:
    """A read params file: its path, tensors and decoded metadata."""

    path: str
    tensors: Dict[str, torch.Tensor]
    meta: dict

    def fail(self, msg: str) -> NoReturn:
        raise ValueError(f"{self.path}: {msg}")

    @contextlib.contextmanager
    def naming_errors(self):
        """Prefixes the file's path to a ValueError raised inside (building and validating
        the params object from the file), unless it already names the file."""
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
        """The metadata ``kind`` is `kind` (None: absent, as in EPD files); else an error
        that says which class reads the file. `what` is e.g. "a D-ODE params file"."""
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

    def require_tensors(self, shapes: Mapping[str, Sequence[int]], context: str) -> None:
        """Exactly the tensors `shapes` names (missing ones listed in its order), each of its
        shape; `context` ("K=2, S=3") explains the expected shapes."""
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


def open_params_file(path, what: str, *, kind: Optional[str], supported: int,
                     keys: Iterable[str]) -> ParamsFile:
    """`read_params_file` plus what every params header must satisfy, in this order (the
    first problem found is the one reported): the `kind` (`ParamsFile.require_kind`), a
    format_version <= `supported`, all of `keys`, the checksum, ``meta`` an object."""
    pf = read_params_file(path, what)
    pf.require_kind(kind, what)
    check_format_version(pf, supported)
    pf.require_keys(keys)
    check_checksum(pf)
    if not isinstance(pf.meta["meta"], dict):
        pf.fail(f"metadata 'meta' must be an object, got {type(pf.meta['meta']).__name__}")
    return pf


# ------------------------------------------------------------------- params objects


def to_tensor(owner: str, name: str, value) -> torch.Tensor:
    """`value` itself if a tensor (dtype, device and autograd kept), else a float64 tensor;
    ValueError naming ``owner.name`` if it cannot be one."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{owner}.{name}: cannot make a tensor from "
                         f"{type(value).__name__}: {e}") from None


def check_grid_shape(owner: str, sigmas: torch.Tensor) -> None:
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"{owner}.sigmas must be a 1-D grid of S+1 >= 2 values, got "
                         f"shape {list(sigmas.shape)}")


def check_grid(owner: str, sigmas: torch.Tensor) -> None:
    """The time grid: finite, > 0 and strictly decreasing (sigma_max first)."""
    s = sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError(f"{owner}.sigmas has non-finite values (nan or inf)")
    if (s <= 0).any():
        raise ValueError(f"{owner}.sigmas must be > 0 (the last is sigma_min), min is "
                         f"{s.min().item():.6g}")
    if not (s[1:] < s[:-1]).all():
        raise ValueError(f"{owner}.sigmas must be strictly decreasing (sigma_max first)")


def check_common_fields(owner: str, params) -> None:
    """The fields every params class has besides its tensors: ``nfe`` an int (each class
    checks its own NFE rule), ``max_order`` an iPNDM order, ``schedule`` and ``meta``."""
    if isinstance(params.nfe, bool) or not isinstance(params.nfe, int):
        raise ValueError(f"{owner}.nfe must be an int, got {params.nfe!r}")
    if not 1 <= params.max_order <= 4:
        raise ValueError(f"{owner}.max_order must be in 1..4 (iPNDM), got {params.max_order}")
    if params.schedule is not None and not isinstance(params.schedule, (str, dict)):
        raise ValueError(f"{owner}.schedule must be a str, a dict or None, got "
                         f"{type(params.schedule).__name__}")
    if not isinstance(params.meta, dict):
        raise ValueError(f"{owner}.meta must be a dict, got {type(params.meta).__name__}")


def check_afs_nfe(what: str, made: str, *, afs: bool, nfe: int, detail: str,
                  asked_afs=None, asked_nfe=None) -> None:
    """ValueError unless the asked afs / latency NFE (None: not asked) are the params' own;
    `what` ("D-ODE params"), `made` ("fitted") and `detail` ("5 steps, afs=False") word
    the messages."""
    if asked_afs is not None and bool(asked_afs) != afs:
        raise ValueError(f"afs={bool(asked_afs)} was asked but the {what} were {made} with "
                         f"afs={afs}")
    if asked_nfe is not None and int(asked_nfe) != nfe:
        raise ValueError(f"{what} were {made} for latency NFE {nfe} ({detail}) but NFE "
                         f"{asked_nfe} was asked")


def check_same_grid(what: str, made: str, mine: torch.Tensor, given: torch.Tensor, schedule,
                    *, rtol: float, atol: float) -> None:
    """ValueError unless the grid `given` (float64) is the params' grid `mine` within
    rtol / atol; `what` ("EPD params") and `made` ("distilled") word the message."""
    mine = mine.detach().to("cpu", torch.float64)
    given = given.detach().to("cpu", torch.float64).reshape(-1)
    if given.numel() != mine.numel():
        raise ValueError(f"{what} have {mine.numel()} sigmas ({mine.numel() - 1} steps) but "
                         f"the grid given has {given.numel()} ({given.numel() - 1} steps)")
    if not torch.allclose(given, mine, rtol=rtol, atol=atol):
        i = int(((given - mine).abs() > atol + rtol * mine.abs()).nonzero()[0, 0])
        raise ValueError(f"{what} were {made} on a different time grid: sigma[{i}] is "
                         f"{mine[i].item():.8g} in the params but {given[i].item():.8g} in "
                         f"the grid given (schedule {schedule!r})")
