"""imgscan detectors: models only (no Ray, no storage code).

Every detector follows the contract of ``detectors.base``; ``DETECTORS`` maps a
detector's name to its class, in the order a bundle trains them (the mixture
reuses the autoencoder's encoder).

Attributes are imported lazily (PEP 562) so that ``imgscan --help`` and flag
errors answer without first importing TensorFlow.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: detector names in training order (the classes are in ``DETECTORS``)
DETECTOR_NAMES = ("autoencoder", "mixture", "cam", "ocsvm", "whitening")

_LAZY = {
    "AutoencoderDetector": "detectors.autoencoder",
    "build_autoencoder": "detectors.autoencoder",
    "BaseDetector": "detectors.base",
    "NotFittedError": "detectors.base",
    "ScoreColumn": "detectors.base",
    "OcsvmDetector": "detectors.baseline",
    "CamDetector": "detectors.cam",
    "build_cam_classifier": "detectors.cam",
    "MixtureDetector": "detectors.mixture",
    "WhiteningDetector": "detectors.whitening",
}

if TYPE_CHECKING:
    from detectors.autoencoder import AutoencoderDetector, build_autoencoder
    from detectors.base import BaseDetector, NotFittedError, ScoreColumn
    from detectors.baseline import OcsvmDetector
    from detectors.cam import CamDetector, build_cam_classifier
    from detectors.mixture import MixtureDetector
    from detectors.whitening import WhiteningDetector

    DETECTORS: dict[str, type[BaseDetector]]


def __getattr__(name: str) -> Any:
    if name == "DETECTORS":
        classes = {
            "autoencoder": __getattr__("AutoencoderDetector"),
            "mixture": __getattr__("MixtureDetector"),
            "cam": __getattr__("CamDetector"),
            "ocsvm": __getattr__("OcsvmDetector"),
            "whitening": __getattr__("WhiteningDetector"),
        }
        assert tuple(classes) == DETECTOR_NAMES
        globals()["DETECTORS"] = classes
        return classes
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'detectors' has no attribute {name!r}")


__all__ = [
    "DETECTORS",
    "DETECTOR_NAMES",
    "AutoencoderDetector",
    "BaseDetector",
    "CamDetector",
    "MixtureDetector",
    "NotFittedError",
    "OcsvmDetector",
    "ScoreColumn",
    "WhiteningDetector",
    "build_autoencoder",
    "build_cam_classifier",
]
