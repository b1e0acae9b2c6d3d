"""The learned parameters of the few-step solvers, one class per family.

    EPDParams   EPD-Solver / EPD-Plugin: K branch points, weights, perturbations per step
    AMEDParams  AMED-Solver / AMED-Plugin: a table or an `AMEDPredictor` network
    DODEParams  D-ODE: one extrapolation weight per step

All three share the fields, checks and the file format of `base.ParamsBase` and
`file`: ``params.save(path)`` writes one safetensors file (atomically; an existing file
only with ``overwrite=True``), ``Class.load(path)`` reads and validates it.
"""
from .amed import AMEDParams, AMEDPredictor
from .dode import DODEParams
from .epd import EPDParams

__all__ = ["EPDParams", "AMEDParams", "DODEParams", "AMEDPredictor"]
