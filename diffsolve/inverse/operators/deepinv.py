"""deepinv's ``Physics`` objects as diffsolve operators (the optional ``deepinv`` extra)."""

from __future__ import annotations

import torch

from .base import Operator, _cast, _shape


class DeepInvPhysics(Operator):
    """A deepinv ``Physics`` object as a diffsolve operator (deepinv is an optional extra:
    ``pip install 'diffsolve[deepinv]'``). ``shape`` is one sample's input shape; the output shape is read
    from one call of ``physics.A`` on zeros. A = ``physics.A`` (noiseless), Aᴴ = ``physics.A_adjoint`` and
    A⁺ = ``physics.A_dagger`` for a ``LinearPhysics``; other physics are nonlinear. Inputs are cast to the
    precision of the physics' floating buffers and parameters (deepinv builds masks and kernels in float32, which
    its convolutions and products refuse to mix with float64 input) and results back to the input's, as
    diffsolve's own operators do."""

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
        tensors = [*physics.parameters(), *physics.buffers()] if isinstance(physics, torch.nn.Module) else []
        #: a tensor of the physics' precision and device (None: the physics has no floating state to match)
        self._precision = next((t.detach().new_empty(()) for t in tensors if t.is_floating_point()), None)
        with torch.no_grad():
            probe = self._call(physics.A, torch.zeros(1, *self.shape_in))
        self.shape_out = tuple(probe.shape[1:])
        self.complex_output = probe.is_complex()

    def _call(self, fn, v):
        """fn(v) in the physics' precision and on its device, returned in v's."""
        return fn(v) if self._precision is None else _cast(fn(_cast(v, self._precision)), v)

    def _forward(self, x):
        return self._call(self.physics.A, x)

    def _adjoint(self, y):
        return self._call(self.physics.A_adjoint, y)

    def _pinv(self, y):
        return self._call(self.physics.A_dagger, y)

    def __repr__(self):
        return f"DeepInvPhysics({type(self.physics).__name__}, shape_in={self.shape_in}, shape_out={self.shape_out})"
