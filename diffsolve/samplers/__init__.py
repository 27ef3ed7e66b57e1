"""Built-in samplers; importing this package registers them (see :mod:`diffsolve.registry`)."""

from . import adaptive_sde, bdia, ddim, dpm_solver_pp, dpm_solver_v3, euler_maruyama, pndm, sa_solver  # noqa: F401
