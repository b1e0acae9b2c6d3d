"""`epd eval`: global RMSE of samples to a reference (matched by seed) and their Frechet
distance in pixel space to the data of ``--model`` (the 1797 digits for the digits models,
``model.sample_data(10000)`` seeded 0 for models that have it) or of ``--data`` (.npy, or
.npz with ``samples``, ``images`` or ``data``). The FD is printed with its sample count
("FD (n=N)"): it is biased upwards for few samples. Non-finite samples are refused.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from ..metrics import frechet_distance, global_rmse
from . import outputs
from .errors import UserError
from .resolve import load_model_or_fail, model_shape
from .threads import pick_threads

__all__ = ["run_eval", "load_samples", "model_data"]

DATA_SAMPLES = 10_000
DATA_SEED = 0


def load_samples(path) -> Tuple[np.ndarray, np.ndarray]:
    """``(seeds [N] or None, samples [N, ...])`` from a per-seed folder, an .npz or .npy."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return outputs.load_seed_files(path)
    f = outputs.load_array_file(path, ("samples", "seeds"))
    if not isinstance(f, dict):
        return None, f
    if "samples" not in f:
        raise UserError(f"{path} has no 'samples' array")
    samples, seeds = f["samples"], f.get("seeds")
    if seeds is not None and len(seeds) != len(samples):
        raise UserError(f"{path}: {len(seeds)} seeds but {len(samples)} samples")
    return seeds, samples


def _check_finite(samples: np.ndarray, path) -> None:
    if samples.dtype.kind not in "fiub" or samples.ndim < 1:
        raise UserError(f"{path}: expected a numeric array of samples [N, ...], got "
                        f"{samples.dtype} of shape {list(samples.shape)}")
    bad = int((~np.isfinite(samples.reshape(len(samples), -1))).any(axis=1).sum())
    if bad:
        raise UserError(f"{path}: {bad} of {len(samples)} samples have non-finite values "
                        f"(NaN or inf); the metrics need finite samples (a diverged solver?)")


def model_data(spec: str, model) -> np.ndarray:
    """The data the samples of ``model`` (loaded from ``spec``) are compared with."""
    if spec.strip().lower() in ("digits-unet", "digits-exact"):
        from ..models.digits import load_digits_data

        return load_digits_data()[0].numpy()
    if hasattr(model, "sample_data"):
        g = torch.Generator().manual_seed(DATA_SEED)
        data = model.sample_data(DATA_SAMPLES, generator=g)
        if isinstance(data, tuple):
            data = data[0]
        return data.detach().cpu().numpy()
    if hasattr(model, "images"):
        return torch.as_tensor(model.images).cpu().numpy()
    raise UserError(f"model {spec!r} has no data to compare with; give --data FILE "
                    f"(.npy or .npz with 'samples'/'images'/'data')")


def run_eval(args) -> int:
    if not (args.model or args.data or args.reference):
        raise UserError("give --model NAME or --data FILE (Frechet distance) and/or "
                        "--reference DIR|FILE.npz (RMSE)")
    if args.json:
        outputs.ensure_writable_file(args.json)
    pick_threads(args.threads, None)   # nothing to time: 'auto' keeps torch's count
    seeds, samples = load_samples(args.samples)
    _check_finite(samples, args.samples)
    samples = samples.astype(np.float64)
    res = {"samples": os.fspath(args.samples), "num_samples": int(len(samples)),
           "shape": list(samples.shape[1:])}
    lines = [f"samples: {args.samples} ({len(samples)} of shape {list(samples.shape[1:])})"]
    if args.reference:
        res.update(_rmse_to_reference(samples, seeds, args))
        lines.append(f"global RMSE to reference: {res['rmse']:.6g} (over {res['rmse_matched']}"
                     f" seed(s) matched)")
    if args.model or args.data:
        res.update(_frechet(samples, args))
        n = len(samples)
        lines.append(f"FD (n={n}), pixel space, to {res['data']} ({res['num_data']} items): "
                     f"{res['frechet_distance']:.6g}")
        if n < samples[0].size:
            lines.append(f"  note: {n} samples for {samples[0].size} dimensions: the estimate "
                         f"is biased upwards; compare FDs only at equal n")
    print("\n".join(lines))
    if args.json:
        outputs.write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def _rmse_to_reference(samples, seeds, args) -> dict:
    rseeds, ref = load_samples(args.reference)
    _check_finite(ref, args.reference)
    if seeds is None or rseeds is None:
        if len(ref) != len(samples):
            raise UserError("without seeds, samples and reference must have the same "
                            f"length ({len(samples)} vs {len(ref)})")
        a, b, matched = samples, ref, len(samples)
    else:
        pos = {int(s): i for i, s in enumerate(rseeds.tolist())}
        common = [(i, pos[int(s)]) for i, s in enumerate(seeds.tolist()) if int(s) in pos]
        if not common:
            raise UserError(f"no seed in common between {args.samples} and {args.reference}")
        a = samples[[i for i, _ in common]]
        b = ref[[j for _, j in common]]
        matched = len(common)
    if a.shape[1:] != b.shape[1:]:
        raise UserError(f"shapes differ: samples {list(a.shape[1:])}, reference "
                        f"{list(b.shape[1:])}")
    return {"rmse": global_rmse(a, b), "rmse_kind": "global", "rmse_matched": int(matched),
            "reference": os.fspath(args.reference)}


def _frechet(samples, args) -> dict:
    """The Frechet distance to the data of ``--model`` (samples of the model's shape) or to
    ``--data`` (an array of the samples' shape, or of their size, then reshaped)."""
    if args.data:
        what = os.fspath(args.data)
        data = outputs.load_array_file(what, ("samples", "images", "data"))
        if isinstance(data, dict):
            if not data:
                raise UserError(f"{what} has none of the arrays 'samples', 'images', 'data'")
            data = next(iter(data.values()))
    else:
        model = load_model_or_fail(args.model)
        want = model_shape(model)
        if tuple(samples.shape[1:]) != want:
            raise UserError(f"the samples have shape {list(samples.shape[1:])} but model "
                            f"{args.model!r} makes shape {list(want)}: these samples are not "
                            f"from that model")
        data = model_data(args.model, model)
        what = f"model:{args.model}"
    _check_finite(data, what)
    data = data.astype(np.float64)
    if data.shape[1:] != samples.shape[1:]:
        if data[0].size != samples[0].size:
            raise UserError(f"the data {what} has shape {list(data.shape[1:])}, the samples "
                            f"{list(samples.shape[1:])}")
        data = data.reshape((len(data),) + samples.shape[1:])
    if len(samples) < 2:
        raise UserError("the Frechet distance needs at least 2 samples")
    return {"frechet_distance": frechet_distance(samples, data), "frechet_n": int(len(samples)),
            "data": what, "num_data": int(len(data))}
