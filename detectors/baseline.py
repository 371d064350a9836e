"""Classical baseline: HOG features + scikit-learn OneClassSVM."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from skimage.feature import hog
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from detectors.base import BaseDetector, ScoreColumn, sklearn_from_bytes, sklearn_to_bytes, split_validation
from detectors.columns import COLUMNS
from detectors.preprocessing import ImageBatch, check_image_size, check_non_empty, to_uint8_batch


def hog_features(xb: np.ndarray, *, pixels_per_cell: int, orientations: int = 9) -> np.ndarray:
    """uint8 (n, s, s, 1) -> float64 (n, d) HOG descriptors."""
    return (
        np.stack(
            [
                hog(
                    img[:, :, 0],
                    orientations=orientations,
                    pixels_per_cell=(pixels_per_cell,) * 2,
                    cells_per_block=(2, 2),
                    feature_vector=True,
                )
                for img in xb
            ]
        )
        if len(xb)
        else np.zeros((0, 0))
    )


class OcsvmDetector(BaseDetector):
    """``ocsvm_score``: OneClassSVM ``score_samples`` on HOG features (low = anomalous)."""

    name: ClassVar[str] = "ocsvm"
    _fitted_attr: ClassVar[str] = "pipeline_"
    columns: ClassVar[tuple[ScoreColumn, ...]] = COLUMNS["ocsvm"]

    def __init__(
        self,
        *,
        input_size: int = 32,
        pixels_per_cell: int = 4,
        orientations: int = 9,
        nu: float = 0.1,
        gamma: str | float = "scale",
        validation_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.input_size = input_size
        self.pixels_per_cell = pixels_per_cell
        self.orientations = orientations
        self.nu = nu
        self.gamma = gamma
        self.validation_fraction = validation_fraction
        self.seed = seed

    def fit(self, images: ImageBatch, labels: Sequence[Any] | None = None, **_: Any) -> OcsvmDetector:
        check_non_empty(images)
        check_image_size(self.input_size, multiple_of=self.pixels_per_cell)
        xb = to_uint8_batch(images, self.input_size, 1)
        self.pipeline_: Pipeline = make_pipeline(StandardScaler(), OneClassSVM(nu=self.nu, gamma=self.gamma))
        # Calibrate on held-out images, like every detector: a OneClassSVM scores its own
        # training images higher than new normal ones, and that bias would read as drift
        # (and as a wrong calibrated threshold) on every normal night.
        train_idx, val_idx = split_validation(len(xb), self.validation_fraction, self.seed)
        self.pipeline_.fit(self._features(xb[train_idx]))
        self._record_training(xb, self.score(xb[val_idx] if len(val_idx) else xb[train_idx]))
        return self

    def _features(self, xb: np.ndarray) -> np.ndarray:
        return hog_features(xb, pixels_per_cell=self.pixels_per_cell, orientations=self.orientations)

    def score(self, images: ImageBatch) -> dict[str, np.ndarray]:
        self._check_fitted()
        xb = to_uint8_batch(images, self.input_size, 1)
        if len(xb) == 0:
            return {"ocsvm_score": np.zeros(0)}
        return {"ocsvm_score": self.pipeline_.score_samples(self._features(xb))}

    def to_files(self) -> dict[str, bytes]:
        self._check_fitted()
        return {"model.skops": sklearn_to_bytes(self.pipeline_), "meta.json": json.dumps(self.metadata()).encode()}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> OcsvmDetector:
        meta = cls._read_metadata(files, cls.name)
        det = cls(**meta["params"])
        det.pipeline_ = sklearn_from_bytes(files["model.skops"])
        det._restore_metadata(meta)
        return det
