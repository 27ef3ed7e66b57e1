"""FID/KID evaluation of samplers: feature extractors, reference statistics, sharded and resumable
generation (also across a torchrun group), and NFE sweeps.

    from diffsolve.fid import frechet_distance, kid, Statistics, get_extractor, ModelSource, evaluate

See :mod:`diffsolve.fid.features` (Inception-v3 and FID-digits extractors), :mod:`diffsolve.fid.stats`
(Fréchet distance, KID, statistics files), :mod:`diffsolve.fid.run` (shards, resume, torchrun) and
:mod:`diffsolve.fid.sweep`; the command lines are ``diffsolve fid``, ``diffsolve fid-ref`` and
``diffsolve sweep`` (``python -m diffsolve.fid`` under torchrun).
"""

from .features import (FEATURES, INCEPTION_ENV, DigitsFeatures, FeatureExtractor, InceptionFeatures, get_extractor,
                       to_uint8)
from .run import (FIDResult, FolderSource, Incomplete, ModelSource, data_images, evaluate, init_distributed,
                  reference_statistics)
from .stats import Statistics, frechet_distance, kid, mean_and_covariance

__all__ = [
    "FEATURES", "FIDResult", "FeatureExtractor", "DigitsFeatures", "FolderSource", "INCEPTION_ENV", "Incomplete",
    "InceptionFeatures", "ModelSource", "Statistics", "data_images", "evaluate", "frechet_distance",
    "get_extractor", "init_distributed", "kid", "mean_and_covariance", "reference_statistics", "to_uint8",
]
