"""The jobs behind the ``epd`` command line, one small module each.

- `seeds`: seed ranges ("0-99,200");
- `outputs`: atomic PNG / .npy / .npz / JSON writes, the per-seed layout and resume,
  readable errors for damaged arrays, removal of the empty folders of a failed command;
- `plots`: sample grid and error-vs-NFE figures (matplotlib, Agg, imported lazily);
- `threads`: CPU threads that fit a shared machine (1 or all cores, by timing; passive
  OpenMP waiting);
- `distributed`: rank / world size from torchrun, process-group set-up (gloo on CPU);
- `resolve`: model, solver, budget, params and class-label checks (clear `UserError` s);
- `sample_job`, `distill_job`, `eval_job`, `listing`, `demo`: the commands.
"""
from .errors import UserError

__all__ = ["UserError"]
