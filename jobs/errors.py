"""The exceptions that mean "the input is wrong", reported as one line."""

from __future__ import annotations

from detectors.base import NotFittedError
from jobs.bundle import BundleError
from jobs.sources import SourceError
from jobs.storage import StorageError

USER_ERRORS: tuple[type[BaseException], ...] = (
    SourceError,
    BundleError,
    StorageError,
    NotFittedError,
    ValueError,
    FileNotFoundError,
    PermissionError,
)
