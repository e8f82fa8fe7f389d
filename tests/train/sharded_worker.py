"""One rank of a latent-sharded training run, started as its own process by test_parallel.py.

argv: world rank latent_shards init_file out_dir spec_json. Trains the full SAE's shard on this
rank's part of each global batch and saves its losses, the gathered final SAE and its encodings.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vlsae_ray.sae import build_sae
from vlsae_ray.train import SAETrainer
from vlsae_ray.train.parallel import LatentShardedSAE, ParallelLayout

world, rank, latent_shards = (int(a) for a in sys.argv[1:4])
init_file, out_dir, spec = sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
layout = ParallelLayout.create(latent_shards)
x = torch.load(f"{out_dir}/x.pt")
torch.manual_seed(0)
model = LatentShardedSAE.shard_of(build_sae(spec["sae"]), layout)
data_parallel = layout.data_parallel > 1
wrapped = DistributedDataParallel(model, process_group=layout.data_group) if data_parallel else model
trainer = SAETrainer(
    wrapped, total_steps=spec["steps"], sample=x[:256], dead_tokens_threshold=spec["dead"], layout=layout
)
part = spec["batch"] // layout.data_parallel
losses = []
for step in range(spec["steps"]):
    start = step * spec["batch"] + layout.data_index * part
    losses.append(trainer.step(x[start : start + part]))
full = model.full_sae()
model.eval()
with torch.no_grad():
    z_local = model(x[:128])[1]
z = layout.gather_shards(z_local).permute(1, 0, 2).reshape(128, -1)
if layout.shard_index == 0:
    torch.save({"metrics": losses, "state": full.state_dict(), "z": z}, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
