"""A served world: the HTTP API on a real Ray Serve (loopback), holding two SAEs of the world CLIP.

- `block`: the session's world SAE (block 2, class token), its catalog from a real label job run
  (names, top images) and its MS, as the demo serves it;
- `vl`: a VL-SAE on the image and text embeddings (`visual`, `text`), for captions and pairs.

API keys come from a keys file, as a mounted Kubernetes Secret gives them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import requests
import torch

from serve.load import png
from vlsae_ray.backbones import Backbone, builtin_backbone
from vlsae_ray.config import LabelConfig, ServeConfig
from vlsae_ray.eval import monosemanticity_score
from vlsae_ray.interpret import run_label
from vlsae_ray.local_stack import free_port
from vlsae_ray.sae import build_sae
from vlsae_ray.train import fit_local
from vlsae_ray.world import generate_items

BLOCK = "visual.transformer.resblocks.2"
KEY = "test-key-0123456789"


@dataclass
class ServedWorld:
    url: str
    key: str
    config: ServeConfig

    def call(self, method: str, route: str, key: str | None = None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"} | kwargs.pop("headers", {})
        return requests.request(method, self.url + route, headers=headers, timeout=120, **kwargs)

    png = staticmethod(png)  # an image as the API takes it: PNG bytes in base64


def _vl_sae(root: str) -> str:
    """A VL-SAE fitted briefly on world image and caption embeddings (paired rows)."""
    backbone = Backbone(builtin_backbone())
    items = generate_items(512, seed=7)
    ids = [item.id for item in items]
    with torch.no_grad():
        image = backbone.activations(
            ["visual"], pixels=backbone.pixels([i.image for i in items]), item_ids=ids
        )
        text = backbone.activations(["text"], texts=[i.caption for i in items], item_ids=ids)
    x = torch.cat([image["visual"].values, text["text"].values])
    modality = torch.cat(
        [torch.zeros(len(items), dtype=torch.bool), torch.ones(len(items), dtype=torch.bool)]
    )
    sae = build_sae({"architecture": "vl_sae", "d_in": x.shape[1], "n_latents": 4 * x.shape[1], "k": 8})
    fit_local(sae, x, batch_size=128, epochs=2, seed=0, modality=modality)
    sae.save(f"{root}/vl-sae")
    return f"{root}/vl-sae"


@pytest.fixture(scope="session")
def world_artifacts(world_sae, tmp_path_factory, ray_cluster, write_dataset) -> dict:
    """The serve config's `saes` section for the two SAEs, their artifacts written under a temp dir."""
    ids, x_nd, z_nf, embeddings_ne, sae = world_sae
    root = str(tmp_path_factory.mktemp("served"))
    sae.save(f"{root}/sae")
    shards = [len(ids) // 4] * 4
    label = run_label(
        LabelConfig(
            sae=f"{root}/sae",
            activations=write_dataset(f"{root}/block", x_nd, ids, shards),
            embeddings=write_dataset(f"{root}/embedding", embeddings_ne, ids, shards),
            vocabulary="world",
            top_k=9,
            output=f"{root}/labels",
        )
    )
    ms = monosemanticity_score(z_nf, embeddings_ne)
    with open(f"{root}/monosemanticity.json", "w") as f:
        json.dump({"latents": [None if torch.isnan(v) else float(v) for v in ms]}, f)
    return {
        "block": {
            "sae": f"{root}/sae",
            "hook_point": BLOCK,
            "catalog": label.catalog,
            "monosemanticity": f"{root}/monosemanticity.json",
        },
        "vl": {"sae": _vl_sae(root), "hook_point": "visual", "text_hook_point": "text"},
    }


@pytest.fixture(scope="package")  # its replica's CPU goes back to the other tests' jobs after these
def served_world(world_artifacts, tmp_path_factory) -> ServedWorld:
    from ray import serve

    from serve.app import build_app

    keys = tmp_path_factory.mktemp("secret") / "api-keys"
    keys.write_text(f"{KEY}\nsecond-key\n")
    config = ServeConfig(
        backbone=builtin_backbone(),
        saes=world_artifacts,
        port=free_port(),
        api_keys_file=str(keys),
        cpus_per_replica=0.5,  # room beside it for the tests' own deployments on a 2-CPU Ray
    )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name="vlsae-api-test", route_prefix="/")
    yield ServedWorld(f"http://127.0.0.1:{config.port}", KEY, config)
    serve.shutdown()
