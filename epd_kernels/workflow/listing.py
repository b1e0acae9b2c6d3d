"""`epd list`: the solvers (NFE rule, valid budgets up to 9, params) and embedded models."""
from __future__ import annotations

from ..solvers.registry import solver_names, valid_budgets
from .resolve import ALIASES, budget_rule, model_shape, needs_params, num_classes

__all__ = ["run_list"]


def run_list(args) -> int:
    print("solvers (latency NFE = sequential denoiser calls):")
    rows = []
    for name in solver_names():
        budgets = ",".join(map(str, valid_budgets(name, up_to=9)))
        notes = []
        if needs_params(name):
            notes.append("needs --params (epd distill)")
        if name in ALIASES:
            notes.append(f"alias of {ALIASES[name]}")
        rows.append((name, budget_rule(name), budgets, "; ".join(notes)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"  {'name':<{w[0]}}  {'rule':<{w[1]}}  {'budgets<=9':<{w[2]}}  notes")
    for r in rows:
        print(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
    print("\nmodels (--model NAME, or 'package.module:factory'):")
    from ..models.registry import DEFAULT_MODEL, load_model, model_names

    for name in model_names():
        try:
            m = load_model(name)
            shape = model_shape(m)
            nc = num_classes(m)
            desc = f"shape {list(shape) if shape else '?'}" + (
                f", {nc} classes" if nc else ", unconditional")
        except Exception as e:  # a broken embedded model should not hide the others
            desc = f"unavailable ({type(e).__name__}: {e})"
        print(f"  {name}{' (default)' if name == DEFAULT_MODEL else ''}: {desc}")
    return 0
