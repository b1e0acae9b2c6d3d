"""`epd sample`: per-seed sampling with resume, atomic files and multi-process sharing.

The output layouts (a folder of per-seed files, or ``X.npz`` assembled from the shards in
``X.npz.parts/``; ``class_labels`` -1 when unconditional) and the resume rules are the ones
``epd sample --help`` gives. Resuming with other settings (model, solver, NFE, params file,
labels), or unknown ones, is refused. One generator per seed (`make_noise`) makes a sample
independent of the batch and of the processes: under torchrun rank r takes
``pending[r::world]`` of the unfinished seeds, and rank 0 assembles an .npz.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import List

import numpy as np
import torch

from ..noise import make_noise
from ..solvers.registry import nfe_to_steps
from ..sampling import sample
from . import outputs
from .distributed import distributed_context, local_device
from .errors import UserError, one_line
from .resolve import (AMED_SOLVERS, EPD_SOLVERS, check_budget, check_solver,
                      class_labels_for, file_sha256, label_cond, load_model_or_fail,
                      load_params, model_shape, needs_params, parse_class_label)
from .seeds import format_seeds, parse_seeds
from .threads import model_batch_runner, pick_threads

__all__ = ["run_sample"]


class _StepProgress:
    """A bar over the denoiser steps of every batch, driven by the solvers' per-step
    callback, so that one long batch (a large NFE) shows progress too. Shown only once a
    run has lasted `DELAY_S`."""

    DELAY_S = 2.0

    def __init__(self, batches: int, steps: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.steps, self.done_batches = max(int(steps), 1), 0
        self.bar = tqdm(total=batches * self.steps, desc=desc, unit="step", delay=self.DELAY_S,
                        dynamic_ncols=True, disable=not enabled or batches == 0)

    def _advance_to(self, n: int) -> None:
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)   # update() honours the 2 s delay

    def callback(self, info) -> None:
        self._advance_to(self.done_batches * self.steps + min(int(info["i"]) + 1, self.steps))

    def batch_done(self, seeds_done: int) -> None:
        self.done_batches += 1
        self.bar.set_postfix_str(f"{seeds_done} seeds", refresh=False)
        self._advance_to(self.done_batches * self.steps)


def _manifest(args, solver, nfe, shape, label_mode) -> dict:
    return {"model": args.model, "solver": solver, "nfe": int(nfe),
            "params_sha256": file_sha256(args.params) if args.params else None,
            "class_labels": label_mode if isinstance(label_mode, str) else int(label_mode),
            "shape": list(shape), "dtype": "float32"}


def _json_object(text: str) -> dict:
    saved = json.loads(text)
    if not isinstance(saved, dict):
        raise ValueError("not a JSON object")
    return saved


def _check_same_settings(where: str, saved: dict, current: dict) -> None:
    diff = [k for k in current if saved.get(k) != current[k]]
    if diff:
        what = ", ".join(f"{k}: {saved.get(k)!r} there vs {current[k]!r} now" for k in diff)
        raise UserError(f"{where} holds samples made with other settings ({what}); use "
                        f"another --out or delete it")


def _check_manifest(folder: str, current: dict) -> None:
    path = os.path.join(folder, outputs.MANIFEST)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = _json_object(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume: {path} cannot be read ({one_line(e)}), so the "
                        f"settings of the samples in {folder} are unknown; use another --out "
                        f"or delete the folder") from None
    _check_same_settings(folder, saved, current)


def _absorb_existing_npz(npz_path: str, parts: str, manifest: dict, wanted: set) -> None:
    """Moves the wanted seeds of an existing final .npz into shards (rank 0, before work)."""
    if not os.path.exists(npz_path):
        return
    f = outputs.load_array_file(npz_path, ("run", "seeds", "samples"))
    if not isinstance(f, dict) or len(f) < 3:   # not all of run, seeds, samples
        raise UserError(f"cannot resume from {npz_path}: it has no run settings ('run', "
                        f"'seeds', 'samples' as 'epd sample' writes them); use another --out "
                        f"or delete it")
    try:
        run = _json_object(str(f["run"]))
    except ValueError as e:
        raise UserError(f"cannot resume from {npz_path}: its run settings cannot be read "
                        f"({one_line(e)}); use another --out or delete it") from None
    _check_same_settings(npz_path, run, manifest)
    done = outputs.finished_seeds(parts)
    for s, x in zip(f["seeds"].tolist(), f["samples"]):
        if s in wanted and s not in done:
            outputs.write_npy(outputs.seed_path(parts, s), x.astype(np.float32))


def _resolve(args):
    """Checks the request and loads what it names: ``(solver, seeds, label_mode, model,
    shape, params, nfe)``; every problem is a `UserError` before any file is written."""
    solver = check_solver(args.solver)
    seeds = parse_seeds(args.seeds)
    label_mode = parse_class_label(args.class_label)
    if needs_params(solver) and not args.params:
        raise UserError(f"solver {solver!r} needs --params FILE (make one with "
                        f"'epd distill --solver {solver} ...')")
    if args.params and not needs_params(solver):
        raise UserError(f"solver {solver!r} takes no params; --params is only for the "
                        f"distilled solvers (epd, epd-ipndm, amed, amed-ipndm, d-*)")
    args.device = local_device(args.device)
    model = load_model_or_fail(args.model, device=args.device)
    shape = model_shape(model)
    params = None
    if args.params:
        params = load_params(solver, args.params, model, args.model, nfe=args.nfe)
        nfe = int(params.nfe)
    else:
        if args.nfe is None:
            raise UserError(f"give --nfe (the latency budget) for solver {solver!r}")
        nfe = int(args.nfe)
        check_budget(solver, nfe)
    if params is not None and solver in EPD_SOLVERS + AMED_SOLVERS:
        params = params.to(args.device)  # once, not on every batch
    class_labels_for(model, seeds[:1], label_mode)  # validates the label early
    return solver, seeds, label_mode, model, shape, params, nfe


def run_sample(args) -> int:
    solver, seeds, label_mode, model, shape, params, nfe = _resolve(args)
    out = os.fspath(args.out)
    to_npz = out.lower().endswith(".npz")
    folder = out + ".parts" if to_npz else out
    if to_npz:
        outputs.ensure_writable_file(out)
    outputs.ensure_writable_dir(folder)
    manifest = _manifest(args, solver, nfe, shape, label_mode)
    batch = min(args.batch_size, len(seeds))
    threads = pick_threads(args.threads, model_batch_runner(
        model, shape, batch, label_cond(model, seeds[:batch], label_mode, args.device),
        args.device), args.device)

    with distributed_context(args.device) as dist:
        if dist.is_main:
            outputs.remove_stale_temporaries(folder, outputs.SAMPLE_FILES)
            _check_manifest(folder, manifest)
            if to_npz:
                _absorb_existing_npz(out, folder, manifest, set(seeds))
            outputs.write_json(os.path.join(folder, outputs.MANIFEST), manifest)
        dist.barrier()
        done = outputs.finished_seeds(folder)
        pending = [s for s in seeds if s not in done]
        mine = pending[dist.rank::dist.world]
        if dist.is_main:
            print(f"epd sample: {solver} nfe={nfe} on {args.model}: {len(seeds)} seeds, "
                  f"{len(seeds) - len(pending)} already finished, {len(pending)} to compute"
                  + (f" on {dist.world} processes" if dist.active else "")
                  + f", {threads} thread(s)" + (" each" if dist.active else ""), flush=True)
        t0 = time.perf_counter()
        stats_list = _sample_seeds(args, mine, solver, nfe, params, model, shape, label_mode,
                                   folder, png=(not to_npz), show=dist.is_main)
        summary = _summarise(stats_list, len(mine), time.perf_counter() - t0)
        all_summaries = dist.all_gather_object(summary)
        dist.barrier()
        if dist.is_main:
            if to_npz:
                _assemble(out, folder, seeds, model, label_mode, manifest)
            _report(solver, nfe, all_summaries, out)
        dist.barrier()
    return 0


def _sample_seeds(args, mine, solver, nfe, params, model, shape, label_mode, folder, png,
                  show) -> list:
    """Samples ``mine`` in batches and writes their files; returns ``[(n, stats)]``."""
    layout = outputs.image_layout(shape) if png else None
    scale = (args.png_scale or max(1, 64 // max(layout[:2]))) if layout else 1
    batches = -(-len(mine) // args.batch_size)
    try:
        steps = nfe_to_steps(solver, nfe)
    except ValueError:
        steps = nfe
    bar = _StepProgress(batches, steps, f"sample {solver} nfe={nfe}",
                        args.progress and show and len(mine) > 0)
    stats_list = []
    try:
        for a in range(0, len(mine), args.batch_size):
            chunk = mine[a:a + args.batch_size]
            noise = make_noise(chunk, shape, device=args.device)
            try:
                x, st = sample(model, noise, solver=solver, nfe=nfe, params=params,
                               return_stats=True, callback=bar.callback,
                               **label_cond(model, chunk, label_mode, args.device))
            except ValueError as e:
                raise UserError(one_line(e)) from None
            stats_list.append((len(chunk), st))
            arr = x.detach().to("cpu", torch.float32).numpy()
            for s, xs in zip(chunk, arr):
                if layout:
                    outputs.write_png(outputs.seed_path(folder, s, ".png"),
                                      outputs.to_uint8_image(xs, shape, scale))
                outputs.write_npy(outputs.seed_path(folder, s), xs)
            bar.batch_done(a + len(chunk))
    finally:
        bar.bar.close()
    return stats_list


def _summarise(stats_list, n, wall) -> dict:
    # latency NFE, total evaluations and steps per sample are the same for every batch
    per_sample = {k: getattr(stats_list[0][1], k) for k in ("latency_nfe", "total_evals",
                                                             "steps")} if stats_list else {}
    return {"computed": n, **per_sample, "wall_s": wall,
            "sampling_s": sum(s.wall_time_s for _, s in stats_list)}


def _report(solver, nfe, summaries: List[dict], out: str) -> None:
    computed = sum(s["computed"] for s in summaries)
    first = next((s for s in summaries if s["computed"]), None)
    if first is None:
        print(f"epd sample: nothing to compute, all seeds were finished; output {out}")
        return
    wall = max(s["wall_s"] for s in summaries)
    samp = sum(s["sampling_s"] for s in summaries)
    # Under torchrun the processes sample at the same time: their sampling times add up
    # to more than the wall time, so the sum is labelled as one.
    n = len(summaries)
    samp_text = (f"sampling time {samp:.2f} s" if n == 1 else
                 f"sampling time summed over {n} processes {samp:.2f} s")
    print(f"epd sample: computed {computed} seed(s); solver {solver}, nfe {nfe}: latency NFE "
          f"{first['latency_nfe']}, total evaluations {first['total_evals']} per sample, "
          f"{first['steps']} steps; {samp_text}, wall time {wall:.2f} s "
          f"({1000 * wall / max(computed, 1):.1f} ms/sample); output {out}", flush=True)


def _assemble(out: str, folder: str, seeds: List[int], model, label_mode, manifest) -> None:
    chosen, samples = outputs.load_seed_files(folder, seeds)
    labels = class_labels_for(model, seeds, label_mode)
    labels = labels.numpy() if labels is not None else np.full(len(seeds), -1, np.int64)
    outputs.write_npz(out, samples=samples.astype(np.float32), seeds=chosen,
                      class_labels=labels.astype(np.int64), run=np.asarray(json.dumps(manifest)))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"epd sample: wrote {out} ({len(seeds)} samples, seeds {format_seeds(seeds)})")
