"""Export to SAELens' on-disk format, so SAELens users can open our SAEs with `SAE.load_from_disk`.

SAELens (>= 6) reads a folder with `cfg.json` (architecture, d_in, d_sae, dtype, device,
apply_b_dec_to_input, normalize_activations, metadata, and the architecture's own fields) and
`sae_weights.safetensors` with W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d] (+ threshold [F]
for JumpReLU). Mapping: TopK -> "topk" (k); ReLU -> "standard"; JumpReLU -> "jumprelu" with its
thresholds; BatchTopK and Matryoshka -> "jumprelu" with the learned global θ for every latent,
which is exactly their inference rule. VL-SAE has no SAELens counterpart (distance encoder, two decoders).
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

from vlsae_ray import storage
from vlsae_ray.sae.base import SparseAutoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens config format written here (its `metadata.sae_lens_version` selects the reader).
SAELENS_FORMAT_VERSION = "6.0.0"
# our architecture -> SAELens' inference architecture
SAELENS_ARCHITECTURES = {
    "topk": "topk",
    "relu": "standard",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}


def export_saelens(sae: SparseAutoencoder, uri: str) -> None:
    """Write `sae` (input scale folded) under the folder `uri` in SAELens' format."""
    architecture = sae.config.architecture
    if architecture not in SAELENS_ARCHITECTURES:
        raise ValueError(
            f"SAELens has no architecture for {architecture!r} SAEs; export one of"
            f" {sorted(SAELENS_ARCHITECTURES)}, or load this one with SparseAutoencoder.load"
        )
    state = sae.folded_state_dict()
    weights = {
        "W_enc": state["W_enc_fd"].T,
        "b_enc": state["b_enc_f"],
        "W_dec": state["W_dec_fd"],
        "b_dec": state["b_dec_d"],
    }
    extra = {"k": sae.config.k} if architecture == "topk" else {}
    if architecture == "jumprelu":
        weights["threshold"] = state["log_threshold_f"].exp()
    elif architecture in ("batchtopk", "matryoshka_batchtopk"):
        weights["threshold"] = state["threshold"].expand(sae.config.n_latents)
    cfg = {
        "architecture": SAELENS_ARCHITECTURES[architecture],
        "d_in": sae.config.d_in,
        "d_sae": sae.config.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "vlsae_architecture": architecture},
        **extra,
    }
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in weights.items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), safetensors.torch.save(tensors))
    storage.write_text(storage.join(uri, CFG_FILE), json.dumps(cfg, indent=2))
