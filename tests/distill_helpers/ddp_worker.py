"""torchrun worker of test_distill_multiproc.py.

    torchrun --standalone --nproc_per_node=2 ddp_worker.py OUT_DIR BATCH CHECKPOINT_DIR

Each rank distils with per-rank batch BATCH every case of `problems.ddp_cases` (fresh
noise, a pool, each without and with per-sample class labels); rank 0 saves the
parameters (OUT_DIR/<case>.safetensors); the "pool" run uses a checkpoint in
CHECKPOINT_DIR, which only rank 0 may write.
"""
import os
import sys

import torch
import torch.distributed as dist

from distill_helpers.problems import SMALL, ddp_cases
from epd_kernels.distill import distill

torch.set_num_threads(1)
out_dir, batch, ckpt_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank = dist.get_rank()
for name, (model, pool, cond) in ddp_cases(2 * batch).items():
    ckpt = os.path.join(ckpt_dir, "pool.ckpt") if name == "pool" else None
    p = distill(model, shape=model.shape, batch_size=batch, pool=pool, checkpoint=ckpt,
                **SMALL, **cond)
    assert p.meta["world_size"] == 2 and p.meta["batch_size"] == 2 * batch
    if rank == 0:
        p.save(os.path.join(out_dir, f"{name}.safetensors"))
        with open(os.path.join(out_dir, f"{name}.loss"), "w") as f:
            f.write(repr(p.meta["final_loss"]))
dist.barrier()
dist.destroy_process_group()
