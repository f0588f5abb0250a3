#!/usr/bin/env bash
# Browser test of the dashboard: headless Chromium (Debian's `chromium`,
# installed here when missing) loads every page of the dashboard served by
# `modelwatch demo` against a private ClickHouse, checks that the rendered
# values equal what the API returns, and saves screenshots and DOM dumps as
# artefacts in ${BROWSER_ARTIFACTS:-target/browser-artifacts}.
#
# Everything it starts (ClickHouse, the demo) listens on 127.0.0.1 only and is
# stopped by PID on exit. With --update-docs it also refreshes the README
# screenshot docs/dashboard.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$(pwd)"
ART="${BROWSER_ARTIFACTS:-$ROOT/target/browser-artifacts}"
mkdir -p "$ART"

# 1. Chromium, idempotently.
find_chromium() { command -v chromium || command -v chromium-browser || true; }
if [ -z "$(find_chromium)" ]; then
  echo "== installing chromium (Debian package)"
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
CHROMIUM="$(find_chromium)"
export CHROMIUM

# 2. The binary.
echo "== building modelwatch"
cargo build --quiet --locked --bin modelwatch
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/modelwatch"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d -t modelwatch-browser-XXXXXX)"
DEMO_PID=""
# Only the ClickHouse scripts get these: modelwatch reads every MODELWATCH_*
# variable as a configuration override.
CH_ENV=(MODELWATCH_STATE_DIR="$WORK/state" MODELWATCH_CH_HTTP_PORT="$(free_port)" MODELWATCH_CH_TCP_PORT="$(free_port)")
cleanup() {
  if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then
    kill "$DEMO_PID" 2>/dev/null || true
    wait "$DEMO_PID" 2>/dev/null || true
  fi
  env "${CH_ENV[@]}" deploy/clickhouse-stop.sh >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# 3. A private ClickHouse.
echo "== private clickhouse"
CH_URL="$(env "${CH_ENV[@]}" deploy/clickhouse-start.sh)"

# 4. The demo, serving the dashboard at the end.
API_PORT="$(free_port)"
echo "== modelwatch demo (dashboard on 127.0.0.1:$API_PORT)"
MODELWATCH_CLICKHOUSE__URL="$CH_URL" MODELWATCH_API__LISTEN="127.0.0.1:$API_PORT" \
  "$BIN" demo --events "${BROWSER_TEST_EVENTS:-36000}" --rate 20 >"$ART/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 600); do
  if grep -q "Press Ctrl-C" "$ART/demo.log"; then break; fi
  if ! kill -0 "$DEMO_PID" 2>/dev/null; then
    echo "demo exited early:"; cat "$ART/demo.log"; exit 1
  fi
  sleep 1
done
grep -q "Press Ctrl-C" "$ART/demo.log" || { echo "demo did not finish in time"; tail -20 "$ART/demo.log"; exit 1; }

# 5. The pages, checked against the API.
python3 tests/browser/check.py "http://127.0.0.1:$API_PORT" "$ART"

if [ "${1:-}" = "--update-docs" ]; then
  cp "$ART/model.png" docs/dashboard.png
  echo "docs/dashboard.png updated"
fi
echo "== browser test passed; artefacts in $ART"
