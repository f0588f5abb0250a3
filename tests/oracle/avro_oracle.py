#!/usr/bin/env python3
"""Independent oracle for src/ingest/decode.rs: encodes fixed events with
fastavro (not the Rust code) and prints the parsing canonical forms, the
CRC-64-AVRO fingerprints and the raw / single-object datums as hex.

    pip install fastavro==1.13.1
    python3 tests/oracle/avro_oracle.py > tests/oracle/avro_vectors.json

The events here are mirrored by hand in the Rust tests (`oracle_events`).
"""
import io
import json
import os

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def load(name):
    with open(os.path.join(ROOT, "schemas", name + ".avsc")) as f:
        return fastavro.parse_schema(json.load(f))


def datum(schema, record):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def main():
    schemas = {n: load(n) for n in ("PredictionEvent", "GroundTruthEvent", "AlertEvent")}
    out = {"fastavro": fastavro.__version__, "schemas": {}, "datums": {}}
    for name, s in schemas.items():
        pcf = to_parsing_canonical_form(s)
        out["schemas"][name] = {
            "canonical_form": pcf,
            # fastavro returns the 8 fingerprint bytes little-endian, as the
            # single-object header carries them.
            "fingerprint_le_hex": fingerprint(pcf, "CRC-64-AVRO"),
        }

    prediction_full = {
        "request_id": "req-1",
        "model_id": "churn",
        "model_version": "v2",
        "timestamp": 1700000000123,
        "features": {
            "age": ("long", 42),
            "income": ("double", 1234.5),
            "country": ("string", "DE"),
            "vip": ("boolean", True),
            "missing": None,
            "ratio": ("double", float("inf")),
            "delta": ("long", -7),
        },
        "predicted_label": "1",
        "predicted_value": None,
        "score": 0.875,
        "class_probabilities": {"0": 0.125, "1": 0.875},
        "segments": {"country": "DE", "channel": "web"},
        "latency_ms": 3.25,
    }
    prediction_min = {
        "request_id": "r",
        "model_id": "m",
        "model_version": "1",
        "timestamp": 1,
        "features": {},
        "predicted_label": None,
        "predicted_value": -2.5,
        "score": None,
        "class_probabilities": None,
        "segments": {},
        "latency_ms": None,
    }
    ground_truth = {
        "request_id": "req-1",
        "timestamp": 1700000600000,
        "actual_label": "0",
        "actual_value": None,
    }
    alert = {
        "alert_id": "a1b2",
        "rule": "psi_high",
        "status": "firing",
        "severity": "critical",
        "model_id": "churn",
        "model_version": "v2",
        "segment": "country=DE",
        "feature": "income",
        "metric": "psi",
        "value": 0.31,
        "threshold": 0.2,
        "baseline": None,
        "p_value": 0.001,
        "window_start": 1700000000000,
        "window_end": 1700000300000,
        "fired_at": 1700000301000,
        "message": "psi 0.31 > 0.2",
    }
    cases = {
        "prediction_full": ("PredictionEvent", prediction_full),
        "prediction_min": ("PredictionEvent", prediction_min),
        "ground_truth": ("GroundTruthEvent", ground_truth),
        "alert": ("AlertEvent", alert),
    }
    for key, (name, record) in cases.items():
        raw = datum(schemas[name], record)
        fp = bytes.fromhex(out["schemas"][name]["fingerprint_le_hex"])
        out["datums"][key] = {
            "raw_hex": raw.hex(),
            "single_object_hex": (b"\xc3\x01" + fp + raw).hex(),
        }
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
