#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (libFuzzer via cargo-fuzz) for a bounded
# time, starting from the committed seed corpus. A crash, a panic, an
# allocation the targets' counting allocator refuses or a process above
# -rss_limit_mb fails the run; the input that did it is left in
# fuzz/artifacts/<target>/ and its path is printed.
#
#   deploy/fuzz.sh                 every target for $MODELWATCH_FUZZ_SECONDS (default 45) each
#   deploy/fuzz.sh decode          one target
#   deploy/fuzz.sh --keep [T...]   the same, new inputs added to fuzz/corpus/<target>/
#   deploy/fuzz.sh --cmin          re-minimise fuzz/corpus/: the seed-* files and
#                                  the fewest others that cover every edge
#
# cargo-fuzz is installed once into a cache outside the repo (about 30 s);
# when present that is a no-op. The machine's stable toolchain serves:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass the -Z flags it needs, and without a
# sanitizer (the code under test has no `unsafe`) the build needs no nightly
# runtime and runs about twice as fast.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR="$PWD"

CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
CACHE_DIR="${MODELWATCH_CACHE_DIR:-$HOME/.cache/modelwatch}"
FUZZ_ROOT="$CACHE_DIR/cargo-fuzz-$CARGO_FUZZ_VERSION"
if [ ! -x "$FUZZ_ROOT/bin/cargo-fuzz" ]; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $FUZZ_ROOT" >&2
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked \
    --root "$FUZZ_ROOT" --target-dir "$CACHE_DIR/cargo-fuzz-build" >&2
  rm -rf "$CACHE_DIR/cargo-fuzz-build"
fi
export PATH="$FUZZ_ROOT/bin:$PATH"
export RUSTC_BOOTSTRAP=1

SECONDS_PER_TARGET="${MODELWATCH_FUZZ_SECONDS:-45}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT_DIR/target}/fuzz"
# Inputs up to 64 KiB; the process may never hold more than 512 MiB.
LIBFUZZER_FLAGS=(-max_len=65536 -rss_limit_mb=512 -timeout=10 -print_final_stats=1)
FUZZ=(--sanitizer none --target-dir "$TARGET_DIR")

cd fuzz
cargo fuzz build "${FUZZ[@]}"
if [ "${1:-}" = "--cmin" ]; then
  for t in $(cargo fuzz list); do
    old="$(mktemp -d)"
    mv "corpus/$t"/* "$old"/
    mv "$old"/seed-* "corpus/$t"/
    # Set cover on edges (not hit counts): a few hundred files, same coverage.
    cargo fuzz run "${FUZZ[@]}" "$t" "corpus/$t" "$old" -- -set_cover_merge=1 \
      -use_counters=0 -max_len=4096 -rss_limit_mb=512
    rm -rf "$old"
  done
  exit 0
fi
keep=0
if [ "${1:-}" = "--keep" ]; then
  keep=1
  shift
fi

targets="${*:-$(cargo fuzz list)}"
for t in $targets; do
  echo "== fuzz $t for ${SECONDS_PER_TARGET}s"
  # New inputs go to a scratch directory: the committed corpus is only read.
  work="$(mktemp -d)"
  if [ "$keep" = 1 ]; then
    rmdir "$work"
    work="corpus/$t"
  fi
  if ! cargo fuzz run "${FUZZ[@]}" "$t" "$work" "corpus/$t" -- \
      "${LIBFUZZER_FLAGS[@]}" -max_total_time="$SECONDS_PER_TARGET"; then
    [ "$keep" = 1 ] || rm -rf "$work"
    echo "FUZZ FAILURE in target $t; the failing input:" >&2
    ls -1d "$ROOT_DIR/fuzz/artifacts/$t/"* >&2 || true
    echo "replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none $t artifacts/$t/<file>" >&2
    exit 1
  fi
  [ "$keep" = 1 ] || rm -rf "$work"
done
