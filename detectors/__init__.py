"""imgscan detectors: models only (no Ray, no storage code).

Every detector follows the contract of ``detectors.base``; ``DETECTORS`` maps a
detector's name to its class, in the order a bundle trains them (the mixture
reuses the autoencoder's encoder).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from detectors.autoencoder import AutoencoderDetector, build_autoencoder
from detectors.base import BaseDetector, NotFittedError, ScoreColumn
from detectors.baseline import OcsvmDetector
from detectors.cam import CamDetector, build_cam_classifier
from detectors.mixture import MixtureDetector

DETECTORS: dict[str, type[BaseDetector]] = {
    "autoencoder": AutoencoderDetector,
    "mixture": MixtureDetector,
    "cam": CamDetector,
    "ocsvm": OcsvmDetector,
}

__all__ = [
    "DETECTORS",
    "AutoencoderDetector",
    "BaseDetector",
    "CamDetector",
    "MixtureDetector",
    "NotFittedError",
    "OcsvmDetector",
    "ScoreColumn",
    "build_autoencoder",
    "build_cam_classifier",
]
