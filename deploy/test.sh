#!/usr/bin/env bash
# Sets up everything the tests need (idempotent: skips what is there) and runs
# every test: unit, property, oracle, integration against a real ClickHouse
# server and MockCluster, end-to-end against a separate tansu broker, and the
# modern-ClickHouse (chdb) check of the shipped SQL.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. ClickHouse server binary (the tests start private servers on free ports).
if ! command -v clickhouse-server >/dev/null 2>&1 && [ ! -x /usr/sbin/clickhouse-server ]; then
  echo "== installing clickhouse-server (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq clickhouse-server clickhouse-client >/dev/null
fi

# 1b. Build and test packages: OpenSSL headers for librdkafka's TLS / SASL,
# stunnel4 and the openssl CLI for the TLS broker of tests/it/kafka_tls.rs.
deploy/build-deps.sh --test

# 2. The tansu broker, built once into a cache outside the repo.
echo "== tansu broker"
MODELWATCH_TANSU_BIN="$(deploy/install-tansu.sh)"
export MODELWATCH_TANSU_BIN

# 3. chdb for the modern-ClickHouse SQL check.
if ! python3 -c 'import chdb' >/dev/null 2>&1; then
  echo "== installing chdb (PyPI)"
  python3 -m pip install --quiet chdb
fi

# 4. The tests.
echo "== cargo test"
cargo test --all-targets --locked
echo "== chdb: the shipped SQL on a current ClickHouse engine"
python3 tests/chdb/check_sql.py
echo "== browser: the dashboard in headless Chromium (screenshots in target/browser-artifacts)"
tests/browser/run.sh
echo "== fuzz: the decoders under libFuzzer, from the committed corpus (deploy/fuzz.sh)"
deploy/fuzz.sh
