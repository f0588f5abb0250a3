#!/usr/bin/env python3
"""Loads each dashboard page in headless Chromium, saves a screenshot and the
rendered DOM, and checks the rendered values against the API's JSON.

Usage: check.py BASE_URL ARTEFACT_DIR  (CHROMIUM: the browser binary)
"""
import json
import os
import re
import subprocess
import sys
import urllib.request

BASE, ART = sys.argv[1].rstrip("/"), sys.argv[2]
CHROMIUM = os.environ.get("CHROMIUM", "chromium")
MODEL = "fraud-detector"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--virtual-time-budget=15000", "--run-all-compositor-stages-before-draw"]


def api(path):
    with urllib.request.urlopen(BASE + path, timeout=30) as r:
        return json.load(r)


def browse(name, fragment, height=2200):
    url = f"{BASE}/{fragment}"
    dom = subprocess.run([CHROMIUM, *FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    if dom.returncode != 0:
        sys.exit(f"chromium failed on {url}: {dom.stderr[-2000:]}")
    with open(os.path.join(ART, f"{name}.html"), "w") as f:
        f.write(dom.stdout)
    shot = os.path.join(ART, f"{name}.png")
    subprocess.run([CHROMIUM, *FLAGS, f"--window-size=1400,{height}", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120, check=True)
    if not os.path.getsize(shot) > 10_000:
        sys.exit(f"screenshot {shot} is suspiciously small")
    if 'data-rendered="true"' not in dom.stdout:
        sys.exit(f"{name}: the page did not finish rendering")
    return dom.stdout


def attr(html, name, pattern=r"[^\"]*"):
    m = re.search(rf'{name}="({pattern})"', html)
    return m.group(1) if m else None


def field(html, name):
    m = re.search(rf'data-field="{name}"[^>]*>([^<]*)<', html)
    return m.group(1).strip() if m else None


def fmt(v, digits=3):
    if v is None:
        return "–"
    if float(v).is_integer() and abs(v) >= 1:
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


failures = []


def expect(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


# Overview: the model, its status and open alerts as the API reports them.
models = api("/api/models")["models"]
model = next(m for m in models if m["model_id"] == MODEL)
html = browse("overview", "#/")
card = html[html.index(f'data-model="{MODEL}"'):]
expect(field(card, "status") == model["status"], f"overview status {model['status']}")
expect(field(card, "open_alerts") == str(model["open_alerts"]), f"overview open alerts {model['open_alerts']}")
expect(model["open_alerts"] > 0, "the demo raised alerts")
expect(field(card, "drifted_count") == str(len(model["drifted_features"])), "overview drifted feature count")

# Model page: accuracy chart, heatmap with drifted cells, drift table.
v1 = "v1"
acc = api(f"/api/models/{MODEL}/timeseries?metric=accuracy,estimated_accuracy")
pts = [p["value"] for s in acc["series"] if s["metric"] == "accuracy" for p in s["points"]]
n_points = sum(len(s["points"]) for s in acc["series"])
heat = api(f"/api/models/{MODEL}/heatmap?version={v1}&metric=psi")
drifted_cells = sum(1 for row in heat["drift_detected"] for d in row if d == 1)
html = browse("model", f"#/model/{MODEL}?version={v1}", height=2600)
expect(attr(html, 'data-chart="accuracy" data-points', r"\d+") == str(n_points), f"accuracy chart has {n_points} points")
expect(field(html, "min_accuracy") == fmt(min(pts)), f"lowest accuracy {fmt(min(pts))} shown")
expect(min(pts) < 0.8 < max(pts), f"accuracy drops (from {max(pts):.3f} to {min(pts):.3f})")
expect(attr(html, 'data-features', r"\d+") == str(len(heat["features"])), f"heatmap has {len(heat['features'])} features")
expect(attr(html, 'data-drifted-cells', r"\d+") == str(drifted_cells), f"heatmap shows {drifted_cells} drifted cells")
expect(drifted_cells > 0, "drift is visible")
drift = api(f"/api/models/{MODEL}/drift?version={v1}")
top = drift["features"][0]
row = html[html.index(f'data-feature="{top["feature"]}"'):]
expect(field(row, "drifted_windows") == f'{top["drifted_windows"]} / {top["windows"]}', f"drift table row of {top['feature']}")

# Alerts page: as many rows as the API returns.
alerts = api("/api/alerts?limit=500")
html = browse("alerts", "#/alerts")
expect(field(html, "alert_count") == f'{alerts["count"]} alerts', f"alerts page lists {alerts['count']} alerts")
expect(html.count('class="alert-row"') == alerts["count"], "one row per alert")

# Version comparison: accuracy of both versions.
cmp_ = api(f"/api/models/{MODEL}/compare?a=v1&b=v2")
acc_row = next(m for m in cmp_["metrics"] if m["metric"] == "accuracy")
html = browse("compare", f"#/compare/{MODEL}?a=v1&b=v2")
row = html[html.index('data-metric="accuracy"'):]
for side in ("a", "b"):
    m = re.search(rf'data-side="{side}">([^<]*)<', row)
    expect(m is not None and m.group(1) == fmt(acc_row[side]["value"], 4), f"compare accuracy {side} {fmt(acc_row[side]['value'], 4)}")

if failures:
    sys.exit(f"{len(failures)} check(s) failed")
print("all dashboard checks passed")
