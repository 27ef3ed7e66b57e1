"""diffsolve: fast samplers for pretrained diffusion models and diffusion-based inverse-problem solvers."""

from . import schedules
from .api import Inversion, SampleInfo, invert, sample
from .model import DiffusionModel, Prediction
from .registry import get_sampler, list_samplers, register_sampler
from .loading import load_model
from .inverse import solve

__all__ = [
    "DiffusionModel", "Inversion", "Prediction", "SampleInfo", "get_sampler", "invert", "list_samplers", "load_model",
    "register_sampler", "sample", "schedules", "solve",
]
__version__ = "0.1.0"

# Pretrained pipelines (issue 9): text-to-image latent models, and diffsolve samplers as a diffusers scheduler.
from .model import TextConditioning  # noqa: E402
from .pipelines import FixedClassUNet, TextToImageModel  # noqa: E402

__all__ += ["DiffsolveScheduler", "FixedClassUNet", "TextConditioning", "TextToImageModel"]


def __getattr__(name: str):
    if name == "DiffsolveScheduler":  # imported on first use: it pulls in diffusers' scheduler base classes
        from .scheduler_adapter import DiffsolveScheduler

        return DiffsolveScheduler
    raise AttributeError(f"module 'diffsolve' has no attribute {name!r}")
