"""The output columns of every detector, declared once.

Kept apart from the detector classes (and free of TensorFlow) so that the
Parquet schema (``jobs.schema``) can be built in processes that never load a
model, such as the decode tasks of the scoring job.
"""

from __future__ import annotations

from detectors.base import ScoreColumn

#: the CAM's class of self-made defects, when it was trained on normal images only
DEFECT_CLASS = "__defect__"

#: the fused score (``detectors.fusion``): every detector's meaningful columns in one number
ANOMALY_SCORE = ScoreColumn(
    "anomaly_score",
    "float64",
    "high",
    "-log10 of the combined tail probability of the detectors' meaningful scores (3 = at most 1 normal image in 1,000)",
)

COLUMNS: dict[str, tuple[ScoreColumn, ...]] = {
    "autoencoder": (
        ScoreColumn("recon_error", "float32", "high", "per-image mean squared reconstruction error"),
        ScoreColumn(
            "recon_local", "float32", "high", "maximum of the error map: squared error / normal error at that pixel"
        ),
        ScoreColumn("recon_peak_y", "float32", None, "row of the error map's maximum, fraction of height"),
        ScoreColumn("recon_peak_x", "float32", None, "column of the error map's maximum, fraction of width"),
        ScoreColumn("ae_kl", "float32", "high", "KL divergence of the latent (VAE only)"),
    ),
    "mixture": (
        ScoreColumn("gmm_loglik", "float64", "low", "log-likelihood of pooled features"),
        ScoreColumn("gmm_local_loglik", "float64", "low", "lowest log-likelihood over feature-map locations"),
        ScoreColumn("gmm_peak_y", "float32", None, "row of the least likely location, fraction of height"),
        ScoreColumn("gmm_peak_x", "float32", None, "column of the least likely location, fraction of width"),
    ),
    "cam": (
        ScoreColumn("cam_pred", "string", None, "predicted class"),
        # low confidence = out of distribution (the maximum-softmax-probability baseline)
        ScoreColumn("cam_prob", "float32", "low", "probability of the predicted class"),
        ScoreColumn("cam_anomaly", "float32", "high", "probability of the anomalous class"),
        ScoreColumn("cam_map", "list<float32>", None, "class activation map, row-major"),
        ScoreColumn("cam_peak_y", "float32", None, "row of the map's peak, fraction of height"),
        ScoreColumn("cam_peak_x", "float32", None, "column of the map's peak, fraction of width"),
    ),
    "ocsvm": (ScoreColumn("ocsvm_score", "float64", "low", "OneClassSVM score of HOG features"),),
    "whitening": (
        ScoreColumn(
            "white_excess", "float32", "high", "most unpredictable spot: whitened residual energy, in std of that pixel"
        ),
        ScoreColumn(
            "white_deficit", "float32", "high", "smoothest spot: whitened residual energy below normal, in std"
        ),
        ScoreColumn("white_peak_y", "float32", None, "row of the most abnormal spot, fraction of height"),
        ScoreColumn("white_peak_x", "float32", None, "column of the most abnormal spot, fraction of width"),
    ),
}
