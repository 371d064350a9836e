"""Convolutional autoencoder (optionally variational): reconstruction error.

Architecture (from the method documents): encoder blocks of Conv2D(stride 2) +
LeakyReLU(0.2) + BatchNormalization, a dense latent, a mirrored Conv2DTranspose
decoder and a sigmoid output trained with MSE.

The default BatchNorm momentum is 0.9, not Keras' 0.99: with ~100 training
images an epoch is a handful of steps, and at 0.99 the moving statistics used at
inference are still far from the batch statistics after 20 epochs, which wrecks
the scores (seen on digits: AUROC 0.26-0.87). At 0.9 they settle in ~50 steps.

The default latent grows with the image area (one unit per 32 pixels, 8 to 256):
32 px keeps the 32 that digits were tuned with, while on 64 px brick textures 32
units blur the mortar lines so much that a pasted gravel patch's error is lost
among theirs. Brick benchmark (``bench/accuracy.py --only texture``; maps scored
offline from fits with latent 32 / 64 / 128 / 256): the relative error map's
peak falls inside the patch 85% / 94% / 93.5% / 98.5% of the time, recon_error
AUROC 0.73 / 0.79 / 0.79 / 0.87. The dense layers grow with the latent: ~2M
weights at 64 px (latent 128), ~17M at 128 px (256).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import keras
import numpy as np

from detectors.base import (
    BaseDetector,
    ScoreColumn,
    keras_from_bytes,
    keras_to_bytes,
    predict_in_batches,
    seed_everything,
    split_validation,
)
from detectors.columns import COLUMNS
from detectors.layers import KLDivergence, Sampling
from detectors.maps import box_mean, peak_location, relative_error
from detectors.preprocessing import (
    ImageBatch,
    check_image_size,
    check_non_empty,
    to_float_batch,
    to_uint8_batch,
)


def build_autoencoder(
    *,
    input_size: int = 32,
    channels: int = 1,
    filters: Sequence[int] = (32, 64),
    latent_dim: int = 32,
    variational: bool = False,
    kl_weight: float = 1.0,
    bn_momentum: float = 0.9,
    seed: int = 0,
) -> keras.Model:
    """Build the (variational) convolutional autoencoder.

    Layers are named so that parts can be taken by name: ``enc_block{i}_conv``,
    ``encoder_features`` (last encoder feature map), ``latent`` (or ``z_mean``,
    ``z_log_var``, ``z``), ``dec_block{i}_deconv``, ``reconstruction``; for a VAE
    the model has a second output ``kl`` (per-image KL divergence).
    """
    filters = tuple(int(f) for f in filters)
    if not filters or any(f <= 0 for f in filters):
        raise ValueError(f"Expected a non-empty list of positive filter counts. Received: filters={filters}.")
    check_image_size(input_size, multiple_of=2 ** len(filters))
    if channels not in (1, 3):
        raise ValueError(f"Expected channels to be 1 or 3. Received: channels={channels}.")
    if latent_dim <= 0:
        raise ValueError(f"Expected latent_dim > 0. Received: latent_dim={latent_dim}.")

    inputs = keras.Input((input_size, input_size, channels), name="image")
    x = inputs
    for i, f in enumerate(filters, start=1):
        x = keras.layers.Conv2D(f, 3, strides=2, padding="same", name=f"enc_block{i}_conv")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"enc_block{i}_act")(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"enc_block{i}_bn")(x)
    x = keras.layers.Identity(name="encoder_features")(x)
    fmap_shape = tuple(int(d) for d in x.shape[1:])
    flat = keras.layers.Flatten(name="enc_flatten")(x)
    outputs: list[Any] = []
    if variational:
        z_mean = keras.layers.Dense(latent_dim, name="z_mean")(flat)
        z_log_var = keras.layers.Dense(latent_dim, name="z_log_var")(flat)
        z = Sampling(seed=seed, name="z")([z_mean, z_log_var])
        kl = KLDivergence(beta=kl_weight, name="kl")([z_mean, z_log_var])
    else:
        z = keras.layers.Dense(latent_dim, name="latent")(flat)
    y = keras.layers.Dense(math.prod(fmap_shape), name="dec_dense")(z)
    y = keras.layers.LeakyReLU(0.2, name="dec_dense_act")(y)
    y = keras.layers.Reshape(fmap_shape, name="dec_reshape")(y)
    for i, f in enumerate(reversed(filters), start=1):
        y = keras.layers.Conv2DTranspose(f, 3, strides=2, padding="same", name=f"dec_block{i}_deconv")(y)
        y = keras.layers.LeakyReLU(0.2, name=f"dec_block{i}_act")(y)
        y = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"dec_block{i}_bn")(y)
    recon = keras.layers.Conv2DTranspose(channels, 3, padding="same", activation="sigmoid", name="reconstruction")(y)
    outputs.append(recon)
    if variational:
        outputs.append(kl)
    return keras.Model(inputs, outputs, name="vae" if variational else "autoencoder")


class AutoencoderDetector(BaseDetector):
    """Reconstruction error of a convolutional (variational) autoencoder.

    Columns: ``recon_error`` (per-image MSE), ``recon_local`` (the maximum of the
    error map, see ``error_map()``: a small defect that the image mean hides still
    stands out), ``recon_peak_y``/``recon_peak_x`` (where that maximum is, as
    fractions of height/width) and ``ae_kl`` (KL divergence, VAE only).

    The error map is the squared error per pixel; with ``relative_map=True``
    (default) divided by the error that the training images show at that pixel
    (``maps.relative_error``; learned in ``pixel_error_``), then averaged over
    ``local_window`` x ``local_window`` squares (default 1: no averaging).
    Measured on the brick benchmark (latent 128, seed 0): peak inside the gravel
    patch 93.5% relative / 91% plain squared error at window 1; wider windows
    lose (relative: 87.5% at 2, 80% at 4, 68% at 8; the former default, plain
    squared error at window 8, 61%): the gravel shows in a few extreme pixels, and
    a wider mean lets the long error streaks of misplaced mortar lines win. On
    digits (one-vs-rest, 32 px, digits 1 3 5 8 9) the recon_local AUROC is 0.987
    relative at window 1, 0.904 plain at window 1, 0.932 plain at window 4 (the
    former default).
    """

    name: ClassVar[str] = "autoencoder"
    columns: ClassVar[tuple[ScoreColumn, ...]] = COLUMNS["autoencoder"]

    def __init__(
        self,
        *,
        input_size: int = 32,
        channels: int = 1,
        filters: Sequence[int] = (32, 64),
        latent_dim: int | None = None,
        variational: bool = False,
        kl_weight: float = 1.0,
        epochs: int = 30,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        local_window: int = 1,
        relative_map: bool = True,
        validation_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.input_size = input_size
        self.channels = channels
        self.filters = filters
        self.latent_dim = latent_dim
        self.variational = variational
        self.kl_weight = kl_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.local_window = local_window
        self.relative_map = relative_map
        self.validation_fraction = validation_fraction
        self.seed = seed

    @property
    def latent_dim_(self) -> int:
        """``latent_dim``, or by default one unit per 32 pixels, clipped to [8, 256]."""
        if self.latent_dim is not None:
            return int(self.latent_dim)
        return min(256, max(8, self.input_size * self.input_size // 32))

    def fit(self, images: ImageBatch, labels: Sequence[Any] | None = None, *, verbose: int = 0) -> AutoencoderDetector:
        """Learn to reconstruct ``images`` (uint8, any size; assumed normal)."""
        check_non_empty(images)
        if self.epochs < 1:
            raise ValueError(f"Expected epochs >= 1. Received: epochs={self.epochs}.")
        if int(self.local_window) < 1:
            raise ValueError(f"Expected local_window >= 1. Received: local_window={self.local_window}.")
        seed_everything(self.seed)
        xb = to_uint8_batch(images, self.input_size, self.channels)
        x = xb.astype(np.float32) / 255.0
        train_idx, val_idx = split_validation(len(x), self.validation_fraction, self.seed)
        self.model_ = build_autoencoder(
            input_size=self.input_size,
            channels=self.channels,
            filters=self.filters,
            latent_dim=self.latent_dim_,
            variational=self.variational,
            kl_weight=self.kl_weight,
            seed=self.seed,
        )
        loss: Any = ["mse", None] if self.variational else "mse"
        self.model_.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss=loss)
        x_tr, x_val = x[train_idx], x[val_idx]
        y_tr: Any = [x_tr, np.zeros(len(x_tr))] if self.variational else x_tr
        val: Any = None
        if len(x_val):
            val = (x_val, [x_val, np.zeros(len(x_val))] if self.variational else x_val)
        hist = self.model_.fit(
            x_tr,
            y_tr,
            validation_data=val,
            epochs=self.epochs,
            batch_size=self.batch_size,
            shuffle=True,
            verbose=verbose,
        )
        self.history_ = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        # what normal images show at each pixel; all of them (not only the held-out
        # ones): the map needs the spatial profile, which 10% of a small set leaves noisy
        self.pixel_error_ = self._squared_error(x, self._forward(x)[0]).mean(axis=0)
        self._record_training(xb, self._score_floats(x_val if len(x_val) else x_tr))
        return self

    def _anomaly_columns(self) -> tuple[str, ...]:
        # the KL of the latent exists only for a VAE
        return ("recon_error", "recon_local", *(("ae_kl",) if self.variational else ()))

    # -- inference
    def reconstruct(self, images: ImageBatch) -> np.ndarray:
        """float32 (n, s, s, channels) reconstructions in [0, 1]."""
        return self._forward(self._prepare(images))[0]

    def error_map(self, images: ImageBatch) -> np.ndarray:
        """float32 (n, s, s): the map whose maximum and its place are ``recon_local``
        and ``recon_peak_y``/``recon_peak_x`` (see the class docstring)."""
        x = self._prepare(images)
        return self._local_map(self._squared_error(x, self._forward(x)[0]))

    @staticmethod
    def _squared_error(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
        """float32 (n, s, s, c) images and reconstructions -> (n, s, s), mean over channels."""
        return np.asarray(np.mean((x - recon) ** 2, axis=-1), dtype=np.float32)

    def _local_map(self, err: np.ndarray) -> np.ndarray:
        m = relative_error(err, self.pixel_error_) if self.relative_map else err
        return box_mean(m, int(self.local_window))

    def score(self, images: ImageBatch) -> dict[str, np.ndarray]:
        """Score uint8 images (any size) -> the columns declared in ``columns``."""
        return self._score_floats(self._prepare(images))

    def _score_floats(self, x: np.ndarray) -> dict[str, np.ndarray]:
        n = len(x)
        recon, kl = self._forward(x)
        err = self._squared_error(x, recon)  # (n, s, s)
        local = self._local_map(err)
        peak_y, peak_x = peak_location(local)
        return {
            "recon_error": err.reshape(n, err.shape[1] * err.shape[2]).mean(axis=1).astype(np.float32),
            "recon_local": local.reshape(n, err.shape[1] * err.shape[2]).max(axis=1, initial=0.0).astype(np.float32),
            "recon_peak_y": peak_y,
            "recon_peak_x": peak_x,
            "ae_kl": kl.astype(np.float32) if kl is not None else np.full(n, np.nan, np.float32),
        }

    def _prepare(self, images: ImageBatch) -> np.ndarray:
        self._check_fitted()
        return to_float_batch(images, self.input_size, self.channels)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if len(x) == 0:
            s, c = self.input_size, self.channels
            return np.zeros((0, s, s, c), np.float32), (np.zeros(0, np.float32) if self.variational else None)
        outs = predict_in_batches(self.model_, x)
        return outs[0], (outs[1] if self.variational else None)

    def encoder_model(self) -> keras.Model:
        """Model image -> last encoder feature map (n, h', w', filters[-1])."""
        self._check_fitted()
        return keras.Model(self.model_.inputs[0], self.model_.get_layer("encoder_features").output, name="encoder")

    # -- persistence
    def to_files(self) -> dict[str, bytes]:
        import json

        self._check_fitted()
        meta = self.metadata() | {"history": self.history_}
        buf = io.BytesIO()
        np.save(buf, self.pixel_error_.astype(np.float32), allow_pickle=False)
        return {
            "model.keras": keras_to_bytes(self.model_),
            "meta.json": json.dumps(meta, indent=2).encode(),
            "pixel_error.npy": buf.getvalue(),
        }

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> AutoencoderDetector:
        meta = cls._read_metadata(files, cls.name)
        det = cls(**meta["params"])
        det.model_ = keras_from_bytes(files["model.keras"])
        if "pixel_error.npy" not in files:
            raise ValueError(
                f"Expected a 'pixel_error.npy' among the artifact files of an autoencoder. Received: {sorted(files)}."
            )
        s = det.input_size
        pixel_error = np.load(io.BytesIO(files["pixel_error.npy"]), allow_pickle=False)
        if pixel_error.shape != (s, s):
            raise ValueError(f"Expected 'pixel_error.npy' of shape {(s, s)}. Received: {pixel_error.shape}.")
        det.pixel_error_ = pixel_error.astype(np.float32)
        det.history_ = meta.get("history", {})
        det._restore_metadata(meta)
        return det
