#!/usr/bin/env bash
# Installs the Kafka-compatible `tansu` broker once into a cache directory
# outside the repo, so later runs (and CI on the same machine) reuse it.
# Building it takes about 10 minutes on 2 cores; when present this is a no-op.
set -euo pipefail
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
CACHE_DIR="${MODELWATCH_CACHE_DIR:-$HOME/.cache/modelwatch}"
ROOT="$CACHE_DIR/tansu-$TANSU_VERSION"
BIN="$ROOT/bin/tansu"
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$ROOT"
echo "building tansu $TANSU_VERSION into $ROOT (about 10 minutes, once)" >&2
# A separate target dir keeps the build out of the project's target/.
cargo install tansu --version "$TANSU_VERSION" --locked \
  --features dynostore,libsql --root "$ROOT" \
  --target-dir "$CACHE_DIR/tansu-build" >&2
rm -rf "$CACHE_DIR/tansu-build"
echo "$BIN"
