r"""Closed-form fitting of D-ODE lambdas (Kim, Tang, Yu, CVPR 2024, Sec. 3.3, eq. 13-14;
docs/design.md, "D-ODE").

A teacher (`teacher_targets`: ``teacher_factor`` = C times the steps on `refine_sigmas`,
Heun without AFS by default, ``teacher="same"`` the paper's base solver) gives targets
``T_{n+1}`` at the student sigmas for one batch of noise. The student runs from the same
noise with a lambda rule (fitted and sampled trajectories coincide) and, the update being
affine, fits ``lambda_n* = <T_{n+1} - a_n, b_n> / <b_n, b_n>`` as it reaches each step
(`solve_lambda`, float64 over the batch; ``lambda_0 = 0``).

Joint refinement (``refine=True``, default; not in the paper): the greedy fit throws away
the cancellation of errors between steps that a multistep solver relies on (greedy d-ipndm
was up to 4x worse than iPNDM on 64-dim models at NFE 5-9). `refine_lambdas` minimises the
final state's distance to the teacher's by Gauss-Newton (forward-difference Jacobian, a line
search accepting only a decrease) from the better of the greedy lambdas and zeros, so never
worse than either on the fitting batch: d-ipndm 0.03-0.8x iPNDM's held-out RMSE (greedy
0.7-4.1x), for about ``refine_iterations * (S + 1)`` student runs.
"""
from __future__ import annotations

import math
import numbers
import time
from typing import Callable, List, Optional, Sequence

import torch

from ..params.dode import DODE_BASES, DODEParams, dode_latency_nfe, normalize_dode_base
from ..solvers import SOLVERS
from ..solvers.common import check_cond_keywords, check_int
from ..solvers.dode import DODE_SOLVERS
from ..solvers.registry import resolve_sigmas
from ..solvers.schedules import check_sigmas

__all__ = ["fit_dode", "refine_sigmas", "teacher_targets", "solve_lambda", "refine_lambdas",
           "FIT_SEED_BASE", "DEFAULT_FIT_BATCH"]

#: Keywords of `distill` that `fit_dode` does not take (refused rather than passed to the
#: denoiser as conditioning).
_DISTILL_OPTIONS = ("iterations", "lr", "num_points", "M", "plugin", "pool", "loss", "method",
                    "checkpoint", "progress", "init", "delta_max", "o_max")

#: Fitting noise for ``seed`` uses the per-sample seeds ``FIT_SEED_BASE + seed * B + j``
#: (`make_noise` style), a range disjoint from the small seeds used for evaluation.
FIT_SEED_BASE = 2 ** 40
#: Samples the lambdas are fitted on. The paper's 100 suits its greedy fit; the joint
#: refinement overfits a small batch (d-ipndm, digits U-Net, NFE 9, held-out RMSE / iPNDM's:
#: 1.000 with 128, 0.93-0.95 with 512). Cost there: about 40 s (15 s with 128).
DEFAULT_FIT_BATCH = 512


def refine_sigmas(sigmas, factor: int, rho: float = 7.0) -> torch.Tensor:
    """The grid with every interval cut into `factor` sub-steps uniform in sigma^(1/rho).

    Returns ``factor * S + 1`` float64 values; entry ``factor * n`` is exactly ``sigmas[n]``.
    """
    check_int("teacher_factor", factor, 1)
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
    """Teacher states at ``sigmas[1:]`` from ``x`` at ``sigmas[0]`` (a list of S tensors): a
    solver of `SOLVERS` run on `refine_sigmas(sigmas, teacher_factor)`."""
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


def refine_lambdas(final_state: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                   starts: Sequence[torch.Tensor], *, iterations: int = 4,
                   fixed: Sequence[int] = (0,)) -> tuple:
    """Gauss-Newton on ``mean ||target - final_state(lambdas)||^2`` (module docstring).

    Args:
        final_state: ``lambdas [S] float64 -> x_S`` (the student run on the fitting batch).
        target: the teacher's final state on that batch.
        starts: candidate starting lambdas; the one with the lowest loss is used.
        iterations: Gauss-Newton steps (each: one run per free lambda plus the line search).
        fixed: indices kept at their starting value (lambda_0 has no previous estimate).

    Returns ``(lambdas, info)``; info holds the loss of every start, the final loss and the
    number of accepted steps. The returned loss is never above the best start's.
    """
    t = target.to(torch.float64).reshape(-1)

    def loss_of(lam):
        x = final_state(lam).to(torch.float64).reshape(-1)
        e = float((t - x).pow(2).mean())
        return (e if math.isfinite(e) else math.inf), x

    start_losses = []
    best = None
    for lam in starts:
        lam = lam.to(torch.float64).clone()
        e, x = loss_of(lam)
        start_losses.append(e)
        if best is None or e < best[0]:
            best = (e, lam, x)
    e, lam, x = best
    free = [i for i in range(lam.numel()) if i not in set(fixed)]
    accepted = 0
    for _ in range(int(iterations)):
        if not free or not math.isfinite(e):
            break
        cols = []
        for i in free:
            eps = 1e-3 * max(1.0, abs(float(lam[i])))
            bumped = lam.clone()
            bumped[i] += eps
            cols.append((loss_of(bumped)[1] - x) / eps)
        J = torch.stack(cols, 1)                                        # [N, F]
        JtJ = J.T @ J
        ridge = 1e-10 * float(JtJ.diagonal().sum()) + 1e-300
        step = torch.linalg.solve(JtJ + ridge * torch.eye(len(free), dtype=torch.float64),
                                  J.T @ (t - x))
        if not torch.isfinite(step).all():
            break
        scale, improved = 1.0, False
        while scale >= 1.0 / 64:
            trial = lam.clone()
            trial[free] += scale * step
            e2, x2 = loss_of(trial)
            if e2 < e:
                gain = (e - e2) / e if e > 0 else 0.0
                lam, x, e, improved = trial, x2, e2, True
                accepted += 1
                break
            scale /= 2
        if not improved or gain < 1e-4:
            break
    return lam, {"start_losses": start_losses, "loss": e, "accepted_steps": accepted}


def _resolve_grid(schedule, steps: int) -> torch.Tensor:
    """The float64 grid of `schedule` (`resolve_sigmas`), checked to have `steps` steps."""
    s = resolve_sigmas(schedule, steps)
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
             shape: Optional[Sequence[int]] = None, batch_size: int = DEFAULT_FIT_BATCH,
             teacher_factor: int = 10, schedule=None, afs: Optional[bool] = None,
             seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
             teacher: str = "heun", teacher_afs: bool = False, max_order: int = 4,
             noise: Optional[torch.Tensor] = None, refine: bool = True,
             refine_iterations: int = 4, **cond) -> DODEParams:
    """Fits the per-step lambdas of a D-ODE solver against a teacher (module docstring).

    Args:
        solver: "d-euler" (alias "d-ddim"), "d-heun" (alias "d-edm") or "d-ipndm".
        nfe: latency budget with the base solver's rule (``S - afs`` for d-euler / d-ipndm,
            ``2 S - afs`` for d-heun); may be None with an explicit grid.
        shape: per-sample shape (not needed when `noise` is given).
        batch_size, seed: the fitting batch, per-sample seeds ``FIT_SEED_BASE + seed * B + j``
            (or ``noise``, a ``[B, ...]`` batch of N(0, I) noise).
        teacher_factor: C, teacher sub-steps per student step (the paper's 10).
        schedule, afs: the student's grid (as for `sample`) and analytic first step (None: on
            for d-heun, off otherwise).
        teacher: a baseline solver name or "same" (the base solver); teacher_afs its AFS.
        max_order: iPNDM order cap (d-ipndm). refine, refine_iterations: the joint
            refinement and its Gauss-Newton steps (False: the paper's greedy fit alone).
        **cond: conditioning for the denoiser; tensors have leading dimension B.

    Returns: a validated `DODEParams`; ``meta`` records the teacher settings and per-step
    MSEs to the teacher: ``loss`` (returned lambdas), ``loss_greedy`` / ``loss_base`` (greedy
    step / plain base step from the same state) and, with ``refine``, ``lambdas_greedy`` and
    ``refine`` (final-state MSE of the base solver, the greedy and the refined lambdas).
    """
    t0 = time.perf_counter()
    base = normalize_dode_base(solver)
    a = (base == "heun") if afs is None else bool(afs)
    sigmas, nfe = _student_grid(base, a, nfe, schedule)

    check_cond_keywords(denoiser, cond, where="fit_dode", options=_DISTILL_OPTIONS)
    if not isinstance(refine, bool):
        raise ValueError(f"refine must be True or False, got {refine!r}")
    refine_iterations = check_int("refine_iterations", refine_iterations, 0)
    if teacher == "same":
        teacher = base
    noise = _fitting_noise(noise, shape, batch_size, seed, device, dtype)

    x_T = noise * float(sigmas[0])
    extra = {"max_order": int(max_order)} if base == "ipndm" else {}
    lambdas, loss, rule, refined, greedy_loss = _fit(
        denoiser, base, a, x_T, sigmas, extra, cond, teacher=teacher,
        teacher_factor=teacher_factor, teacher_afs=teacher_afs, refine=refine,
        refine_iterations=refine_iterations)
    meta = {
        "teacher": teacher,
        "teacher_factor": int(teacher_factor),
        "teacher_afs": bool(teacher_afs),
        "batch_size": int(noise.shape[0]),
        "seed": int(seed),
        "dtype": str(noise.dtype).replace("torch.", ""),
        "loss": loss,
        "loss_base": rule.loss_base,
        "refine": refined,
        "fit_seconds": time.perf_counter() - t0,
    }
    if refined is not None:
        meta["loss_greedy"] = greedy_loss
        meta["lambdas_greedy"] = list(rule.lambdas)
    return DODEParams(lambdas=lambdas, sigmas=sigmas,
                      base=base, nfe=int(nfe), afs=a, max_order=int(max_order),
                      schedule=_schedule_meta(schedule), meta=meta).validate()


def _fit(denoiser, base, a, x_T, sigmas, extra, cond, *, teacher, teacher_factor,
         teacher_afs, refine, refine_iterations):
    """The greedy closed-form fit, then (with ``refine``) the joint refinement:
    ``(lambdas, per-step loss, the greedy rule, refinement record, greedy per-step loss)``."""
    steps = sigmas.numel() - 1
    greedy_loss = None
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
        lambdas = torch.tensor(rule.lambdas, dtype=torch.float64)
        refined = None
        if refine:
            def final_state(lam):
                return DODE_SOLVERS[base](denoiser, x_T, sigmas, lambdas=lam.tolist(), afs=a,
                                          **extra, **cond)

            greedy_loss = list(loss)
            lambdas, info = refine_lambdas(final_state, targets[-1],
                                           [lambdas, torch.zeros_like(lambdas)],
                                           iterations=int(refine_iterations))
            refined = {"final_mse_greedy": info["start_losses"][0],
                       "final_mse_base": info["start_losses"][1],
                       "final_mse": info["loss"], "accepted_steps": info["accepted_steps"],
                       "iterations": int(refine_iterations)}
            DODE_SOLVERS[base](denoiser, x_T, sigmas, lambdas=lambdas.tolist(),
                               callback=record, afs=a, **extra, **cond)
    return lambdas, loss, rule, refined, greedy_loss


def _student_grid(base: str, a: bool, nfe, schedule):
    """``(sigmas, nfe)`` of the student: from the budget with the base solver's rule, or
    from an explicit grid when ``nfe`` is None."""
    per_step = DODE_BASES[base]
    if nfe is None:
        if schedule is None or isinstance(schedule, (str, dict)):
            raise ValueError("nfe must be given unless schedule is an explicit list of sigmas")
        sigmas = check_sigmas(schedule, "schedule")
        nfe = dode_latency_nfe(sigmas.numel() - 1, base, a)
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
    return sigmas, nfe


def _fitting_noise(noise, shape, batch_size, seed, device, dtype):
    """The fitting batch: the seeded one (`FIT_SEED_BASE`) or the caller's, checked."""
    if noise is None:
        if shape is None:
            raise ValueError("give shape (per-sample shape) or a noise batch")
        batch_size = check_int("batch_size", batch_size, 1)
        from ..noise import make_noise

        first = FIT_SEED_BASE + int(seed) * int(batch_size)
        return make_noise(range(first, first + int(batch_size)), shape, device=device,
                          dtype=dtype)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ValueError("noise must be a floating tensor of shape [B, ...]")
    return noise if device is None else noise.to(device)
