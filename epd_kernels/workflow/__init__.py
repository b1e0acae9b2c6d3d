"""The jobs behind the ``epd`` command line, one small module each.

- `seeds`: seed ranges ("0-99,200");
- `outputs`: atomic PNG / .npy / .npz / JSON writes, the per-seed layout and resume;
- `plots`: sample grid and error-vs-NFE figures (matplotlib, Agg, imported lazily);
- `distributed`: rank / world size from torchrun, process-group set-up (gloo on CPU);
- `resolve`: model, solver, budget, params and class-label checks (clear `UserError` s);
- `sample_job`, `distill_job`, `eval_job`, `listing`, `demo`: the commands.
"""
from .errors import UserError

__all__ = ["UserError"]
