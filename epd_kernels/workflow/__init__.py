"""The jobs behind the ``epd`` command line (`epd_kernels.cli`): one module per command
and the modules they share."""
from .errors import UserError

__all__ = ["UserError"]
