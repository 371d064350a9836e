"""The exceptions that mean "the input is wrong", reported as one line.

Kept free of heavy imports (no TensorFlow) so the command line answers fast;
every domain error below subclasses ValueError or OSError.
"""

from __future__ import annotations

# SourceError, BundleError, NotFittedError and the detectors' argument errors are
# ValueErrors; StorageError is an OSError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
