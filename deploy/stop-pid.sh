#!/usr/bin/env bash
# Usage: deploy/stop-pid.sh NAME PID_FILE TIMEOUT_SECONDS
# Stops the process named in PID_FILE (never anything matched by name):
# SIGTERM, then SIGKILL after TIMEOUT_SECONDS; removes the PID file.
set -euo pipefail
NAME="$1"
PID_FILE="$2"
TIMEOUT="$3"

log() { echo "$NAME: $*" >&2; }

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
