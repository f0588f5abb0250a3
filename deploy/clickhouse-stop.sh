#!/usr/bin/env bash
# Stops the ClickHouse server started by deploy/clickhouse-start.sh: only the
# process named in its PID file, never anything matched by name.
set -euo pipefail
STATE_DIR="${MODELWATCH_STATE_DIR:-$HOME/.local/state/modelwatch}"
exec "$(dirname "$0")/stop-pid.sh" clickhouse-stop \
  "$STATE_DIR/clickhouse/clickhouse-server.pid" "${MODELWATCH_CH_STOP_TIMEOUT:-30}"
