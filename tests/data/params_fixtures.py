"""What the params files in this folder hold, and how they were written.

The EPD and D-ODE files were written by ``EPDParams.save`` / ``DODEParams.save`` at commit
8e87818, the AMED files by ``AMEDParams.save`` at commit 93e713f: both before the params
classes moved into the `epd_kernels.params` package. tests/test_params.py loads them with
the current code and compares with `RECIPES`, so a change to the file layout or to the
checksum shows up as a failing test. Their worth is that the current code did NOT write
them: regenerate them (``python tests/data/params_fixtures.py``) only for a deliberate
format change, together with a new format version.

Values are literals (no generator, no solver code) so that they are the test's oracle.
"""
from __future__ import annotations

import os

import torch

F64, F32 = torch.float64, torch.float32
HERE = os.path.dirname(os.path.abspath(__file__))


def karras_grid(S, smax=80.0, smin=0.002, rho=7.0):
    i = torch.arange(S + 1, dtype=F64) / S
    return (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def ramp(*shape, lo=-0.5, hi=0.5, dtype=F32):
    """Evenly spaced values of the given shape: distinct, non-trivial predictor weights."""
    n = 1
    for d in shape:
        n *= d
    return torch.linspace(lo, hi, n, dtype=F64).reshape(shape).to(dtype)


#: A tiny AMED predictor (float32 weights): its architecture and its whole state dict.
PREDICTOR_CONFIG = {"feature_dim": 4, "hidden": 3, "bottleneck": 2, "time_channels": 2,
                    "delta_max": 0.2, "o_max": 0.01}
PREDICTOR_STATE = {
    "map_time.weight": ramp(2, 2), "map_time.bias": ramp(2, lo=0.1, hi=0.2),
    "enc0.weight": ramp(3, 4, lo=-1.0, hi=1.0), "enc0.bias": ramp(3, lo=-0.25, hi=0.25),
    "enc1.weight": ramp(2, 3), "enc1.bias": ramp(2, lo=0.0, hi=0.125),
    "head_r.weight": ramp(1, 6, lo=-0.3, hi=0.6), "head_r.bias": torch.tensor([0.25]),
    "head_delta.weight": ramp(1, 6, lo=0.2, hi=-0.4), "head_delta.bias": torch.tensor([-0.5]),
    "head_o.weight": ramp(1, 6, lo=-2.0, hi=2.0), "head_o.bias": torch.tensor([0.0]),
}


#: file name -> (class name, constructor keyword arguments)
RECIPES = {
    "epd.safetensors": ("EPDParams", dict(
        r=torch.tensor([[0.2, 0.8], [0.0, 1.0], [0.5, 0.25]], dtype=F64),
        weights=torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]], dtype=F64),
        delta=torch.tensor([[0.1, -0.05], [0.0, 0.2], [-0.3, 0.0]], dtype=F64),
        o=torch.tensor([0.01, -0.02, 0.0], dtype=F64),
        sigmas=karras_grid(3), schedule="edm",
        meta={"teacher": "dpm2", "loss": [0.5, 0.25]})),
    "epd_plugin_f32.safetensors": ("EPDParams", dict(
        r=torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.6, 0.7]], dtype=F32),
        weights=torch.tensor([[0.125, 0.375, 0.5], [0.25, 0.25, 0.5]], dtype=F32),
        delta=torch.tensor([[0.0, 0.015625, -0.25], [0.5, 0.0, 0.0]], dtype=F32),
        o=torch.tensor([0.0, 0.0078125], dtype=F32),
        sigmas=karras_grid(2), afs=False, plugin=True, max_order=3,
        schedule={"name": "edm", "rho": 7.0}, meta={})),
    "dode.safetensors": ("DODEParams", dict(
        lambdas=torch.tensor([0.0, 0.25, -0.125], dtype=F64), sigmas=karras_grid(3),
        base="heun", schedule="edm", meta={"fit": 1})),
    "amed_table.safetensors": ("AMEDParams", dict(
        r=torch.tensor([0.5, 0.25, 0.75, 1.0], dtype=F64),
        delta=torch.tensor([0.0, 0.125, -0.0625, 0.2], dtype=F64),
        o=torch.tensor([0.005, 0.0, -0.01, 0.0], dtype=F64),
        sigmas=karras_grid(4), schedule={"name": "edm", "rho": 7.0},
        meta={"teacher": "heun", "final_loss": 0.5})),
    "amed_predictor.safetensors": ("AMEDParams", dict(
        predictor=(PREDICTOR_CONFIG, PREDICTOR_STATE), features="module:net.mid2",
        sigmas=karras_grid(3), afs=False, plugin=True, max_order=2, schedule="edm",
        meta={"teacher": "dpm2"})),
}


def make_predictor(config, state):
    from epd_kernels.params import AMEDPredictor

    net = AMEDPredictor(**config, dtype=F32)
    net.load_state_dict(state)
    return net.requires_grad_(False)


def build(name):
    import epd_kernels

    cls_name, kw = RECIPES[name]
    kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if "predictor" in kw:
        kw["predictor"] = make_predictor(*kw["predictor"])
    return getattr(epd_kernels, cls_name)(**kw)


if __name__ == "__main__":
    for name in RECIPES:
        build(name).save(os.path.join(HERE, name), overwrite=True)
        print("wrote", name)
