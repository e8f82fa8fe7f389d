"""The SAE interface every architecture implements, the architecture registry, save and load.

Shapes: b = batch, d = d_in, f = n_latents. Parameters (all fp32):
    W_enc_fd [F, d], b_enc_f [F], W_dec_fd [F, d] (row j = decoder column j), b_dec_d [d],
and one buffer `input_scale` (a scalar s). Pre-activations and reconstruction are

    pre = W_enc (x - s b_dec) + s b_enc,      x_hat = W_dec^T z + s b_dec,      z = act(pre)

on raw activations x. This is exactly the usual SAE on normalised inputs x / s (mean squared norm
1, see `init.input_scale`) with latents multiplied by s, because every activation here is
positively homogeneous. So the parameters live in normalised units (one learning rate fits every
model width and layer), latents and reconstructions come out in raw units (z_j is the length of
latent j's contribution, as decoder columns have unit norm), and `save` folds s into the biases:
a saved SAE has s = 1 and gives identical outputs on raw activations.
"""

from __future__ import annotations

import abc
import functools
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from vlsae_ray import storage
from vlsae_ray.sae import checkpoint, kernels
from vlsae_ray.sae.config import BaseSAEConfig
from vlsae_ray.sae.init import geometric_median, input_scale
from vlsae_ray.sae.kernels import SparseLatents

WEIGHTS_FILE, CONFIG_FILE = checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE


class Forward(NamedTuple):
    """What one encoder pass leaves for the loss: centred inputs, dense pre-activations, kernel choice."""

    centred_bd: torch.Tensor  # x - s b_dec
    pre_bf: torch.Tensor  # raw units; without gradients when `sparse`
    sparse: bool
    text_b: torch.Tensor | None = None  # VL-SAE: which rows are text
    # False: pre_bf is a bf16 approximation that `select_pre` recomputes (TopK's `encoder_shortlist`);
    # True: pre_bf holds the forward's pre-activations, in the compute dtype (bf16 under autocast)
    exact: bool = True


# architecture name -> (config class, module class); filled by `register`.
ARCHITECTURES: dict[str, tuple[type[BaseSAEConfig], type[SparseAutoencoder]]] = {}


def register(config_cls: type[BaseSAEConfig]):
    """Class decorator: make `config_cls` (tagged by its `architecture` literal) build this module."""
    name = config_cls.model_fields["architecture"].default

    def decorate(module_cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
        if name in ARCHITECTURES:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        ARCHITECTURES[name] = (config_cls, module_cls)
        module_cls.config_class = config_cls
        return module_cls

    return decorate


class SparseAutoencoder(nn.Module, abc.ABC):
    """Base of every SAE: encode, decode, forward -> (x_hat, z, aux), save and load.

    Subclasses implement `select(pre_bf) -> SparseLatents` (which latents are on, with their
    pre-activations) and `loss_terms(...)`; `activate` maps selected pre-activations to latents
    (ReLU unless overridden). `aux` (the third output of `forward`) maps a name to a weighted
    scalar loss term; the training loss is their sum.
    """

    config_class: ClassVar[type[BaseSAEConfig]]
    # Whether decoder columns are kept at unit norm (they carry no scale when latents do).
    unit_norm_decoder: ClassVar[bool] = True
    has_encoder_bias: ClassVar[bool] = True
    # Whether training starts the dictionary at sample rows (`init.init_dictionary_from_data`).
    dictionary_from_data: ClassVar[bool] = False

    def __init__(self, config: BaseSAEConfig):
        super().__init__()
        self.config = config
        # Random unit-norm decoder columns and the encoder as its transpose (Gao et al. 2024, sec. 2.2).
        W_dec_fd = torch.randn(config.n_latents, config.d_in)
        W_dec_fd /= W_dec_fd.norm(dim=-1, keepdim=True)
        self.W_enc_fd = nn.Parameter(W_dec_fd.clone())
        if self.has_encoder_bias:
            self.b_enc_f = nn.Parameter(torch.zeros(config.n_latents))
        self.W_dec_fd = nn.Parameter(W_dec_fd)
        self.b_dec_d = nn.Parameter(torch.zeros(config.d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))

    # -- the architecture ------------------------------------------------------------------------

    @abc.abstractmethod
    def select(self, pre_bf: torch.Tensor) -> SparseLatents:
        """The active latents and their pre-activations (no gradients); commutes with positive scaling."""

    def activate(self, pre: SparseLatents) -> torch.Tensor:
        """Latent values of the selected pre-activations (differentiable)."""
        return pre.values_n.relu()

    def max_active(self, batch: int) -> int | None:
        """An upper bound on the active entries of a batch (None: unbounded); picks the kernels."""
        return None

    @abc.abstractmethod
    def loss_terms(
        self,
        x_bd: torch.Tensor,
        x_hat_bd: torch.Tensor,
        z: SparseLatents,
        fwd: Forward,
        dead_mask_f: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Weighted scalar loss terms in normalised units; the training loss is their sum."""

    # -- the SAE ---------------------------------------------------------------------------------

    def check_width(self, x_bd: torch.Tensor) -> None:
        if x_bd.shape[-1] != self.config.d_in:
            raise ValueError(
                f"activations have dimension {x_bd.shape[-1]} but the SAE expects d_in={self.config.d_in}:"
                " pass activations from the layer the SAE was trained on"
            )

    def pre_acts(self, x_bd: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations [B, F] in raw units."""
        self.check_width(x_bd)
        s = self.input_scale
        return torch.addmm(s * self.b_enc_f, x_bd - s * self.b_dec_d, self.W_enc_fd.T)

    def encode(self, x_bd: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, F] (zeros where inactive) of raw activations."""
        return self.encode_sparse(x_bd).to_dense()

    def encode_sparse(self, x_bd: torch.Tensor) -> SparseLatents:
        """The active latents of raw activations, as `SparseLatents`."""
        pre = self.select(self.pre_acts(x_bd))
        return pre.with_values(self.activate(pre))

    def decode(self, z_bf: torch.Tensor) -> torch.Tensor:
        """Reconstruction in raw units from latents [B, F]."""
        return z_bf @ self.W_dec_fd + self.input_scale * self.b_dec_d

    def forward(
        self, x_bd: torch.Tensor, dead_mask_f: torch.Tensor | None = None, *, sparse_latents: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | SparseLatents, dict[str, torch.Tensor]]:
        """(x_hat_bd, z, aux). `dead_mask_f` marks dead latents for auxiliary losses (training).

        z is the dense [B, F] latents, or `SparseLatents` with `sparse_latents=True` (the trainer's
        choice: it never needs the dense matrix). Encoder and decoder run through the sparse kernels
        when `kernels.use_sparse` says so, else through dense matrix products; values and gradients agree.
        """
        self.check_width(x_bd)
        fwd = self.encoder_pass(x_bd)
        pre = self.select_pre(fwd)
        z = pre.with_values(self.activate(pre.with_values(self.gathered_pre_acts(fwd, pre))))
        x_hat_bd = kernels.decode(z, self.W_dec_fd, fwd.sparse) + self.input_scale * self.b_dec_d
        aux = self.loss_terms(x_bd, x_hat_bd, z, fwd, dead_mask_f)
        return x_hat_bd, (z if sparse_latents else z.to_dense()), aux

    def encoder_pass(self, x_bd: torch.Tensor) -> Forward:
        """The dense encoder GEMM, with gradients only on the dense reference path.

        The one place that picks the encoder's precision: fp32, bf16 under torch.autocast (the
        trainer's `precision: bf16`; selection then reads the bf16 pre-activations and the latents
        take their values in fp32), or, with a TopK SAE's `encoder_shortlist` on the sparse kernels,
        a bf16 GEMM whose values only shortlist candidates (`select_pre` recomputes those in fp32).
        """
        sparse = kernels.use_sparse(self.max_active(x_bd.shape[0]), x_bd.shape[0], self.config.n_latents)
        centred_bd = x_bd - self.input_scale * self.b_dec_d
        if sparse and getattr(self.config, "encoder_shortlist", 0):
            with torch.no_grad():
                s_b_enc_f = (self.input_scale * self.b_enc_f).bfloat16()
                pre_bf = torch.addmm(s_b_enc_f, centred_bd.bfloat16(), self.W_enc_fd.bfloat16().T)
            return Forward(centred_bd, pre_bf, sparse, exact=False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            pre_bf = torch.addmm(self.input_scale * self.b_enc_f, centred_bd, self.W_enc_fd.T)
        return Forward(centred_bd, pre_bf, sparse)

    def select_pre(self, fwd: Forward) -> SparseLatents:
        """`select` on the encoder pass; architectures that accept an approximate pass override it."""
        if not fwd.exact:
            raise NotImplementedError(f"{type(self).__name__} needs the exact fp32 encoder pass")
        return self.select(fwd.pre_bf.detach())

    @torch.no_grad()
    def exact_pre_acts(self, fwd: Forward, latents: SparseLatents) -> torch.Tensor:
        """fp32 pre-activations at `latents`' entries, O(n·d), no gradients."""
        dots_n = kernels.entry_dots(latents, fwd.centred_bd, self.W_enc_fd)
        return dots_n + self.input_scale * self.b_enc_f[latents.indices_n]

    def gathered_pre_acts(self, fwd: Forward, pre: SparseLatents) -> torch.Tensor:
        """Pre-activations at `pre`'s entries with gradients to W_enc, b_enc and b_dec."""
        if not fwd.sparse:
            return fwd.pre_bf[pre.rows_n, pre.indices_n].float()
        s_b_enc_n = self.input_scale * self.b_enc_f[pre.indices_n]
        if not fwd.exact:  # select_pre left the exact pre-activations (with s * b_enc) in pre.values_n
            dots_n = pre.values_n.detach() - s_b_enc_n.detach()
            return (
                kernels.gathered_dot(pre, fwd.centred_bd, self.W_enc_fd, None, True, dots_n=dots_n)
                + s_b_enc_n
            )
        dots_n = kernels.gathered_dot(pre, fwd.centred_bd, self.W_enc_fd, fwd.pre_bf, sparse=True)
        # pre_bf includes s * b_enc; take it out of the reused values and add it back differentiably.
        return dots_n - s_b_enc_n.detach() + s_b_enc_n

    def mse(self, x_bd: torch.Tensor, x_hat_bd: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ||x - x_hat||^2 in normalised units (x / input_scale)."""
        return (x_bd - x_hat_bd).pow(2).sum(-1).mean() / self.input_scale**2

    # -- initialisation and the unit-norm constraint ---------------------------------------------

    @torch.no_grad()
    def init_from_data(self, sample_nd: torch.Tensor) -> None:
        """Set the input scale and put the decoder bias at the sample's geometric median.

        The geometric median as b_dec follows Bricken et al. 2023 ("Towards Monosemanticity").
        """
        sample_nd = sample_nd.to(self.b_dec_d.device, torch.float32)
        if sample_nd.ndim != 2 or sample_nd.shape[1] != self.config.d_in:
            raise ValueError(
                f"the init sample has shape {tuple(sample_nd.shape)}; expected [N, {self.config.d_in}]"
            )
        scale = input_scale(sample_nd)
        self.input_scale.fill_(scale)
        self.b_dec_d.copy_(geometric_median(sample_nd / scale))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder columns to unit norm (after each optimiser step)."""
        if not self.unit_norm_decoder:
            return
        self.W_dec_fd /= self.W_dec_fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Drop the gradient component along each decoder column (before each optimiser step).

        With unit-norm columns, that component only changes the norm, which `normalize_decoder_`
        undoes anyway; removing it keeps Adam's moment estimates for the useful directions.
        """
        if self.W_dec_fd.grad is not None and self.unit_norm_decoder:
            self.W_dec_fd.grad.sub_(self._parallel_component(self.W_dec_fd.grad))

    @torch.no_grad()
    def without_parallel_grad(self, grad_fd: torch.Tensor) -> torch.Tensor:
        """A decoder gradient less its component along each column (a gradient hook, for DeepSpeed)."""
        return grad_fd - self._parallel_component(grad_fd) if self.unit_norm_decoder else grad_fd

    def _parallel_component(self, grad_fd: torch.Tensor) -> torch.Tensor:
        unit_fd = self.W_dec_fd / self.W_dec_fd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (grad_fd * unit_fd).sum(-1, keepdim=True) * unit_fd

    # -- checkpoints -----------------------------------------------------------------------------

    @torch.no_grad()
    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The state with the input scale folded into the biases (so input_scale = 1).

        Tensors the folding leaves alone are the module's own, detached (no copy of the weights).
        """
        s = self.input_scale
        state = {name: t.detach() for name, t in self.state_dict().items()}
        if self.has_encoder_bias:
            state["b_enc_f"] = s * self.b_enc_f
        state["b_dec_d"] = s * self.b_dec_d
        state["input_scale"] = torch.ones_like(s)
        return state

    def save(self, uri: str) -> None:
        """Write `sae.safetensors` and `config.json` under the folder `uri` (local path or s3://).

        The format is `vlsae_ray.sae.checkpoint`'s single file; a latent-sharded SAE saves one file
        per shard instead (`LatentShardedSAE.save`). `load` reads both.
        """
        checkpoint.save_single(uri, self.folded_state_dict(), self.config.model_dump_json(indent=2))

    @classmethod
    def load(cls, uri: str, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """The SAE saved under `uri` (either form), as the subclass its config's architecture names."""
        config_dict, state = checkpoint.read(uri)
        config = _parse(config_dict)
        module_cls = ARCHITECTURES[config.architecture][1]
        if not issubclass(module_cls, cls):
            raise TypeError(f"{uri!r} holds a {module_cls.__name__}, not a {cls.__name__}")
        with torch.device("meta"):  # no random init of weights that are read next
            sae = module_cls(config)
        sae.load_state_dict(state, assign=True)
        return sae.to(device)


def _parse(config_dict: dict) -> BaseSAEConfig:
    from vlsae_ray.sae import parse_config

    return parse_config(config_dict)


def load_config(uri: str) -> BaseSAEConfig:
    """The config of the SAE saved under `uri`, without reading its weights."""
    return _parse(checkpoint.read_config(uri))


@functools.cache
def _load_eval(uri: str, version: str) -> SparseAutoencoder:  # version: a changed checkpoint is reloaded
    return SparseAutoencoder.load(uri).eval()


def load_sae(uri: str) -> SparseAutoencoder:
    """The SAE at `uri` in eval mode, loaded once per process (Ray reuses worker processes across tasks)."""
    return _load_eval(uri, storage.version(checkpoint.commit_uri(uri)))
