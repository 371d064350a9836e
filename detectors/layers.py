"""Custom Keras layers, registered so that ``.keras`` files load in safe mode."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="imgscan")
class Sampling(keras.layers.Layer):
    """VAE reparameterisation: z = mean + exp(log_var / 2) * eps while training,
    z = mean at inference so that scores are deterministic."""

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        z_mean, z_log_var = inputs
        if not training:
            return z_mean
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="imgscan")
class KLDivergence(keras.layers.Layer):
    """Adds beta * KL(q(z|x) || N(0, I)), averaged over the batch, as a model loss,
    and returns the per-image KL divergence."""

    def __init__(self, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def call(self, inputs: Any) -> Any:
        z_mean, z_log_var = inputs
        kl = -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
        self.add_loss(self.beta * ops.mean(kl))
        return kl

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "beta": self.beta}
