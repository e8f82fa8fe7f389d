"""The whole pipeline on real parts: Ray Data, Ray Train (2 workers, gloo), Ray Serve over HTTP.

Every stage's output is checked against an independent single-process computation.
"""

import base64
import io
import uuid

import pytest
import requests
import torch

from vlsae_ray import storage
from vlsae_ray.activations import store
from vlsae_ray.activations.sources import load_image, package_photo_items
from vlsae_ray.backbones import Backbone
from vlsae_ray.demo import BLOCK, EMBEDDING, demo_configs
from vlsae_ray.eval import fvu, l0, monosemanticity_score
from vlsae_ray.eval.evaluate import run_evaluate
from vlsae_ray.interpret import read_catalog, run_label
from vlsae_ray.local_stack import free_port
from vlsae_ray.sae import SparseAutoencoder, build_sae
from vlsae_ray.train.ray_train import run_train

pytestmark = pytest.mark.slow


def small_configs(root: str):
    from vlsae_ray.activations.extract import run_extract
    from vlsae_ray.backbones import builtin_backbone

    configs = demo_configs(root, builtin_backbone(storage.join(root, "world-clip.pt")), 256, free_port())
    configs["extract"] = configs["extract"].model_copy(update={"shard_rows": 64})
    configs["train"] = configs["train"].model_copy(
        update={
            "sae": configs["train"].sae.model_copy(update={"n_latents": 256, "k": 8}),
            "training": configs["train"].training.model_copy(update={"batch_size": 64, "epochs": 8}),
        }
    )
    run_extract(configs["extract"])
    return configs


@pytest.fixture(scope="module", params=["local", "s3"])
def pipeline(request, tmp_path_factory, ray_cluster):
    if request.param == "local":
        root = str(tmp_path_factory.mktemp("pipeline"))
    else:
        bucket = request.getfixturevalue("s3_server").buckets[0]
        root = f"s3://{bucket}/pipeline-{uuid.uuid4().hex[:8]}"
    configs = small_configs(root)
    train = run_train(configs["train"])
    return request.param, configs, train


@torch.no_grad()
def test_train_evaluate_label(pipeline):
    _, configs, train = pipeline
    x, ids = store.load_activations(configs["train"].activations)
    e, embedding_ids = store.load_activations(configs["evaluate"].embeddings)
    assert ids == embedding_ids and train.steps == 8 * (256 // 2 // 32)
    sae = SparseAutoencoder.load(configs["train"].output)
    x_hat, z, _ = sae(x)
    torch.manual_seed(0)
    untrained = build_sae(sae.config)
    untrained.init_from_data(x)
    assert fvu(x, x_hat) < 0.6 * fvu(x, untrained(x)[0])  # training on Ray Train learned something

    report = run_evaluate(configs["evaluate"])
    assert report.rows == 256
    assert report.fvu == pytest.approx(fvu(x, x_hat), rel=1e-4)
    assert report.l0 == pytest.approx(l0(z), rel=1e-6) and report.l0 <= 8
    ms = monosemanticity_score(z, e)
    assert report.ms_latents_median == pytest.approx(float(ms[~ms.isnan()].median()), abs=1e-5)
    assert "| FVU |" in storage.read_text(report.report)

    labels = run_label(configs["label"])
    catalog = read_catalog(labels.catalog).to_pylist()
    for latent in range(0, 256, 17):
        order = torch.sort(z[:, latent], descending=True, stable=True).indices[:9]
        expected = [ids[i] for i in order if z[i, latent] > 0]
        assert catalog[latent]["top_source_ids"] == expected


def test_serve_encode_over_http(pipeline):
    """The trained SAE (local or s3://) served: POST /v1/encode equals a direct encode; bad input 400s."""
    _, configs, _ = pipeline
    from ray import serve

    from serve.app import build_app

    config = configs["serve"]
    serve.start(http_options={"host": "127.0.0.1", "port": config.port})
    try:
        serve.run(build_app(config), name="vlsae-test", route_prefix="/")
        url = f"http://127.0.0.1:{config.port}/v1/encode"
        image = load_image(package_photo_items(3)[2]["id"])  # a real photo, not from the dataset
        png = io.BytesIO()
        image.save(png, format="PNG")

        def post(data: bytes):
            return requests.post(
                url, json={"sae": "demo", "images": [base64.b64encode(data).decode()]}, timeout=60
            )

        good = post(png.getvalue())
        assert good.status_code == 200, good.text
        served = config.saes["demo"]
        backbone, sae = Backbone(config.backbone), SparseAutoencoder.load(served.sae)
        with torch.no_grad():
            x = backbone.activations([BLOCK], pixels=backbone.pixels([image]), item_ids=["image"])[BLOCK]
            z = sae.encode(x.values)[0]
        values, latents = z.topk(config.top_k)
        expected = [(int(j), float(v)) for j, v in zip(latents, values, strict=True) if v > 0]
        got = [(item["latent"], item["activation"]) for item in good.json()["results"][0]["latents"]]
        assert [j for j, _ in got] == [j for j, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4, abs=1e-5)

        bad = post(b"%PDF-1.4 definitely not a picture")
        assert bad.status_code == 400 and "format" in bad.json()["detail"]
        truncated = post(png.getvalue()[:200])
        assert truncated.status_code == 400 and "cannot be read" in truncated.json()["detail"]
        assert requests.post(url, timeout=60).status_code == 422  # no body at all
        assert post(png.getvalue()).json() == good.json()  # still serving, same answer
    finally:
        serve.shutdown()


def test_embedding_dataset_is_the_image_embedding(pipeline):
    _, configs, _ = pipeline
    e, ids = store.load_activations(configs["evaluate"].embeddings)
    backbone = Backbone(configs["extract"].backbone)
    with torch.no_grad():
        direct = backbone.model.encode_image(backbone.pixels([load_image(i) for i in ids[:8]]))
    torch.testing.assert_close(e[:8], direct.half().float(), atol=2e-3, rtol=2e-3)
    assert configs["evaluate"].embeddings.endswith(EMBEDDING)
