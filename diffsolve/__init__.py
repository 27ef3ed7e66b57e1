"""diffsolve: fast samplers for pretrained diffusion models and diffusion-based inverse-problem solvers."""

from . import schedules
from .api import Inversion, SampleInfo, invert, sample
from .core import BudgetExceededError
from .inverse import solve
from .loading import load_model
from .model import DiffusionModel, Prediction, TextConditioning
from .pipelines import FixedClassUNet, TextToImageModel
from .registry import get_sampler, list_samplers, register_sampler

__all__ = [
    "BudgetExceededError", "DiffsolveScheduler", "DiffusionModel", "FixedClassUNet", "Inversion", "Prediction",
    "SampleInfo", "TextConditioning", "TextToImageModel", "get_sampler", "invert", "list_samplers", "load_model",
    "register_sampler", "sample", "schedules", "solve",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "DiffsolveScheduler":  # imported on first use: it pulls in diffusers' scheduler base classes
        from .scheduler_adapter import DiffsolveScheduler

        return DiffsolveScheduler
    raise AttributeError(f"module 'diffsolve' has no attribute {name!r}")
