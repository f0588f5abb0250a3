#!/usr/bin/env python3
"""Generates the oracle fixtures of the change detectors, the Wilson
intervals and label drift (src/metrics/oracle_tests.rs):

- tests/fixtures/detectors.json: error streams and the indices where River's
  ADWIN and PageHinkley report `drift_detected` (default and custom
  parameters);
- tests/fixtures/wilson.json: statsmodels `proportion_confint(method="wilson")`
  for (count, nobs) pairs and for the rates of a binary confusion matrix;
- tests/fixtures/label_drift.json: label distributions (classes and binned
  regression values) against a reference, with the binned statistics of
  gen_fixtures.py and scipy's chi2_contingency.

Run from the repository root:  python3 tests/oracle/gen_stats2_fixtures.py
Needs: numpy, scipy, statsmodels, river
(pip install numpy scipy statsmodels river).
"""
import json
import os
import sys

import numpy as np
import river
import scipy
import statsmodels
from river import drift
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_fixtures import binned, categorical_case, enc  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
BINS = 10


def detections(detector, xs):
    out = []
    for i, x in enumerate(xs):
        detector.update(x)
        if detector.drift_detected:
            out.append(i)
    return out


def detector_case(name, xs, adwin=None, ph=None):
    adwin = adwin or {}
    ph = ph or {}
    xs = [float(x) for x in xs]
    return {
        "name": name,
        "values": enc(xs),
        "adwin_params": adwin,
        "page_hinkley_params": ph,
        "adwin": detections(drift.ADWIN(**adwin), xs),
        "page_hinkley": detections(drift.PageHinkley(**ph), xs),
    }


def wilson(count, nobs):
    lo, hi = proportion_confint(count, nobs, alpha=0.05, method="wilson")
    return {"count": int(count), "nobs": int(nobs), "low": float(lo), "high": float(hi)}


def label_numeric_case(name, ref, cur):
    ref = np.asarray(ref, dtype=float)
    cur = np.asarray(cur, dtype=float)
    cuts = np.unique(np.quantile(ref, [i / BINS for i in range(1, BINS)]))
    k = len(cuts) + 1
    rc = np.bincount(np.searchsorted(cuts, ref, side="right"), minlength=k)
    cc = np.bincount(np.searchsorted(cuts, cur, side="right"), minlength=k)
    nonzero = (rc + cc) > 0
    chi2, p, _, _ = stats.chi2_contingency(np.vstack([rc[nonzero], cc[nonzero]]), correction=False)
    out = {
        "name": name,
        "kind": "regression",
        "reference": enc(ref),
        "current": enc(cur),
        "chi2_statistic": float(chi2),
        "chi2_p_value": float(p),
    }
    out.update(binned(rc, cc))
    return out


def main():
    rng = np.random.default_rng(20240601)
    versions = {
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "statsmodels": statsmodels.__version__,
        "river": river.__version__,
    }
    b = lambda p, n: (rng.random(n) < p).astype(float)
    custom_adwin = {"delta": 0.05, "clock": 1, "max_buckets": 3, "min_window_length": 10, "grace_period": 50}
    custom_ph = {"min_instances": 50, "delta": 0.01, "threshold": 20.0, "alpha": 0.999}
    ramp = np.concatenate([b(0.05 + 0.45 * i / 2000, 1) for i in range(2000)])
    abs_err = np.round(np.abs(np.concatenate([rng.normal(0, 1, 1500), rng.normal(0, 3, 1500)])), 6)
    detectors = [
        detector_case("binary_error_rate_jump", np.concatenate([b(0.1, 1500), b(0.35, 1500)])),
        detector_case("binary_error_stationary", b(0.2, 4000)),
        detector_case("binary_error_rate_drop", np.concatenate([b(0.5, 1000), b(0.1, 2000)])),
        detector_case("gradual_ramp", ramp),
        detector_case("regression_abs_error_shift", abs_err),
        detector_case(
            "custom_parameters",
            np.concatenate([b(0.1, 1000), b(0.3, 1000), b(0.1, 1000)]),
            adwin=custom_adwin,
            ph=custom_ph,
        ),
        detector_case("several_changes", np.concatenate([b(p, 700) for p in [0.1, 0.6, 0.2, 0.9, 0.05]])),
    ]

    pairs = [(0, 10), (10, 10), (1, 1), (0, 1), (37, 100), (500, 1000), (3, 7), (999, 1000), (12345, 54321)]
    y = rng.integers(0, 2, 700)
    score = np.round(np.clip(rng.beta(2 + 3 * y, 5 - 3 * y), 0, 1), 6)
    pred = (score >= 0.5).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    wilson_fixture = {
        "pairs": [wilson(c, n) for c, n in pairs],
        "binary": {
            "y_true": enc(y),
            "score": enc(score),
            "threshold": 0.5,
            "accuracy": wilson(tp + tn, len(y)),
            "precision": wilson(tp, tp + fp),
            "recall": wilson(tp, tp + fn),
            "fpr": wilson(fp, fp + tn),
            "specificity": wilson(tn, fp + tn),
        },
    }

    classes = ["cat", "dog", "fish", "bird"]
    yt = rng.normal(50, 10, 1500)
    label_cases = [
        dict(categorical_case(
            "classes_stable",
            list(rng.choice(classes, 1000, p=[0.4, 0.3, 0.2, 0.1])),
            list(rng.choice(classes, 600, p=[0.4, 0.3, 0.2, 0.1])),
        ), kind="multiclass"),
        dict(categorical_case(
            "classes_shift_and_unseen",
            list(rng.choice(classes, 1000, p=[0.4, 0.3, 0.2, 0.1])),
            list(rng.choice(classes + ["eel"], 600, p=[0.1, 0.2, 0.3, 0.3, 0.1])),
        ), kind="multiclass"),
        label_numeric_case("values_stable", np.round(yt[:1000], 6), np.round(yt[1000:], 6)),
        label_numeric_case(
            "values_shift", np.round(yt[:1000], 6), np.round(rng.normal(56, 12, 500), 6)
        ),
    ]

    os.makedirs(OUT, exist_ok=True)
    for name, body in [
        ("detectors", {"cases": detectors}),
        ("wilson", wilson_fixture),
        ("label_drift", {"cases": label_cases}),
    ]:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(dict(generated_by="tests/oracle/gen_stats2_fixtures.py", versions=versions, **body), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
