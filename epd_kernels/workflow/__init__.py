"""The jobs behind the ``epd`` command line (`epd_kernels.cli`), one small module each:
the commands (`sample_job`, `distill_job`, `eval_job`, `listing`, `demo`) and what they
share (`resolve`, `outputs`, `plots`, `seeds`, `threads`, `distributed`, `errors`).
"""
from .errors import UserError

__all__ = ["UserError"]
