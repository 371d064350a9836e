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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
        """Every detector's columns for a batch of uint8 images (any size)."""
        out: dict[str, Any] = {}
        for det in self.detectors.values():
            out.update(det.score(images))
        return out

    @property
    def calibration(self) -> dict[str, dict[str, Any]]:
        """score column -> statistics of held-out normal training scores."""
        out: dict[str, dict[str, Any]] = {}
        for det in self.detectors.values():
            out.update(det.calibration_)
        return out

    def files(self) -> dict[str, bytes]:
        return {
            f"{name}/{fname}": data for name, det in self.detectors.items() for fname, data in det.to_files().items()
        }

    def save(self, uri: str, storage_options: StorageOptions | None = None) -> str:
        files = self.files()
        digest = hashlib.sha256()
        for path in sorted(files):
            digest.update(path.encode())
            digest.update(hashlib.sha256(files[path]).digest())
        self.version = digest.hexdigest()[:16]
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
        detectors: dict[str, BaseDetector] = {}
        for name, fnames in manifest["detectors"].items():
            if name not in DETECTORS:
                raise BundleError(f"Model bundle {uri} has unknown detector {name!r}; known: {list(DETECTORS)}.")
            try:
                files = {f: read_bytes(join(uri, name, f), storage_options) for f in fnames}
                detectors[name] = DETECTORS[name].from_files(files)
            except (StorageError, ValueError, KeyError) as e:
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
