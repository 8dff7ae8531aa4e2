#!/usr/bin/env bash
# Builds blockvault in release mode and runs the benchmark harness. Arguments go to the harness,
# e.g. `bash benches/run.sh --size 2GiB` for a quick run, `--help` for all options.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockvault-target}"
cargo build --locked --release -p blockvault-cli -p blockvault-benches
exec "$CARGO_TARGET_DIR/release/bv-bench" --blockvault "$CARGO_TARGET_DIR/release/blockvault" "$@"
