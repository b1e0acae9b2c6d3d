"""Distillation: fit EPD-Solver / EPD-Plugin or AMED-Solver / AMED-Plugin parameters to
an accurate teacher.

Modules: `settings` (every setting, its default and check; keywords sorted into settings
and conditioning), `api` (`distill`), `budget` (sizing to ``time_budget_s``), `loop` (one
training run), `students` (what each method optimises), `teacher`, `batches`, `noise`,
`conditioning`, `checkpoint`, `schedule_search` (``schedule="auto"``) and `verdict` (the
held-out comparison with the baselines). This package is callable: ``distill(...)`` is
`epd_kernels.distill.distill`.

    params = distill(denoiser, nfe=5, shape=(C, H, W), num_points=2)      # EPDParams
    x0 = sample(denoiser, noise, solver="epd", params=params)
    params = distill(denoiser, nfe=5, shape=(C, H, W), method="amed")     # AMEDParams
    x0 = sample(denoiser, noise, solver="amed", params=params)

Method (docs/design.md, "Distillation"; EPD: arXiv 2507.14797, AMED: arXiv 2312.00094):

* Student grid: ``get_sigmas`` of the schedule (default polynomial, rho = 7, sigma in
  [0.002, 80]) with ``S = (nfe + afs) / 2`` steps.
* Teacher: DPM-Solver-2 (``teacher="dpm2"``) or Heun on the student grid with ``M`` extra
  points inside every interval (`teacher.refine_sigmas`), run without autograd from the
  same starting state ``noise * sigma_max``; its states at the student sigmas are the
  targets (`teacher.teacher_targets`).
* Student (`students`): what is optimised and how it is unrolled is the only part that
  depends on the method. A student has a ``module`` (the nn.Module Adam optimises; its
  state_dict is the checkpoint's "latent"), ``param_groups()``, ``unroll(x, **cond)``
  (the sampler run differentiably with ``return_trajectory=True``) and ``export(meta)``
  (detached, validated params); the loop, the teacher, checkpoints and the
  multi-process averaging are shared.

  - EPD (``method="epd"``, default; `EPDStudent`): `epd_sampler` on `EPDParams` whose
    tensors are differentiable images of free latents (`latent.LatentEPD`:
    ``r = sigmoid(a)``, ``weights = softmax(b)``, ``delta = delta_max tanh(c)``,
    ``o = o_max tanh(e)``, bounds 0.1 / 0.1 by default), started from `EPDParams.init`
    (or ``init=``); K = ``num_points`` branches (default 2).
  - AMED (``method="amed"``, arXiv 2312.00094; `AMEDStudent`): `amed_sampler` (one
    intermediate point per step, ``plugin=True`` for AMED-Plugin on iPNDM) on
    `AMEDParams`, started from the neutral `AMEDParams.init` (r = 1/2, delta = o = 0:
    DPM-Solver-2, or iPNDM on the refined grid) or ``init=``. ``amed_form="predictor"``
    (default, the paper's) trains a copy of the `AMEDPredictor` (hidden 128, bottleneck
    4, 8 time channels; heads start at zero), which maps per-sample ``features`` read at
    each main point (``"denoised"`` by default, ``"module:<name>"`` for a submodule's
    output such as a U-Net bottleneck, or a callable; always detached, zeros on the AFS
    step) to r, delta, o; ``amed_form="table"`` learns one r, delta, o per step
    (`latent.LatentAMEDTable`). Bounds: the paper's ``delta_max = 0.2``, ``o_max = 0.01``.
    Learning rates: the predictor's three head biases (one logit each, like a table
    latent) learn at ``lr``, all its other weights at ``lr * WEIGHT_LR_SCALE`` (0.1):
    Adam moves every parameter by about lr per step, and a weight feeds ~20 inputs into
    a logit, so at the full rate the sigmoids saturated within the first iterations on
    the 64-dim mixture (r -> 0, delta and o at their bounds) and training stalled at
    twice the loss. The other defaults are the shared ones below.

  The fused `epd_step` backward carries gradients to the weights and o (and to the
  states), the denoiser carries them to r and delta (and to the predictor through them);
  the denoiser's weights are frozen (``requires_grad_(False)`` for the run, restored
  afterwards).
* Loss: ``sum_n loss(x_n, y_n)`` over the S student states, default the mean squared
  distance (`mse_loss`); ``loss=callable(student, teacher) -> scalar`` replaces it (e.g.
  a feature distance). It must be a mean over the batch for multi-process runs.
  ``match="final"`` applies it to the last state only.
* Learned grid (``learn_grid=True``, EPD only): the interior sigmas become parameters too
  (`latent.LatentEPD`: softmax-weighted log-sigma increments, ends fixed), differentiated
  through the sampler; the loss is then the final state's (the teacher's intermediate
  states belong to the start grid). The default of ``schedule="auto"``, where it runs
  after the fixed-grid run and is kept only if better on validation (`schedule_search`).
* Adam, cosine learning-rate decay to 0 over ``iterations`` (`cosine_lr`).
* Training noise (`batches.TeacherBatches`): a fixed pool of ``pool`` draws whose teacher
  targets are computed once (default), or fresh noise every iteration (``pool=None``);
  both are pure functions of (seed, iteration, row), see `noise`. Per-sample conditioning
  (e.g. class labels) works with both: with a pool, one row per pool entry.
* A non-finite loss or gradient skips the step with a RuntimeWarning; ``max_failures``
  (5) in a row raise RuntimeError.

Budget (``time_budget_s``, default 60 s): the settings left at "auto" (M, pool, iterations,
batch_size) are sized from the model's measured cost (`budget`); when the grid too is left
to the budget (no ``schedule``, no ``iterations``), the grid search (``schedule="auto"``)
runs whenever it fits with final runs of at least 150 iterations and pools of at least 512
draws, else one run that learns the grid from the polynomial rho = 7 one (EPD). The search
is what wins on mixtures with unequal weights and per-dimension scales (fixed rho = 7 grid:
1.18x the best baseline's held-out RMSE at NFE 5; the search: 0.45-0.54x); the learned
grid is what wins where the search does not fit (the digits U-Net at NFE 5 / 7: 0.081 /
0.091 on the fixed grid, 0.057 / 0.047 learned). ``time_budget_s=None`` gives the fixed
defaults below and the rho = 7 grid.

Fixed defaults (shared by EPD and AMED; chosen for EPD; the caps of the budget), found by
experiment on the 64-dim Gaussian mixture of
benchmarks/bench_distill.py (8 components, NFE 5, K = 2, RMSE to the ODE solution on 1024
held-out draws, 2 seeds each; the 64-dim Gaussian in brackets), first with a plain
``distill`` on the polynomial rho = 7 grid::

    iterations = 300   150: 0.139 [0.021]   300: 0.116-0.121 [0.017]   600: 0.114-0.121 [0.012]
    lr = 0.05          0.02: 0.157-0.163    0.05: 0.116-0.121          0.1: 0.115-0.119
    M = 15             3: 0.131-0.136 [0.065]   7: 0.116-0.122 [0.022]   15: 0.116-0.121 [0.017]
                       (M = 3, the paper's value, leaves the teacher itself as the error)

On that grid batch 16, 32 and 64 and pools of 256-4096 (or fresh noise) gave the same
error (0.115-0.122). The pool and the batch matter once the grid fits the mixture
(``schedule="auto"``: rho = 3.5, then the grid learned on the final state, whose error is
a few draws that end in another component and overfit a small pool). `distill_auto` at
NFE 5, one seed each, pool / batch / iterations -> held-out RMSE (best baseline 0.149)::

    1024 / 32 / 300: 0.110    4096 / 32 / 300: 0.094    4096 / 64 / 300: 0.086
    4096 / 128 / 300: 0.086   4096 / 64 / 600: 0.089    4096 / 128 / 600: 0.083
    4096 / 256 / 600: 0.083

    batch_size = 64, pool = 4096: the cheapest setting near the floor; on the exact digits
    denoiser 0.106 -> 0.100 (25 s -> 44 s for the whole NFE-5 search, one thread), on the
    Gaussian level (0.0034); 600 iterations or a batch of 256 gave the digits 0.099 at
    1.4-5x the time.

A pool computes its teacher targets once (2-4x faster than fresh noise for the same
result).

Neither wider bounds (delta_max = o_max = 0.3 or 0.5), more branches (K = 3, 4, 8), Heun
as teacher, nor a final-state-only loss did better at these 300 iterations (the
final-state loss needs more: 1000 iterations of batch 64 gave 0.093 on that grid, and
learning the grid too 0.091). The schedule matters most on the
mixture (rho 7: 0.22-0.26, rho 3.5: 0.11-0.12, time-uniform: 0.12-0.20): most of its
error comes from a few samples that end in another mixture component; the default stays
polynomial rho = 7 and the benchmark picks a schedule per NFE on validation noise. On a
2-core machine the 64-dim runs take 1-4 s (300 iterations) with ``torch.set_num_threads(1)``;
intra-op threads make such tiny problems up to 10x slower under load.

Checkpoints (``checkpoint=path``): written atomically every ``checkpoint_every``
iterations, at the end, and on KeyboardInterrupt (then re-raised). Rerunning the same call
resumes (a finished checkpoint returns at once); a checkpoint written with other settings
raises ValueError listing the differences. A run killed at any moment and resumed ends
with the parameters of an uninterrupted run.

Multi-process (``torch.distributed`` initialised, e.g. by torchrun; gloo on CPU, nccl on
GPU): ``batch_size`` is per process; rank r takes rows ``[r b, (r + 1) b)`` of the global
batch of iteration i, so W processes with batch b train exactly like one with batch W b;
the loss and gradients are averaged with one all-reduce per iteration; only rank 0 writes
the checkpoint (every rank reads it on resume: use a shared file system) and shows the
progress bar; the teacher pass over a pool is split between the ranks. Conditioning
tensors whose leading dimension is the pool size (with a pool) follow the pool's draws;
without a pool, those whose leading dimension is the global batch are sliced per rank;
other conditioning is passed as is. The AMED predictor's initial weights come from a generator
seeded with ``seed``, so every rank starts from the same network.
"""
import sys as _sys
import types as _types

from .api import distill
from .checkpoint import load_checkpoint, save_checkpoint
from .conditioning import conditioning_rows
from .latent import DELTA_MAX, O_MAX, LatentAMEDTable, LatentEPD
from .loop import cosine_lr, mse_loss, train
from .noise import row_seed, training_noise
from .settings import (AUTO, DEFAULT_BATCH_SIZE, DEFAULT_ITERATIONS, DEFAULT_K, DEFAULT_LR,
                       DEFAULT_M, DEFAULT_POOL, DEFAULT_TIME_BUDGET_S, METHODS,
                       DistillSettings, SearchSettings)
from .students import WEIGHT_LR_SCALE, AMEDStudent, EPDStudent
from .teacher import refine_sigmas, teacher_targets

__all__ = ["distill", "DistillSettings", "SearchSettings", "AUTO", "train", "mse_loss",
           "cosine_lr", "LatentEPD", "LatentAMEDTable", "EPDStudent", "AMEDStudent",
           "WEIGHT_LR_SCALE", "METHODS", "DELTA_MAX", "O_MAX", "refine_sigmas",
           "teacher_targets", "training_noise", "row_seed", "save_checkpoint",
           "load_checkpoint", "DEFAULT_ITERATIONS", "DEFAULT_BATCH_SIZE", "DEFAULT_LR",
           "DEFAULT_M", "DEFAULT_POOL", "DEFAULT_K", "DEFAULT_TIME_BUDGET_S",
           "conditioning_rows"]


class _CallableModule(_types.ModuleType):
    """This package, callable as `distill`: ``from epd_kernels import distill`` gives the
    package (``epd_kernels.distill`` is always the module, with its submodules), and
    ``distill(denoiser, nfe=5, shape=...)`` calls `epd_kernels.distill.distill`."""

    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__wrapped__ = distill   # inspect.signature(epd_kernels.distill) shows the function's
