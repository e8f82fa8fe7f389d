"""The VL-SAE authors' auxiliary aligner for LLaVA (arXiv 2510.21323, Sec. 3.2; `AuxiliaryAE`).

A LLaVA's hidden states of image tokens and of text tokens live in different regions of one
space, so a VL-SAE's shared encoder would give them few common concepts. The aligner maps each
modality's hidden state x to a projection p = P_m x (one linear map per modality) in which an
image and its caption land close, and decodes it back, x_rec = D_m p:

    loss = InfoNCE(P_v v, P_t t) + MSE(D_v P_v v, v) + MSE(D_t P_t t, t)

with a symmetric InfoNCE over the batch's pairs on the unnormalised projections, at temperature
0.07 (as the authors' code: their normalisation lines are commented out). The VL-SAE is then
trained on the projections, and hallucination mitigation maps an edited text concept back to a
hidden state through D_t (`vlsae_ray.steer.hallucination`).

Saved as `aligner.safetensors` and `config.json` under a folder URI (`save`, `Aligner.load`).
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.nn import functional as F

from vlsae_ray import storage

Modality = Literal["vision", "text"]
WEIGHTS, CONFIG = "aligner.safetensors", "config.json"


class AlignerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    d_in: int = Field(gt=0, description="width of the hidden states (both modalities)")
    d_proj: int = Field(gt=0, description="width of the projections, the VL-SAE's d_in")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature")


def info_nce(p_v: torch.Tensor, p_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: image i's caption is text row i, every other row a negative."""
    logits_bb = p_v @ p_t.T / temperature
    labels_b = torch.arange(len(p_v), device=p_v.device)
    return (F.cross_entropy(logits_bb, labels_b) + F.cross_entropy(logits_bb.T, labels_b)) / 2


class Aligner(nn.Module):
    def __init__(self, config: AlignerConfig):
        super().__init__()
        self.config = config
        self.vision_projection = nn.Linear(config.d_in, config.d_proj)
        self.text_projection = nn.Linear(config.d_in, config.d_proj)
        self.vision_decoder = nn.Linear(config.d_proj, config.d_in)
        self.text_decoder = nn.Linear(config.d_proj, config.d_in)

    def project(self, x_bd: torch.Tensor, modality: Modality) -> torch.Tensor:
        return (self.text_projection if modality == "text" else self.vision_projection)(x_bd)

    def decode(self, p_bd: torch.Tensor, modality: Modality) -> torch.Tensor:
        return (self.text_decoder if modality == "text" else self.vision_decoder)(p_bd)

    def forward(self, v_bd: torch.Tensor, t_bd: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and its terms on paired rows (text row i is the caption of image row i)."""
        p_v, p_t = self.project(v_bd, "vision"), self.project(t_bd, "text")
        terms = {
            "info_nce": info_nce(p_v, p_t, self.config.temperature),
            "mse_vision": F.mse_loss(self.decode(p_v, "vision"), v_bd),
            "mse_text": F.mse_loss(self.decode(p_t, "text"), t_bd),
        }
        with torch.no_grad():  # in-batch retrieval: how often an image's nearest caption is its own
            hits = (p_v @ p_t.T).argmax(dim=1) == torch.arange(len(p_v), device=p_v.device)
            terms["retrieval"] = hits.float().mean()
        terms["loss"] = terms["info_nce"] + terms["mse_vision"] + terms["mse_text"]
        return terms

    def save(self, uri: str) -> None:
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        storage.write_bytes(storage.join(uri, WEIGHTS), save_safetensors(state))
        storage.write_text(storage.join(uri, CONFIG), self.config.model_dump_json(indent=2))

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu") -> Aligner:
        config = AlignerConfig.model_validate(json.loads(storage.read_text(storage.join(uri, CONFIG))))
        aligner = cls(config)
        aligner.load_state_dict(load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS))))
        return aligner.to(device).eval()
