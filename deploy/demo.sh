#!/usr/bin/env bash
# Sets up and runs the demo: installs the build's Debian packages
# (deploy/build-deps.sh: OpenSSL and libcurl headers), installs and starts a local ClickHouse on
# 127.0.0.1:8123 when none answers there (deploy/clickhouse-start.sh), builds
# modelwatch and runs `modelwatch demo` (in-process Kafka, synthetic traffic).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/build-deps.sh
deploy/clickhouse-start.sh
exec cargo run --release --locked --quiet -- demo "$@"
