"""One rank of a 4-shard latent-sharded run that saves its SAE, started by test_sharded_save.py.

argv: world rank init_file out_dir spec_json. Trains a few steps, then measures the peak RSS the
save adds to this process (Linux's high-water mark, reset just before the save through
/proc/self/clear_refs; the test fixes glibc's mmap threshold so freed buffers leave the resident
set and the peak is the live memory): of the sharded save, then of the gather-then-save path it
replaces. Then it trains one more step and saves again with the commit replaced by a process exit:
a save killed after every shard is written and before the index commits them.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from vlsae_ray import storage
from vlsae_ray.sae import checkpoint, parse_config
from vlsae_ray.train import SAETrainer
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout

KILLED_SAVE_EXIT = 3


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra(save) -> int:
    """Bytes by which `save()` raises this process's resident memory above where it started."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark (VmHWM) starts again at the current RSS
    before = rss_kib("VmRSS")
    save()
    return (rss_kib("VmHWM") - before) * 1024


world, rank = int(sys.argv[1]), int(sys.argv[2])
init_file, out_dir, spec = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
layout = ParallelLayout.create(world)
x = 20.0 * torch.randn(256, spec["sae"]["d_in"], generator=torch.Generator().manual_seed(1)) + 5.0
sae = LatentShardedSAE(parse_config(spec["sae"]), layout, seed=0)
trainer = SAETrainer(sae, total_steps=4, lr=1e-3, sample=x, layout=layout)
for step in range(2):
    trainer.step(x[64 * step : 64 * (step + 1)])
uri, single_uri = spec["uri"], spec["single_uri"]
# Not the save's: the S3 client, and what botocore loads on its first multipart upload.
storage.write_bytes(storage.join(single_uri, f"warm-up-{rank}"), bytes(storage.part_size() + 1))
result = {"shard_bytes": sum(t.nbytes for t in sae.local.state_dict().values())}
result["save_extra"] = peak_extra(lambda: sae.save(uri))


def gather_then_save():  # what the Ray Train loop did before: every rank gathers, rank 0 writes
    full = sae.full_sae()
    if rank == 0:
        full.save(single_uri)
        torch.save(full.folded_state_dict(), f"{out_dir}/reference.pt")


result["gather_extra"] = peak_extra(gather_then_save)
with open(f"{out_dir}/rank{rank}.json", "w") as f:
    json.dump(result, f)

trainer.step(x[128:192])  # new weights, saved by a save killed before its commit
checkpoint.commit_sharded = lambda *args: os._exit(KILLED_SAVE_EXIT)
sae.save(uri)
dist.destroy_process_group()
sys.stderr.flush()
os._exit(0)
