"""The API over real HTTP against Ray Serve: each route's answer equals the library's in-process
result (`vlsae_ray.interpret.service`), two SAEs in one deployment, API keys, bad input."""

import io

import pytest
import torch
from PIL import Image

from vlsae_ray.interpret.service import Interpreter, top_concepts
from vlsae_ray.world import generate_items

ITEMS = generate_items(3, split="test", seed=11)


@pytest.fixture(scope="module")
def library(served_world):
    """The same backbone and SAEs, in this process."""
    interpreter = Interpreter(served_world.config.backbone)
    return interpreter, {k: interpreter.load(k, v) for k, v in served_world.config.saes.items()}


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol * max(1.0, abs(b))


def same_concepts(got: list[dict], expected: list[dict]) -> bool:
    return [c["latent"] for c in got] == [c["latent"] for c in expected] and all(
        close(g["activation"], e["activation"]) and g["name"] == e["name"]
        for g, e in zip(got, expected, strict=True)
    )


def test_encode_equals_the_library_for_each_sae(served_world, library):
    interpreter, saes = library
    images = [item.image for item in ITEMS]
    for sae_id, served in saes.items():
        r = served_world.call(
            "POST",
            "/v1/encode",
            json={"sae": sae_id, "images": [served_world.png(i) for i in images], "top_k": 5},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hook_point"] == served.config.hook_point
        codes = interpreter.image_codes([(served, image) for image in images])
        for result, z in zip(body["results"], codes, strict=True):
            assert same_concepts(result["latents"], top_concepts(served, z, 5))
            assert result["map"] is None
    # the two SAEs answer differently for the same image: each request reached its own SAE
    answers = [
        served_world.call(
            "POST", "/v1/encode", json={"sae": s, "images": [served_world.png(images[0])]}
        ).json()
        for s in saes
    ]
    assert answers[0]["results"] != answers[1]["results"]


def test_patch_map_equals_the_library(served_world, library):
    interpreter, saes = library
    served = saes["block"]
    latent = top_concepts(served, interpreter.image_codes([(served, ITEMS[0].image)])[0], 1)[0]["latent"]
    r = served_world.call(
        "POST",
        "/v1/encode",
        json={"sae": "block", "images": [served_world.png(ITEMS[0].image)], "map_latent": latent},
    )
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["map"]
    expected = interpreter.patch_map(served, ITEMS[0].image, latent)
    assert got["grid"] == expected["grid"] and got["grid"][0] * got["grid"][1] == len(got["values"])
    assert torch.allclose(torch.tensor(got["values"]), torch.tensor(expected["values"]), atol=1e-4)
    # a pooled hook point has no patches
    r = served_world.call(
        "POST",
        "/v1/encode",
        json={"sae": "vl", "images": [served_world.png(ITEMS[0].image)], "map_latent": 0},
    )
    assert r.status_code == 400 and "pooled" in r.json()["detail"]


def test_interpret_equals_the_library(served_world, library):
    interpreter, saes = library
    item = ITEMS[1]
    image = served_world.png(item.image)
    r = served_world.call(
        "POST", "/v1/interpret", json={"sae": "vl", "image": image, "caption": item.caption, "top_k": 6}
    )
    assert r.status_code == 200, r.text
    got, expected = r.json(), interpreter.interpret(saes["vl"], item.image, item.caption, 6)
    assert same_concepts(got["image"], expected["image"]) and same_concepts(
        got["caption"], expected["caption"]
    )
    for side in ("shared", "image_only", "text_only"):
        assert [c["latent"] for c in got[side]] == [c["latent"] for c in expected[side]]
    r = served_world.call("POST", "/v1/interpret", json={"sae": "block", "image": image})
    assert r.status_code == 200 and r.json()["caption"] is None and r.json()["shared"] is None
    r = served_world.call("POST", "/v1/interpret", json={"sae": "block", "caption": item.caption})
    assert r.status_code == 400 and "images only" in r.json()["detail"]


def test_steer_equals_the_library(served_world, library):
    interpreter, saes = library
    served = saes["block"]
    latent = top_concepts(served, interpreter.image_codes([(served, ITEMS[2].image)])[0], 1)[0]["latent"]
    labels = ["a red object", "a blue object", "a green object"]
    edits = [{"latent": latent, "op": "set", "value": 4.0}]
    r = served_world.call(
        "POST",
        "/v1/steer",
        json={"sae": "block", "image": served_world.png(ITEMS[2].image), "edits": edits, "labels": labels},
    )
    assert r.status_code == 200, r.text
    got = r.json()
    expected = interpreter.steer(
        served, ITEMS[2].image, [e | {} for e in edits], relative=True, labels=labels
    )
    for side in ("default", "steered"):
        assert [p["label"] for p in got[side]["labels"]] == labels
        for g, e in zip(got[side]["labels"], expected[side]["labels"], strict=True):
            assert close(g["probability"], e["probability"], 1e-3)
    assert got["default"] != got["steered"]  # the clamp moved the prediction


def test_catalog_routes_equal_the_catalog(served_world, library):
    _, saes = library
    served = saes["block"]
    listing = served_world.call("GET", "/v1/saes").json()["saes"]
    assert (
        [s["id"] for s in listing] == ["block", "vl"]
        and listing[0]["has_catalog"]
        and not listing[1]["has_catalog"]
    )
    named = next(j for j, e in served.entries.items() if e["name"])
    entry = served_world.call("GET", f"/v1/saes/block/latents/{named}").json()
    assert entry["name"] == served.entries[named]["name"] and entry["ms"] == pytest.approx(served.ms[named])
    assert entry["firing_density"] == pytest.approx(served.entries[named]["firing_count"] / served.rows)
    assert [i["source_id"] for i in entry["top_images"]] == served.entries[named]["top_source_ids"]
    image = served_world.call("GET", entry["top_images"][0]["url"])
    assert image.headers["content-type"] == "image/png" and Image.open(io.BytesIO(image.content)).size[0] > 0
    word = served.entries[named]["name"].split()[0]
    page = served_world.call(
        "GET", "/v1/saes/block/latents", params={"q": word, "sort": "confidence", "limit": 5}
    ).json()
    assert page["total"] == served.search(word, "confidence", 5, 0)[0] and 0 < len(page["latents"]) <= 5
    assert all(word in (s["name"] or "") + " " + (s["runner_up"] or "") for s in page["latents"])
    # latents named with the word come first (their runner-up alone second), each best first
    in_name = [word in (s["name"] or "") for s in page["latents"]]
    assert in_name == sorted(in_name, reverse=True) and in_name[0]
    for group in (True, False):
        confidences = [
            s["confidence"]
            for s, n in zip(page["latents"], in_name, strict=True)
            if n == group and s["confidence"] is not None
        ]
        assert confidences == sorted(confidences, reverse=True)


def test_every_route_but_healthz_needs_a_key(served_world):
    spec = served_world.call("GET", "/openapi.json").json()
    routes = [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops]
    assert len(routes) >= 8
    for method, path in routes:
        url = path.replace("{sae}", "block").replace("{latent}", "0").replace("{source_id}", "x")
        for key in ("", "wrong-key", "test-key-012345678"):  # none, wrong, a prefix of the right one
            status = served_world.call(method, url, key=key, json={}).status_code
            assert status == (200 if path == "/healthz" else 401), (method, path, key, status)
    assert served_world.call("GET", "/v1/saes", key="second-key").status_code == 200


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served_world, library):
    image = served_world.png(ITEMS[0].image)
    huge = io.BytesIO()
    Image.new("1", (5000, 4000)).save(huge, format="PNG")  # small file, 20M pixels: a decompression bomb
    import base64

    cases = [
        ({"sae": "nope", "images": [image]}, 404, "no SAE"),
        ({"sae": "block", "images": ["bm90IGFuIGltYWdl"]}, 400, "not in a format"),
        ({"sae": "block", "images": ["%%%"]}, 400, "base64"),
        ({"sae": "block", "images": [base64.b64encode(huge.getvalue()).decode()]}, 413, "pixels"),
        ({"sae": "block", "images": [image], "map_latent": 10**6}, 400, "map_latent"),
        ({"sae": "block", "images": []}, 422, ""),
        ({"sae": "block", "images": [image] * 17}, 422, ""),
    ]
    for body, status, words in cases:
        r = served_world.call("POST", "/v1/encode", json=body)
        assert r.status_code == status, (body.get("sae"), r.text[:200])
        assert words in str(r.json()["detail"])
    steer = {"sae": "block", "image": image, "edits": [{"latent": 0, "value": 1.0}]}
    assert served_world.call("POST", "/v1/steer", json=steer).status_code == 400  # no labels for CLIP
    never = next(j for j, e in library[1]["block"].entries.items() if not e["firing_count"])
    r = served_world.call(
        "POST", "/v1/steer", json=steer | {"labels": ["a"], "edits": [{"latent": never, "value": 1}]}
    )
    assert r.status_code == 400 and "absolute" in r.json()["detail"]
    mitigate = {"sae": "block", "image": image, "question": "Describe the image."}
    r = served_world.call("POST", "/v1/mitigate", json=mitigate)  # a CLIP SAE: nothing to mitigate
    assert r.status_code == 400 and "cannot mitigate" in r.json()["detail"]
    assert served_world.call("POST", "/v1/mitigate", json=mitigate | {"cd_beta": 0}).status_code == 422
    assert served_world.call("GET", "/v1/saes/block/latents/99999").status_code == 404
    assert served_world.call("GET", "/v1/images/not-an-id").status_code == 404
    assert (
        served_world.call("POST", "/v1/encode", json={"sae": "block", "images": [image]}).status_code == 200
    )


def test_a_replica_holding_one_sae_at_a_time_still_answers_each(served_world, library):
    """max_loaded_saes=1: alternating SAEs unloads and reloads them (the multiplexed LRU); every
    answer is still its own SAE's."""
    from ray import serve

    from serve.app import build_app

    interpreter, saes = library
    config = served_world.config.model_copy(update={"max_loaded_saes": 1})
    serve.run(build_app(config), name="vlsae-lru-test", route_prefix="/lru")
    try:
        image = ITEMS[0].image
        expected = {
            s: top_concepts(served, interpreter.image_codes([(served, image)])[0], 5)
            for s, served in saes.items()
        }
        for sae_id in ["block", "vl", "block", "vl"]:
            body = {"sae": sae_id, "images": [served_world.png(image)], "top_k": 5}
            r = served_world.call(
                "POST", "/lru/v1/encode", json=body, headers={"serve_multiplexed_model_id": sae_id}
            )
            assert r.status_code == 200, r.text
            assert same_concepts(r.json()["results"][0]["latents"], expected[sae_id])
    finally:
        serve.delete("vlsae-lru-test")
