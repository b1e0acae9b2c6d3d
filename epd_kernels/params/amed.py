"""AMED-Solver / AMED-Plugin parameters (docs/design.md, "AMED"): a TABLE ``r, delta, o [S]``,
or the paper's PREDICTOR, an `AMEDPredictor` mapping per-sample features and the step's
sigmas to ``[B]`` values. `AMEDParams.init`: the neutral start r = 1/2, delta = o = 0."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .amed_predictor import AMEDPredictor, check_feature_spec, feature_spec_name, pooled_dim
from .base import FLOAT_DTYPES, ParamsBase

__all__ = ["AMEDParams", "AMEDPredictor"]

AMED_FORMS = ("table", "predictor")
#: The paper's bounds: scale_time in (0.8, 1.2), scale_dir in (0.99, 1.01).
AMED_DELTA_MAX = 0.2
AMED_O_MAX = 0.01

_CONFIG_KEYS = ("feature_dim", "hidden", "bottleneck", "time_channels", "delta_max", "o_max")


@dataclass
class AMEDParams(ParamsBase):
    """AMED parameters on one grid: either ``r, delta, o`` or ``predictor``."""

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

    _WHAT = "AMED params"
    _FILE = "an AMED params file"
    _KIND = "amed"
    _VALUES = ("r", "delta", "o")
    _SOLVERS = ("amed", "amed-ipndm")
    _FILE_KEYS = ("form", "plugin", "features", "predictor")

    def __post_init__(self):
        super().__post_init__()
        if self.predictor is not None and self.features is None:
            self.features = "denoised"

    @classmethod
    def init(cls, sigmas, *, form: str = "table", afs: bool = True, plugin: bool = False,
             max_order: int = 4, schedule: Union[str, dict, None] = None,
             meta: Optional[dict] = None, features="denoised",
             feature_dim: Optional[int] = None, shape=None, hidden: int = 128,
             bottleneck: int = 4, time_channels: int = 8,
             delta_max: float = AMED_DELTA_MAX, o_max: float = AMED_O_MAX, seed: int = 0,
             dtype: torch.dtype = torch.float64, device=None) -> "AMEDParams":
        """The neutral start (r = 1/2, delta = o = 0) as a table or an `AMEDPredictor` reading
        ``features`` (input size ``feature_dim``, or from ``shape`` for "denoised")."""
        if form not in AMED_FORMS:
            raise ValueError(f"form must be one of {AMED_FORMS}, got {form!r}")
        sig = cls._grid(sigmas)
        S = sig.numel() - 1
        common = dict(sigmas=sig, afs=afs, plugin=plugin, max_order=max_order,
                      schedule=schedule, meta=dict(meta or {}))
        if form == "table":
            kw = dict(dtype=dtype, device=device)
            return cls(r=torch.full((S,), 0.5, **kw), delta=torch.zeros(S, **kw),
                       o=torch.zeros(S, **kw), **common).validate()
        spec = check_feature_spec(features)
        if feature_dim is None:
            if spec != "denoised" or shape is None:
                raise ValueError("feature_dim (values per sample of the feature source) must "
                                 "be given for the predictor form, unless "
                                 "features='denoised' and the data shape is given")
            feature_dim = pooled_dim(shape)
        net = AMEDPredictor(feature_dim, hidden=hidden, bottleneck=bottleneck,
                            time_channels=time_channels, delta_max=delta_max, o_max=o_max,
                            seed=seed, dtype=dtype, device=device)
        net.requires_grad_(False)  # like a table: a value, until a distillation trains it
        return cls(predictor=net, features=spec, **common).validate()

    @property
    def form(self) -> str:
        return "table" if self.predictor is None else "predictor"

    @property
    def feature_dim(self) -> Optional[int]:
        return None if self.predictor is None else self.predictor.feature_dim

    def step_values(self, n: int, features: Optional[torch.Tensor] = None, t=None,
                    t_next=None):
        """``(r, delta, o)`` of step n: 0-d (table) or ``[B]`` from ``features [B, F]``."""
        if not 0 <= int(n) < self.num_steps:
            raise ValueError(f"step n = {n} is outside 0..{self.num_steps - 1}")
        if self.predictor is None:
            return self.r[n], self.delta[n], self.o[n]
        if features is None:
            raise ValueError("the predictor form needs the features [B, F] of the step")
        t = float(self.sigmas[n]) if t is None else t
        t_next = float(self.sigmas[n + 1]) if t_next is None else t_next
        return self.predictor(features, t, t_next)

    def with_features(self, features) -> "AMEDParams":
        """A copy (sharing the predictor) that reads ``features`` (e.g. a named callable)."""
        if self.predictor is None:
            raise ValueError("table-form AMED params read no features")
        return self.replace(features=check_feature_spec(features))

    def detach(self) -> "AMEDParams":
        """A copy whose tensors (and predictor) are detached from autograd and cloned."""
        if self.predictor is None:
            return super().detach()
        return self.replace(predictor=copy.deepcopy(self.predictor).requires_grad_(False))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "AMEDParams":
        """A copy on ``device``; ``dtype`` converts the table / the predictor's weights."""
        if self.predictor is None:
            return super().to(device, dtype)
        return self.replace(sigmas=self.sigmas.to(device=device),
                            predictor=copy.deepcopy(self.predictor).to(device=device,
                                                                        dtype=dtype))

    def _shapes(self, S):
        """The table's tensors; none for the predictor form (checked here)."""
        given = [n for n in self._VALUES if getattr(self, n) is not None]
        if self.predictor is not None:
            if given:
                raise ValueError(f"AMEDParams has a predictor and table values {given}: give "
                                 f"one form only")
            if not isinstance(self.predictor, AMEDPredictor):
                raise ValueError(f"AMEDParams.predictor must be an AMEDPredictor, got "
                                 f"{type(self.predictor).__name__}")
            check_feature_spec(self.features)
            return {}
        if len(given) != 3:
            missing = [n for n in self._VALUES if n not in given]
            raise ValueError(f"AMEDParams needs either a predictor or the table r, delta, o; "
                             f"missing {missing}")
        if self.features is not None:
            raise ValueError("table-form AMED params read no features: leave features None")
        return {n: ("[S]", (S,)) for n in self._VALUES}

    def _check_values(self, values):
        """Table: EPD's ranges. Predictor: finite weights (its outputs are bounded)."""
        if self.predictor is None:
            return self._check_step_values(values)
        for name, p in self.predictor.state_dict().items():
            if not torch.isfinite(p).all():
                raise ValueError(f"AMEDParams.predictor weight {name!r} has non-finite values "
                                 f"(nan or inf)")

    def _tensors_for_file(self):
        out = super()._tensors_for_file()
        if self.predictor is not None:
            out.update({"predictor." + k: v.detach().to("cpu").contiguous().clone()
                        for k, v in self.predictor.state_dict().items()})
        return out

    def save(self, path, feature_name: Optional[str] = None, *, overwrite: bool = False) -> None:
        """`ParamsBase.save`; a predictor reading a callable needs ``feature_name``."""
        net = self.predictor
        self._save(path, overwrite, {
            "form": self.form, "plugin": self.plugin,
            "features": None if net is None else feature_spec_name(self.features, feature_name),
            "predictor": None if net is None else net.config})

    @classmethod
    def load(cls, path, device=None, features: Optional[Callable] = None) -> "AMEDParams":
        """`ParamsBase.load`; ``features`` is the callable a file saved by name."""
        return cls._load(path, device, features=features)

    @classmethod
    def _from_file(cls, pf, features=None):
        meta = pf.meta
        pf.require_solver(cls._SOLVERS)
        if meta["form"] not in AMED_FORMS:
            pf.fail(f"form must be one of {AMED_FORMS}, got {meta['form']!r}")
        S, table = meta["S"], meta["form"] == "table"
        expect = {"sigmas": (S + 1,)}
        if table:
            expect.update({n: (S,) for n in cls._VALUES})
        else:
            net = cls._predictor_from_meta(pf)
            expect.update({"predictor." + k: tuple(v.shape)
                           for k, v in net.state_dict().items()})
        pf.require_tensors(expect, f"S={S}, form {meta['form']!r}")
        own = dict(sigmas=pf.tensors["sigmas"], plugin=meta["plugin"])
        if table:
            if meta["features"] is not None or meta["predictor"] is not None:
                pf.fail("a table-form file must have features and predictor null")
            return dict(own, **{n: pf.tensors[n] for n in cls._VALUES})
        state = {k[len("predictor."):]: v for k, v in pf.tensors.items()
                 if k.startswith("predictor.")}
        dtypes = {v.dtype for v in state.values()}
        if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
            pf.fail(f"the predictor weights must share one floating dtype, got "
                    f"{sorted(map(str, dtypes))}")
        net.to(dtype=dtypes.pop())
        net.load_state_dict(state, strict=True)
        return dict(own, predictor=net.requires_grad_(False),
                    features=cls._features_from_meta(pf, features))

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
