"""Inverse problems with a diffusion prior: measurement operators, noise models and the DPS, DDS and DAPS
solvers (``diffsolve.solve``).

    from diffsolve import load_model, solve
    from diffsolve.inverse import SuperResolution, GaussianNoise, measure

    model = load_model("digits16")
    op = SuperResolution(4, "bicubic", shape=model.sample_shape)
    y = measure(op, x, GaussianNoise(0.05), seed=0)           # σ_y in the model's data space ([−1, 1])
    x_hat = solve(model, op, y, "dds", noise=GaussianNoise(0.05), seeds=range(len(y)))

Operators (:mod:`.operators`): ``Inpainting``, ``SuperResolution``, ``Blur``, ``Denoising``, ``MRI``, ``CT``,
``PhaseRetrieval``, ``MatrixOperator``, ``DeepInvPhysics``; all batched, with ``A``, ``A_adjoint``, ``A_pinv``,
``shape_in``, ``shape_out``. Solvers (``list_solvers()``, ``diffsolve solvers``): ``dps``, ``dds``, ``daps``
(= ``daps_1k``), ``daps_100``. Task presets for image models: :mod:`.tasks`.
"""

from .cg import conjugate_gradient
from .metrics import psnr, ssim
from .noise import GaussianNoise, PoissonNoise, measure
from .operators import (CT, MRI, Blur, DeepInvPhysics, Denoising, Inpainting, MatrixOperator, Operator,
                        PhaseRetrieval, SuperResolution, gaussian_kernel, motion_kernel)
from .registry import Problem, get_solver, list_solvers, register_solver
from .solve import SolveInfo, solve

__all__ = [
    "CT", "MRI", "Blur", "DeepInvPhysics", "Denoising", "GaussianNoise", "Inpainting", "MatrixOperator", "Operator",
    "PhaseRetrieval", "PoissonNoise", "Problem", "SolveInfo", "SuperResolution", "conjugate_gradient",
    "gaussian_kernel", "get_solver", "list_solvers", "measure", "motion_kernel", "psnr", "register_solver", "solve",
    "ssim",
]
