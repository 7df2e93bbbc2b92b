#!/usr/bin/env bash
# Builds target/release/{coordinator,worker}, provisioning libtorch 2.11.0 first if needed.
# Idempotent: a second run only re-checks the cache and lets cargo decide what to rebuild.
set -euo pipefail
source "$(dirname "$0")/env.sh"
kormlm_setup_libtorch
cd "$KORMLM_ROOT"
cargo build --release --bins "$@"
