"""AMED-Solver / AMED-Plugin parameters (arXiv 2312.00094), in one of two forms.

Both forms give, at step n (from ``t = t_n`` to ``t' = t_{n+1}``), the values the sampler
(`epd_kernels.solvers.amed`) needs, in the parametrisation EPD uses:

    r      in [0, 1]   intermediate time  t_mid = t'^r t^(1 - r)
    delta  > -1        the intermediate evaluation is at sigma (1 + delta) t_mid
                       (the paper's scale_time = 1 + delta)
    o      > -1        the update is scaled by 1 + o (the paper's scale_dir = 1 + o)

* TABLE form: ``r, delta, o [S]``, one value per step for every sample ("EPD with K = 1").
* PREDICTOR form (the paper's): an `AMEDPredictor` network maps per-sample features read
  at the main point (``features``: "denoised", "module:<name>" or a callable; see
  `epd_kernels.amed_predictor`) and the two sigmas to ``[B]`` values of r, delta, o.

`AMEDParams.init` gives the neutral start of either form, r = 1/2, delta = o = 0: AMED-Solver
is then DPM-Solver-2 and AMED-Plugin is iPNDM on the grid refined by the geometric
midpoints. Common fields: ``sigmas [S+1]`` (float64, strictly decreasing, > 0), ``afs``,
``plugin`` (AMED-Plugin on iPNDM), ``max_order`` (its iPNDM order), ``nfe`` (latency NFE
``2 S - afs``, which is also the total number of evaluations), ``schedule`` and ``meta``.

File format (`save` / `load`): one safetensors file (written atomically) with the tensors
``sigmas`` and either ``r``, ``delta``, ``o`` (table) or the predictor's state dict under
``predictor.<name>`` (float64), and JSON metadata (`epd_kernels.params_file`):
``format_version``, ``kind`` ("amed"), ``solver`` ("amed" / "amed-ipndm"), ``form``
("table" / "predictor"), ``S``, ``nfe``, ``afs``, ``plugin``, ``max_order``,
``schedule``, ``features`` (the feature source, None for a table), ``predictor`` (the
network's config, None for a table), ``package_version``, ``meta`` and ``checksum``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .amed_predictor import (AMEDPredictor, check_feature_spec, feature_spec_name,
                             pooled_dim)
from .params import epd_latency_nfe
from .params_file import (FLOAT_DTYPES, check_afs_nfe, check_common_fields, check_grid,
                          check_grid_shape, check_same_grid, open_params_file, to_tensor,
                          write_params_file)

__all__ = ["AMEDParams", "AMEDPredictor", "AMED_FORMAT_VERSION", "AMED_FORMS",
           "amed_latency_nfe", "AMED_DELTA_MAX", "AMED_O_MAX"]

#: Version of the file layout written by `AMEDParams.save`. Readers refuse newer versions.
AMED_FORMAT_VERSION = 1
AMED_FORMS = ("table", "predictor")
#: The paper's bounds: scale_time in (0.8, 1.2), scale_dir in (0.99, 1.01).
AMED_DELTA_MAX = 0.2
AMED_O_MAX = 0.01

_KIND = "amed"
_TABLE = ("r", "delta", "o")
_META_KEYS = ("format_version", "kind", "solver", "form", "S", "nfe", "afs", "plugin",
              "max_order", "schedule", "features", "predictor", "package_version", "meta",
              "checksum")
_CONFIG_KEYS = ("feature_dim", "hidden", "bottleneck", "time_channels", "delta_max", "o_max")


def amed_latency_nfe(num_steps: int, afs: bool) -> int:
    """Sequential (and total) denoiser evaluations of AMED: 2 per step, minus 1 with AFS."""
    return epd_latency_nfe(num_steps, afs)


def _tensor(name, value):
    return to_tensor("AMEDParams", name, value)


@dataclass
class AMEDParams:
    """AMED parameters on one time grid, table or predictor form (module docstring).

    Build with `AMEDParams.init(sigmas, form=...)`, by ``distill(..., method="amed")``, or
    with `AMEDParams.load(path)`. Give either ``r, delta, o`` or ``predictor``.
    """

    sigmas: torch.Tensor
    r: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None
    o: Optional[torch.Tensor] = None
    predictor: Optional[AMEDPredictor] = None
    features: Union[str, Callable, None] = None
    nfe: Optional[int] = None
    afs: bool = True
    plugin: bool = False
    max_order: int = 4
    schedule: Union[str, dict, None] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sigmas = _tensor("sigmas", self.sigmas).detach().to(torch.float64)
        for name in _TABLE:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _tensor(name, v))
        if self.predictor is not None and self.features is None:
            self.features = "denoised"
        self.afs = bool(self.afs)
        self.plugin = bool(self.plugin)
        if isinstance(self.max_order, bool) or not isinstance(self.max_order, int):
            raise ValueError(f"AMEDParams.max_order must be an int in 1..4, got "
                             f"{self.max_order!r}")
        if self.meta is None:
            self.meta = {}
        if self.nfe is None and self.sigmas.dim() == 1:
            self.nfe = amed_latency_nfe(self.sigmas.numel() - 1, self.afs)

    # ---------------------------------------------------------------- construction

    @classmethod
    def init(cls, sigmas, *, form: str = "table", afs: bool = True, plugin: bool = False,
             max_order: int = 4, schedule: Union[str, dict, None] = None,
             meta: Optional[dict] = None, features="denoised",
             feature_dim: Optional[int] = None, shape=None, hidden: int = 128,
             bottleneck: int = 4, time_channels: int = 8,
             delta_max: float = AMED_DELTA_MAX, o_max: float = AMED_O_MAX, seed: int = 0,
             dtype: torch.dtype = torch.float64, device=None) -> "AMEDParams":
        """The neutral start (r = 1/2, delta = o = 0) on ``sigmas`` ([S+1], decreasing).

        ``form="table"``: r, delta, o of shape [S] (``dtype``, ``device``).
        ``form="predictor"``: an `AMEDPredictor` whose heads are zero (so it outputs the
        neutral values for any input) reading ``features``; its input size is
        ``feature_dim``, or for ``features="denoised"`` the pooled size of a sample of
        per-sample ``shape``. ``hidden``, ``bottleneck``, ``time_channels``,
        ``delta_max``, ``o_max`` and ``seed`` (initial encoder weights) configure it.
        """
        if form not in AMED_FORMS:
            raise ValueError(f"form must be one of {AMED_FORMS}, got {form!r}")
        sig = _tensor("sigmas", sigmas).detach().to(torch.float64)
        check_grid_shape("AMEDParams", sig)
        S = sig.numel() - 1
        common = dict(sigmas=sig, afs=afs, plugin=plugin, max_order=max_order,
                      schedule=schedule, meta=dict(meta or {}))
        if form == "table":
            kw = dict(dtype=dtype, device=device)
            p = cls(r=torch.full((S,), 0.5, **kw), delta=torch.zeros(S, **kw),
                    o=torch.zeros(S, **kw), **common)
        else:
            spec = check_feature_spec(features)
            if feature_dim is None:
                if spec != "denoised" or shape is None:
                    raise ValueError("feature_dim (values per sample of the feature source) "
                                     "must be given for the predictor form, unless "
                                     "features='denoised' and the data shape is given")
                feature_dim = pooled_dim(shape)
            net = AMEDPredictor(feature_dim, hidden=hidden, bottleneck=bottleneck,
                                time_channels=time_channels, delta_max=delta_max,
                                o_max=o_max, seed=seed, dtype=dtype, device=device)
            net.requires_grad_(False)  # like a table: a value, until a distillation trains it
            p = cls(predictor=net, features=spec, **common)
        return p.validate()

    # ---------------------------------------------------------------- properties

    @property
    def form(self) -> str:
        return "table" if self.predictor is None else "predictor"

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def solver(self) -> str:
        """The `sample` name: "amed" or "amed-ipndm"."""
        return "amed-ipndm" if self.plugin else "amed"

    @property
    def total_evaluations(self) -> int:
        """All evaluations (batch B each): equal to the latency NFE (no parallel branches)."""
        return amed_latency_nfe(self.num_steps, self.afs)

    @property
    def feature_dim(self) -> Optional[int]:
        return None if self.predictor is None else self.predictor.feature_dim

    def step_values(self, n: int, features: Optional[torch.Tensor] = None, t=None,
                    t_next=None):
        """``(r, delta, o)`` of step n: 0-d tensors (table) or ``[B]`` tensors (predictor,
        from ``features [B, F]`` and the sigmas t, t', default ``sigmas[n], sigmas[n+1]``)."""
        if not 0 <= int(n) < self.num_steps:
            raise ValueError(f"step n = {n} is outside 0..{self.num_steps - 1}")
        if self.predictor is None:
            return self.r[n], self.delta[n], self.o[n]
        if features is None:
            raise ValueError("the predictor form needs the features [B, F] of the step")
        t = float(self.sigmas[n]) if t is None else t
        t_next = float(self.sigmas[n + 1]) if t_next is None else t_next
        return self.predictor(features, t, t_next)

    # ---------------------------------------------------------------- copies

    def replace(self, **changes) -> "AMEDParams":
        """A shallow copy with some fields changed (``nfe`` recomputed unless given)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw["meta"] = dict(self.meta)
        if "nfe" not in changes and ({"sigmas", "afs"} & set(changes)):
            kw["nfe"] = None
        kw.update(changes)
        return AMEDParams(**kw)

    def with_features(self, features) -> "AMEDParams":
        """A copy (sharing the predictor) that reads ``features`` (e.g. the callable a
        file could only name)."""
        if self.predictor is None:
            raise ValueError("table-form AMED params read no features")
        return self.replace(features=check_feature_spec(features))

    def detach(self) -> "AMEDParams":
        """A copy whose tensors (and predictor) are detached from autograd and cloned."""
        if self.predictor is None:
            return self.replace(**{n: getattr(self, n).detach().clone() for n in _TABLE})
        net = copy.deepcopy(self.predictor)
        for p in net.parameters():
            p.requires_grad_(False)
        return self.replace(predictor=net)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AMEDParams":
        """A copy on ``device``; ``dtype`` converts the table / the predictor's weights."""
        if self.predictor is None:
            return self.replace(**{n: getattr(self, n).to(device=device, dtype=dtype)
                                   for n in _TABLE})
        return self.replace(predictor=copy.deepcopy(self.predictor).to(device=device,
                                                                        dtype=dtype))

    # ---------------------------------------------------------------- checks

    def check_structure(self) -> None:
        """Form, shapes, dtypes and metadata types; the NFE rule (no value checks)."""
        check_grid_shape("AMEDParams", self.sigmas)
        S = self.num_steps
        given = [n for n in _TABLE if getattr(self, n) is not None]
        if self.predictor is not None:
            if given:
                raise ValueError(f"AMEDParams has a predictor and table values {given}: give "
                                 f"one form only")
            if not isinstance(self.predictor, AMEDPredictor):
                raise ValueError(f"AMEDParams.predictor must be an AMEDPredictor, got "
                                 f"{type(self.predictor).__name__}")
            check_feature_spec(self.features)
        else:
            if len(given) != 3:
                missing = [n for n in _TABLE if n not in given]
                raise ValueError(f"AMEDParams needs either a predictor or the table r, delta, "
                                 f"o; missing {missing}")
            for name in _TABLE:
                t = getattr(self, name)
                if t.dtype not in FLOAT_DTYPES:
                    raise ValueError(f"AMEDParams.{name} must be a floating tensor, got "
                                     f"{t.dtype}")
                if tuple(t.shape) != (S,):
                    raise ValueError(f"AMEDParams.{name} must have shape [S] = [{S}] (S from "
                                     f"sigmas of length {S + 1}), got {list(t.shape)}")
            devices = {getattr(self, n).device for n in _TABLE}
            if len(devices) > 1:
                raise ValueError(f"AMEDParams tensors r, delta, o are on several devices: "
                                 f"{sorted(map(str, devices))}")
            if self.features is not None:
                raise ValueError("table-form AMED params read no features: leave features "
                                 "None")
        check_common_fields("AMEDParams", self)
        expected = amed_latency_nfe(S, self.afs)
        if self.nfe != expected:
            raise ValueError(f"AMEDParams.nfe = {self.nfe} does not match S = {S} steps with "
                             f"afs={self.afs}: AMED has latency NFE 2*S - afs = {expected}")

    def validate(self) -> "AMEDParams":
        """Structure plus values: finite; r in [0, 1], delta > -1, o > -1 (table); finite
        weights (predictor, whose outputs are bounded by construction); a finite, positive,
        strictly decreasing grid. Returns self; raises ValueError naming the field."""
        self.check_structure()
        if self.predictor is None:
            vals = {n: getattr(self, n).detach().to("cpu", torch.float64) for n in _TABLE}
            for name, v in vals.items():
                if not torch.isfinite(v).all():
                    raise ValueError(f"AMEDParams.{name} has non-finite values (nan or inf)")
            r = vals["r"]
            if (r < 0).any() or (r > 1).any():
                raise ValueError(f"AMEDParams.r must lie in [0, 1], got values in "
                                 f"[{r.min().item():.6g}, {r.max().item():.6g}]")
            for name in ("delta", "o"):
                if (vals[name] <= -1).any():
                    raise ValueError(f"AMEDParams.{name} must be > -1 (1 + {name} is a "
                                     f"positive scale), min is {vals[name].min().item():.6g}")
        else:
            for name, p in self.predictor.state_dict().items():
                if not torch.isfinite(p).all():
                    raise ValueError(f"AMEDParams.predictor weight {name!r} has non-finite "
                                     f"values (nan or inf)")
        check_grid("AMEDParams", self.sigmas)
        return self

    def check_compatible(self, nfe: Optional[int] = None, sigmas=None, *,
                         plugin: Optional[bool] = None, afs: Optional[bool] = None,
                         rtol: float = 1e-5, atol: float = 1e-8) -> None:
        """Raises ValueError unless these params fit the requested nfe, grid, plugin, afs."""
        if plugin is not None and bool(plugin) != self.plugin:
            want = "amed-ipndm" if plugin else "amed"
            raise ValueError(f"these AMED params are for solver {self.solver!r} "
                             f"(plugin={self.plugin}), not {want!r}")
        check_afs_nfe("AMED params", "made", afs=self.afs, nfe=self.nfe,
                      detail=f"{self.num_steps} steps, afs={self.afs}", asked_afs=afs,
                      asked_nfe=nfe)
        if sigmas is not None:
            check_same_grid("AMED params", "distilled", self.sigmas, _tensor("sigmas", sigmas),
                            self.schedule, rtol=rtol, atol=atol)

    # ---------------------------------------------------------------- files

    def _tensors_for_file(self):
        out = {"sigmas": self.sigmas.detach().to("cpu").contiguous().clone()}
        if self.predictor is None:
            for n in _TABLE:
                out[n] = getattr(self, n).detach().to("cpu").contiguous().clone()
        else:
            for k, v in self.predictor.state_dict().items():
                out["predictor." + k] = v.detach().to("cpu").contiguous().clone()
        return out

    def save(self, path: Union[str, os.PathLike], feature_name: Optional[str] = None) -> None:
        """Writes a safetensors file atomically. A predictor reading a callable needs
        ``feature_name`` (stored as ``"callable:<name>"``; pass the callable again to
        `load`)."""
        self.validate()
        features = None
        if self.predictor is not None:
            features = feature_spec_name(self.features, feature_name)
        fields = {
            "format_version": AMED_FORMAT_VERSION, "kind": _KIND, "solver": self.solver,
            "form": self.form, "S": self.num_steps, "nfe": self.nfe, "afs": self.afs,
            "plugin": self.plugin, "max_order": self.max_order, "schedule": self.schedule,
            "features": features,
            "predictor": None if self.predictor is None else self.predictor.config,
            "meta": self.meta,
        }
        write_params_file(path, self._tensors_for_file(), fields, "AMEDParams")

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None,
             features: Optional[Callable] = None) -> "AMEDParams":
        """Reads and fully validates a file written by `save`.

        ``features``: the callable for a file saved with a named callable feature source.
        FileNotFoundError for a missing file; ValueError naming the file and the problem
        for a truncated or corrupted file, a file of another kind (EPD, D-ODE), a newer
        format_version, missing keys, wrong shapes, an nfe that does not match the grid,
        or out-of-range values.
        """
        pf = open_params_file(path, "an AMED params file", kind=_KIND,
                              supported=AMED_FORMAT_VERSION, keys=_META_KEYS)
        meta = pf.meta
        if meta["solver"] not in ("amed", "amed-ipndm"):
            pf.fail(f"solver must be 'amed' or 'amed-ipndm', got {meta['solver']!r}")
        if meta["form"] not in AMED_FORMS:
            pf.fail(f"form must be one of {AMED_FORMS}, got {meta['form']!r}")
        pf.require_bool("afs", "plugin")
        pf.require_int("S", "nfe", "max_order")
        if (meta["solver"] == "amed-ipndm") != meta["plugin"]:
            pf.fail(f"solver {meta['solver']!r} contradicts plugin={meta['plugin']}")
        S, tensors = meta["S"], pf.tensors
        if meta["form"] == "table":
            expect = {"r": (S,), "delta": (S,), "o": (S,), "sigmas": (S + 1,)}
        else:
            expect = {"sigmas": (S + 1,)}
            net = cls._predictor_from_meta(pf)
            expect.update({"predictor." + k: tuple(v.shape)
                           for k, v in net.state_dict().items()})
        pf.require_tensors(expect, f"S={S}, form {meta['form']!r}")
        common = dict(sigmas=tensors["sigmas"], nfe=meta["nfe"], afs=meta["afs"],
                      plugin=meta["plugin"], max_order=meta["max_order"],
                      schedule=meta["schedule"], meta=meta["meta"])
        with pf.naming_errors():
            if meta["form"] == "table":
                if meta["features"] is not None or meta["predictor"] is not None:
                    pf.fail("a table-form file must have features and predictor null")
                params = cls(r=tensors["r"], delta=tensors["delta"], o=tensors["o"], **common)
            else:
                spec = cls._features_from_meta(pf, features)
                state = {k[len("predictor."):]: v for k, v in tensors.items()
                         if k.startswith("predictor.")}
                dtypes = {v.dtype for v in state.values()}
                if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
                    pf.fail(f"the predictor weights must share one floating dtype, got "
                            f"{sorted(map(str, dtypes))}")
                net.to(dtype=dtypes.pop())
                net.load_state_dict(state, strict=True)
                for p in net.parameters():
                    p.requires_grad_(False)
                params = cls(predictor=net, features=spec, **common)
            params.validate()
        return params.to(device) if device is not None else params

    @staticmethod
    def _predictor_from_meta(pf) -> AMEDPredictor:
        cfg = pf.meta["predictor"]
        if not isinstance(cfg, dict) or sorted(cfg) != sorted(_CONFIG_KEYS):
            pf.fail(f"metadata 'predictor' must be an object with the keys "
                    f"{list(_CONFIG_KEYS)}, got {cfg!r}")
        try:
            return AMEDPredictor(**cfg)
        except (TypeError, ValueError) as e:
            pf.fail(f"metadata 'predictor' is not a valid AMEDPredictor config: {e}")

    @staticmethod
    def _features_from_meta(pf, features):
        spec = pf.meta["features"]
        try:
            spec = check_feature_spec(spec)
        except ValueError as e:
            pf.fail(f"metadata 'features': {e}")
        if not isinstance(spec, str):
            pf.fail(f"metadata 'features' must be a string, got {spec!r}")
        if spec.startswith("callable:"):
            if features is None:
                return spec  # usable once the callable is supplied (with_features)
            if not callable(features):
                pf.fail(f"features must be the callable {spec[len('callable:'):]!r} names, "
                        f"got {type(features).__name__}")
            return features
        if features is not None:
            pf.fail(f"the file reads features {spec!r}; features= is only for files saved "
                    f"with a named callable")
        return spec
