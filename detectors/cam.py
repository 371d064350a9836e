"""CNN classifier with GlobalAveragePooling + Dense softmax, and its class
activation maps (CAM: last-conv activations . Dense weights of a class).

Trained on labelled images. When only one class is given (normal images only),
it learns "normal" against self-made defects (``detectors.defects``) and its
``cam_anomaly`` is the probability of a defect.

With self-made defects the map itself is trained, DRAEM-style (Zavrtanik et al.
2021: a discriminative network trained from scratch on synthetic anomalies and
their masks): ``cam_dense`` applied to every cell of ``cam_features`` gives the
defect probability of that cell, a focal loss pulls it towards the share of the
cell the defect's mask covers (``pixel_loss=True``, the default), and
``cam_anomaly`` is the largest mean over ``SCORE_WINDOW`` x ``SCORE_WINDOW`` cells.
The image label alone (``pixel_loss=False``, as before) gets no word on *where* the
defect is, and the softmax on the map's global average dilutes a defect of a few
cells into the background. The default rests on these runs, 2026-12-03, load 6-11
(``bench/accuracy.py --only texture --detectors cam --train 150 --test 60 --params
'{"cam": {"epochs": 15, "pixel_loss": false}}' --archives A --defects ...``, and the
same without ``"pixel_loss": false``; seed 0; cam_anomaly AUROC / share of map peaks
inside the defect, image labels -> masks):

* brick (tuned on): photo 0.993/93% -> 0.999/100%, stain 0.895/83% -> 0.983/95%,
  blur 0.689/65% -> 0.901/85%, scratch 0.996/87% -> 0.999/100%; mean 0.893 -> 0.971;
* grass (tuned on): photo/stain/scratch mean 0.638 -> 0.659 (grass stays hard: the
  CAM does not find even its own self-made stains there, AUROC ~0.6);
* gravel (held out of all tuning): photo 0.839 -> 0.886, stain 0.529 -> 0.566,
  blur 0.475 -> 0.781, scratch 0.819 -> 0.837, hole 0.782 -> 0.801; mean 0.689 -> 0.774,
  peaks inside 45% -> 67%;
* digits one-vs-rest 1 / 3 / 8 (held out; ``bench/accuracy.py --only digits
  --digits 1 3 8 --detectors cam --params '{"cam": {"pixel_loss": false}}'``):
  cam_anomaly 0.879 / 0.739 / 0.373 -> 0.952 / 0.838 / 0.432 (mean 0.664 -> 0.741).

(The figures above came from an ad-hoc script. Re-run through that command, 2026-12-03, load
1-3: ``--archives brick grass gravel --jobs 2``, every kind, with and without ``"pixel_loss":
false``: mean cam_anomaly brick 0.899 -> 0.977, grass 0.622 -> 0.723, gravel 0.695 -> 0.779,
peaks inside 55.1% -> 72.6%, 165 / 171 CPU-s: the same conclusion, brick and gravel within
0.006 of the script's figures. The default as it is, 30 epochs, 2026-12-03, load 5-9:
``bench/accuracy.py --only texture --archives brick grass --quick --detectors cam --jobs 2``:
cam_anomaly brick photo / scratch / stain / hole / blur 0.995 / 0.914 / 0.964 / 0.978 /
0.874, grass 0.904 / 0.632 / 0.559 / 0.870 / 0.896, mean 0.859, peaks inside 77.7%, 194
CPU-s for both archives.)

A third block (``filters=(32, 64, 128)``) with masks was better on grass (0.707)
and worse on brick (0.948), so the two-block default stays. Nor does a U-shaped
network (``decoder=True``: that third block's context, ~29 px, at the two-block map
resolution, DRAEM's discriminative shape) help the one-class CAM at 30 epochs; the
same command with ``--params '{"cam": {"decoder": true}}'``: mean 0.794 (brick scratch
0.558, grass stain 0.574), peaks inside 69.5%, 467 CPU-s (2.4x); with ``"filters":
[16, 32, 64]`` as well: mean 0.807, 155 CPU-s. So ``decoder`` stays off by default.
Trained on the bench's own stains and scratches (``bench/ceiling.py``), neither network
passes 0.69 on grass. Twice the epochs (``--params '{"cam": {"epochs": 60}}'``, 2.1x the
CPU) lifts brick and grass to a mean of 0.877 (grass stain and scratch no better, 0.567 and
0.652; brick scratch worse, 0.847), but not
the held-out archives (``--archives gravel ihc``: 0.814 -> 0.818); on digits 1 / 3 / 8
(``bench/accuracy.py --only digits --digits 1 3 8 --detectors cam``) cam_anomaly goes
0.952 / 0.838 / 0.432 -> 0.948 / 0.773 / 0.859. The epochs are ``imgscan train``'s
(``jobs.train.TrainConfig.epochs``, shared with the autoencoder), so they stay.

Columns: ``cam_pred`` (class name), ``cam_prob`` (its probability; low = out of distribution),
``cam_anomaly`` (probability of the anomalous class: the labelled
``anomaly_class`` or the self-made defect class; NaN when there is none),
``cam_map`` (flattened map at feature-map resolution, row-major, of the
anomalous class when there is one, else of the predicted class; see
``cam_map_shape_``), and its peak ``cam_peak_y``/``cam_peak_x`` (fractions).
"""

from __future__ import annotations

import json
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
from detectors.columns import COLUMNS, DEFECT_CLASS
from detectors.defects import KINDS, make_defects_with_masks
from detectors.features import BACKBONES, build_backbone_extractor, preprocess_for_backbone
from detectors.maps import box_mean, peak_location, smoothed_peak
from detectors.preprocessing import ImageBatch, check_image_size, check_non_empty, to_uint8_batch


def build_cam_classifier(
    *,
    num_classes: int,
    input_size: int = 32,
    channels: int = 1,
    backbone: str = "small",
    filters: Sequence[int] = (32, 64, 128),
    weights: str | None = None,
    trainable_blocks: int = 1,
    dropout: float = 0.3,
    decoder: bool = False,
) -> keras.Model:
    """Backbone -> ``cam_features`` (last conv map) -> ``cam_gap`` -> ``cam_dense`` softmax.

    ``backbone="small"``: blocks of two 3x3 Conv-BN-ReLU, max-pooling between
    blocks (not after the last, to keep the map fine). With ``decoder`` (and three
    or more blocks) the network is U-shaped: the last block's map is upsampled
    back, level by level, to the resolution of block 2 (half the input side), each
    level concatenated with that block's map (skip connection) and refined by two
    3x3 Conv-BN-ReLU (``up{b}_...``, ``filters[b - 1]`` channels); ``cam_features``
    is that fine map, float32 (n, input_size / 2, input_size / 2, filters[1]), whose
    cells see the deepest block's context (~29 px with three blocks, ~61 px with
    four). Otherwise a Keras application (``vgg16``...) with ``weights`` from a
    local file; only its last ``trainable_blocks`` blocks are trained when weights
    are given.
    """
    if num_classes < 2:
        raise ValueError(f"Expected at least 2 classes. Received: num_classes={num_classes}.")
    if backbone == "small":
        filters = tuple(int(f) for f in filters)
        check_image_size(input_size, multiple_of=2 ** (len(filters) - 1))
        inputs = keras.Input((input_size, input_size, channels), name="image")
        x, skips = inputs, {}
        for b, f in enumerate(filters, start=1):
            x = _conv_bn_relu(x, f, f"block{b}")
            skips[b] = x
            if b < len(filters):
                x = keras.layers.MaxPooling2D(name=f"block{b}_pool")(x)
        if decoder:
            # back up to block 2's resolution, not to the input's: a map cell of 2x2 px is fine
            # enough for the smallest defect, and each level finer would cost 4x the last one
            for b in range(len(filters) - 1, 1, -1):
                x = keras.layers.UpSampling2D(name=f"up{b}_upsample")(x)
                x = keras.layers.Concatenate(name=f"up{b}_concat")([x, skips[b]])
                x = _conv_bn_relu(x, filters[b - 1], f"up{b}")
        features = x
    elif backbone in BACKBONES:
        base = build_backbone_extractor(backbone, input_size=input_size, weights=weights)
        if weights is not None:
            blocks = sorted({ly.name.split("_")[0] for ly in base.layers if ly.name.startswith("block")})
            keep = set(blocks[-trainable_blocks:]) if trainable_blocks > 0 else set()
            for ly in base.layers:
                ly.trainable = ly.name.split("_")[0] in keep
        inputs, features = base.inputs[0], base.outputs[0]
    else:
        raise ValueError(f"Expected backbone 'small' or one of {list(BACKBONES)}. Received: backbone={backbone!r}.")
    features = keras.layers.Identity(name="cam_features")(features)
    x = keras.layers.GlobalAveragePooling2D(name="cam_gap")(features)
    x = keras.layers.Dropout(dropout, name="cam_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="cam_dense")(x)
    return keras.Model(inputs, outputs, name=f"cam_{backbone}")


def _conv_bn_relu(x: Any, filters: int, prefix: str) -> Any:
    """Two 3x3 Conv-BN-ReLU named ``{prefix}_conv{j}``, ``{prefix}_bn{j}``, ``{prefix}_relu{j}``."""
    for j in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv{j}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn{j}")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu{j}")(x)
    return x


#: side, in map cells, of the neighbourhood whose mean defect probability scores an image
#: (pixel-supervised CAM): 3 cells = 6 px at 64 px with one pooling, about the smallest defect
SCORE_WINDOW = 3


def _default_filters(synthetic: bool, decoder: bool = False) -> tuple[int, ...]:
    """Blocks of the small CNN: three with a decoder (U-shaped, the map back at block 2's
    resolution); without one, two when it learns self-made defects, three for labelled classes.

    A defect is local: with two blocks a map cell sees ~13 px, and the map's peak
    lands in the pasted gravel patch for every seed tried (brick benchmark, seeds
    0/1/2: 92.0% / 91.0% / 95.0%, AUROC >= 0.999), where three blocks (~29 px)
    localize by luck (93.0% / 65.5% / 52.5%: the AUROC stays 1.0, the map
    spreads); ``bench/accuracy.py --only texture --seed N --params
    '{"cam": {"filters": [32, 64, 128]}}'`` re-measures them. Classes of whole
    shapes need the context of a third block (digits, ten classes at 32 px, 30
    epochs, a 70/30 split; an offline script, not in the repo: test accuracy
    99.4% with three blocks, 98.5% with two).
    """
    return (32, 64) if synthetic and not decoder else (32, 64, 128)


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

    images: uint8 (n, h, w, c) -> uint8 (n, h, w, c). A label names the object, not
    where it sits: fresh shifts every epoch keep a small CNN from memorising
    pixels (and, in the label audit, from memorising wrong labels).
    """
    n, h, w, _ = images.shape
    out = np.zeros_like(images)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = images[i, ys, xs]
    return out


def random_flips(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image flipped left-right and/or upside down, each with chance 1/2.

    images: uint8 (n, h, w, c) -> uint8 (n, h, w, c). With a few hundred normal
    images the classifier could learn them by heart and call every unseen normal
    image a defect; flips show it four versions of each, without the seams a
    shift or a roll would add (a seam is just what a defect looks like). Off by
    default (``CamDetector(flips=False)``): it did not help where it was tried,
    grass crops of the bench with the cosine schedule (cam_anomaly mean AUROC
    over the five defect kinds 0.645 without, 0.647 with: ``bench/accuracy.py
    --only texture --archives grass --quick --detectors cam --params '{"cam":
    {"schedule": "cosine", "flips": true}}'``); the constant rate, the default,
    gave 0.721 without flips on the same set.
    """
    out = images.copy()
    lr, ud = rng.random(len(images)) < 0.5, rng.random(len(images)) < 0.5
    out[lr] = out[lr][:, :, ::-1]
    out[ud] = out[ud][:, ::-1]
    return out


class CamDetector(BaseDetector):
    """Class, probability, anomaly probability and class activation map."""

    name: ClassVar[str] = "cam"
    _fitted_attr: ClassVar[str] = "cam_model_"
    columns: ClassVar[tuple[ScoreColumn, ...]] = COLUMNS["cam"]

    def __init__(
        self,
        *,
        input_size: int = 32,
        channels: int = 1,
        backbone: str = "small",
        filters: Sequence[int] | None = None,
        weights: str | None = None,
        trainable_blocks: int = 1,
        anomaly_class: str | None = None,
        synthetic_defects: bool | None = None,
        defect_kinds: Sequence[str] | None = None,
        epochs: int = 30,
        batch_size: int = 32,
        learning_rate: float = 1e-3,
        schedule: str = "constant",
        validation_fraction: float = 0.1,
        shift: int = 0,
        flips: bool = False,
        pixel_loss: bool = True,
        decoder: bool = False,
        seed: int = 0,
    ) -> None:
        self.input_size = input_size
        self.channels = channels
        self.backbone = backbone
        self.filters = filters
        self.weights = weights
        self.trainable_blocks = trainable_blocks
        self.anomaly_class = anomaly_class
        self.synthetic_defects = synthetic_defects
        self.defect_kinds = defect_kinds
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.schedule = schedule
        self.validation_fraction = validation_fraction
        self.shift = shift
        self.flips = flips
        self.pixel_loss = pixel_loss
        self.decoder = decoder
        self.seed = seed

    def fit(self, images: ImageBatch, labels: Sequence[Any] | None = None, *, verbose: int = 0) -> CamDetector:
        """Train on ``images`` with ``labels`` (any hashable; None = all normal).

        Self-made defects are added as class ``__defect__`` when
        ``synthetic_defects`` is True, or by default when fewer than two labels exist;
        ``defect_kinds`` picks among ``detectors.defects.KINDS`` (None: all of them).
        """
        n = check_non_empty(images)
        if labels is not None and len(labels) != n:
            raise ValueError(f"Expected one label per image. Received: {len(labels)} labels for {n} images.")
        if self.epochs < 1:
            raise ValueError(f"Expected epochs >= 1. Received: epochs={self.epochs}.")
        kinds = tuple(self.defect_kinds) if self.defect_kinds is not None else KINDS
        if not kinds or set(kinds) - set(KINDS):
            raise ValueError(f"Expected defect_kinds among {list(KINDS)}. Received: defect_kinds={self.defect_kinds}.")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"Expected schedule 'constant' or 'cosine'. Received: schedule={self.schedule!r}.")
        seed_everything(self.seed)
        rng = np.random.default_rng(self.seed)
        xb = to_uint8_batch(images, self.input_size, self.channels)
        names = ["normal"] * n if labels is None else [str(v) for v in labels]
        classes = sorted(set(names))
        if self.anomaly_class is not None and self.anomaly_class not in classes:
            raise ValueError(
                f"anomaly_class={self.anomaly_class!r} is not among the labels. Received labels: {classes}."
            )
        synthetic = self.synthetic_defects if self.synthetic_defects is not None else len(classes) < 2
        if synthetic:
            classes.append(DEFECT_CLASS)
        if len(classes) < 2:
            raise ValueError(f"Expected at least two classes, or synthetic_defects. Received: labels {classes}.")
        self.classes_ = classes
        y = np.array([classes.index(v) for v in names], dtype=np.int64)
        train_idx, val_idx = split_validation(n, self.validation_fraction, self.seed)
        self.model_ = build_cam_classifier(
            num_classes=len(classes),
            input_size=self.input_size,
            channels=self.channels,
            backbone=self.backbone,
            filters=self.filters if self.filters is not None else _default_filters(synthetic, self.decoder),
            weights=self.weights,
            trainable_blocks=self.trainable_blocks,
            decoder=self.decoder,
        )
        learning_rate: Any = self.learning_rate
        if self.schedule == "cosine":
            # decays to zero over the whole run: the last epoch's weights are a settled model,
            # not one caught mid-swing (at a constant rate, accuracy on held-out digits moved by
            # +-7 points from one epoch to the next once the model began to fit noisy labels)
            per_epoch = -(-len(train_idx) * (2 if synthetic else 1) // self.batch_size)
            learning_rate = keras.optimizers.schedules.CosineDecay(self.learning_rate, per_epoch * self.epochs)
        pixel = synthetic and self.pixel_loss
        trained = self._pixel_model() if pixel else self.model_
        trained.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            # focal: a defect covers a few percent of the map; plain cross-entropy would be won
            # by calling every cell normal (DRAEM's discriminative network uses it for that reason)
            loss=keras.losses.BinaryFocalCrossentropy(gamma=2.0) if pixel else "sparse_categorical_crossentropy",
            metrics=None if pixel else ["accuracy"],
        )
        defect = len(classes) - 1
        x_val, y_val = xb[val_idx], self._targets(y[val_idx], None, pixel)
        if synthetic and len(val_idx):
            x_bad, m_bad = self._make_defects(x_val, rng, kinds)
            x_val = np.concatenate([x_val, x_bad])
            y_val = np.concatenate([y_val, self._targets(np.full(len(val_idx), defect), m_bad, pixel)])
        history: dict[str, list[float]] = {}
        for epoch in range(self.epochs):
            x_tr, y_tr = xb[train_idx], self._targets(y[train_idx], None, pixel)
            if self.shift:
                x_tr = random_shifts(x_tr, self.shift, rng)
            if self.flips:
                x_tr = random_flips(x_tr, rng)
            if synthetic:  # fresh defects every epoch: they never repeat
                x_bad, m_bad = self._make_defects(x_tr, rng, kinds)
                x_tr = np.concatenate([x_tr, x_bad])
                y_tr = np.concatenate([y_tr, self._targets(np.full(len(train_idx), defect), m_bad, pixel)])
            h = trained.fit(
                self._model_input(x_tr),
                y_tr,
                batch_size=self.batch_size,
                shuffle=True,
                initial_epoch=epoch,
                epochs=epoch + 1,
                verbose=0,  # one fit per epoch: Keras would number them "Epoch 2/2", "Epoch 3/3", ...
                validation_data=(self._model_input(x_val), y_val) if len(x_val) else None,
            )
            for k, v in h.history.items():
                history.setdefault(k, []).extend(float(a) for a in v)
            if verbose:
                stats = " - ".join(f"{k}: {v[-1]:.4f}" for k, v in h.history.items())
                print(f"Epoch {epoch + 1}/{self.epochs} - {stats}", flush=True)
        self.history_ = history
        self._build_cam_model()
        calib = xb[val_idx] if len(val_idx) else xb[train_idx]
        self._record_training(xb, self.score(calib), labels)
        return self

    @property
    def anomaly_index_(self) -> int | None:
        if DEFECT_CLASS in self.classes_:
            return self.classes_.index(DEFECT_CLASS)
        if self.anomaly_class is not None:
            return self.classes_.index(self.anomaly_class)
        return None

    @property
    def pixel_supervised_(self) -> bool:
        """True when the map itself was trained on the self-made defects' masks."""
        return bool(self.pixel_loss) and DEFECT_CLASS in self.classes_

    def _make_defects(
        self, images: np.ndarray, rng: np.random.Generator, kinds: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, s, s, c) normal images -> (uint8 (n, s, s, c) with one self-made defect each,
        float32 (n, s, s) masks in [0, 1]): ``detectors.defects.make_defects_with_masks``. A
        method so that a measurement (``bench/ceiling.py``) can train the same network on
        other defects; the detector itself never sees any but its own."""
        return make_defects_with_masks(images, rng, kinds=kinds)

    def _pixel_model(self) -> keras.Model:
        """The classifier's own layers, read per map cell: ``cam_dense`` applied to every cell of
        ``cam_features`` is the softmax of the class activation maps (plus the bias) there, so
        training this output on the defects' masks trains the CAM itself -> probability of the
        defect class per cell, float32 (n, h', w', 1). Used for training only, never saved."""
        cells = self.model_.get_layer("cam_dense")(self.model_.get_layer("cam_features").output)
        defect = keras.layers.Lambda(lambda t: t[..., -1:], name="cam_pixel_defect")(cells)
        return keras.Model(self.model_.inputs[0], defect, name="cam_pixel")

    def _targets(self, y: np.ndarray, masks: np.ndarray | None, pixel: bool) -> np.ndarray:
        """Class indices int64 (n,), or with ``pixel`` the defect share of every map cell,
        float32 (n, h', w', 1): the masks (n, s, s) averaged over each cell, 0 for normal images."""
        if not pixel:
            return y
        h, w = self.cam_map_shape_
        if masks is None:
            return np.zeros((len(y), h, w, 1), np.float32)
        n, s, _ = masks.shape
        return masks.reshape(n, h, s // h, w, s // w).mean(axis=(2, 4))[..., None].astype(np.float32)

    def _anomaly_columns(self) -> tuple[str, ...]:
        # With an anomaly class (labelled, or self-made defects) its probability is the score,
        # and a confident anomaly has a HIGH cam_prob: the wrong side. Without one, a low
        # maximum softmax probability is the out-of-distribution signal.
        return ("cam_anomaly",) if self.anomaly_index_ is not None else ("cam_prob",)

    def _model_input(self, xb: np.ndarray) -> np.ndarray:
        x = xb.astype(np.float32) / 255.0
        return preprocess_for_backbone(self.backbone, x) if self.backbone in BACKBONES else x

    def _build_cam_model(self) -> None:
        self.cam_model_ = keras.Model(
            self.model_.inputs[0],
            [self.model_.get_layer("cam_features").output, self.model_.outputs[0]],
        )
        self.dense_weights_, self.dense_bias_ = (
            np.asarray(w) for w in self.model_.get_layer("cam_dense").get_weights()
        )

    @property
    def cam_map_shape_(self) -> tuple[int, int]:
        shape = self.model_.get_layer("cam_features").output.shape
        return int(shape[1]), int(shape[2])

    def predict_maps(self, images: ImageBatch) -> tuple[np.ndarray, np.ndarray]:
        """-> (probabilities float32 (n, k), CAMs float32 (n, h', w', k) of every class)."""
        self._check_fitted()
        xb = to_uint8_batch(images, self.input_size, self.channels)
        if len(xb) == 0:
            h, w = self.cam_map_shape_
            k = len(self.classes_)
            return np.zeros((0, k), np.float32), np.zeros((0, h, w, k), np.float32)
        feats, probs = predict_in_batches(self.cam_model_, self._model_input(xb))
        cams = np.einsum("nhwd,dk->nhwk", feats, self.dense_weights_).astype(np.float32)
        return probs.astype(np.float32), cams

    def predict_embeddings(self, images: ImageBatch, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """-> (probabilities float32 (n, k), embeddings float32 (n, d)).

        The embedding is the ``cam_gap`` vector: the last-conv activations averaged
        over the map (d = filters of the last block), what ``cam_dense`` weighs.
        Batched, so only one batch of feature maps is held at a time.
        """
        self._check_fitted()
        xb = to_uint8_batch(images, self.input_size, self.channels)
        probs = np.zeros((len(xb), len(self.classes_)), np.float32)
        embeddings = np.zeros((len(xb), self.dense_weights_.shape[0]), np.float32)
        for start in range(0, len(xb), batch_size):
            feats, p = self.cam_model_(self._model_input(xb[start : start + batch_size]), training=False)
            probs[start : start + len(p)] = np.asarray(p)
            embeddings[start : start + len(p)] = np.asarray(feats).mean(axis=(1, 2))
        return probs, embeddings

    def score(self, images: ImageBatch) -> dict[str, Any]:
        probs, cams = self.predict_maps(images)
        n = len(probs)
        pred = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
        a = self.anomaly_index_
        if a is not None and self.pixel_supervised_:
            # the map was trained to be the defect probability per cell (DRAEM): the image is
            # as anomalous as its worst small neighbourhood, where the mean over the whole map
            # (what the softmax head sees) dilutes a defect of a few cells into the background
            maps = self._cell_probabilities(cams)[..., a]
            local = box_mean(maps, SCORE_WINDOW)
            anomaly = local.reshape(n, -1).max(axis=1) if n else np.zeros(0, np.float32)
            peak_y, peak_x = peak_location(local)
        else:
            map_class = np.full(n, a) if a is not None else pred
            maps = cams[np.arange(n), :, :, map_class] if n else cams[..., 0]
            anomaly = probs[:, a] if a is not None else np.full(n, np.nan, np.float32)
            peak_y, peak_x = smoothed_peak(maps, 4)
        return {
            "cam_pred": np.array([self.classes_[i] for i in pred], dtype=object),
            "cam_prob": probs[np.arange(n), pred] if n else np.zeros(0, np.float32),
            "cam_anomaly": np.asarray(anomaly, np.float32),
            "cam_map": maps.reshape(n, maps.shape[1] * maps.shape[2]),
            "cam_peak_y": peak_y,
            "cam_peak_x": peak_x,
        }

    def _cell_probabilities(self, cams: np.ndarray) -> np.ndarray:
        """CAMs float32 (n, h', w', k) -> softmax over the classes per cell, with the dense bias."""
        logits = cams + self.dense_bias_
        logits = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    # -- persistence
    def metadata(self) -> dict[str, Any]:
        return super().metadata() | {
            "classes": self.classes_,
            "cam_map_shape": list(self.cam_map_shape_),
            "history": self.history_,
        }

    def to_files(self) -> dict[str, bytes]:
        self._check_fitted()
        return {
            "model.keras": keras_to_bytes(self.model_),
            "meta.json": json.dumps(self.metadata(), indent=2).encode(),
        }

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> CamDetector:
        meta = cls._read_metadata(files, cls.name)
        # a bundle from before pixel_loss existed was trained on image labels only
        # a bundle from before ``decoder`` existed has the plain small CNN
        det = cls(**({"pixel_loss": False, "decoder": False} | meta["params"]))
        det.model_ = keras_from_bytes(files["model.keras"])
        det.classes_ = list(meta["classes"])
        det.history_ = meta.get("history", {})
        det._build_cam_model()
        det._restore_metadata(meta)
        return det
