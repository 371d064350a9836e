"""Label metrics: exact with every labelled row, unbiased when the normals are sampled."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from jobs.reduce_metrics import Confusion, LabelledSample, label_codes


def _data(n: int = 40_000, n_anom: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.zeros(n, bool)
    y[rng.choice(n, n_anom, replace=False)] = True
    return rng.normal(size=n) + 1.5 * y, y


def test_label_codes() -> None:
    codes = label_codes(["anomaly", "3", None, "anomaly", ""], "anomaly")
    assert codes.tolist() == [1, 0, -1, 1, 0]


@pytest.mark.parametrize("direction", ["high", "low"])
def test_exact_when_everything_fits(direction: str) -> None:
    x, y = _data()
    x = x if direction == "high" else -x
    s = LabelledSample()
    for start in range(0, len(x), 3000):
        s.feed(x[start : start + 3000], y[start : start + 3000].astype(np.int8))
    m = s.metrics(direction)
    assert m is not None and not m["normals_sampled"]
    oriented = x if direction == "high" else -x
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, oriented), abs=1e-12)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, oriented), abs=1e-12)


def test_sampled_normals_stay_close() -> None:
    x, y = _data()
    s = LabelledSample(max_normals=5000)
    for start in range(0, len(x), 3000):
        s.feed(x[start : start + 3000], y[start : start + 3000].astype(np.int8))
    m = s.metrics("high")
    assert m is not None and m["normals_sampled"] and m["n_labelled"] == len(x)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, x), abs=0.02)
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, x), abs=0.05)


def test_no_metrics_without_both_classes() -> None:
    s = LabelledSample()
    s.feed(np.arange(5.0), np.zeros(5, np.int8))
    assert s.metrics("high") is None


def test_confusion_ignores_unknown_labels() -> None:
    c = Confusion()
    c.update(np.array([True, True, False, False, True]), np.array([1, 0, 1, 0, -1], np.int8))
    assert c.to_json()["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert c.to_json()["f1"] == pytest.approx(0.5)
