"""A model bundle: the fitted detectors of one training run, stored under one URI.

Layout under MODEL_URI::

    bundle.json              version, input size, channels, detectors, training facts
    <detector>/meta.json     params, fingerprint, calibration statistics, history
    <detector>/*.keras|*.skops
    training/                curves.json, curves.png, reconstructions.png, skipped.json

``bundle.json`` is written last: a bundle without it is incomplete and refused.
The version is a hash of the detector files, so two bundles with the same
version give the same scores.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.columns import ANOMALY_SCORE
from detectors.preprocessing import ImageBatch
from jobs.storage import StorageError, StorageOptions, join, read_bytes, read_json, write_bytes, write_json

if TYPE_CHECKING:  # the detectors import TensorFlow: only load() needs them
    from detectors import BaseDetector

BUNDLE_FORMAT = 1


class BundleError(ValueError):
    """A model bundle is missing, incomplete or not readable."""


@dataclass
class ModelBundle:
    detectors: dict[str, BaseDetector]
    input_size: int
    channels: int
    training: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    created_at: str = ""

    def score(self, images: ImageBatch) -> dict[str, Any]:
        """Every detector's columns for a batch of uint8 images (any size), and the
        fused ``anomaly_score`` of their declared anomaly columns (``detectors.fusion``)."""
        from detectors.fusion import anomaly_score

        out: dict[str, Any] = {}
        for det in self.detectors.values():
            out.update(det.score(images))
        out[ANOMALY_SCORE.name] = anomaly_score(self.detectors.values(), out)
        return out

    @property
    def calibration(self) -> dict[str, dict[str, Any]]:
        """score column -> statistics of held-out normal training scores (and, for
        ``anomaly_score``, its distribution on normal images by construction)."""
        from detectors.fusion import null_calibration

        out: dict[str, dict[str, Any]] = {}
        for det in self.detectors.values():
            out.update(det.calibration_)
        out[ANOMALY_SCORE.name] = null_calibration()
        return out

    def files(self) -> dict[str, bytes]:
        return {
            f"{name}/{fname}": data for name, det in self.detectors.items() for fname, data in det.to_files().items()
        }

    def save(self, uri: str, storage_options: StorageOptions | None = None) -> str:
        files = self.files()
        self.version = bundle_version({path: hashlib.sha256(data).digest() for path, data in files.items()})
        self.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for path, data in files.items():
            write_bytes(join(uri, path), data, storage_options)
        write_json(join(uri, "bundle.json"), self.manifest(files), storage_options)
        return self.version

    def manifest(self, files: Mapping[str, bytes]) -> dict[str, Any]:
        """bundle.json for the detector ``files`` just written (``files()``: Keras
        serialises through a temp file, so it is done once per save)."""
        listing: dict[str, list[str]] = {name: [] for name in self.detectors}
        for path in sorted(files):
            name, _, fname = path.partition("/")
            listing[name].append(fname)
        return {
            "format": BUNDLE_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "input_size": self.input_size,
            "channels": self.channels,
            "detectors": listing,
            "training": self.training,
        }

    @classmethod
    def load(cls, uri: str, storage_options: StorageOptions | None = None) -> ModelBundle:
        from detectors import DETECTORS

        manifest = read_manifest(uri, storage_options)
        blobs: dict[str, dict[str, bytes]] = {}
        for name, fnames in manifest["detectors"].items():
            if name not in DETECTORS:
                raise BundleError(f"Model bundle {uri} has unknown detector {name!r}; known: {list(DETECTORS)}.")
            try:
                blobs[name] = {f: read_bytes(join(uri, name, f), storage_options) for f in fnames}
                for fname, data in blobs[name].items():
                    _check_kind(fname, data)
            except (StorageError, ValueError) as e:
                raise BundleError(f"Model bundle {uri}: detector {name!r} cannot be loaded: {e}") from e
        # the hash before any deserialising: files changed after the driver's check_bundle
        # (or never checked) are refused here, in the actor, too
        _check_version(
            uri, manifest, {f"{n}/{f}": hashlib.sha256(d).digest() for n, fs in blobs.items() for f, d in fs.items()}
        )
        detectors: dict[str, BaseDetector] = {}
        for name, files in blobs.items():
            try:
                detectors[name] = DETECTORS[name].from_files(files)
            except (ValueError, KeyError) as e:
                raise BundleError(f"Model bundle {uri}: detector {name!r} cannot be loaded: {e}") from e
        return cls(
            detectors=detectors,
            input_size=int(manifest["input_size"]),
            channels=int(manifest["channels"]),
            training=dict(manifest.get("training", {})),
            version=str(manifest["version"]),
            created_at=str(manifest.get("created_at", "")),
        )


def read_manifest(uri: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """bundle.json of a bundle, checked; cheap (use before starting cluster work)."""
    try:
        manifest: dict[str, Any] = read_json(join(uri, "bundle.json"), storage_options)
    except StorageError as e:
        raise BundleError(
            f"No model bundle at {uri} (bundle.json missing or unreadable). Train one with "
            f"'imgscan train --source SRC --out {uri}'."
        ) from e
    except ValueError as e:
        raise BundleError(f"Model bundle {uri}: bundle.json is not valid JSON: {e}") from e
    if not isinstance(manifest, Mapping) or "detectors" not in manifest or "version" not in manifest:
        raise BundleError(f"Model bundle {uri}: bundle.json lacks 'detectors'/'version'.")
    if int(manifest.get("format", 0)) > BUNDLE_FORMAT:
        raise BundleError(f"Model bundle {uri} has format {manifest['format']}; upgrade imgscan to read it.")
    return dict(manifest)


def bundle_version(digests: Mapping[str, bytes]) -> str:
    """The version of a bundle: a hash of its detector files' paths and sha256 digests."""
    digest = hashlib.sha256()
    for path in sorted(digests):
        digest.update(path.encode())
        digest.update(digests[path])
    return digest.hexdigest()[:16]


def check_bundle(uri: str, storage_options: StorageOptions | None = None) -> dict[str, Any]:
    """Check a whole bundle without building its models (no TensorFlow: for the driver).

    ``bundle.json`` is read and checked; every file it lists must exist and parse:
    ``meta.json`` names its detector in a format this imgscan reads, a ``.keras`` file
    is an intact zip (CRCs checked) with a weights file and a ``config.json`` that names
    only Keras' own classes and imgscan's registered layers (no ``Lambda``: safe mode
    refuses it), a ``.skops`` file loads with the trusted types ``ModelBundle.load``
    allows. Last, the files' hash must equal the bundle's version. Returns the manifest;
    raises ``BundleError`` with a one-line reason naming the detector and the file.
    """
    from detectors import DETECTOR_NAMES  # names only: importing the classes would load TensorFlow

    manifest = read_manifest(uri, storage_options)
    digests: dict[str, bytes] = {}
    for name, fnames in manifest["detectors"].items():
        if name not in DETECTOR_NAMES:
            raise BundleError(f"Model bundle {uri} has unknown detector {name!r}; known: {list(DETECTOR_NAMES)}.")
        if "meta.json" not in fnames:
            raise BundleError(f"Model bundle {uri}: detector {name!r} cannot be loaded: it lists no meta.json.")
        for fname in fnames:
            try:
                data = read_bytes(join(uri, name, fname), storage_options)
            except StorageError as e:
                raise BundleError(f"Model bundle {uri}: detector {name!r} cannot be loaded: {e}") from e
            try:
                _check_file(name, fname, data)
            except Exception as e:  # any parser's error on a damaged file: one line, not a traceback
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise BundleError(f"Model bundle {uri}: detector {name!r} cannot be loaded: {fname}: {reason}") from e
            digests[f"{name}/{fname}"] = hashlib.sha256(data).digest()
    _check_version(uri, manifest, digests)
    return manifest


def _check_version(uri: str, manifest: Mapping[str, Any], digests: Mapping[str, bytes]) -> None:
    """The files' hash (``bundle_version``) must be the version bundle.json names."""
    if bundle_version(digests) != manifest["version"]:
        raise BundleError(
            f"Model bundle {uri}: its files do not match version {manifest['version']} of bundle.json "
            "(a file was changed after training); restore the bundle or train a new one."
        )


#: the only kinds of file a bundle holds: each loads without running code
SAFE_SUFFIXES = (".keras", ".skops", ".npy", ".json")
#: the first bytes of a pickle (protocol 2 and up: 0x80, protocol number)
PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))


def _check_kind(fname: str, data: bytes) -> None:
    """Refuse a file that is not one of the safe kinds, and anything that is a pickle
    (loading a pickle runs code chosen by whoever wrote it)."""
    low = fname.lower()
    if low.endswith((".pkl", ".pickle", ".joblib", ".pt", ".pth", ".dill")) or data[:2] in PICKLE_MAGIC:
        raise ValueError(f"{fname} is a pickle: loading it would run code, so bundles hold none")
    if not low.endswith(SAFE_SUFFIXES):
        raise ValueError(f"{fname} is not a kind of file a bundle holds (only {', '.join(SAFE_SUFFIXES)})")


#: the weights file a ``.keras`` archive holds (Keras 3 saving format)
KERAS_WEIGHTS = "model.weights.h5"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_file(detector: str, fname: str, data: bytes) -> None:
    """Raise (any exception) when one bundle file cannot be what its name says."""
    _check_kind(fname, data)
    if fname == "meta.json":
        from detectors.base import BaseDetector  # numpy + json only

        meta = BaseDetector._read_metadata({"meta.json": data}, detector)
        if "anomaly_columns" not in meta:
            raise ValueError(
                "trained by an imgscan that did not declare which scores mean something (no 'anomaly_columns'), "
                "which anomaly_score needs; retrain the bundle with 'imgscan train'"
            )
    elif fname.endswith(".keras"):
        _check_keras(data)
    elif fname.endswith(".skops"):
        from detectors.base import sklearn_from_bytes  # scikit-learn + skops only

        sklearn_from_bytes(data)
    elif fname.endswith(".npy"):
        np.load(io.BytesIO(data), allow_pickle=False)  # an object array (a pickle inside) is refused
    elif fname.endswith(".json"):
        json.loads(data)


def _check_keras(data: bytes) -> None:
    """A ``.keras`` file without Keras: zip intact, weights present, config only of known classes."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        broken = zf.testzip()
        if broken is not None:
            raise ValueError(f"member {broken} is damaged (CRC mismatch)")
        names = set(zf.namelist())
        if "config.json" not in names or KERAS_WEIGHTS not in names:
            raise ValueError(
                f"not a Keras 3 model file: expected config.json and {KERAS_WEIGHTS}, found {sorted(names)}"
            )
        if zf.read(KERAS_WEIGHTS)[: len(HDF5_SIGNATURE)] != HDF5_SIGNATURE:
            raise ValueError(f"{KERAS_WEIGHTS} is not an HDF5 file")
        config = json.loads(zf.read("config.json"))
    for obj in _keras_objects(config):
        cls, module, registered = obj.get("class_name"), obj.get("module"), obj.get("registered_name")
        if cls == "Lambda":
            raise ValueError("a Lambda layer holds code: Keras refuses it in safe mode")
        own = isinstance(module, str) and (module == "keras" or module.startswith("keras."))
        ours = isinstance(registered, str) and registered.startswith("imgscan>")
        if module is not None and not (own or ours):
            raise ValueError(f"class {cls!r} of module {module!r} is neither Keras' nor imgscan's")


def _keras_objects(config: Any) -> Iterator[dict[str, Any]]:
    """Every serialised object (a dict with ``class_name``) in a Keras config, depth first."""
    if isinstance(config, dict):
        if "class_name" in config:
            yield config
        for value in config.values():
            yield from _keras_objects(value)
    elif isinstance(config, list):
        for value in config:
            yield from _keras_objects(value)
