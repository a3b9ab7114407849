"""The strongest PyTorch peer: the finite transformer with `scaled_dot_product_attention`.

What a user writes in twenty lines. Per layer `l`, with the `M` heads laid out as attention heads:

    q = einsum("bnd,mde->bmne", x, A[l])          # queries z = Aᵀx, (B, M, n, d)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=log w, scale=1.0)   # k = v = x
    x = x + (1/L) · mean_m V_m y_m

keys = values = the tokens, shared by all heads; the float mask `log w` (`-inf` at padding) is
added to the scores. Autograd gives the gradient. Two ways to share the keys across heads are
available — a stride-0 `expand` (`kv="expand"`) or grouped-query attention with one key/value head
(`kv="gqa"`, `enable_gqa=True`) — and `best_kv` times both and keeps the faster (the peer runs
with its best settings). Float32, same thread count as JAX.
"""

from __future__ import annotations

import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F

    AVAILABLE = True
except ImportError:  # optional: `pip install -e '.[bench]'`
    AVAILABLE = False


class SDPAPeer:
    """`forward()` -> x_1; `loss_and_grad()` -> (loss, (dA, dV)), loss `mean(|x_1|^2)`."""

    def __init__(self, threads: int = 2, kv: str = "expand"):
        self.threads = threads
        self.kv = kv

    def setup(self, A, V, x, w):
        torch.set_num_threads(self.threads)
        self.A = torch.as_tensor(np.asarray(A, np.float32)).requires_grad_(True)
        self.V = torch.as_tensor(np.asarray(V, np.float32)).requires_grad_(True)
        self.x = torch.as_tensor(np.asarray(x, np.float32))
        w = torch.as_tensor(np.asarray(w, np.float32))
        logw = torch.where(w > 0, torch.log(torch.where(w > 0, w, 1.0)), -torch.inf)
        self.mask = logw[:, None, None, :]  # (B, 1, 1, n): broadcast over heads and queries

    def _field(self, x, A, V):
        q = torch.einsum("bnd,mde->bmne", x, A)
        if self.kv == "gqa":
            kv = x[:, None]
            y = F.scaled_dot_product_attention(q, kv, kv, attn_mask=self.mask, scale=1.0,
                                               enable_gqa=True)
        else:
            kv = x[:, None].expand(q.shape)
            y = F.scaled_dot_product_attention(q, kv, kv, attn_mask=self.mask, scale=1.0)
        return torch.einsum("bmnd,med->bne", y, V) / A.shape[0]

    def velocity(self):
        """One evaluation of the head-averaged field at the input tokens (first layer's heads)."""
        with torch.no_grad():
            return self._field(self.x, self.A[0], self.V[0])

    def _flow(self):
        x = self.x
        L = self.A.shape[0]
        for layer in range(L):
            x = x + self._field(x, self.A[layer], self.V[layer]) / L
        return x

    def forward(self):
        with torch.no_grad():
            return self._flow()

    def loss_and_grad(self):
        self.A.grad = None
        self.V.grad = None
        loss = torch.mean(self._flow() ** 2)
        loss.backward()
        return loss.detach(), (self.A.grad, self.V.grad)


def best_kv(A, V, x, w, threads: int = 2, repeats: int = 2) -> str:
    """The faster key/value layout for this size (forward + gradient, best of `repeats`)."""
    best, best_t = "expand", float("inf")
    for kv in ("expand", "gqa"):
        peer = SDPAPeer(threads, kv)
        peer.setup(A, V, x, w)
        try:
            peer.loss_and_grad()
        except (RuntimeError, TypeError):  # a torch without enable_gqa for this path
            continue
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            peer.loss_and_grad()
            t = min(t, time.perf_counter() - t0)
        if t < best_t:
            best, best_t = kv, t
    return best


class BestSDPAPeer(SDPAPeer):
    """`SDPAPeer` that picks its faster key/value layout (`best_kv`) for the data it is set up
    with: the peer at its best settings, in the interface of `benchmarks.run`."""

    def setup(self, A, V, x, w):
        self.kv = best_kv(A, V, x, w, self.threads)
        super().setup(A, V, x, w)
