"""What every command needs first: the model, the solver and its budget, params, labels.

All problems the user can fix are raised as `UserError` with the valid choices named.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import torch

from ..solvers.registry import spec as _spec, nfe_to_steps, solver_names, valid_budgets
from .errors import UserError, one_line

__all__ = ["load_model_or_fail", "load_params", "check_solver", "check_budget",
           "class_labels_for"]

#: Solvers `epd distill` can produce params for.
DISTILLABLE = ("epd", "epd-ipndm", "amed", "amed-ipndm", "d-euler", "d-heun", "d-ipndm")
#: The distilled solvers trained by gradient descent (`epd_kernels.distill`).
EPD_SOLVERS = ("epd", "epd-ipndm")
AMED_SOLVERS = ("amed", "amed-ipndm")
#: Names that are aliases of another solver (same function, same settings).
ALIASES = {"ddim": "euler", "d-ddim": "d-euler"}


def load_model_or_fail(spec: str, device: str = "cpu"):
    """`load_model(spec)` with the library's ValueError turned into a `UserError`; checks
    the model has a per-sample ``.shape``."""
    from ..models.registry import load_model

    try:
        model = load_model(spec, device=device)
    except ValueError as e:
        raise UserError(one_line(e)) from None
    if model_shape(model) is None:
        raise UserError(f"model {spec!r} has no .shape attribute (the per-sample shape, e.g. "
                        f"(3, 32, 32)); set it on the object the factory returns")
    return model


def model_shape(model) -> Optional[tuple]:
    try:
        return tuple(int(n) for n in model.shape)
    except (AttributeError, TypeError):   # no shape, or None
        return None


def num_classes(model) -> int:
    try:
        return int(getattr(model, "num_classes", 0) or 0)
    except (TypeError, ValueError):
        return 0


def check_solver(name: str) -> str:
    key = (name or "").strip().lower()
    if key not in solver_names():
        raise UserError(f"unknown solver {name!r}; known solvers: {', '.join(solver_names())}")
    return key


def needs_params(name: str) -> bool:
    return bool(_spec(name).needs_params)


def budget_rule(name: str) -> str:
    """Human-readable NFE rule of a solver (its default afs)."""
    spec = _spec(name)
    rule = "NFE = steps" if spec.evals_per_step == 1 else "NFE = 2*steps"
    return rule + (" - 1 (analytic first step)" if spec.default_afs else "")


def check_budget(name: str, nfe: int) -> int:
    """The number of steps for ``nfe``; `UserError` listing the valid budgets otherwise."""
    try:
        return nfe_to_steps(name, nfe)
    except ValueError:
        ok = ", ".join(map(str, valid_budgets(name, up_to=15)))
        raise UserError(f"solver {name!r} cannot meet a budget of nfe={nfe} ({budget_rule(name)});"
                        f" valid budgets: {ok}, ...") from None


def parse_class_label(text: Optional[str]):
    """``--class-label`` value: None (per seed), "none" (unconditional) or an int."""
    if text is None or text == "seed":
        return "seed"
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--class-label must be an integer, 'seed' or 'none', got "
                        f"{text!r}") from None


def class_labels_for(model, keys: Sequence[int], mode) -> Optional[torch.Tensor]:
    """Integer labels ``[len(keys)]`` for a conditional model, or None. ``mode``: "seed"
    (key % num_classes; keys are seeds or rows), "none" or an int (one label for all)."""
    nc = num_classes(model)
    if mode == "none":
        return None
    if nc <= 0:
        if isinstance(mode, int):
            raise UserError(f"--class-label {mode} given but the model is not class-conditional")
        return None
    if mode == "seed":
        return torch.tensor([int(k) % nc for k in keys], dtype=torch.int64)
    if not 0 <= int(mode) < nc:
        raise UserError(f"--class-label {mode} is out of range: the model has {nc} classes "
                        f"(0..{nc - 1})")
    return torch.full((len(keys),), int(mode), dtype=torch.int64)


def label_cond(model, keys: Sequence[int], mode, device) -> dict:
    """The model's keywords for ``keys``: ``{"class_labels": labels}``, or {} without."""
    labels = class_labels_for(model, keys, mode)
    return {} if labels is None else {"class_labels": labels.to(device)}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def params_family(solver: str) -> str:
    """The kind of params file a solver reads: "EPD", "AMED" or "D-ODE"."""
    if solver.startswith("d-"):
        return "D-ODE"
    return "AMED" if solver.startswith("amed") else "EPD"


def _file_solver(path: str) -> Optional[str]:
    """The solver a params file's metadata names ("d-ode" for a D-ODE file that names no
    solver), or None when it cannot tell: then the loader of the requested kind reports
    the damage."""
    import json

    from ..fileio import read_safetensors_metadata

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        solver = json.loads(read_safetensors_metadata(data, path, "a params file")["solver"])
    except (ValueError, KeyError):
        solver = None
    if solver in solver_names():
        return solver
    return "d-ode" if b"d-ode" in data[:4096] else None


def load_params(solver: str, path, model, model_spec: str, nfe: Optional[int] = None):
    """Loads the params file of ``solver`` and checks it fits the solver, nfe and model
    (a file of another kind is refused, by its own "solver" metadata, before loading; an
    AMED predictor's feature submodule is looked up in the model before sampling)."""
    from ..params import AMEDParams, DODEParams, EPDParams

    path = os.fspath(path)
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        raise UserError(f"--params {path} is a folder; give a params file (.safetensors, from "
                        f"'epd distill')" + (f", e.g. one it holds: {', '.join(inside[:4])}"
                                            if inside else ""))
    if not os.path.isfile(path):
        raise UserError(f"params file not found: {path}")
    want = params_family(solver)
    made_for = _file_solver(path)
    if made_for is not None and params_family(made_for) != want:
        raise UserError(f"{path} holds {params_family(made_for)} params (for solver "
                        f"{made_for!r}), not {want} params for {solver!r}")
    try:
        params = {"EPD": EPDParams, "AMED": AMEDParams, "D-ODE": DODEParams}[want].load(path)
    except ValueError as e:
        raise UserError(one_line(e)) from None
    made_for = params.solver
    if want == "D-ODE":
        from ..params.dode import normalize_dode_base

        if normalize_dode_base(solver) != params.base:
            raise UserError(f"{path} holds params for solver {made_for!r}, not {solver!r}")
    elif made_for != solver:
        raise UserError(f"{path} holds params for solver {made_for!r}, not {solver!r}")
    if nfe is not None and int(nfe) != int(params.nfe):
        raise UserError(f"{path} was made for nfe={params.nfe}, but --nfe {nfe} was asked "
                        f"(omit --nfe or distill params for nfe={nfe})")
    meta, shape = params.meta or {}, model_shape(model)
    if meta.get("shape") is not None and tuple(meta["shape"]) != shape:
        raise UserError(f"{path} was distilled for samples of shape {list(meta['shape'])} "
                        f"(model {meta.get('model', '?')!r}) but model "
                        f"{model_spec!r} makes shape {list(shape)}")
    if want == "AMED":
        _check_feature_source(params, model, model_spec, path)
    if meta.get("model") not in (None, model_spec):
        import warnings

        warnings.warn(f"{path} was distilled on model {meta['model']!r}, not {model_spec!r}; "
                      f"the params will work but may be far from optimal", stacklevel=2)
    return params


def _check_feature_source(params, model, model_spec, path) -> None:
    """UserError unless the AMED predictor can read its features from ``model``."""
    from ..params.amed_predictor import FeatureExtractor

    if params.form != "predictor" or params.features == "denoised":
        return
    try:
        with FeatureExtractor(params.features, model, params.feature_dim):
            pass  # entering registers the hook: the submodule exists
    except ValueError as e:
        raise UserError(f"{path}: its AMED predictor reads features {params.features!r}, "
                        f"which model {model_spec!r} cannot give: {one_line(e)}") from None

