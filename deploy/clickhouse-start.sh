#!/usr/bin/env bash
# Starts a private ClickHouse server for modelwatch on 127.0.0.1, idempotently.
#
# - Installs Debian's clickhouse-server / clickhouse-client when missing.
# - Does nothing when something already answers /ping on the HTTP port.
# - Otherwise renders deploy/clickhouse/{config,users}.xml.in into
#   $MODELWATCH_STATE_DIR/clickhouse, starts the server in the background,
#   writes its PID file and waits (bounded) until /ping answers.
#
# Environment: MODELWATCH_CH_HTTP_PORT (8123), MODELWATCH_CH_TCP_PORT (9000),
# MODELWATCH_STATE_DIR ($HOME/.local/state/modelwatch),
# MODELWATCH_CH_START_TIMEOUT seconds (60). Stop with deploy/clickhouse-stop.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HTTP_PORT="${MODELWATCH_CH_HTTP_PORT:-8123}"
TCP_PORT="${MODELWATCH_CH_TCP_PORT:-9000}"
STATE_DIR="${MODELWATCH_STATE_DIR:-$HOME/.local/state/modelwatch}"
DIR="$STATE_DIR/clickhouse"
PID_FILE="$DIR/clickhouse-server.pid"
TIMEOUT="${MODELWATCH_CH_START_TIMEOUT:-60}"

log() { echo "clickhouse-start: $*" >&2; }

# True when the HTTP interface on 127.0.0.1:$1 answers /ping with "Ok.".
ping_ok() {
  timeout 3 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
    printf "GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
    grep -q "^Ok\." <&3' "$1" 2>/dev/null
}

find_server() {
  if command -v clickhouse-server >/dev/null 2>&1; then
    command -v clickhouse-server
  elif [ -x /usr/sbin/clickhouse-server ]; then
    echo /usr/sbin/clickhouse-server
  elif [ -x /usr/bin/clickhouse ]; then
    echo "/usr/bin/clickhouse server"
  fi
}

if ping_ok "$HTTP_PORT"; then
  log "a server already answers on 127.0.0.1:$HTTP_PORT, nothing to do"
  echo "http://127.0.0.1:$HTTP_PORT"
  exit 0
fi

SERVER="$(find_server)"
if [ -z "$SERVER" ]; then
  log "clickhouse-server not found, installing the Debian package"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    clickhouse-server clickhouse-client >&2
  SERVER="$(find_server)"
  if [ -z "$SERVER" ]; then
    log "installation finished but no clickhouse-server binary was found"
    exit 1
  fi
fi

# A stale PID file whose process is gone, or a process that no longer
# answers: never kill anything here, just report it.
if [ -f "$PID_FILE" ]; then
  OLD_PID="$(cat "$PID_FILE" 2>/dev/null || true)"
  if [ -n "$OLD_PID" ] && kill -0 "$OLD_PID" 2>/dev/null; then
    log "server pid $OLD_PID is running but does not answer on port $HTTP_PORT yet, waiting"
  else
    rm -f "$PID_FILE"
  fi
fi

mkdir -p "$DIR/data" "$DIR/tmp" "$DIR/log" "$DIR/user_files" "$DIR/format_schemas"
render() {
  sed -e "s|@DIR@|$DIR|g" -e "s|@HTTP_PORT@|$HTTP_PORT|g" -e "s|@TCP_PORT@|$TCP_PORT|g" "$1" >"$2"
}
render "$HERE/clickhouse/config.xml.in" "$DIR/config.xml"
render "$HERE/clickhouse/users.xml.in" "$DIR/users.xml"

if [ ! -f "$PID_FILE" ]; then
  log "starting $SERVER on 127.0.0.1:$HTTP_PORT (data in $DIR)"
  # shellcheck disable=SC2086 # SERVER may be "clickhouse server"
  nohup $SERVER --config-file="$DIR/config.xml" >"$DIR/log/stdout.log" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
fi
PID="$(cat "$PID_FILE")"

deadline=$((SECONDS + TIMEOUT))
until ping_ok "$HTTP_PORT"; do
  if ! kill -0 "$PID" 2>/dev/null; then
    log "server exited during startup; last log lines:"
    tail -n 20 "$DIR/log/clickhouse-server.err.log" "$DIR/log/stdout.log" >&2 2>/dev/null || true
    rm -f "$PID_FILE"
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "no answer on 127.0.0.1:$HTTP_PORT after ${TIMEOUT}s (pid $PID still running; see $DIR/log)"
    exit 1
  fi
  sleep 0.2
done
log "ready on 127.0.0.1:$HTTP_PORT (pid $PID)"
echo "http://127.0.0.1:$HTTP_PORT"
