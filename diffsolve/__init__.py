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
