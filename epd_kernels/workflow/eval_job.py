"""`epd eval`: metrics of a set of samples.

* samples: a folder of per-seed ``seed-NNNNNN.npy`` files or an ``.npz`` with
  ``samples`` (and ``seeds``), as `epd sample` writes them;
* ``--reference DIR|FILE.npz``: RMSE to it (`metrics.rmse`, per-sample RMS over all
  dimensions, then the mean), matched by seed;
* ``--model NAME`` or ``--data FILE``: Frechet distance in pixel space
  (`metrics.frechet_distance`) to the model's data: the 1797 digits
  (`load_digits_data`) for the digits models, ``model.sample_data(10000, generator
  seeded 0)`` for models that have it (gaussian, gmm); ``--data`` takes an .npy array or
  an .npz with ``samples``, ``images`` or ``data``.

Prints the metrics; ``--json PATH`` also writes them.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch

from ..metrics import frechet_distance, rmse
from . import outputs
from .errors import UserError, one_line

__all__ = ["run_eval", "load_samples", "model_data", "DATA_SAMPLES", "DATA_SEED"]

DATA_SAMPLES = 10_000
DATA_SEED = 0


def load_samples(path) -> Tuple[np.ndarray, np.ndarray]:
    """``(seeds [N] or None, samples [N, ...])`` from a per-seed folder or an .npz."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return outputs.load_seed_files(path)
    if not os.path.exists(path):
        raise UserError(f"samples not found: {path}")
    try:
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            return None, arr
        with np.load(path, allow_pickle=False) as f:
            if "samples" not in f:
                raise UserError(f"{path} has no 'samples' array (has {sorted(f.files)})")
            samples = f["samples"]
            seeds = f["seeds"] if "seeds" in f else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None
    if seeds is not None and len(seeds) != len(samples):
        raise UserError(f"{path}: {len(seeds)} seeds but {len(samples)} samples")
    return seeds, samples


def model_data(spec: str) -> np.ndarray:
    """The data a model's samples are compared with (see the module docstring)."""
    from .resolve import load_model_or_fail

    key = spec.strip().lower()
    if key in ("digits-unet", "digits-exact"):
        from ..models.digits import load_digits_data

        return load_digits_data()[0].numpy()
    model = load_model_or_fail(spec)
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


def _load_data_file(path) -> np.ndarray:
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    try:
        if path.lower().endswith(".npy"):
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as f:
            for k in ("samples", "images", "data"):
                if k in f:
                    return f[k]
            raise UserError(f"{path} has none of the arrays 'samples', 'images', 'data'")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None


def run_eval(args) -> int:
    if not (args.model or args.data or args.reference):
        raise UserError("give --model NAME or --data FILE (Frechet distance) and/or "
                        "--reference DIR|FILE.npz (RMSE)")
    if args.json:
        outputs.ensure_writable_file(args.json)
    seeds, samples = load_samples(args.samples)
    samples = samples.astype(np.float64)
    res = {"samples": os.fspath(args.samples), "num_samples": int(len(samples)),
           "shape": list(samples.shape[1:])}
    lines = [f"samples: {args.samples} ({len(samples)} of shape {list(samples.shape[1:])})"]

    if args.reference:
        rseeds, ref = load_samples(args.reference)
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
        res["rmse"] = rmse(a, b)
        res["rmse_matched"] = int(matched)
        res["reference"] = os.fspath(args.reference)
        lines.append(f"rmse to reference: {res['rmse']:.6g} (over {matched} seed(s) matched)")

    if args.model or args.data:
        data = _load_data_file(args.data) if args.data else model_data(args.model)
        data = data.astype(np.float64)
        if data.shape[1:] != samples.shape[1:]:
            if data[0].size == samples[0].size:
                data = data.reshape((len(data),) + samples.shape[1:])
            else:
                raise UserError(f"the data has shape {list(data.shape[1:])}, the samples "
                                f"{list(samples.shape[1:])}")
        if len(samples) < 2:
            raise UserError("the Frechet distance needs at least 2 samples")
        res["frechet_distance"] = frechet_distance(samples, data)
        res["data"] = os.fspath(args.data) if args.data else f"model:{args.model}"
        res["num_data"] = int(len(data))
        lines.append(f"frechet distance (pixel space) to {res['data']} ({len(data)} items): "
                     f"{res['frechet_distance']:.6g}")
        if len(samples) < samples[0].size:
            lines.append(f"  note: {len(samples)} samples for {samples[0].size} dimensions: "
                         f"the estimate is biased upwards; use more samples")
    print("\n".join(lines))
    if args.json:
        outputs.write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0
