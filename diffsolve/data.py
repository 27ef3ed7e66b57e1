"""scikit-learn's bundled digits, prepared the way the shipped ``digits16`` model was trained.

The 8×8 images (values 0–16) are upsampled to 16×16 bilinearly and scaled to [−1, 1]. A fixed, seeded,
class-stratified split keeps 300 images out of training: the tests and the FID reference use them as
"real held-out digits".
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT = 300
_SPLIT_SEED = 0


def _split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=HELD_OUT, random_state=_SPLIT_SEED, stratify=labels)
    return np.sort(train), np.sort(test)


def digits(split: str = "train", size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images float32 of shape (N, 1, size, size) in [−1, 1], labels int64.

    ``split`` is ``"train"``, ``"test"`` (the 300 held-out images) or ``"all"``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split != "all":
        train, test = _split_indices(bunch.target)
        keep = torch.from_numpy(train if split == "train" else test)
        images, labels = images[keep], labels[keep]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 2 - 1).clamp(-1, 1), labels


@lru_cache(maxsize=None)
def digits_classifier():
    """A scikit-learn logistic-regression classifier of the 16×16 digits (fitted on the training split;
    97 % accuracy and well calibrated on the held-out split). ``predict_proba`` takes images flattened to
    (N, 256) in [−1, 1]; :func:`classify` wraps that for tensors."""
    from sklearn.linear_model import LogisticRegression

    images, labels = digits("train")
    return LogisticRegression(C=1.0, max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())


def classify(images: torch.Tensor) -> torch.Tensor:
    """Class probabilities (N, 10) of 1×16×16 images in [−1, 1] under :func:`digits_classifier`."""
    probs = digits_classifier().predict_proba(images.detach().float().cpu().clamp(-1, 1).flatten(1).numpy())
    return torch.from_numpy(probs)
