#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command; CI calls exactly this.
# It installs what the tests need on a fresh machine and fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

echo "==> running every test"
cargo test --workspace --locked --no-fail-fast
