"""One rank of a distributed training run, started as its own process by test_parallel.py.

argv: world rank latent_shards init_file out_dir spec_json. Trains this rank's part of the layout
(a latent shard, DDP over data-parallel groups, or DeepSpeed ZeRO with spec["zero_stage"]) on its
part of each global batch, as the Ray Train loop builds it (the bare SAE without latent shards),
and saves its metrics, the gathered final SAE and its encodings.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vlsae_ray.sae import build_sae
from vlsae_ray.train import SAETrainer
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout

world, rank, latent_shards = (int(a) for a in sys.argv[1:4])
init_file, out_dir, spec = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
zero_stage = spec.get("zero_stage")
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
layout = ParallelLayout.create(latent_shards)
x = torch.load(f"{out_dir}/x.pt")
torch.manual_seed(0)
full = build_sae(spec["sae"])
model = full if latent_shards == 1 else LatentShardedSAE.shard_of(full, layout)
wrapped = model
if layout.data_parallel > 1 and zero_stage is None:
    wrapped = DistributedDataParallel(model, process_group=layout.data_group)
trainer = SAETrainer(
    wrapped,
    total_steps=spec["steps"],
    lr=spec["lr"],
    sample=x[:256],
    dead_tokens_threshold=spec["dead"],
    layout=layout,
    zero_stage=zero_stage,
    precision=spec.get("precision", "fp32"),
)
part = spec["batch"] // layout.data_parallel
losses = []
for step in range(spec["steps"]):
    start = step * spec["batch"] + layout.data_index * part
    losses.append(trainer.step(x[start : start + part]))
if latent_shards > 1:
    full = model.full_sae()
model.eval()
with torch.no_grad():
    z_local = model(x[:128])[1]
z = layout.gather_shards(z_local).permute(1, 0, 2).reshape(128, -1)
torch.save({"metrics": losses, "state": full.state_dict(), "z": z}, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
# Now and then (4 of 65 ZeRO-2 runs here) a C++ thread of DeepSpeed's or torch's CPU runtime aborts
# the interpreter's teardown ("terminate called without an active exception"), after all of the
# above is done and saved; the exit skips that teardown.
sys.stderr.flush()
os._exit(0)
