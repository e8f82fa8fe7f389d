"""Sparse latents and the two products that use their sparsity, with the dense reference beside them.

With k of F latents active per sample, the batch's latents are a sparse [B, F] matrix S (stored as
`SparseLatents`, CSR by sample). Both products an SAE needs beyond the encoder GEMM touch only
S's B·k entries:

    decode:         x_hat = S @ W_dec           grads: W_dec += S^T g,   S_bj += g_b . W_dec_j
    gathered_dot:   s_bj  = a_b . W_j  (b,j in S)    grads: W += S_g^T a,   a += S_g @ W

so each is O(B·k·d) instead of a dense O(B·F·d) matrix product (as sparsify's `decode` and its
sparse encoder backward; Gao et al. 2024, sec. 5). Both run as `embedding_bag` calls: the
per-sample sums are bags over samples, and the transposed sums are bags over latents after one sort.

`use_sparse` is the single place that picks the sparse kernels or the plain dense reference.

Precision follows torch.autocast, which the trainer opens around the forward for `precision: bf16`
(`vlsae_ray.train.step`): autocast runs the dense products (the encoder GEMM, the dense decode) in
bf16, and `compute_dtype` gives the sparse decode the same dtype, as autocast would a matmul. Each
product accumulates in fp32 (oneDNN, cuBLAS and `embedding_bag` do) and its result comes back in the
weights' dtype (fp32), so what follows (activations, losses, the all-reduce of partial decodes) is
fp32. The sparse kernels' backward runs in fp32 on the fp32 weights they saved. Without autocast
every product is fp32, unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Above this density (active entries / B·F) the dense matrix products are as fast as the gathers.
MAX_SPARSE_DENSITY = 1 / 8
_dense_reference = False


@contextlib.contextmanager
def dense_reference():
    """Run every SAE through the plain dense matrix products (tests compare the two paths)."""
    global _dense_reference
    previous, _dense_reference = _dense_reference, True
    try:
        yield
    finally:
        _dense_reference = previous


def compute_dtype(weights: torch.Tensor) -> torch.dtype:
    """The dtype a product with `weights` runs in: autocast's where it is on, else the weights' own."""
    device = weights.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weights.dtype


def use_sparse(max_active: int | None, batch: int, n_latents: int) -> bool:
    """Whether a batch with at most `max_active` active latents (None: unbounded) uses the sparse kernels."""
    return (
        not _dense_reference
        and max_active is not None
        and max_active <= MAX_SPARSE_DENSITY * batch * n_latents
    )


@dataclass(frozen=True)
class SparseLatents:
    """The active latents of a batch in CSR form, sample b owning entries offsets_b1[b]:offsets_b1[b+1].

    `values_n` may carry gradients; the index tensors never do. Views of the same pattern made by
    `with_values` share one cache of the derived index tensors (`rows_n`, `by_latent`), so the
    forward and every backward kernel compute them once per batch.
    """

    indices_n: torch.Tensor  # latent index of each entry (long)
    values_n: torch.Tensor  # its value
    offsets_b1: torch.Tensor  # [B + 1], long
    n_latents: int
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_topk(cls, values_bk: torch.Tensor, indices_bk: torch.Tensor, n_latents: int) -> SparseLatents:
        batch, k = indices_bk.shape
        offsets_b1 = torch.arange(0, (batch + 1) * k, k, device=indices_bk.device)
        return cls(indices_bk.reshape(-1), values_bk.reshape(-1), offsets_b1, n_latents)

    @classmethod
    def from_mask(cls, values_bf: torch.Tensor, mask_bf: torch.Tensor) -> SparseLatents:
        """The entries of `values_bf` where `mask_bf` holds, row by row."""
        rows_n, indices_n = mask_bf.nonzero(as_tuple=True)
        counts_b = mask_bf.sum(-1)
        offsets_b1 = torch.cat([counts_b.new_zeros(1), counts_b.cumsum(0)])
        return cls(indices_n, values_bf[rows_n, indices_n], offsets_b1, values_bf.shape[-1])

    @property
    def batch_size(self) -> int:
        return self.offsets_b1.shape[0] - 1

    @property
    def rows_n(self) -> torch.Tensor:
        """The sample of each entry."""
        if "rows_n" not in self._cache:
            counts_b = self.offsets_b1.diff()
            rows_n = torch.repeat_interleave(torch.arange(self.batch_size, device=counts_b.device), counts_b)
            self._cache["rows_n"] = rows_n
        return self._cache["rows_n"]

    @property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_n, offsets_f1): entries sorted by latent and the CSR offsets of S^T."""
        if "by_latent" not in self._cache:
            # A stable sort of integer keys is a radix sort on CPU: ~10x faster than the default argsort.
            order_n = self.indices_n.sort(stable=True).indices
            counts_f = torch.bincount(self.indices_n, minlength=self.n_latents)
            self._cache["by_latent"] = (order_n, torch.cat([counts_f.new_zeros(1), counts_f.cumsum(0)]))
        return self._cache["by_latent"]

    def with_values(self, values_n: torch.Tensor) -> SparseLatents:
        """The same pattern with other values; the cached orderings are shared (and filled once)."""
        return SparseLatents(self.indices_n, values_n, self.offsets_b1, self.n_latents, self._cache)

    def select(self, keep_n: torch.Tensor) -> SparseLatents:
        """The entries where `keep_n` holds (same batch)."""
        rows_n = self.rows_n[keep_n]
        counts_b = torch.bincount(rows_n, minlength=self.batch_size)
        offsets_b1 = torch.cat([counts_b.new_zeros(1), counts_b.cumsum(0)])
        return SparseLatents(self.indices_n[keep_n], self.values_n[keep_n], offsets_b1, self.n_latents)

    def to_dense(self) -> torch.Tensor:
        """The [B, F] matrix (zeros where inactive); differentiable in `values_n`."""
        dense_bf = self.values_n.new_zeros(self.batch_size, self.n_latents)
        return dense_bf.index_put((self.rows_n, self.indices_n), self.values_n)

    def to(self, device: str | torch.device) -> SparseLatents:
        """The same latents on `device` (results of a GPU forward, brought back to CPU)."""
        return SparseLatents(
            self.indices_n.to(device), self.values_n.to(device), self.offsets_b1.to(device), self.n_latents
        )

    def l0(self) -> float:
        """Mean number of active (nonzero) latents per sample."""
        return float((self.values_n != 0).sum()) / max(1, self.batch_size)


def _rows_times(latents: SparseLatents, weights_n: torch.Tensor, dense_bd: torch.Tensor) -> torch.Tensor:
    """S_w @ dense: for each sample, sum_entries weight * dense[latent]  -> [B, d]."""
    return F.embedding_bag(
        latents.indices_n,
        dense_bd,
        latents.offsets_b1,
        mode="sum",
        per_sample_weights=weights_n,
        include_last_offset=True,
    )


def _transposed_times(
    latents: SparseLatents, weights_n: torch.Tensor, dense_bd: torch.Tensor
) -> torch.Tensor:
    """S_w^T @ dense: for each latent, sum over its entries of weight * dense[sample]  -> [F, d]."""
    order_n, offsets_f1 = latents.by_latent
    return F.embedding_bag(
        latents.rows_n[order_n],
        dense_bd,
        offsets_f1,
        mode="sum",
        per_sample_weights=weights_n[order_n],
        include_last_offset=True,
    )


def entry_dots(latents: SparseLatents, a_bd: torch.Tensor, W_fd: torch.Tensor) -> torch.Tensor:
    """a[sample] . W[latent] for every entry, without materialising the [n, d] gathers."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        a_bd, W_fd, latents.indices_n, latents.offsets_b1[:-1], latents.rows_n, 0
    )


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_n, W_fd, latents):
        ctx.save_for_backward(values_n, W_fd)
        ctx.latents = latents
        dtype = compute_dtype(W_fd)
        return _rows_times(latents, values_n.to(dtype), W_fd.to(dtype)).to(W_fd.dtype)

    @staticmethod
    def backward(ctx, grad_bd):
        values_n, W_fd = ctx.saved_tensors
        grad_bd = grad_bd.contiguous()
        grad_values_n = entry_dots(ctx.latents, grad_bd, W_fd) if ctx.needs_input_grad[0] else None
        grad_W_fd = _transposed_times(ctx.latents, values_n, grad_bd) if ctx.needs_input_grad[1] else None
        return grad_values_n, grad_W_fd, None


class _GatheredDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_bd, W_fd, latents, dots_n):
        ctx.save_for_backward(a_bd, W_fd)
        ctx.latents = latents
        return dots_n.to(a_bd.dtype, copy=True)  # values of a bf16 GEMM continue in fp32

    @staticmethod
    def backward(ctx, grad_n):
        a_bd, W_fd = ctx.saved_tensors
        grad_n = grad_n.contiguous()
        grad_a_bd = _rows_times(ctx.latents, grad_n, W_fd) if ctx.needs_input_grad[0] else None
        grad_W_fd = _transposed_times(ctx.latents, grad_n, a_bd) if ctx.needs_input_grad[1] else None
        return grad_a_bd, grad_W_fd, None, None


def decode(latents: SparseLatents, W_fd: torch.Tensor, sparse: bool) -> torch.Tensor:
    """S @ W [B, d] for the latents' values, through the sparse kernel or the dense product, in W's dtype."""
    if sparse:
        return _Decode.apply(latents.values_n, W_fd, latents)
    return (latents.to_dense() @ W_fd).to(W_fd.dtype)


def gathered_dot(
    latents: SparseLatents,
    a_bd: torch.Tensor,
    W_fd: torch.Tensor,
    dots_bf: torch.Tensor | None,
    sparse: bool,
    *,
    dots_n: torch.Tensor | None = None,
) -> torch.Tensor:
    """a_b . W_j at the latents' entries [n], differentiable in a and W.

    `dots_bf` is a @ W^T already computed: without gradients on the sparse path (its values are
    reused), with them on the dense path (gradients flow through the dense product). On the sparse
    path `dots_n`, the values at the entries when the caller has them, replaces `dots_bf`.
    """
    if sparse:
        if dots_n is None:
            dots_n = dots_bf[latents.rows_n, latents.indices_n]
        return _GatheredDot.apply(a_bd, W_fd, latents, dots_n)
    return dots_bf[latents.rows_n, latents.indices_n].to(a_bd.dtype)
