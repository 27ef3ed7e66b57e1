"""Feature extractors for FID/KID, behind one interface.

An extractor maps a batch of 8-bit images — a ``uint8`` tensor (B, C, H, W), as they would be saved to PNG —
to a float32 feature matrix (B, dim). Every extractor has an ``id`` naming its network and a digest of its
weights, so that statistics made with one are never compared with features of another.

* :class:`DigitsFeatures` ("FID-digits"): the 64-d penultimate layer of a small CNN classifier of
  scikit-learn's digits (1×16×16), shipped in the package (``diffsolve/models/digits_features.safetensors``,
  trained by ``examples/train_digits_features.py``). Works offline, on the CPU, in milliseconds.
* :class:`InceptionFeatures`: the standard FID features — the 2048-d pool3 layer of the TensorFlow
  Inception-v3 ("2015-12-05") with its TF1-compatible bilinear resize to 299×299 — computed by
  torch-fidelity's ``FeatureExtractorInceptionV3`` (``pip install 'diffsolve[inception]'``, or
  ``pip install --no-deps torch-fidelity`` where torchvision is unavailable: only its Inception module is
  used, which needs torch alone). The weights are read from a local file (``--inception-weights`` or the
  environment variable ``DIFFSOLVE_INCEPTION_WEIGHTS``); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

INCEPTION_ENV = "DIFFSOLVE_INCEPTION_WEIGHTS"
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release 'fid_weights')",
                   "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's release v0.2.0)")
DIGITS_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "digits_features.safetensors"
FEATURES = ("digits", "inception")


def file_digest(path: str | Path, length: int = 16) -> str:
    """The first ``length`` hex digits of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class FeatureExtractor:
    """The interface: ``extractor(images_uint8) -> (B, dim) float32`` on the CPU.

    Attributes: ``name`` ("digits" or "inception"), ``id`` (name, version and weights digest: two extractors
    with the same id give the same features), ``dim``, ``device``.
    """

    name: str = ""
    id: str = ""
    dim: int = 0
    device: torch.device = torch.device("cpu")

    def check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{self.name} features: expected a uint8 tensor (batch, channels, height, width), got {got}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} features: expected 1 (grey) or 3 (RGB) channels, got {images.shape[1]}")

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        self.check_images(images)
        return self.features(images.to(self.device)).float().cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, dim={self.dim})"


# ---- FID-digits ------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """A small classifier of 1×16×16 digits in [−1, 1]; ``features`` is its 64-d penultimate layer."""

    ARCH = "digits-cnn-v1"
    FEATURE_DIM = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 4 * 4, self.FEATURE_DIM)
        self.head = nn.Linear(self.FEATURE_DIM, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsFeatures(FeatureExtractor):
    """FID-digits: the 64-d features of the shipped digits CNN, for 16×16 grey images (RGB is averaged)."""

    name = "digits"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device | None = None):
        from safetensors.torch import load_file

        path = Path(weights) if weights is not None else DIGITS_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"the digits feature network is missing at {path}: train it with "
                                    "examples/train_digits_features.py")
        self.device = torch.device(device or "cpu")
        self.net = DigitsCNN()
        self.net.load_state_dict(load_file(str(path)))
        self.net = self.net.eval().requires_grad_(False).to(self.device)
        self.dim = DigitsCNN.FEATURE_DIM
        self.id = f"digits:{DigitsCNN.ARCH}:{file_digest(path)}"

    def check_images(self, images: Tensor) -> None:
        super().check_images(images)
        if tuple(images.shape[2:]) != (16, 16):
            raise ValueError(f"digits features: expected 16×16 images (like digits16's samples), got "
                             f"{images.shape[2]}×{images.shape[3]}; use --features inception for other images")

    def features(self, images: Tensor) -> Tensor:
        x = images.float().mean(1, keepdim=True) / 127.5 - 1.0
        return self.net.features(x)

    def logits(self, images: Tensor) -> Tensor:
        """Class scores (B, 10) of uint8 images: the classifier the features come from."""
        self.check_images(images)
        with torch.no_grad():
            return self.net.head(self.features(images.to(self.device))).float().cpu()


# ---- Inception-v3 (torch-fidelity) ---------------------------------------------------------------------
def _fidelity_inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3``. Importing ``torch_fidelity`` imports torchvision
    (for its other extractors), which may be missing or broken beside this torch build; its Inception module
    needs only torch, so it is then loaded on its own, without running the package's ``__init__``."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as err:
        if err.name == "torch_fidelity" or importlib.util.find_spec("torch_fidelity") is None:
            raise ModuleNotFoundError(
                "the Inception features need torch-fidelity: pip install 'diffsolve[inception]' (it brings "
                "torchvision and a torch to match), or keep this torch with pip install --no-deps torch-fidelity "
                "(diffsolve uses only its Inception module, which needs torch alone)", name="torch_fidelity") from err
    except (ImportError, RuntimeError, OSError):  # torchvision present but built for another torch
        pass
    module = sys.modules.get("torch_fidelity.feature_extractor_inceptionv3")
    if module is None:
        spec = importlib.util.find_spec("torch_fidelity")
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        saved = sys.modules.get("torch_fidelity")
        sys.modules["torch_fidelity"] = stub
        try:
            module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        finally:
            if saved is None:
                sys.modules.pop("torch_fidelity", None)
            else:
                sys.modules["torch_fidelity"] = saved
    return module.FeatureExtractorInceptionV3


def inception_weights_path(weights: str | Path | None) -> Path:
    """The Inception weights file from the argument or ``$DIFFSOLVE_INCEPTION_WEIGHTS``; a clear error if
    neither names an existing file."""
    source = "--inception-weights"
    if weights is None:
        weights, source = os.environ.get(INCEPTION_ENV) or None, f"${INCEPTION_ENV}"
    need = ("the Inception features need the FID Inception-v3 weights (2015-12-05, converted from TensorFlow; "
            "95.6 MB), one of the files " + " or ".join(INCEPTION_FILES) + ". diffsolve never downloads it: fetch "
            f"it on a machine with network access and pass its path with --inception-weights PATH or set {INCEPTION_ENV}")
    if weights is None:
        raise FileNotFoundError(f"no Inception weights file given. {need}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {str(path)!r} (from {source}). {need}")
    return path


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised FID Inception-v3 state dict in the format of the real weights file
    (a ``torch.save``d dict of tensors with the same keys and shapes): for tests and benchmarks offline."""
    cls = _fidelity_inception_class()

    class _Unloaded(cls):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    try:
        torch.manual_seed(seed)
        net = _Unloaded("random", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink()
    for m in net.modules():  # variance-preserving, so that random features are O(1) rather than vanishing
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


class InceptionFeatures(FeatureExtractor):
    """The standard FID features: Inception-v3 pool3 (2048-d) of torch-fidelity, weights from a local file.

    Grey images are repeated to RGB; any size is resized to 299×299 inside the network (TF1-compatible
    bilinear), as in torch-fidelity and the original TensorFlow FID.
    """

    name = "inception"
    dim = 2048

    def __init__(self, weights: str | Path | None = None, device: str | torch.device | None = None):
        path = inception_weights_path(weights)
        cls = _fidelity_inception_class()
        try:  # a state dict of tensors: refuse anything else rather than unpickle arbitrary objects
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path}: not a PyTorch state-dict file of the FID Inception-v3 ({type(err).__name__}: "
                             f"{err}); expected " + " or ".join(INCEPTION_FILES)) from err
        try:
            self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
            raise ValueError(f"{path}: does not hold the FID Inception-v3 weights ({str(err).splitlines()[0]}); "
                             "expected " + " or ".join(INCEPTION_FILES)) from err
        self.device = torch.device(device or "cpu")
        self.net = self.net.to(self.device)
        self.id = f"inception:pool3-2048:{file_digest(path)}"

    def features(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        (feats,) = self.net(images.contiguous())
        return feats


def get_extractor(name: str, *, inception_weights: str | Path | None = None, digits_weights: str | Path | None = None,
                  device: str | torch.device | None = None) -> FeatureExtractor:
    """``"digits"`` → :class:`DigitsFeatures`, ``"inception"`` → :class:`InceptionFeatures`."""
    if name == "digits":
        return DigitsFeatures(digits_weights, device=device)
    if name == "inception":
        return InceptionFeatures(inception_weights, device=device)
    raise ValueError(f"features: expected one of {list(FEATURES)}, got {name!r}")


def to_uint8(x: Tensor) -> Tensor:
    """Images in [−1, 1] (B, C, H, W) → uint8, rounded exactly as :func:`diffsolve.images.to_uint8` (what a
    PNG written by ``diffsolve sample`` holds)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
