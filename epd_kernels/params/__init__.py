"""The learned parameters of the few-step solvers: `EPDParams`, `AMEDParams` (table or
`AMEDPredictor`), `DODEParams`, sharing the fields, checks and file format of `base` and
`file` (``params.save(path, overwrite=False)``, ``Class.load(path)``)."""
from .amed import AMEDParams, AMEDPredictor
from .dode import DODEParams
from .epd import EPDParams

__all__ = ["EPDParams", "AMEDParams", "DODEParams", "AMEDPredictor"]
