#!/usr/bin/env python3
"""Generates the oracle fixtures of src/metrics/oracle_tests.rs.

Input samples and the values numpy / scipy / scikit-learn compute from them,
written to tests/fixtures/*.json. Samples are stored as space-separated
decimal strings (`repr` of each float), which Rust parses exactly.

Run from the repository root:  python3 tests/oracle/gen_fixtures.py
Needs: numpy, scipy, scikit-learn (pip install numpy scipy scikit-learn).

Binned drift statistics follow src/metrics/mod.rs exactly: cut points are
np.quantile(reference, i / bins) (method "linear"), deduplicated; a value goes
to bin searchsorted(cuts, v, side="right"); proportions are smoothed as
(c / n + s) / (1 + k * s). The oracle for those is numpy / scipy on that
same binning; KS and Wasserstein are compared with scipy's exact values.
"""
import json
import os

import numpy as np
import scipy
import sklearn
from scipy import stats
from scipy.spatial.distance import jensenshannon
from sklearn import metrics as skm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
SMOOTHING = 1e-4
BINS = 10


def enc(xs):
    return " ".join(repr(float(x)) for x in xs)


def smoothed(counts):
    counts = np.asarray(counts, dtype=float)
    return (counts / counts.sum() + SMOOTHING) / (1 + len(counts) * SMOOTHING)


def binned(ref_counts, cur_counts):
    e, a = smoothed(ref_counts), smoothed(cur_counts)
    return {
        "psi": float(np.sum((a - e) * np.log(a / e))),
        "js_distance": float(jensenshannon(e, a, base=2)),
        "kl_divergence": float(stats.entropy(a, e)),
        "hellinger": float(np.sqrt(1 - np.sum(np.sqrt(a * e)))),
    }


def numeric_case(name, ref, cur):
    ref = np.asarray(ref, dtype=float)
    cur = np.asarray(cur, dtype=float)
    cuts = np.unique(np.quantile(ref, [i / BINS for i in range(1, BINS)]))
    k = len(cuts) + 1
    rc = np.bincount(np.searchsorted(cuts, ref, side="right"), minlength=k)
    cc = np.bincount(np.searchsorted(cuts, cur, side="right"), minlength=k)
    ks = stats.ks_2samp(ref, cur)
    w = stats.wasserstein_distance(ref, cur)
    out = {
        "name": name,
        "reference": enc(ref),
        "current": enc(cur),
        "cuts": [float(c) for c in cuts],
        "ks_statistic": float(ks.statistic),
        "ks_p_value_scipy": float(ks.pvalue),
        "wasserstein": float(w),
        "wasserstein_normed": float(w / np.std(ref)),
        "out_of_range_rate": float(np.mean((cur < ref.min()) | (cur > ref.max()))),
    }
    out.update(binned(rc, cc))
    return out


def categorical_case(name, ref, cur, max_categories=200):
    values, counts = np.unique(np.asarray(ref), return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
    kept = [str(values[i]) for i in order[:max_categories]]
    index = {c: i for i, c in enumerate(kept)}
    k = len(kept) + 1
    rc = np.bincount([index.get(v, k - 1) for v in ref], minlength=k)
    cc = np.bincount([index.get(v, k - 1) for v in cur], minlength=k)
    nonzero = (rc + cc) > 0
    table = np.vstack([rc[nonzero], cc[nonzero]])
    chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
    out = {
        "name": name,
        "max_categories": max_categories,
        "reference": list(ref),
        "current": list(cur),
        "categories": kept,
        "chi2_statistic": float(chi2),
        "chi2_p_value": float(p),
        "new_category_rate": float(cc[-1] / cc.sum()),
    }
    out.update(binned(rc, cc))
    return out


def binary_case(name, y, s, threshold=0.5):
    y = np.asarray(y, dtype=int)
    s = np.asarray(s, dtype=float)
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    bins = np.minimum((s * 10).astype(int), 9)
    ece = sum(
        abs(s[bins == b].sum() - y[bins == b].sum()) for b in range(10)
    ) / len(s)
    return {
        "name": name,
        "threshold": threshold,
        "y_true": enc(y),
        "score": enc(s),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred)),
        "recall": float(skm.recall_score(y, pred)),
        "f1": float(skm.f1_score(y, pred)),
        "fpr": float(fp / (fp + tn)),
        "specificity": float(tn / (fp + tn)),
        "roc_auc": float(skm.roc_auc_score(y, s)),
        "pr_auc": float(skm.average_precision_score(y, s)),
        "log_loss": float(skm.log_loss(y, s, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, s)),
        "expected_calibration_error": float(ece),
    }


def regression_case(name, y, p):
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    return {
        "name": name,
        "y_true": enc(y),
        "y_pred": enc(p),
        "mse": float(skm.mean_squared_error(y, p)),
        "rmse": float(np.sqrt(skm.mean_squared_error(y, p))),
        "mae": float(skm.mean_absolute_error(y, p)),
        "r2": float(skm.r2_score(y, p)),
        "mape": float(skm.mean_absolute_percentage_error(y, p)),
        "median_abs_error": float(skm.median_absolute_error(y, p)),
        "mean_error": float(np.mean(p - y)),
        "abs_errors_sorted": enc(np.sort(np.abs(p - y))),
    }


def multiclass_case(name, y, p):
    labels = sorted(set(y) | set(p))
    prec = skm.precision_score(y, p, labels=labels, average=None, zero_division=0)
    rec = skm.recall_score(y, p, labels=labels, average=None, zero_division=0)
    return {
        "name": name,
        "y_true": list(y),
        "y_pred": list(p),
        "accuracy": float(skm.accuracy_score(y, p)),
        "f1_macro": float(skm.f1_score(y, p, average="macro", zero_division=0)),
        "f1_micro": float(skm.f1_score(y, p, average="micro", zero_division=0)),
        "f1_weighted": float(skm.f1_score(y, p, average="weighted", zero_division=0)),
        # per class; precision only where the class was predicted
        "per_class": {
            c: {
                "precision": float(prec[i]) if c in set(p) else None,
                "recall": float(rec[i]) if c in set(y) else None,
            }
            for i, c in enumerate(labels)
        },
    }


def main():
    rng = np.random.default_rng(20240531)
    os.makedirs(OUT, exist_ok=True)
    versions = {"numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__}

    r = lambda a: np.round(a, 6)
    numeric = [
        numeric_case("normal_no_drift", r(rng.normal(0, 1, 3000)), r(rng.normal(0, 1, 1000))),
        numeric_case("normal_mean_shift", r(rng.normal(0, 1, 3000)), r(rng.normal(0.5, 1, 1000))),
        numeric_case("normal_scale_change", r(rng.normal(10, 2, 3000)), r(rng.normal(10, 4, 1000))),
        numeric_case("lognormal_skewed", r(rng.lognormal(0, 1, 2000)), r(rng.lognormal(0.3, 1.2, 800))),
        numeric_case("integer_ties", rng.integers(0, 6, 2000), rng.integers(1, 8, 700)),
        numeric_case("small_samples", r(rng.normal(0, 1, 200)), r(rng.normal(0.8, 1, 50))),
        numeric_case("far_out_of_range", r(rng.uniform(0, 1, 1000)), r(rng.uniform(5, 6, 300))),
    ]
    cats = ["a", "b", "c", "d", "e"]
    categorical = [
        categorical_case(
            "stable",
            list(rng.choice(cats, 2000, p=[0.4, 0.3, 0.15, 0.1, 0.05])),
            list(rng.choice(cats, 800, p=[0.4, 0.3, 0.15, 0.1, 0.05])),
        ),
        categorical_case(
            "shift_and_unseen",
            list(rng.choice(cats, 2000, p=[0.4, 0.3, 0.15, 0.1, 0.05])),
            list(rng.choice(cats + ["zz", "yy"], 800, p=[0.1, 0.1, 0.2, 0.2, 0.2, 0.1, 0.1])),
        ),
        categorical_case(
            "capped_categories",
            list(rng.choice(cats, 1000, p=[0.4, 0.3, 0.15, 0.1, 0.05])),
            list(rng.choice(cats, 500)),
            max_categories=3,
        ),
    ]
    n = 5000
    y = rng.integers(0, 2, n)
    # scores on the centres of the 2000 histogram bins: binned AUC is exact
    grid = (np.floor(np.clip(rng.beta(2 + 3 * y, 5 - 3 * y), 0, 0.9999) * 2000) + 0.5) / 2000
    y2 = rng.integers(0, 2, 3000)
    cont = np.clip(1 / (1 + np.exp(-(rng.normal(0, 1.5, 3000) + 1.2 * (2 * y2 - 1)))), 1e-6, 1 - 1e-6)
    binary = [
        binary_case("scores_on_bin_grid", y, grid),
        binary_case("continuous_scores", y2, cont, threshold=0.4),
    ]
    yt = rng.normal(50, 10, 2000)
    regression = [
        regression_case("noisy", r(yt), r(yt + rng.normal(1, 5, 2000))),
        regression_case("heavy_tail", r(yt), r(yt + rng.standard_t(2, 2000) * 3)),
    ]
    classes = ["cat", "dog", "fish", "bird"]
    mt = list(rng.choice(classes, 1500, p=[0.4, 0.3, 0.2, 0.1]))
    mp = [t if rng.random() < 0.7 else str(rng.choice(classes[:3])) for t in mt]
    multiclass = [multiclass_case("four_classes", mt, mp)]

    for name, cases in [
        ("drift_numeric", numeric),
        ("drift_categorical", categorical),
        ("binary", binary),
        ("regression", regression),
        ("multiclass", multiclass),
    ]:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump({"generated_by": "tests/oracle/gen_fixtures.py", "versions": versions, "cases": cases}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
