#!/usr/bin/env bash
# Stops the tansu broker started by deploy/tansu-start.sh: only the process
# named in its PID file, never anything matched by name. Its in-memory topics
# are gone afterwards.
set -euo pipefail
STATE_DIR="${MODELWATCH_STATE_DIR:-$HOME/.local/state/modelwatch}"
exec "$(dirname "$0")/stop-pid.sh" tansu-stop \
  "$STATE_DIR/tansu/tansu.pid" "${MODELWATCH_TANSU_STOP_TIMEOUT:-10}"
