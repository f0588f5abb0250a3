#!/usr/bin/env bash
# Starts a private `tansu` Kafka-compatible broker for modelwatch on
# 127.0.0.1, idempotently, and creates modelwatch's topics if missing.
#
# - Gets the binary from deploy/install-tansu.sh (built once into a cache
#   directory outside the repo; a no-op when already there).
# - When something already listens on the port, only makes sure the topics exist.
# - Otherwise starts `tansu broker` with in-memory storage in the background,
#   writes its PID file, waits (bounded) until it accepts connections.
#
# Environment: MODELWATCH_KAFKA_PORT (9092), MODELWATCH_KAFKA_PARTITIONS (4,
# for both input topics: they must be co-partitioned), MODELWATCH_STATE_DIR
# ($HOME/.local/state/modelwatch), MODELWATCH_TANSU_BIN (skip the install
# script), topic names as in the service config: MODELWATCH_KAFKA__PREDICTIONS_TOPIC,
# MODELWATCH_KAFKA__GROUND_TRUTH_TOPIC, MODELWATCH_KAFKA__ALERTS_TOPIC,
# MODELWATCH_KAFKA__DEAD_LETTER_TOPIC. Stop with deploy/tansu-stop.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${MODELWATCH_KAFKA_PORT:-9092}"
PARTITIONS="${MODELWATCH_KAFKA_PARTITIONS:-4}"
STATE_DIR="${MODELWATCH_STATE_DIR:-$HOME/.local/state/modelwatch}"
DIR="$STATE_DIR/tansu"
PID_FILE="$DIR/tansu.pid"
TIMEOUT="${MODELWATCH_TANSU_START_TIMEOUT:-30}"
URL="tcp://127.0.0.1:$PORT"

log() { echo "tansu-start: $*" >&2; }

port_open() {
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

if [ -n "${MODELWATCH_TANSU_BIN:-}" ]; then
  TANSU="$MODELWATCH_TANSU_BIN"
else
  TANSU="$(bash "$HERE/install-tansu.sh" | tail -n 1)"
fi
if [ ! -x "$TANSU" ]; then
  log "no tansu binary at $TANSU"
  exit 1
fi

mkdir -p "$DIR"
if port_open "$PORT"; then
  log "something already listens on 127.0.0.1:$PORT, not starting a broker"
else
  if [ -f "$PID_FILE" ]; then
    OLD_PID="$(cat "$PID_FILE" 2>/dev/null || true)"
    if [ -n "$OLD_PID" ] && kill -0 "$OLD_PID" 2>/dev/null; then
      log "broker pid $OLD_PID is running but not listening on $PORT yet, waiting"
    else
      rm -f "$PID_FILE"
    fi
  fi
  if [ ! -f "$PID_FILE" ]; then
    log "starting $TANSU on $URL (in-memory storage)"
    nohup "$TANSU" broker --listener-url "$URL" --advertised-listener-url "$URL" \
      --storage-engine memory://tansu/ >"$DIR/tansu.log" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
  fi
  PID="$(cat "$PID_FILE")"
  deadline=$((SECONDS + TIMEOUT))
  until port_open "$PORT"; do
    if ! kill -0 "$PID" 2>/dev/null; then
      log "broker exited during startup; last log lines:"
      tail -n 20 "$DIR/tansu.log" >&2 || true
      rm -f "$PID_FILE"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "broker not listening on $PORT after ${TIMEOUT}s (pid $PID; see $DIR/tansu.log)"
      exit 1
    fi
    sleep 0.2
  done
  log "ready on $URL (pid $PID)"
fi

# Topics: tansu does not auto-create them.
EXISTING="$("$TANSU" topic list --broker "$URL" 2>/dev/null || true)"
create_topic() {
  local name="$1" partitions="$2"
  if grep -q "\"name\":\"$name\"" <<<"$EXISTING"; then
    return 0
  fi
  local out
  if out="$("$TANSU" topic create --broker "$URL" --partitions "$partitions" "$name" 2>&1)"; then
    log "created topic $name ($partitions partitions)"
  elif grep -q "already exists" <<<"$out"; then
    return 0
  else
    log "cannot create topic $name: $out"
    return 1
  fi
}
create_topic "${MODELWATCH_KAFKA__PREDICTIONS_TOPIC:-predictions}" "$PARTITIONS"
create_topic "${MODELWATCH_KAFKA__GROUND_TRUTH_TOPIC:-ground-truth}" "$PARTITIONS"
create_topic "${MODELWATCH_KAFKA__ALERTS_TOPIC:-model-alerts}" 1
create_topic "${MODELWATCH_KAFKA__DEAD_LETTER_TOPIC:-modelwatch-dead-letter}" 1
echo "127.0.0.1:$PORT"
