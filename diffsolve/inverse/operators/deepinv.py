"""deepinv's ``Physics`` objects as diffsolve operators (the optional ``deepinv`` extra)."""

from __future__ import annotations

import torch

from .base import Operator, _shape


class DeepInvPhysics(Operator):
    """A deepinv ``Physics`` object as a diffsolve operator (deepinv is an optional extra:
    ``pip install 'diffsolve[deepinv]'``). ``shape`` is one sample's input shape; the output shape is read
    from one call of ``physics.A`` on zeros. A = ``physics.A`` (noiseless), Aᴴ = ``physics.A_adjoint`` and
    A⁺ = ``physics.A_dagger`` for a ``LinearPhysics``; other physics are nonlinear."""

    def __init__(self, physics, *, shape):
        try:
            import deepinv
        except ImportError as err:
            raise ImportError("DeepInvPhysics needs deepinv, an optional extra: "
                              "pip install 'diffsolve[deepinv]'") from err
        if not isinstance(physics, deepinv.physics.Physics):
            raise TypeError(f"physics: expected a deepinv.physics.Physics, got {type(physics).__name__}")
        self.physics = physics
        self.linear = isinstance(physics, deepinv.physics.LinearPhysics)
        self.shape_in = _shape(shape)
        with torch.no_grad():
            probe = physics.A(torch.zeros(1, *self.shape_in))
        self.shape_out = tuple(probe.shape[1:])
        self.complex_output = probe.is_complex()

    def _forward(self, x):
        return self.physics.A(x)

    def _adjoint(self, y):
        return self.physics.A_adjoint(y)

    def _pinv(self, y):
        return self.physics.A_dagger(y)

    def __repr__(self):
        return f"DeepInvPhysics({type(self.physics).__name__}, shape_in={self.shape_in}, shape_out={self.shape_out})"
