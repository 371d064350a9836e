"""The contract every detector keeps, and what they share.

A detector is an estimator in the scikit-learn sense:

* ``__init__`` stores keyword-only hyper-parameters unchanged;
* ``fit(images, labels=None)`` validates and learns (learned state ends in ``_``);
* ``score(images)`` returns named per-image columns (``dict[str, np.ndarray]``),
  each declared in the class attribute ``columns`` with its dtype and the side
  that is anomalous;
* ``anomaly_columns_`` (set by ``fit``) names the columns that mean something
  for the model it trained: what ``detectors.fusion`` combines into
  ``anomaly_score``, and what the reducer and the report show per score;
* ``to_files()`` / ``from_files(files)`` turn a fitted detector into named byte
  blobs and back, in formats that load without executing code (``.keras`` in
  safe mode, skops, JSON). Where the blobs are stored is the job layer's
  business: detectors hold no storage code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

#: 2: meta.json declares ``anomaly_columns`` (what ``detectors.fusion`` combines)
FORMAT_VERSION = 2
CALIBRATION_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
#: most calibration scores kept as a sample (more are summarised by this many evenly spaced
#: quantiles): what a night's scores are compared with (two-sample drift statistics), and
#: what a score's tail probability is read from
CALIBRATION_SAMPLE = 1000

Direction = Literal["high", "low"]


@dataclass(frozen=True)
class ScoreColumn:
    """One output column of a detector.

    ``dtype`` is an Arrow type name understood by ``jobs.schema``:
    ``float32``, ``float64``, ``string`` or ``list<float32>``.
    ``direction`` says which side is anomalous (``None`` for non-scores).
    """

    name: str
    dtype: str
    direction: Direction | None
    description: str


class NotFittedError(ValueError, AttributeError):
    """Raised when a detector is used before ``fit``."""


class BaseDetector:
    """Shared plumbing: parameters, metadata, calibration, Keras (de)serialisation."""

    name: ClassVar[str]
    columns: ClassVar[tuple[ScoreColumn, ...]]
    # The learned attribute whose presence means "fitted".
    _fitted_attr: ClassVar[str] = "model_"

    # Filled by fit().
    fingerprint_: str
    n_train_: int
    calibration_: dict[str, dict[str, Any]]
    #: the columns that mean something for the fitted model (None: restored from an older artifact)
    anomaly_columns_: tuple[str, ...] | None

    # -- parameters (sklearn's get_params without the dependency on BaseEstimator)
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_attr):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet. Call fit(images) first.")

    # -- the contract (implemented by every detector)
    def score(self, images: Any) -> dict[str, Any]:
        """uint8 images (any size) -> one array per column of ``columns``, length n."""
        raise NotImplementedError

    def to_files(self) -> dict[str, bytes]:
        """The fitted detector as named blobs (``meta.json`` among them)."""
        raise NotImplementedError

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> BaseDetector:
        raise NotImplementedError

    @property
    def score_columns(self) -> dict[str, ScoreColumn]:
        return {c.name: c for c in self.columns}

    def _anomaly_columns(self) -> tuple[str, ...]:
        """The columns that mean something for the fitted model; detectors whose
        configuration decides it (a VAE's KL, a CAM's anomaly class) override this."""
        return tuple(c.name for c in self.columns if c.direction is not None)

    # -- metadata
    def _record_training(
        self, images: np.ndarray, calibration_scores: Mapping[str, np.ndarray], labels: Sequence[Any] | None = None
    ) -> None:
        """Fingerprint the training data; keep statistics of the scores of held-out
        normal images (the training images themselves when too few are held out)."""
        self.fingerprint_ = fingerprint(images, labels)
        self.n_train_ = len(images)
        self.calibrate(calibration_scores)

    def calibrate(self, scores: Mapping[str, np.ndarray]) -> None:
        """Keep statistics of ``scores`` (column -> float (n,)) of normal images the model
        did not train on as its calibration (on small training sets ``jobs.train`` pools
        the held-out scores of replicas trained with other seeds); declare the anomaly columns."""
        stats = {
            c.name: calibration_stats(np.asarray(scores[c.name], dtype=np.float64))
            for c in self.columns
            if c.direction is not None and c.name in scores
        }
        # a column this configuration does not produce (all NaN: ae_kl without a VAE) has no calibration
        self.calibration_ = {name: s for name, s in stats.items() if s["n"] > 0}
        declared = self._anomaly_columns()
        uncalibrated = [c for c in declared if c not in self.calibration_]
        if uncalibrated:
            raise ValueError(
                f"{type(self).__name__}: its anomaly columns {uncalibrated} got no finite score on the "
                f"{len(next(iter(scores.values()), []))} calibration images; cannot calibrate them."
            )
        self.anomaly_columns_ = declared

    def metadata(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "detector": self.name,
            "format_version": FORMAT_VERSION,
            "params": _jsonable(self.get_params()),
            "fingerprint": self.fingerprint_,
            "n_train": self.n_train_,
            "calibration": self.calibration_,
            "anomaly_columns": list(self.anomaly_columns_ or ()),
            "columns": [{"name": c.name, "dtype": c.dtype, "direction": c.direction} for c in self.columns],
        }

    @staticmethod
    def _read_metadata(files: Mapping[str, bytes], expected: str) -> dict[str, Any]:
        if "meta.json" not in files:
            raise ValueError(
                f"Expected a 'meta.json' among the artifact files of a {expected!r} detector. "
                f"Received: {sorted(files)}."
            )
        meta: dict[str, Any] = json.loads(files["meta.json"])
        if meta.get("detector") != expected:
            raise ValueError(f"Expected an artifact of detector {expected!r}. Received: {meta.get('detector')!r}.")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"This artifact has format {meta['format_version']}, newer than this imgscan "
                f"understands ({FORMAT_VERSION}). Upgrade imgscan."
            )
        return meta

    def _restore_metadata(self, meta: Mapping[str, Any]) -> None:
        self.fingerprint_ = meta["fingerprint"]
        self.n_train_ = int(meta["n_train"])
        self.calibration_ = dict(meta["calibration"])
        declared = meta.get("anomaly_columns")
        self.anomaly_columns_ = None if declared is None else tuple(str(c) for c in declared)


def fingerprint(images: np.ndarray | Sequence[np.ndarray], labels: Sequence[Any] | None = None) -> str:
    """sha256 over the pixels (and labels) of a training set, order-sensitive."""
    h = hashlib.sha256()
    for img in images:
        arr = np.ascontiguousarray(img)
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    if labels is not None:
        h.update(json.dumps([str(x) for x in labels]).encode())
    return h.hexdigest()


def calibration_stats(scores: np.ndarray) -> dict[str, Any]:
    """Mean, std and quantiles of scores of normal images (NaNs ignored)."""
    s = scores[np.isfinite(scores)]
    if s.size == 0:
        return {"n": 0}
    qs = np.quantile(s, CALIBRATION_QUANTILES)
    # sorted; at most CALIBRATION_SAMPLE values, so its empirical CDF is within 1/CALIBRATION_SAMPLE of the full one
    sample = np.sort(s) if s.size <= CALIBRATION_SAMPLE else np.quantile(s, np.linspace(0, 1, CALIBRATION_SAMPLE))
    return {
        "n": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std(ddof=1)) if s.size > 1 else 0.0,
        "min": float(s.min()),
        "max": float(s.max()),
        "quantiles": {str(q): float(v) for q, v in zip(CALIBRATION_QUANTILES, qs, strict=True)},
        "sample": [float(v) for v in sample],
    }


def split_validation(n: int, fraction: float, seed: int, *, minimum_train: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation index split; validation is empty for tiny sets."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = round(n * fraction)
    if n - n_val < minimum_train or n_val < 2:
        return order, order[:0]
    return order[n_val:], order[:n_val]


def keras_to_bytes(model: Any) -> bytes:
    """A Keras model as the bytes of a ``.keras`` file (public API: via a temp file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def keras_from_bytes(data: bytes) -> Any:
    """Load ``.keras`` bytes with ``safe_mode=True`` (no code is executed)."""
    import keras

    from detectors import layers  # noqa: F401  (registers the custom layers)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as f:
            f.write(data)
        return keras.saving.load_model(path, compile=False, safe_mode=True)


def sklearn_to_bytes(obj: Any) -> bytes:
    import skops.io as sio

    return bytes(sio.dumps(obj))


def sklearn_from_bytes(data: bytes, allowed: Sequence[str] = ()) -> Any:
    """Load a skops dump; only the types skops trusts plus ``allowed`` may appear."""
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=data)
    unexpected = sorted(set(untrusted) - set(allowed))
    if unexpected:
        raise ValueError(
            f"Refusing to load a model that contains unexpected types: {unexpected}. "
            "The artifact may be corrupt or not written by imgscan."
        )
    return sio.loads(data, trusted=list(untrusted))


def seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def predict_in_batches(fn: Any, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Call a Keras model on fixed-size slices (no ``model.predict``: it leaks in
    long-lived actors). Returns the outputs of each call as numpy, concatenated."""
    outs: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch_size):
        res = fn(x[start : start + batch_size], training=False)
        if not isinstance(res, list | tuple):
            res = [res]
        outs.append([np.asarray(r) for r in res])
    if not outs:
        return []
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]
