"""A Gaussian model of the archive: what its mean image and power spectrum cannot predict.

``fit`` learns, per channel, the mean image of the normal images and the mean power
spectrum of their residuals (image minus mean image); colour images are first turned to
the eigenvectors of the archive's colour covariance (so a stain of one hue is not hidden
under the brightness variation the three channels share). ``score`` divides each new
residual's Fourier transform by the square root of that spectrum and transforms back:
the *whitened* residual, which is white noise of unit variance wherever the image
looks like the archive (the innovation of a stationary Gaussian texture model). A
defect is what the model cannot predict: a scratch, an edge or a foreign patch puts
energy at frequencies the archive has little of; a blur or a flat fill takes it away.
The local energy, ``log`` of the whitened residual squared and smoothed over ``sigma``
px (summed over channels), is standardised at every pixel by its mean and standard
deviation over the held-in normal images, so that a pixel of an aligned archive
(digits, forms) is compared with the same pixel of its normal images, and a texture
(stationary) with itself. Two scores:

* ``white_excess``: the map's maximum (a spot more unpredictable than normal);
* ``white_deficit``: the maximum of its negative (a spot smoother than normal); declared
  (entering ``anomaly_score``) only for texture-like archives, see ``ALIGNED_SHARE``.

No network and no training beyond two means: it fits in under a second (300 crops of
64 px) and scores ~5,100 grey 64 px images/s on one core (``bench/throughput.py
--per-detector-only``, 2026-12-03; numpy FFTs and one Gaussian filter per batch), and its
model is the right one where a texture is close to Gaussian (grass, gravel, stained
tissue), where the networks have the least to learn from. This
is the classical detector of spots in Gaussian textures (Grosjean and Moisan,
"A-contrario detectability of spots in textured backgrounds", JMIV 2009), whitened
and standardised per pixel; neither scikit-learn nor scikit-image has it.

Measured on the texture bench (``bench/accuracy.py``): see the README's accuracy
section for the columns beside the other detectors'.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from detectors.base import BaseDetector, ScoreColumn, split_validation
from detectors.columns import COLUMNS
from detectors.maps import peak_location
from detectors.preprocessing import ImageBatch, check_image_size, check_non_empty, to_uint8_batch

#: the spectrum's floor, relative to its mean over every channel and frequency: whitening
#: amplifies a frequency by at most 1/sqrt(this) (~6x) the average gain. Frequencies, and colour
#: components, an archive has little of are where two decodes of one JPEG differ (the
#: DCT-scaled fast path against the full decode, both resized; chroma is subsampled): at 1e-3
#: ``white_deficit`` of grey digits moved by 24% of its spread between them, at 1e-2 by 10.5%,
#: at 3e-2 under the 10% ``tests/test_score.py`` allows (set the constant and run that test; the
#: bench's fused means lost 0.000-0.003, one-off re-fuses); a floor per colour component instead
#: of one for all let the minor components of a colour archive move 0.26-0.52 of the spread
#: (0.07-0.12 now; a one-off colour version of that test, see ``bench/colour.py``'s docstring)
SPECTRUM_FLOOR = 3e-2
#: above this share of the variance in the mean image, an archive is aligned (not a texture) and
#: ``white_deficit`` is not declared: digits 0.69-0.84 (where it ranks other digits *below* normal
#: ones, AUROC 0.09-0.27), crops of ten scikit-image textures and scenes 0.0003-0.031 (one-off:
#: ``aligned_share_`` of this detector fitted on the sets of ``bench/accuracy.py``)
ALIGNED_SHARE = 0.25
#: the floor of a pixel's standard deviation of log-energy (a pixel that never varies)
STD_FLOOR = 1e-3
#: images transformed at once (each holds a float64 copy and a complex128 spectrum: 64 images
#: of 224 x 224 x 3 are ~150 MB)
CHUNK = 64


class WhiteningDetector(BaseDetector):
    """``white_excess`` / ``white_deficit``: the most and the least energetic spot of the
    whitened residual, in standard deviations of that pixel over normal images."""

    name: ClassVar[str] = "whitening"
    _fitted_attr: ClassVar[str] = "spectrum_"
    columns: ClassVar[tuple[ScoreColumn, ...]] = COLUMNS["whitening"]

    def __init__(
        self,
        *,
        input_size: int = 32,
        channels: int = 1,
        sigma: float = 1.0,
        validation_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.input_size = input_size
        self.channels = channels
        self.sigma = sigma
        self.validation_fraction = validation_fraction
        self.seed = seed

    def fit(self, images: ImageBatch, labels: Sequence[Any] | None = None, **_: Any) -> WhiteningDetector:
        """images: normal uint8 images (any size; resized to ``input_size``)."""
        check_non_empty(images)
        check_image_size(self.input_size)
        if not self.sigma > 0:
            raise ValueError(f"Expected sigma > 0 (px). Received: sigma={self.sigma!r}.")
        xb = to_uint8_batch(images, self.input_size, self.channels)
        train_idx, val_idx = split_validation(len(xb), self.validation_fraction, self.seed)
        train = xb[train_idx]
        n = len(train)
        self.colour_basis_ = self._colour_basis(train)
        # sums over chunks of CHUNK images: a float copy of every training image (and its
        # complex spectrum, 16 bytes a value) would not fit in memory for a large archive
        mean = np.zeros(train.shape[1:], np.float64)
        for x in self._chunks(train):
            mean += x.sum(axis=0)
        self.mean_image_ = mean / n  # (s, s, c)
        power = np.zeros(train.shape[1:], np.float64)
        for x in self._chunks(train):
            power += (np.abs(np.fft.fft2(x - self.mean_image_, axes=(1, 2))) ** 2).sum(axis=0)
        power /= n
        self.spectrum_ = power + SPECTRUM_FLOOR * power.mean()
        e_sum = np.zeros(train.shape[1:3], np.float64)
        e_sq = np.zeros(train.shape[1:3], np.float64)
        for x in self._chunks(train):
            energy = self._log_energy(x)
            e_sum, e_sq = e_sum + energy.sum(axis=0), e_sq + (energy**2).sum(axis=0)
        self.energy_mean_ = e_sum / n
        self.energy_std_ = np.maximum(np.sqrt(np.maximum(e_sq / n - self.energy_mean_**2, 0.0)), STD_FLOOR)
        # the share of the pixels' variance (within each channel) that is the mean image's: ~0
        # for a texture, most of it for an aligned archive (digits, forms, product shots). The
        # residuals' variance is the power spectrum's sum over N^2 (Parseval, N pixels)
        spatial = float(self.mean_image_.var(axis=(0, 1)).sum())
        residual = float(power.sum()) / (train.shape[1] * train.shape[2]) ** 2
        self.aligned_share_ = np.asarray(spatial / max(spatial + residual, 1e-12))
        self._record_training(xb, self.score(xb[val_idx] if len(val_idx) else train))
        return self

    def _colour_basis(self, xb: np.ndarray) -> np.ndarray:
        """uint8 (n, s, s, c) -> float64 (c, c): the eigenvectors of the pixels' colour covariance
        (the identity for grey). Whitening each channel alone would hide a stain that shifts one
        channel under the large variation all three share (brightness); in this basis it moves
        the minor components, which the archive barely varies, and each component's spectrum
        then scales it to unit power (so only the rotation matters, not the eigenvalues)."""
        c = xb.shape[3]
        if c == 1:
            return np.eye(1)
        count, total, outer = 0, np.zeros(c), np.zeros((c, c))
        for start in range(0, len(xb), CHUNK):
            px = xb[start : start + CHUNK].reshape(-1, c).astype(np.float64) / 255.0
            count, total, outer = count + len(px), total + px.sum(axis=0), outer + px.T @ px
        mean = total / count
        _, vectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
        return np.asarray(vectors)

    def _chunks(self, xb: np.ndarray) -> Iterator[np.ndarray]:
        """uint8 (n, s, s, c) -> float64 (<= CHUNK, s, s, c) in [0, 1] in the colour basis, in order."""
        for start in range(0, len(xb), CHUNK):
            yield (xb[start : start + CHUNK].astype(np.float64) / 255.0) @ self.colour_basis_

    def _anomaly_columns(self) -> tuple[str, ...]:
        """``white_deficit`` only for a texture-like archive: where the mean image carries
        more than ``ALIGNED_SHARE`` of the variance, the smoothest spot of a normal image is
        its background, and an anomaly shows as content where the archive has none (excess)."""
        if float(self.aligned_share_) > ALIGNED_SHARE:
            return ("white_excess",)
        return ("white_excess", "white_deficit")

    def _log_energy(self, x: np.ndarray) -> np.ndarray:
        """float (n, s, s, c) in [0, 1] -> float64 (n, s, s): log of the smoothed whitened energy."""
        spec = np.fft.fft2(x - self.mean_image_, axes=(1, 2)) / np.sqrt(self.spectrum_)
        white = np.real(np.fft.ifft2(spec, axes=(1, 2)))
        energy = ndimage.gaussian_filter((white**2).sum(axis=3), (0, self.sigma, self.sigma), mode="wrap")
        return np.log(energy + 1e-12)  # an exactly flat spot (a constant image) stays finite

    def maps(self, images: ImageBatch) -> np.ndarray:
        """float32 (n, s, s): the standardised log-energy (+ too unpredictable, - too smooth)."""
        self._check_fitted()
        xb = to_uint8_batch(images, self.input_size, self.channels)
        z = np.empty(xb.shape[:3], np.float32)
        for start, x in zip(range(0, len(xb), CHUNK), self._chunks(xb), strict=True):
            z[start : start + len(x)] = (self._log_energy(x) - self.energy_mean_) / self.energy_std_
        return z

    def score(self, images: ImageBatch) -> dict[str, np.ndarray]:
        self._check_fitted()
        z = self.maps(images)
        flat = z.reshape(len(z), z.shape[1] * z.shape[2])
        peak_y, peak_x = peak_location(np.abs(z))
        return {
            "white_excess": flat.max(axis=1, initial=-np.inf),
            "white_deficit": (-flat).max(axis=1, initial=-np.inf),
            "white_peak_y": peak_y,
            "white_peak_x": peak_x,
        }

    #: the learned arrays, each stored as ``<name>.npy`` (the bundle holds no pickles)
    _ARRAYS: ClassVar[tuple[str, ...]] = (
        "colour_basis",
        "mean_image",
        "spectrum",
        "energy_mean",
        "energy_std",
        "aligned_share",
    )

    def to_files(self) -> dict[str, bytes]:
        self._check_fitted()
        files = {"meta.json": json.dumps(self.metadata()).encode()}
        for name in self._ARRAYS:
            buf = io.BytesIO()
            np.save(buf, getattr(self, f"{name}_"), allow_pickle=False)
            files[f"{name}.npy"] = buf.getvalue()
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> WhiteningDetector:
        meta = cls._read_metadata(files, cls.name)
        det = cls(**meta["params"])
        missing = [f"{name}.npy" for name in cls._ARRAYS if f"{name}.npy" not in files]
        if missing:
            raise ValueError(f"Expected {missing} among the whitening detector's files. Received: {sorted(files)}.")
        s, c = det.input_size, det.channels
        shapes = {
            "colour_basis": (c, c),
            "mean_image": (s, s, c),
            "spectrum": (s, s, c),
            "energy_mean": (s, s),
            "energy_std": (s, s),
            "aligned_share": (),
        }
        for name in cls._ARRAYS:
            arr = np.load(io.BytesIO(files[f"{name}.npy"]), allow_pickle=False)
            if arr.shape != shapes[name]:
                raise ValueError(f"Expected '{name}.npy' of shape {shapes[name]}. Received: {arr.shape}.")
            setattr(det, f"{name}_", arr)
        det._restore_metadata(meta)
        return det
