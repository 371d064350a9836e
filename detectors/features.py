"""Convolutional feature extractors: a Keras application backbone or an encoder.

``build_backbone_extractor`` returns a model image -> feature map (n, h', w', d)
taken from a named layer; weights come from a local file the caller names (the
job layer fetches URIs), or are random (``weights=None``), never downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

# name -> (constructor, preprocess_input, default feature layer)
_APPLICATIONS: dict[str, tuple[Callable[..., keras.Model], Callable[[Any], Any], str]] = {
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input, "block5_conv3"),
    "vgg19": (keras.applications.VGG19, keras.applications.vgg19.preprocess_input, "block5_conv4"),
    "resnet50": (keras.applications.ResNet50, keras.applications.resnet.preprocess_input, "conv5_block3_out"),
    "mobilenetv2": (
        keras.applications.MobileNetV2,
        keras.applications.mobilenet_v2.preprocess_input,
        "out_relu",
    ),
}

BACKBONES = tuple(_APPLICATIONS)


def check_backbone(backbone: str, allowed_extra: tuple[str, ...] = ()) -> None:
    allowed = (*allowed_extra, *BACKBONES)
    if backbone not in allowed:
        raise ValueError(f"Expected backbone to be one of {list(allowed)}. Received: backbone={backbone!r}.")


def build_backbone_extractor(
    backbone: str,
    *,
    input_size: int,
    layer: str | None = None,
    weights: str | None = None,
) -> keras.Model:
    """Model uint8-range RGB floats (n, s, s, 3) -> feature map of ``layer``.

    ``weights`` is a local path of a Keras weights file (``.weights.h5`` or the
    ``*_notop.h5`` files Keras publishes) or ``None`` for random weights.
    """
    check_backbone(backbone)
    ctor, _, default_layer = _APPLICATIONS[backbone]
    base = ctor(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    if weights is not None:
        try:
            base.load_weights(weights)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"Could not load {backbone} weights from {weights!r}: {e}. Expected a Keras weights "
                f"file for {backbone} with include_top=False."
            ) from e
    name = layer or default_layer
    try:
        out = base.get_layer(name).output
    except ValueError as e:
        raise ValueError(f"{backbone} has no layer named {name!r}. Received: layer={layer!r}.") from e
    return keras.Model(base.inputs[0], out, name=f"{backbone}_{name}")


def preprocess_for_backbone(backbone: str, x01: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1] (n, s, s, 1|3) -> the backbone's expected input."""
    if x01.shape[-1] == 1:
        x01 = np.repeat(x01, 3, axis=-1)
    _, prep, _ = _APPLICATIONS[backbone]
    return np.asarray(prep(x01 * 255.0), dtype=np.float32)
