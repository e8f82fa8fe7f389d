"""Small transformers models saved the way users save theirs, and a naive reference for token modes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlsae_ray import storage
from vlsae_ray.activations.sources import load_image, source_items
from vlsae_ray.config import SourceConfig, TokenConfig


def world_images(n: int) -> list[Image.Image]:
    return [load_image(item["id"]) for item in source_items(SourceConfig(n_items=n))]


def save_clip_tokenizer(folder):
    """A transformers CLIPTokenizer with open_clip's BPE (the same ids as open_clip's SimpleTokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    eot = "<end_of_text>"
    tokenizer = CLIPTokenizer(
        vocab=dict(bpe.encoder),
        merges=sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get),
        bos_token="<start_of_text>",
        eos_token=eot,
        pad_token=eot,
        unk_token=eot,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def hf_clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel, its image processor and tokenizer, saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("hf-clip")
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    save_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def llava_folder():
    """The committed world LLaVA: a folder `save_pretrained` wrote, with its processor and tokenizer."""
    from vlsae_ray.world.llava import WORLD_LLAVA_PATH

    return WORLD_LLAVA_PATH


def assert_rows_match(rows, reference, token: TokenConfig, lengths=None, cls=None):
    """`rows` against a reference output, item by item with plain loops.

    `reference` is [B, T, d] (a sequence: `lengths` real tokens per item, `cls` the pooled position;
    default all T and token 0) or [B, d] (one pooled row per item)."""
    n_items = reference.shape[0]
    assert rows.values.dtype == torch.float32 and rows.item.dtype == torch.int64
    assert rows.token.dtype == torch.int32
    for b in range(n_items):
        mine = rows.item == b
        values, tokens = rows.values[mine], rows.token[mine].tolist()
        if reference.ndim == 2:
            assert tokens == [-1]
            torch.testing.assert_close(values[0], reference[b], rtol=1e-4, atol=1e-5)
            continue
        n = reference.shape[1] if lengths is None else lengths[b]
        real = reference[b, :n]
        if token.mode == "cls":
            position = 0 if cls is None else cls[b]
            assert tokens == [position]
            expected = real[position][None]
        elif token.mode == "mean":
            assert tokens == [-1]
            expected = real.mean(0)[None]
        elif token.mode == "all":
            assert tokens == list(range(n))
            expected = real
        else:
            assert len(tokens) == min(token.k, n) and tokens == sorted(set(tokens)) and tokens[-1] < n
            expected = real[tokens]
        torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)
    assert len(rows.item) == len(rows.values) == len(rows.token) and rows.item.tolist() == sorted(rows.item)


MODES = [
    *(TokenConfig(mode=mode) for mode in ("cls", "mean", "all")),
    TokenConfig(mode="random", k=3, seed=7),
]


@pytest.fixture(params=MODES, ids=str)
def token(request) -> TokenConfig:
    return request.param


@pytest.fixture
def rows_match():
    return assert_rows_match


@pytest.fixture
def images():
    return world_images


def upload_folder(folder: Path, uri: str) -> str:
    """Copy a local model folder to `uri` (e.g. on S3), as a user puts weights in object storage."""
    for path in filter(Path.is_file, folder.rglob("*")):
        storage.write_bytes(storage.join(uri, path.relative_to(folder).as_posix()), path.read_bytes())
    return uri


@pytest.fixture
def upload():
    return upload_folder
