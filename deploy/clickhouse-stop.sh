#!/usr/bin/env bash
# Stops the ClickHouse server started by deploy/clickhouse-start.sh: only the
# process named in its PID file, never anything matched by name.
set -euo pipefail
STATE_DIR="${MODELWATCH_STATE_DIR:-$HOME/.local/state/modelwatch}"
DIR="$STATE_DIR/clickhouse"
PID_FILE="$DIR/clickhouse-server.pid"
TIMEOUT="${MODELWATCH_CH_STOP_TIMEOUT:-30}"

log() { echo "clickhouse-stop: $*" >&2; }

if [ ! -f "$PID_FILE" ]; then
  log "no PID file at $PID_FILE, nothing to stop"
  exit 0
fi
PID="$(cat "$PID_FILE")"
if ! [[ "$PID" =~ ^[0-9]+$ ]] || ! kill -0 "$PID" 2>/dev/null; then
  log "process ${PID:-?} is not running"
  rm -f "$PID_FILE"
  exit 0
fi
kill -TERM "$PID"
deadline=$((SECONDS + TIMEOUT))
while kill -0 "$PID" 2>/dev/null; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "pid $PID did not exit after ${TIMEOUT}s, sending SIGKILL"
    kill -KILL "$PID" 2>/dev/null || true
    break
  fi
  sleep 0.2
done
rm -f "$PID_FILE"
log "stopped pid $PID"
