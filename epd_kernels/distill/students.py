"""Students of the distillation loop: what is optimised and how it is unrolled.

A student has ``module`` (what Adam optimises; the checkpoint stores its state_dict under
"latent"), ``unroll(x, **cond)`` (``[x_0, ..., x_S]``, the sampler run differentiably from
x), ``export(meta)`` (detached, validated params), ``solver`` (the `sample` name) and
``init_summary()`` (a JSON-able fingerprint of the start, for the checkpoint settings).

`EPDStudent` wraps `LatentEPD` around `epd_sampler`. `AMEDStudent` wraps either
`LatentAMEDTable` (table form) or a trainable copy of the start's `AMEDPredictor`
(predictor form) around `amed_sampler`.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from ..params.amed import AMED_DELTA_MAX, AMED_O_MAX, AMEDParams
from ..params.amed_predictor import check_feature_spec, probe_feature_dim
from ..branches import BranchRunner
from ..params import EPDParams
from ..params.file import checksum
from ..solvers.amed import amed_sampler
from ..solvers.epd import epd_sampler
from .latent import DELTA_MAX, O_MAX, LatentAMEDTable, LatentEPD

__all__ = ["EPDStudent", "AMEDStudent", "amed_start", "epd_start", "build_student",
           "WEIGHT_LR_SCALE", "schedule_description", "callable_name"]

#: Learning-rate factor of the AMED predictor's weights (its head biases learn at lr).
WEIGHT_LR_SCALE = 0.1


def _is_head_bias(name: str) -> bool:
    return name.startswith("head_") and name.endswith(".bias")


class EPDStudent:
    """EPD / EPD-Plugin: the free latents of `LatentEPD`, unrolled by `epd_sampler`."""

    def __init__(self, denoiser: Callable, start: EPDParams, delta_max: float, o_max: float,
                 device, learn_grid: bool = False):
        self.denoiser, self.start = denoiser, start
        self.delta_max, self.o_max = float(delta_max), float(o_max)
        self.module = LatentEPD.from_params(start, delta_max, o_max, device=device,
                                            learn_grid=learn_grid)
        self.runner = BranchRunner(denoiser, start.num_points)

    @property
    def solver(self) -> str:
        return self.start.solver

    def param_groups(self):
        return [{"params": list(self.module.parameters())}]

    def init_summary(self):
        s = self.start
        return s.r.tolist() + s.weights.tolist() + s.delta.tolist() + [s.o.tolist()]

    def unroll(self, x, **cond):
        _, traj = epd_sampler(self.denoiser, x, self.module.grid(), params=self.module.natural(),
                              runner=self.runner, return_trajectory=True, **cond)
        return traj

    def export(self, meta: dict) -> EPDParams:
        params = self.module.natural(meta={**self.start.meta, **meta}).detach()
        if self.module.learns_grid:  # the grid is no longer the start's named schedule
            params.schedule = {"kind": "learned", "start": self.start.schedule}
        return params.validate()


class AMEDStudent:
    """AMED-Solver / AMED-Plugin, table or predictor form, unrolled by `amed_sampler`."""

    def __init__(self, denoiser: Callable, start: AMEDParams, delta_max: float, o_max: float,
                 device):
        self.denoiser, self.start = denoiser, start
        self.delta_max, self.o_max = float(delta_max), float(o_max)
        if start.form == "table":
            self.module = LatentAMEDTable.from_params(start, delta_max, o_max, device=device)
        else:
            self.module = copy.deepcopy(start.predictor).to(device)
            for p in self.module.parameters():
                p.requires_grad_(True)

    @property
    def solver(self) -> str:
        return self.start.solver

    def param_groups(self):
        if self.start.form == "table":
            return [{"params": list(self.module.parameters())}]
        # Adam moves every parameter by about lr per iteration. A head bias is one logit,
        # like a table latent; a weight multiplies one of ~20 inputs of size ~1, so lr on
        # all of them moves the logits ~20x faster: on the 64-dim mixture the sigmoids
        # then saturate within the first iterations (r -> 0, delta and o at their bounds)
        # and training stalls at twice the loss. Everything but the head biases learns
        # at lr * WEIGHT_LR_SCALE.
        biases = [p for n, p in self.module.named_parameters() if _is_head_bias(n)]
        rest = [p for n, p in self.module.named_parameters() if not _is_head_bias(n)]
        return [{"params": biases}, {"params": rest, "lr_scale": WEIGHT_LR_SCALE}]

    def feature_label(self):
        """The feature source as recorded in settings and meta (None for a table)."""
        if self.start.form == "table":
            return None
        f = self.start.features
        return f if isinstance(f, str) else "callable:" + callable_name(f)

    def init_summary(self):
        if self.start.form == "table":
            return [self.start.r.tolist(), self.start.delta.tolist(), self.start.o.tolist()]
        state = {k: v.detach().cpu() for k, v in self.start.predictor.state_dict().items()}
        return {"predictor": self.start.predictor.config, "sha256": checksum(state)}

    def params(self) -> AMEDParams:
        """The differentiable params the sampler sees."""
        if self.start.form == "table":
            return self.module.natural()
        return self.start.replace(predictor=self.module)

    def unroll(self, x, **cond):
        _, traj = amed_sampler(self.denoiser, x, self.start.sigmas, params=self.params(),
                               return_trajectory=True, **cond)
        return traj

    def export(self, meta: dict) -> AMEDParams:
        with torch.no_grad():
            return self.params().replace(meta={**self.start.meta, **meta}).detach().validate()


def amed_start(denoiser: Callable, sigmas, *, init, form, features, plugin, afs, max_order,
               schedule, delta_max, o_max, seed, nfe, probe, cond):
    """``(start, delta_max, o_max)``: the starting `AMEDParams` of an AMED distillation
    and the bounds in force (the paper's by default; a predictor's are its own). ``probe``:
    zeros shaped like a rank's batch, to size a hook's or callable's features."""
    if features is not None and form == "table":
        raise ValueError("features= is only read by the AMED predictor (amed_form="
                         "'predictor'), not by the table form")
    if init is not None:
        if not isinstance(init, AMEDParams):
            raise ValueError(f"init must be AMEDParams for method='amed', got "
                             f"{type(init).__name__}")
        init.check_compatible(nfe=nfe, sigmas=sigmas, plugin=plugin, afs=afs)
        if init.form != form:
            raise ValueError(f"init params have form {init.form!r} but amed_form={form!r} "
                             f"was asked")
        start = init.detach().replace(max_order=max_order)
        if form == "table":
            return (start, AMED_DELTA_MAX if delta_max is None else float(delta_max),
                    AMED_O_MAX if o_max is None else float(o_max))
        cfg = start.predictor.config
        for name, v in (("delta_max", delta_max), ("o_max", o_max)):
            if v is not None and float(v) != cfg[name]:
                raise ValueError(f"{name}={v} differs from the init predictor's bound "
                                 f"{cfg[name]} (the bounds are part of the network)")
        if features is not None:
            start = start.with_features(features)
        return start, cfg["delta_max"], cfg["o_max"]
    delta_max = AMED_DELTA_MAX if delta_max is None else float(delta_max)
    o_max = AMED_O_MAX if o_max is None else float(o_max)
    kw = dict(afs=afs, plugin=plugin, max_order=max_order, schedule=schedule)
    if form == "table":
        return AMEDParams.init(sigmas, form="table", **kw), delta_max, o_max
    spec = check_feature_spec("denoised" if features is None else features)
    fdim = probe_feature_dim(spec, denoiser, probe, float(sigmas[0]), cond)
    start = AMEDParams.init(sigmas, form="predictor", features=spec, feature_dim=fdim,
                            delta_max=delta_max, o_max=o_max, seed=seed, **kw)
    return start, delta_max, o_max


def callable_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def schedule_description(schedule):
    """The grid's name as params record it (``params.schedule``)."""
    if schedule is None:
        return {"kind": "polynomial", "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0}
    if isinstance(schedule, (str, dict)):
        return schedule
    return {"kind": "explicit"}


def epd_start(sigmas, s) -> EPDParams:
    """The starting `EPDParams` of an EPD run with settings ``s``: the neutral init on the
    grid, or ``s.init`` after checking it fits."""
    if s.init is None:
        return EPDParams.init(sigmas, s.K, afs=s.afs, plugin=s.plugin, max_order=s.max_order,
                              schedule=schedule_description(s.schedule))
    if not isinstance(s.init, EPDParams):
        raise ValueError(f"init must be EPDParams for method='epd', got {type(s.init).__name__}")
    s.init.check_compatible(nfe=s.nfe, num_points=s.K, sigmas=sigmas)
    if s.init.afs != s.afs or s.init.plugin != s.plugin:
        raise ValueError(f"init params have afs={s.init.afs}, plugin={s.init.plugin} but "
                         f"afs={s.afs}, plugin={s.plugin} was asked")
    start = s.init.detach()
    start.max_order = s.max_order
    return start


def build_student(denoiser: Callable, s, sigmas, device, probe_cond: dict):
    """The student of settings ``s`` (a resolved `DistillSettings`) on the grid ``sigmas``.
    ``probe_cond``: conditioning for one batch, used to size the AMED predictor's input."""
    if s.method == "amed":
        probe = torch.zeros((s.batch_size,) + s.shape, dtype=s.dtype, device=device)
        start, delta_max, o_max = amed_start(
            denoiser, sigmas, init=s.init, form=s.amed_form, features=s.features,
            plugin=s.plugin, afs=s.afs, max_order=s.max_order,
            schedule=schedule_description(s.schedule), delta_max=s.delta_max, o_max=s.o_max,
            seed=s.seed, nfe=s.nfe, probe=probe, cond=probe_cond)
        return AMEDStudent(denoiser, start, delta_max, o_max, device)
    return EPDStudent(denoiser, epd_start(sigmas, s),
                      DELTA_MAX if s.delta_max is None else s.delta_max,
                      O_MAX if s.o_max is None else s.o_max, device, bool(s.learn_grid))
