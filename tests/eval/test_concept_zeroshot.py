"""Concept-level zero-shot with a real VL-SAE on the world CLIP's image and caption embeddings: the
world task, the file task (folder and parquet) and its bad input."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlsae_ray.backbones import builtin_backbone
from vlsae_ray.config import ConfigError, ZeroShotConfig
from vlsae_ray.eval.concept_zeroshot import (
    choose_alpha,
    concept_level_similarity,
    embedding_level_similarity,
)
from vlsae_ray.eval.downstream import IMAGE_EMBEDDING, zero_shot_with_sae
from vlsae_ray.interpret.naming import in_heldout_fold
from vlsae_ray.world import generate_items, load_world_clip, zero_shot_accuracy
from vlsae_ray.world.zeroshot import class_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = ["red", "green", "blue", "yellow"]
TEMPLATES = ["a {} object", "{} shapes"]


@pytest.fixture(scope="module")
def clip():
    return load_world_clip()


@pytest.fixture(scope="module")
def vlsae(world_vl_sae):
    """A VL-SAE trained on the image and caption embeddings of 256 world training items."""
    return world_vl_sae(256, seed=5, n_latents=256, k=16, batch_size=128)[2]


def test_choose_alpha_takes_the_best_and_the_smallest_among_ties():
    embedding = torch.tensor([[1.0, 0.5], [0.2, 0.3], [0.5, 0.0]])
    concept = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    truth = torch.tensor([0, 0, 0])
    # row 0 stays right while alpha < 0.5, row 1 becomes right once alpha > 0.1, row 2 always is
    alpha, curve = choose_alpha(embedding, concept, truth, [1.0, 0.2, 0.0, 0.4])
    assert curve == pytest.approx({0.0: 2 / 3, 0.2: 1.0, 0.4: 1.0, 1.0: 2 / 3})
    assert alpha == 0.2  # the smaller of the two best
    assert choose_alpha(embedding, concept, truth, [0.05])[0] == 0.05


def test_enhanced_zero_shot_with_alpha_zero_equals_the_plain_one(clip, vlsae):
    model, preprocess, tokenizer = clip
    attributes = ["shape", "colour"]
    config = ZeroShotConfig(
        backbone=builtin_backbone(), n_items=100, validation_items=50, attributes=attributes, alphas=[0.0]
    )
    plain = zero_shot_accuracy(model, preprocess, tokenizer, generate_items(100, split="test"), attributes)
    result = zero_shot_with_sae(config, IMAGE_EMBEDDING, vlsae, "cls")
    assert result["without"] == plain and result["enhanced"] == plain
    assert result["alpha"] == dict.fromkeys(attributes, 0.0)
    assert result["with_sae"] != plain  # the vision decoder's reconstruction is spliced in


def test_concept_level_similarity_is_the_cosine_of_the_latents(clip, vlsae):
    model, preprocess, tokenizer = clip
    items = generate_items(40, split="test", seed=2)
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(item.image) for item in items]))
        classes = class_embeddings(model, tokenizer, "shape")
    z_image, z_class = vlsae.encode(images), vlsae.encode(classes)
    expected = torch.tensor([[torch.cosine_similarity(a, b, dim=0) for b in z_class] for a in z_image])
    concept = concept_level_similarity(vlsae, images, classes)
    assert torch.allclose(concept, expected, atol=1e-6)
    embedding = embedding_level_similarity(images, classes)
    assert torch.equal(
        embedding,
        model.encode_image(torch.stack([preprocess(i.image) for i in items]), normalize=True) @ classes.T,
    )
    # a large alpha hands the decision to the latents, which disagree with the embeddings somewhere
    assert not torch.equal((embedding + 100 * concept).argmax(-1), embedding.argmax(-1))


def world_images(n: int):
    """(image, colour) of n world items whose colour is one of COLOURS."""
    items = [item for item in generate_items(3 * n, seed=7) if item.labels["colour"] in COLOURS]
    return [(item.image, item.labels["colour"]) for item in items[:n]]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def direct_accuracy(clip, labelled: list, ids: list[str], fraction: float) -> float:
    """Plain zero-shot accuracy on the images not in the validation fold, computed here."""
    model, preprocess, tokenizer = clip
    test = [
        (image, colour)
        for (image, colour), id_ in zip(labelled, ids, strict=True)
        if not in_heldout_fold(id_, fraction)
    ]
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(image) for image, _ in test]), normalize=True)
        rows = []
        for colour in COLOURS:
            embedding = model.encode_text(tokenizer([t.format(colour) for t in TEMPLATES]), normalize=True)
            rows.append(torch.nn.functional.normalize(embedding.mean(0), dim=-1))
    predicted = (features @ torch.stack(rows).T).argmax(-1)
    truth = torch.tensor([COLOURS.index(colour) for _, colour in test])
    return int((predicted == truth).sum()) / len(truth)


def file_config(tmp_path, images: str, **update) -> ZeroShotConfig:
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(COLOURS) + "\n")
    fields = dict(task="files", backbone=builtin_backbone(), images=images, classes=str(classes))
    return ZeroShotConfig(**fields, templates=TEMPLATES, validation_fraction=0.3, **update)


def test_file_task_on_a_folder_of_class_subfolders(tmp_path, clip, vlsae):
    labelled = world_images(48)
    ids = []
    for i, (image, colour) in enumerate(labelled):
        (tmp_path / "images" / colour).mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / colour / f"{i:03d}.png").write_bytes(png(image))
        ids.append(f"{colour}/{i:03d}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image: ignored")
    result = zero_shot_with_sae(
        file_config(tmp_path, str(tmp_path / "images")), IMAGE_EMBEDDING, vlsae, "cls"
    )
    assert set(result) == {"without", "with_sae", "enhanced", "alpha"} and set(result["without"]) == {"class"}
    expected = direct_accuracy(clip, labelled, ids, 0.3)
    assert result["without"]["class"] == expected
    assert expected > 0.5  # the world CLIP tells these colours apart far above chance (0.25)


def test_file_task_on_a_parquet_file_with_names_or_indices(tmp_path, clip, vlsae):
    labelled = world_images(40)
    columns = {
        "names": [colour for _, colour in labelled],
        "indices": [COLOURS.index(colour) for _, colour in labelled],
    }
    for kind, labels in columns.items():
        table = pa.table({"jpeg": [png(image) for image, _ in labelled], "y": labels})
        pq.write_table(table, tmp_path / f"{kind}.parquet")
        config = file_config(
            tmp_path, str(tmp_path / f"{kind}.parquet"), image_column="jpeg", label_column="y"
        )
        result = zero_shot_with_sae(config, IMAGE_EMBEDDING, vlsae, "cls")
        ids = [f"{kind}.parquet#{row}" for row in range(len(labelled))]
        assert result["without"]["class"] == direct_accuracy(clip, labelled, ids, 0.3) > 0.5


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (
            {"red/a.png": "ok", "pink/b.png": "ok"},
            r"image 'pink/b.png' .* in subfolder 'pink', which is not a class",
        ),
        ({"red/a.png": "ok", "c.png": "ok"}, r"image 'c.png' .* is outside any class subfolder"),
        ({"red/a.png": "corrupt"}, r"image 'red/a.png' cannot be read \(UnidentifiedImageError"),
        ({"red/readme.txt": "text"}, r"no images found in"),
    ],
)
def test_file_task_rejects_a_bad_folder(tmp_path, vlsae, layout, message):
    image = png(world_images(1)[0][0])
    for name, kind in layout.items():
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image if kind == "ok" else b"\x89PNG truncated" if kind == "corrupt" else b"hello")
    with pytest.raises(ConfigError, match=message):
        zero_shot_with_sae(file_config(tmp_path, str(tmp_path / "images")), IMAGE_EMBEDDING, vlsae, "cls")


def test_file_task_rejects_bad_class_names_and_parquet(tmp_path, vlsae):
    image = png(world_images(1)[0][0])
    pq.write_table(pa.table({"image": [image, image], "label": ["red", "pink"]}), tmp_path / "bad.parquet")
    config = file_config(tmp_path, str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match=r"row 1 of .*bad.parquet' has label 'pink': neither a class"):
        zero_shot_with_sae(config, IMAGE_EMBEDDING, vlsae, "cls")
    with pytest.raises(ConfigError, match=r"has no column 'jpeg' \(columns: image, label\)"):
        zero_shot_with_sae(config.model_copy(update={"image_column": "jpeg"}), IMAGE_EMBEDDING, vlsae, "cls")
    for text, message in (
        ("red\n", "has 1 class name"),
        ("red\nblue\nred\n", r"lists \['red'\] more than once"),
    ):
        (tmp_path / "classes.txt").write_text(text)
        with pytest.raises(ConfigError, match=message):
            zero_shot_with_sae(config, IMAGE_EMBEDDING, vlsae, "cls")
    missing = config.model_copy(update={"classes": str(tmp_path / "nope.txt")})
    with pytest.raises(ConfigError, match="class-names file .*nope.txt' does not exist"):
        zero_shot_with_sae(missing, IMAGE_EMBEDDING, vlsae, "cls")


def test_zero_shot_config_rejects_bad_fields():
    backbone = builtin_backbone()
    with pytest.raises(ValueError, match="task files needs images and classes"):
        ZeroShotConfig(task="files", backbone=backbone)
    with pytest.raises(ValueError, match="images and classes are for task files"):
        ZeroShotConfig(backbone=backbone, images="x")
    with pytest.raises(ValueError, match="alpha would be chosen on the test items"):
        ZeroShotConfig(backbone=backbone, seed=3, validation_seed=3)
    with pytest.raises(ValueError, match="exactly one {}"):
        ZeroShotConfig(task="files", backbone=backbone, images="x", classes="y", templates=["a photo"])
