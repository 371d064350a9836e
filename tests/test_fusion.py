"""The one anomaly score: tail probabilities, their combination, and what each detector declares."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from scipy import stats

from detectors.base import calibration_stats
from detectors.fusion import (
    MissingDeclarationError,
    anomaly_score,
    combine_pvalues,
    fuse,
    null_calibration,
    tail_pvalue,
)

RNG_SEED = 0


def _calibration(values: np.ndarray) -> dict[str, Any]:
    return json.loads(json.dumps(calibration_stats(values)))  # as stored in meta.json


def test_tail_pvalue_reads_the_calibration_and_keeps_falling_past_it() -> None:
    rng = np.random.default_rng(RNG_SEED)
    cal = _calibration(rng.normal(size=500))
    x = np.array([-10.0, 0.0, 1.2816, 2.0, 3.0, 5.0, 10.0, np.nan])
    p = tail_pvalue(x, cal, "high")
    assert p[0] == 1.0 and np.isnan(p[-1])  # below every normal score: nothing unusual
    assert abs(p[1] - 0.5) < 0.06 and abs(p[2] - 0.1) < 0.03  # the empirical body
    assert np.all(np.diff(p[:-1]) < 0)  # strictly falling, also beyond the sample's max
    # ten standard deviations out is far below the sample's floor of 1/501 (not at the normal
    # distribution's 1e-23: 50 exceedances cannot tell a normal tail from a heavier one)
    assert p[-2] < 1e-4
    low = tail_pvalue(-x, cal | {"sample": sorted(-np.asarray(cal["sample"]))}, "low")
    np.testing.assert_allclose(low[:-1], p[:-1])


def test_tail_pvalue_is_uniform_on_new_normal_scores() -> None:
    rng = np.random.default_rng(RNG_SEED)
    cal = _calibration(rng.gamma(2.0, size=1000))
    p = tail_pvalue(rng.gamma(2.0, size=20_000), cal, "high")
    assert stats.kstest(p, "uniform").statistic < 0.03
    assert abs(np.mean(p < 0.01) - 0.01) < 0.004


@pytest.mark.parametrize("draw", ["lognormal", "student_t"])
def test_tail_pvalue_stays_a_probability_on_a_small_calibration(draw: str) -> None:
    """12 calibration scores (a bundle trained on ~120 images) of a heavy-tailed score: new
    normal scores get p < 0.001 about as rarely as 0.1% (an exponential fitted to the top 5
    gave 1.8-2.7%: normal images far in a tail the 12 scores did not show)."""
    rng = np.random.default_rng(RNG_SEED)
    sample = {"lognormal": lambda n: rng.lognormal(0.0, 1.0, n), "student_t": lambda n: rng.standard_t(3, n)}[draw]
    p = np.concatenate([tail_pvalue(sample(1000), _calibration(sample(12)), "high") for _ in range(100)])
    assert np.mean(p < 0.001) <= 0.002
    assert np.mean(p < 0.01) <= 0.015
    beyond = np.sort(p[p < 1 / 13])  # past the sample: still ranked, not one floor value
    assert len(np.unique(beyond)) > 0.9 * len(beyond)


def test_tail_pvalue_never_rises_with_the_score_even_on_tied_calibration_scores() -> None:
    """A discrete score (most normal images at 0): p only falls as the score grows, past ties too."""
    x = np.array([-1.0, 0.0, 1e-12, 0.5, 1.0, 2.0, 1e6])
    for sample in ([0.0] * 10 + [1.0, 1.0], [0.0] * 12, [5.0, 5.0], [0.0, 1.0, 2.0]):
        p = tail_pvalue(x, _calibration(np.array(sample)), "high")
        assert np.all(np.diff(p) <= 0) and np.all((p > 0) & (p <= 1)), (sample, p)


def test_tail_pvalue_needs_a_calibration_sample() -> None:
    with pytest.raises(ValueError, match="calibration sample"):
        tail_pvalue(np.zeros(3), {"n": 10, "mean": 0.0}, "high")


@pytest.mark.parametrize("dependence", ["independent", "identical", "correlated"])
def test_combined_p_is_uniform_for_normal_rows(dependence: str) -> None:
    """Normal rows (uniform p per column): the combined p is uniform whatever ties the columns."""
    rng = np.random.default_rng(RNG_SEED)
    n, k = 40_000, 5
    if dependence == "independent":
        z = rng.normal(size=(k, n))
    elif dependence == "identical":
        z = np.repeat(rng.normal(size=(1, n)), k, axis=0)
    else:  # equicorrelated 0.6
        z = np.sqrt(0.6) * rng.normal(size=(1, n)) + np.sqrt(0.4) * rng.normal(size=(k, n))
    p = combine_pvalues(list(stats.norm.sf(z)))
    # the tail is what thresholds read, and it holds; the body is moved by the cap at 0.5
    assert abs(np.mean(p < 0.001) - 0.001) < 0.0005
    assert abs(np.mean(p < 0.01) - 0.01) < 0.002
    assert p.max() <= 0.5


def test_one_extreme_column_is_enough() -> None:
    """A row anomalous in one score only is flagged: about k * its p, not diluted by the others."""
    normal = [np.full(3, 0.5)] * 5
    p = combine_pvalues([np.array([1e-6, 1e-12, 1e-200]), *normal])
    np.testing.assert_allclose(p, 6 * np.array([1e-6, 1e-12, 1e-200]), rtol=1e-3)
    # nor cancelled by scores on their normal side: p = 1 (beyond every normal image the
    # wrong way, as HOG energy of noise) is no evidence of normality
    very_normal = [np.ones(3)] * 5
    np.testing.assert_allclose(combine_pvalues([np.array([1e-6, 1e-12, 1e-200]), *very_normal]), p, rtol=1e-9)
    assert combine_pvalues([np.array([0.3, np.nan]), np.array([np.nan, np.nan])])[1] != 0.3
    assert np.isnan(combine_pvalues([np.array([np.nan]), np.array([np.nan])])[0])


def test_fuse_reads_only_the_declared_columns() -> None:
    rng = np.random.default_rng(RNG_SEED)
    cal = {"recon_error": _calibration(rng.gamma(2.0, size=300)), "gmm_loglik": _calibration(rng.normal(size=300))}
    scores = {"recon_error": np.array([1.0, 30.0]), "gmm_loglik": np.array([0.0, 0.0])}
    one = fuse(scores, cal, ["recon_error"])
    both = fuse(scores, cal, ["recon_error", "gmm_loglik"])
    assert one[1] > 3 and both[1] > 3 and one[0] < 1  # row 1 is flagged at 1-in-1000 either way
    # a column nobody declared never enters, whatever it holds
    np.testing.assert_array_equal(fuse(scores | {"ocsvm_score": np.array([-1e9, 1e9])}, cal, ["recon_error"]), one)
    # the low side: a very LOW log-likelihood is the anomaly
    assert fuse({"gmm_loglik": np.array([-40.0, 40.0])}, cal, ["gmm_loglik"])[0] > 3
    with pytest.raises(ValueError, match=r"\['ocsvm_score'\] have no scores or no calibration"):
        fuse(scores, cal, ["ocsvm_score"])


def test_each_model_gets_one_vote_whatever_its_number_of_columns() -> None:
    """Grouped by detector, a model's columns are combined first: a detector that exposes three
    views of one normal score does not outvote a detector with one column that sees the anomaly."""
    rng = np.random.default_rng(RNG_SEED)
    same = _calibration(rng.normal(size=300))
    cal = {c: same for c in ("recon_error", "recon_local", "ae_kl")}
    cal["gmm_loglik"] = _calibration(rng.normal(size=300))
    noise = rng.normal(size=50)  # normal rows in every column of the autoencoder
    scores = {"recon_error": noise, "recon_local": noise, "ae_kl": noise, "gmm_loglik": np.full(50, -4.0)}
    three = fuse(scores, cal, {"autoencoder": ["recon_error", "recon_local", "ae_kl"], "mixture": ["gmm_loglik"]})
    one = fuse(scores, cal, {"autoencoder": ["recon_error"], "mixture": ["gmm_loglik"]})
    np.testing.assert_allclose(three, one, rtol=1e-9)  # identical columns: the same vote as one of them
    flat = fuse(scores, cal, ["recon_error", "recon_local", "ae_kl", "gmm_loglik"])
    # flat, the anomaly's p is diluted about 4x instead of 2x
    assert np.all(three >= flat) and np.median(three - flat) > np.log10(1.9)
    # a row anomalous in one column of a two-column detector is still flagged at 1-in-1000
    scores2 = {"recon_error": np.array([0.0, 0.0]), "recon_local": np.array([0.0, 8.0]), "gmm_loglik": np.zeros(2)}
    f = fuse(scores2, cal, {"autoencoder": ["recon_error", "recon_local"], "mixture": ["gmm_loglik"]})
    assert f[0] < 1 and f[1] > 3


def test_null_calibration_is_the_tail_by_construction() -> None:
    cal = null_calibration()
    assert cal["quantiles"] == {"0.95": pytest.approx(1.30103), "0.99": 2.0, "0.999": 3.0}
    assert "sample" not in cal and "mean" not in cal  # the body is not known: no KS, no mean shift
    json.dumps(cal, allow_nan=False)  # strict JSON: it goes into summaries
    z = np.random.default_rng(RNG_SEED).normal(size=(4, 100_000))
    fused = -np.log10(combine_pvalues(list(stats.norm.sf(z))))
    np.testing.assert_allclose(np.quantile(fused, 0.99), cal["quantiles"]["0.99"], rtol=0.05)


def test_an_artifact_without_the_declaration_is_refused() -> None:
    old = SimpleNamespace(name="autoencoder", calibration_={}, anomaly_columns_=None)  # restored from format 1
    with pytest.raises(MissingDeclarationError, match="retrain the bundle"):
        anomaly_score([old], {"recon_error": np.zeros(2)})  # type: ignore[list-item]


@pytest.mark.heavy
def test_each_detector_declares_what_means_something_for_its_model(digits16: Any, tmp_path: Any, capsys: Any) -> None:
    """The declaration follows the configuration, survives a round trip, and a bundle without it is refused."""
    from detectors import AutoencoderDetector, CamDetector, MixtureDetector, OcsvmDetector
    from jobs.bundle import BundleError, ModelBundle, bundle_version, check_bundle

    images, labels = digits16
    zeros = images[labels == 0][:60]
    small: dict[str, Any] = {"filters": (8, 16), "latent_dim": 4, "epochs": 1}
    ae: dict[str, Any] = {"input_size": 16, **small}
    two = np.isin(labels, [0, 1])
    x2, y2 = images[two][:80], labels[two][:80].astype(str)
    cases = [
        (AutoencoderDetector(**ae).fit(zeros), ("recon_error", "recon_local")),
        (AutoencoderDetector(**ae, variational=True).fit(zeros), ("recon_error", "recon_local", "ae_kl")),
        (
            MixtureDetector(input_size=16, n_components=1, local=False, autoencoder_params=small).fit(zeros),
            ("gmm_loglik",),
        ),
        (CamDetector(input_size=16, epochs=1, filters=(8, 16)).fit(zeros), ("cam_anomaly",)),  # self-made defects
        (CamDetector(input_size=16, epochs=1, filters=(8, 16)).fit(x2, y2), ("cam_prob",)),  # classes, no anomaly
        (CamDetector(input_size=16, epochs=1, filters=(8, 16), anomaly_class="1").fit(x2, y2), ("cam_anomaly",)),
        (OcsvmDetector(input_size=16).fit(zeros), ("ocsvm_score",)),
    ]
    for det, expected in cases:
        assert det.anomaly_columns_ == expected, type(det).__name__
        again = type(det).from_files(det.to_files())
        assert again.anomaly_columns_ == expected
    bundle = ModelBundle({"autoencoder": cases[0][0], "ocsvm": cases[-1][0]}, input_size=16, channels=1)
    scores = bundle.score(images[:40])
    assert scores["anomaly_score"].shape == (40,) and np.all(np.isfinite(scores["anomaly_score"]))
    assert bundle.calibration["anomaly_score"]["quantiles"]["0.999"] == pytest.approx(3.0)

    # a bundle whose meta.json lacks the declaration (trained before it existed): one line, before any scoring
    uri = str(tmp_path / "old")
    bundle.save(uri)
    meta_path = tmp_path / "old" / "ocsvm" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["anomaly_columns"]
    meta_path.write_text(json.dumps(meta))
    # ... and a version hash that matches its files, as an old bundle's does
    manifest_path = tmp_path / "old" / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    files = [f"{d}/{f}" for d, names in manifest["detectors"].items() for f in names]
    manifest["version"] = bundle_version(
        {f: hashlib.sha256((tmp_path / "old" / f).read_bytes()).digest() for f in files}
    )
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"ocsvm.*meta.json: trained by an imgscan that did not declare") as e:
        check_bundle(uri)
    assert "\n" not in str(e.value)
    with pytest.raises(MissingDeclarationError, match="ocsvm detector was trained before"):
        old = ModelBundle.load(uri)
        old.score(images[:2])
    from jobs.cli import main

    capsys.readouterr()
    assert main(["score", "--source", str(tmp_path / "src"), "--models", uri, "--out", str(tmp_path / "res")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "retrain the bundle" in err, err
    assert not (tmp_path / "res").exists()  # refused before anything was written
