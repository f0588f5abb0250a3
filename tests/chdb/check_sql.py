#!/usr/bin/env python3
"""Proves modelwatch's ClickHouse SQL also runs on a current ClickHouse engine.

Runs, in chdb (an embedded current ClickHouse, `pip install chdb`):
  1. every statement of deploy/clickhouse/schema.sql (the 18.16 core schema
     and the example queries), and of tests/chdb/schema-modern.sql (the
     LowCardinality + TTL variant a current server gets), each in a fresh
     session, twice (migrations are idempotent);
  2. a small revision / replay scenario on window_metrics, alerts and
     reference_profiles, asserting that FINAL and argMax give exactly the
     values the Rust integration tests assert on ClickHouse 18.16.

Both SQL files are generated from src/sinks/clickhouse.rs and kept in sync by
its unit tests. Exit status 0 when everything passes.
"""

import pathlib
import sys
import tempfile
import time

try:
    from chdb import session as chs
except ImportError:  # pragma: no cover - environment problem, not a test failure mode
    sys.exit("chdb is not installed: pip install chdb")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMAS = [
    ROOT / "deploy" / "clickhouse" / "schema.sql",
    ROOT / "tests" / "chdb" / "schema-modern.sql",
]


def statements(path):
    """The SQL statements of a script: `;` at the end of a line ends one."""
    out, cur = [], []
    for line in path.read_text().splitlines():
        if line.startswith("--") or not line.strip():
            continue
        cur.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(cur).rstrip().rstrip(";"))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def rows(sess, sql):
    """Query result as a list of tuples of strings (TabSeparated)."""
    text = str(sess.query(sql, "TabSeparated")).strip("\n")
    return [tuple(line.split("\t")) for line in text.split("\n")] if text else []


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    print(f"ok  {name}")


def run_schema(path):
    stmts = statements(path)
    if not stmts:
        raise AssertionError(f"{path} has no statements")
    with tempfile.TemporaryDirectory(prefix="modelwatch-chdb-") as tmp:
        sess = chs.Session(tmp)
        try:
            for _ in range(2):
                for sql in stmts:
                    try:
                        sess.query(sql, "TabSeparated")
                    except Exception as e:  # chdb raises a generic error
                        raise AssertionError(f"{path.name}: {e}\n--- statement ---\n{sql}") from e
            print(f"ok  {path.relative_to(ROOT)}: {len(stmts)} statements, twice")
            scenario(sess)
        finally:
            sess.close()


def scenario(sess):
    # Recent times: the modern schema has a 90-day TTL that would drop old rows.
    t0 = int(time.time()) // 300 * 300 - 3600
    values = []
    # (metric, feature, window_start, value, samples, p_value, revision)
    first = [
        ("accuracy", "", t0, 0.5, 101, None, 1),
        ("prediction_count", "", t0, 200.0, 101, None, 1),
        ("psi", "age", t0, 0.31, 101, None, 1),
        ("ks_statistic", "age", t0, 0.2, 101, 0.01, 1),
        ("accuracy", "", t0 + 300, 0.75, 101, None, 1),
    ]
    revised = [("accuracy", "", t0, 0.625, 102, None, 2)]
    for batch in (first, first, revised, first[:1]):
        for m, f, ws, v, n, p, rev in batch:
            pv = "NULL" if p is None else repr(p)
            values.append(
                f"('fraud','v1','',toDateTime({ws}),300,'{m}','{f}',{v!r},{n},{pv},{rev})"
            )
        sess.query(
            "INSERT INTO modelwatch.window_metrics VALUES " + ",".join(values), "TabSeparated"
        )
        values = []
    got = rows(
        sess,
        "SELECT metric, feature, toUInt32(window_start), value, samples, p_value, revision "
        "FROM modelwatch.window_metrics FINAL ORDER BY window_start, metric, feature",
    )
    check(
        "window_metrics FINAL keeps the newest revision once",
        got,
        [
            ("accuracy", "", str(t0), "0.625", "102", "\\N", "2"),
            ("ks_statistic", "age", str(t0), "0.2", "101", "0.01", "1"),
            ("prediction_count", "", str(t0), "200", "101", "\\N", "1"),
            ("psi", "age", str(t0), "0.31", "101", "\\N", "1"),
            ("accuracy", "", str(t0 + 300), "0.75", "101", "\\N", "1"),
        ],
    )
    got = rows(
        sess,
        "SELECT toUInt32(window_start), argMax(value, revision) FROM modelwatch.window_metrics "
        "WHERE metric = 'accuracy' GROUP BY window_start ORDER BY window_start",
    )
    check("argMax agrees with FINAL", got, [(str(t0), "0.625"), (str(t0 + 300), "0.75")])

    alert = (
        "('a1','feature_drift','{status}','critical','fraud','v2','country=DE','age','psi',0.42,0.2,"
        "NULL,0.003,toDateTime({t0}),toDateTime({t1}),toDateTime({fired_s}),"
        "{t0}000,{t1}000,{fired_ms},'psi of age is 0.42')"
    )
    firing_ms, resolved_ms = (t0 + 301) * 1000 + 234, (t0 + 601) * 1000
    firing = alert.format(
        status="firing", t0=t0, t1=t0 + 300, fired_s=firing_ms // 1000, fired_ms=firing_ms
    )
    resolved = alert.format(
        status="resolved", t0=t0, t1=t0 + 300, fired_s=resolved_ms // 1000, fired_ms=resolved_ms
    )
    for batch in ([firing, resolved], [firing]):
        sess.query("INSERT INTO modelwatch.alerts VALUES " + ",".join(batch), "TabSeparated")
    got = rows(sess, "SELECT status, fired_at_ms FROM modelwatch.alerts FINAL ORDER BY status")
    check(
        "a replayed alert is one row after FINAL",
        got,
        [("firing", str(firing_ms)), ("resolved", str(resolved_ms))],
    )

    for rev, profile in ((1, '{"n":1}'), (2, '{"n":2}')):
        sess.query(
            "INSERT INTO modelwatch.reference_profiles VALUES "
            f"('fraud','v1',toDateTime({t0}),{rev},{rev * 1000},'{profile}')",
            "TabSeparated",
        )
    got = rows(
        sess,
        "SELECT model_id, model_version, argMax(profile, revision) FROM modelwatch.reference_profiles "
        "GROUP BY model_id, model_version ORDER BY model_id, model_version",
    )
    check("the newest reference profile wins", got, [("fraud", "v1", '{"n":2}')])


def main():
    sess = chs.Session()  # in memory
    version = rows(sess, "SELECT version()")
    sess.close()
    print(f"chdb engine {version[0][0] if version else '?'}")
    for path in SCHEMAS:
        run_schema(path)
    print("all SQL checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
