"""The PyTorch peer: the same model with torchdiffeq (`odeint` and `odeint_adjoint`), Euler.

Each layer is one `odeint` call over a unit time interval with one Euler step and the field
scaled by 1/L (so no floating-point grid can add a spurious extra step); the field reads the
layer's parameters from an `nn.Module` (what `odeint_adjoint` needs to see them). Note that
`odeint_adjoint` returns the continuous adjoint discretised backwards (optimise-then-discretise),
not the exact gradient of the Euler scheme; it is timed, not used as a reference.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
    from torchdiffeq import odeint, odeint_adjoint

    AVAILABLE = True
except ImportError:  # optional: `pip install -e '.[bench]'`
    AVAILABLE = False


if AVAILABLE:

    class Field(torch.nn.Module):
        def __init__(self, A, V, w):
            super().__init__()
            self.A = torch.nn.Parameter(torch.as_tensor(np.asarray(A)))
            self.V = torch.nn.Parameter(torch.as_tensor(np.asarray(V)))
            self.register_buffer("logw", torch.log(torch.as_tensor(np.asarray(w))))
            self.layer = 0

        def velocity(self, x, A, V):
            z = torch.einsum("bid,mde->bmie", x, A)
            s = torch.einsum("bmie,bje->bmij", z, x) + self.logw[:, None, None, :]
            p = torch.softmax(s, dim=-1)
            y = torch.einsum("bmij,bjd->bmid", p, x)
            return torch.einsum("bmid,med->bie", y, V) / A.shape[0]

        def forward(self, t, x):
            L = self.A.shape[0]
            return self.velocity(x, self.A[self.layer], self.V[self.layer]) / L

    class TorchPeer:
        def __init__(self, adjoint: bool):
            self.adjoint = adjoint
            self.solve = odeint_adjoint if adjoint else odeint

        def setup(self, A, V, x, w):
            torch.set_num_threads(max(1, torch.get_num_threads()))
            self.field = Field(A, V, w)
            self.x = torch.as_tensor(np.asarray(x))
            self.t = torch.tensor([0.0, 1.0], dtype=self.x.dtype)

        def velocity(self):
            with torch.no_grad():
                return self.field.velocity(self.x, self.field.A[0], self.field.V[0])

        def _flow(self):
            x = self.x
            for layer in range(self.field.A.shape[0]):
                self.field.layer = layer
                x = self.solve(self.field, x, self.t, method="euler", options={"step_size": 1.0})[-1]
            return x

        def forward(self):
            with torch.no_grad():
                return self._flow()

        def loss_and_grad(self):
            self.field.zero_grad(set_to_none=True)
            loss = torch.mean(self._flow() ** 2)
            loss.backward()
            return loss.detach(), (self.field.A.grad, self.field.V.grad)
