"""What the params files in this folder hold, and how they were written.

The ``*.safetensors`` files here were written by ``EPDParams.save`` / ``DODEParams.save`` as
they were at commit 8e87818, before params.py and dode_params.py moved onto
`epd_kernels.params_file`. tests/test_params.py loads them with the current code and
compares with `RECIPES`, so a change to the file layout or to the checksum shows up as a
failing test. Their worth is that the current code did NOT write them: regenerate them
(``python tests/data/params_fixtures.py``) only for a deliberate format change, together
with a new FORMAT_VERSION.

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
}


def build(name):
    import epd_kernels

    cls_name, kw = RECIPES[name]
    return getattr(epd_kernels, cls_name)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                             for k, v in kw.items()})


if __name__ == "__main__":
    for name in RECIPES:
        build(name).save(os.path.join(HERE, name))
        print("wrote", name)
