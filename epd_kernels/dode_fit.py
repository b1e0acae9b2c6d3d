r"""Closed-form fitting of D-ODE lambdas (Kim, Tang, Yu, CVPR 2024, Sec. 3.3, eq. 13-14).

On one batch of noise, a teacher (an accurate solver with ``teacher_factor`` = C times
the steps, on a refined grid that contains every student sigma) gives target states
``T_{n+1}`` at the student sigmas. The student D-ODE solver is then run from the same
noise and its lambdas are chosen greedily, step by step: at step n, with the student
state ``x_n`` produced by the already-fitted steps 0..n-1, the update is affine in
lambda (`epd_kernels.solvers.dode`),

    x_{n+1}(lambda) = a_n + lambda b_n,

so the least-squares problem ``min_lambda sum_batch ||T_{n+1} - a_n - lambda b_n||^2`` has
the exact minimiser

    lambda_n* = <T_{n+1} - a_n, b_n> / <b_n, b_n>          (0 when b_n = 0)

(inner products over the whole batch, in float64). Step 0 has no previous estimate:
``lambda_0 = 0``. The student run that fits the lambdas is the ordinary solver function
with a lambda rule in place of the list, so fitted and sampled trajectories coincide.

Teacher grid: each student interval ``[sigma_{n+1}, sigma_n]`` is cut into C sub-steps
uniform in ``sigma^(1/rho)`` (rho = 7), which for a polynomial (Karras) student grid is
exactly the polynomial grid with C times the steps. The default teacher is EDM's Heun
without AFS (second order, 2 C S calls), more accurate than the base solver itself; the
paper's choice (the base solver / DDIM) is ``teacher="same"`` / ``"euler"``.
"""
from __future__ import annotations

import math
import numbers
import time
from typing import Callable, List, Optional, Sequence

import torch

from .dode_params import DODE_BASES, DODEParams, dode_latency_nfe, normalize_dode_base
from .solvers import SOLVERS
from .solvers.dode import DODE_SOLVERS
from .solvers.schedules import check_sigmas, get_sigmas

__all__ = ["fit_dode", "refine_sigmas", "teacher_targets", "solve_lambda", "FIT_SEED_BASE"]

#: Fitting noise for ``seed`` uses the per-sample seeds ``FIT_SEED_BASE + seed * B + j``
#: (`make_noise` style), a range disjoint from the small seeds used for evaluation.
FIT_SEED_BASE = 2 ** 40


def refine_sigmas(sigmas, factor: int, rho: float = 7.0) -> torch.Tensor:
    """The grid with every interval cut into `factor` sub-steps uniform in sigma^(1/rho).

    Returns ``factor * S + 1`` float64 values; entry ``factor * n`` is exactly ``sigmas[n]``.
    """
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f"teacher_factor must be an integer >= 1, got {factor!r}")
    s = check_sigmas(sigmas, "sigmas")
    if factor == 1:
        return s.clone()
    r = 1.0 / float(rho)
    frac = torch.arange(factor, dtype=torch.float64) / factor          # [C]
    hi, lo = s[:-1, None] ** r, s[1:, None] ** r                        # [S, 1]
    inner = (hi + frac[None] * (lo - hi)) ** float(rho)                 # [S, C]
    inner[:, 0] = s[:-1]                                                # exact student sigmas
    out = torch.cat([inner.reshape(-1), s[-1:]])
    if not (out[1:] < out[:-1]).all():
        raise ValueError("the refined teacher grid is not strictly decreasing (teacher_factor "
                         "too large for float64)")
    return out


def teacher_targets(denoiser: Callable, x: torch.Tensor, sigmas, *, teacher: str = "heun",
                    teacher_factor: int = 10, teacher_afs: bool = False,
                    **cond) -> List[torch.Tensor]:
    """Teacher states at ``sigmas[1:]`` from ``x`` at ``sigmas[0]`` (a list of S tensors).

    The teacher is a baseline solver (`epd_kernels.solvers.SOLVERS`: "euler"/"ddim",
    "heun", "dpm2", "ipndm", ...) run on `refine_sigmas(sigmas, teacher_factor)`.
    """
    if not isinstance(teacher, str) or teacher.lower() not in SOLVERS:
        raise ValueError(f"unknown teacher {teacher!r}; use one of {sorted(SOLVERS)} or 'same'")
    fine = refine_sigmas(sigmas, teacher_factor)
    C = int(teacher_factor)
    out: List[torch.Tensor] = []

    def keep(info):
        if (info["i"] + 1) % C == 0:
            out.append(info["x_next"])

    with torch.no_grad():
        SOLVERS[teacher.lower()](denoiser, x, fine, callback=keep, afs=bool(teacher_afs), **cond)
    return out


def solve_lambda(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """argmin_lambda ||target - a - lambda b||^2 over all elements = <t - a, b> / <b, b>
    in float64; 0 if ``<b, b>`` is 0 or not finite."""
    r = (target.to(torch.float64) - a.to(torch.float64)).reshape(-1)
    b64 = b.to(torch.float64).reshape(-1)
    bb = float(torch.dot(b64, b64))
    if not math.isfinite(bb) or bb <= 0.0:
        return 0.0
    lam = float(torch.dot(r, b64)) / bb
    return lam if math.isfinite(lam) else 0.0


class _GreedyFit:
    """Lambda rule ``(i, a, b) -> lambda_i*`` that fits each step as the solver reaches it."""

    def __init__(self, targets: Sequence[torch.Tensor]):
        self.targets = targets
        S = len(targets)
        self.lambdas = [0.0] * S
        self.loss_base = [float("nan")] * S   # per-step MSE of the base step (lambda = 0)

    def __call__(self, i: int, a: torch.Tensor, b: torch.Tensor) -> float:
        t = self.targets[i]
        self.loss_base[i] = float((t.to(torch.float64) - a.to(torch.float64)).pow(2).mean())
        self.lambdas[i] = solve_lambda(t, a, b)
        return self.lambdas[i]


def _resolve_grid(schedule, steps: int) -> torch.Tensor:
    """float64 grid of `steps` steps: None (polynomial), a kind name, a dict of get_sigmas
    keyword arguments (optional "kind"), or an explicit list/tensor of sigmas."""
    if schedule is None:
        s = get_sigmas("polynomial", steps)
    elif isinstance(schedule, str):
        s = get_sigmas(schedule, steps)
    elif isinstance(schedule, dict):
        kw = {k: v for k, v in schedule.items() if k not in ("device", "dtype")}
        kind = kw.pop("kind", "polynomial")
        if kind != "explicit":
            if kw.get("num_steps") not in (None, steps):
                raise ValueError(f"schedule['num_steps']={kw['num_steps']} does not match the "
                                 f"{steps} steps that the nfe budget gives")
            kw["num_steps"] = steps
        s = get_sigmas(kind, **kw)
    else:
        s = check_sigmas(schedule, "schedule")
    if s.numel() - 1 != steps:
        raise ValueError(f"the schedule has {s.numel() - 1} steps but the nfe budget needs "
                         f"{steps}")
    return s


def _schedule_meta(schedule):
    if schedule is None:
        return "polynomial"
    if isinstance(schedule, (str, dict)):
        return schedule
    return "explicit"


def fit_dode(denoiser: Callable, *, solver: str = "d-euler", nfe: Optional[int] = None,
             shape: Optional[Sequence[int]] = None, batch_size: int = 128,
             teacher_factor: int = 10, schedule=None, afs: Optional[bool] = None,
             seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
             teacher: str = "heun", teacher_afs: bool = False, max_order: int = 4,
             noise: Optional[torch.Tensor] = None, **cond) -> DODEParams:
    """Fits the per-step lambdas of a D-ODE solver in closed form against a teacher.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat`` (frozen).
        solver: "d-euler" (alias "d-ddim"), "d-heun" (alias "d-edm") or "d-ipndm".
        nfe: latency budget, with the base solver's rule: ``S - afs`` sequential calls for
            d-euler / d-ipndm, ``2 S - afs`` for d-heun. May be None with an explicit grid.
        shape: per-sample shape ``(C, H, W)`` (not needed when `noise` is given).
        batch_size: size B of the fitting batch (the paper uses 100).
        teacher_factor: C, teacher sub-steps per student step (the paper's C = 10).
        schedule: the student grid: None (polynomial, rho = 7, 80 -> 0.002), a kind name,
            a dict of `get_sigmas` arguments, or an explicit decreasing list of sigmas.
        afs: analytic first step of the student; None = the base solver's default in
            `sample` (on for d-heun, off for d-euler / d-ipndm).
        seed: the fitting noise uses per-sample seeds ``FIT_SEED_BASE + seed * B + j``,
            disjoint from the small seeds one evaluates with.
        device, dtype: of the fitting batch (the lambdas are solved in float64 anyway).
        teacher: a baseline solver name ("heun", "dpm2", "euler", "ipndm", ...) or "same"
            (the base solver, as in the paper). teacher_afs: AFS for the teacher.
        max_order: iPNDM order cap (d-ipndm only; stored in the params).
        noise: optional fitting batch ``[B, ...]`` of N(0, I) noise instead of the seeded one.
        **cond: conditioning for the denoiser; tensors must have leading dimension B.

    Returns: a validated `DODEParams` whose ``meta`` records the teacher settings and the
    per-step fitting losses ``loss`` (MSE to the teacher after each fitted step) and
    ``loss_base`` (MSE of the plain base step from the same state).
    """
    t0 = time.perf_counter()
    base = normalize_dode_base(solver)
    a = (base == "heun") if afs is None else bool(afs)
    per_step = DODE_BASES[base]

    if nfe is None:
        if schedule is None or isinstance(schedule, (str, dict)):
            raise ValueError("nfe must be given unless schedule is an explicit list of sigmas")
        sigmas = check_sigmas(schedule, "schedule")
        steps = sigmas.numel() - 1
        nfe = dode_latency_nfe(steps, base, a)
    else:
        if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
            raise ValueError(f"nfe must be an integer, got {nfe!r}")
        steps, rem = divmod(int(nfe) + int(a), per_step)
        if nfe < 1 or rem != 0 or steps < 1:
            valid = ("any budget >= 1" if per_step == 1 else
                     "odd budgets 1, 3, 5, ... (pass afs=False for even)" if a else
                     "even budgets 2, 4, 6, ... (pass afs=True for odd)")
            raise ValueError(f"solver 'd-{base}' with afs={a} cannot spend exactly nfe={nfe} "
                             f"sequential evaluations; it can meet {valid}")
        sigmas = _resolve_grid(schedule, steps)
    if nfe < 1:
        raise ValueError(f"the grid gives nfe={nfe} < 1 for 'd-{base}' with afs={a}")

    if teacher == "same":
        teacher = base
    if noise is None:
        if shape is None:
            raise ValueError("give shape (per-sample shape) or a noise batch")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or \
                batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        from .sampling import make_noise

        first = FIT_SEED_BASE + int(seed) * int(batch_size)
        noise = make_noise(range(first, first + int(batch_size)), shape, device=device,
                           dtype=dtype)
    elif not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ValueError("noise must be a floating tensor of shape [B, ...]")
    elif device is not None:
        noise = noise.to(device)

    x_T = noise * float(sigmas[0])
    extra = {"max_order": int(max_order)} if base == "ipndm" else {}
    with torch.no_grad():
        targets = teacher_targets(denoiser, x_T, sigmas, teacher=teacher,
                                  teacher_factor=teacher_factor, teacher_afs=teacher_afs, **cond)
        rule = _GreedyFit(targets)
        loss = [float("nan")] * steps

        def record(info):
            i = info["i"]
            loss[i] = float((targets[i].to(torch.float64)
                             - info["x_next"].to(torch.float64)).pow(2).mean())

        DODE_SOLVERS[base](denoiser, x_T, sigmas, lambdas=rule, callback=record, afs=a,
                           **extra, **cond)
    rule.loss_base[0] = loss[0]
    meta = {
        "teacher": teacher,
        "teacher_factor": int(teacher_factor),
        "teacher_afs": bool(teacher_afs),
        "batch_size": int(noise.shape[0]),
        "seed": int(seed),
        "dtype": str(noise.dtype).replace("torch.", ""),
        "loss": loss,
        "loss_base": rule.loss_base,
        "fit_seconds": time.perf_counter() - t0,
    }
    return DODEParams(lambdas=torch.tensor(rule.lambdas, dtype=torch.float64), sigmas=sigmas,
                      base=base, nfe=int(nfe), afs=a, max_order=int(max_order),
                      schedule=_schedule_meta(schedule), meta=meta).validate()
