"""Subprocess of test_distill.py::test_sigkill_and_resume_matches_uninterrupted.

    python kill_worker.py CHECKPOINT OUT_PATH SLEEP

Runs the small Gaussian distillation with a checkpoint after every iteration (each
denoiser call sleeps SLEEP seconds) and saves the final parameters to OUT_PATH.
"""
import sys

import torch

from distill_helpers.problems import SMALL, Slow, gaussian
from epd_kernels.distill import distill

torch.set_num_threads(1)
ckpt, out, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = Slow(gaussian(), sleep)
params = distill(model, shape=model.inner.shape, batch_size=8, pool=64, checkpoint=ckpt,
                 checkpoint_every=1, **SMALL)
params.save(out)
