#!/usr/bin/env bash
# Runs every test of the workspace, the AWS-emulator ones included. This is the README's test
# command and CI calls exactly this. On a fresh machine it installs what the tests need (a Python
# venv with moto, the AWS emulator), starts the emulator on 127.0.0.1, and fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
moto_spec='moto[server]>=5.2,<5.3'
if ! "$venv/bin/python" -c 'import moto.server' 2>/dev/null; then
    echo "==> installing the AWS emulator ($moto_spec) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
    "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" "$moto_spec"
fi

echo "==> building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

echo "==> starting the AWS emulator on 127.0.0.1"
mkdir -p target
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" > target/moto.log 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
"$venv/bin/python" - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/moto-api/"
for _ in range(200):
    try:
        urllib.request.urlopen(url, timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(f"the AWS emulator did not start: see target/moto.log")
PY
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_DYNAMODB AWS_ENDPOINT_URL_SQS

echo "==> running every test"
cargo test --workspace --all-features --locked --no-fail-fast
