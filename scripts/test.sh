#!/usr/bin/env bash
# Runs the whole test suite: unit, property, oracle and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh test
# The rocksdb C++ build takes minutes: keep build output outside the clone so later runs reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockvault-target}"
cargo test --workspace --locked "$@"
