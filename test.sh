#!/usr/bin/env bash
# The test command: provisions libtorch and the Python oracle, then runs formatting, lints and
# every test (unit, oracle and end-to-end) of the workspace.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
kormlm_setup_libtorch
kormlm_provision_oracle
started=$(date +%s)
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
# --release shares one build of libtorch's C++ bindings with the tests below.
cargo clippy --release --workspace --all-targets -- -D warnings
echo "==> cargo build (binaries and examples for the end-to-end tests)"
cargo build --release --workspace --bins --examples
echo "==> cargo test"
cargo test --release --workspace
echo "==> all checks passed in $(( $(date +%s) - started )) s (after provisioning)"
