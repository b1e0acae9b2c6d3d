"""``python -m epd_kernels ...`` runs the ``epd`` command line (see `epd_kernels.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
