"""Helpers shared by the SAE kernel tests: a perturbed SAE and one training forward/backward."""

import pytest
import torch

from vlsae_ray.sae import build_sae


@pytest.fixture
def perturbed_sae():
    """Factory: the SAE of `config` from seed 0, every parameter moved off the structured init."""

    def make(config):
        torch.manual_seed(0)
        sae = build_sae(config)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.3 * torch.randn_like(p))
            sae.input_scale.fill_(3.0)
        return sae

    return make


@pytest.fixture
def loss_and_grads():
    """Run one training forward and backward: (x_hat, z, {loss term: value}, {parameter: grad})."""

    def run(sae, x, dead, **kwargs):
        sae.zero_grad()
        x_hat, z, aux = sae.train()(x, dead, **kwargs)
        sum(aux.values()).backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        return x_hat.detach(), z.detach(), {k: float(v.detach()) for k, v in aux.items()}, grads

    return run
