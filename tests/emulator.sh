# Sourced by tests/run.sh and tests/lambda-figures.sh (from the repository root): the AWS emulator.
#   install_emulator          creates .venv with moto if it is not there yet
#   start_emulator LOGFILE    starts moto on a free 127.0.0.1 port, waits until it answers, exports
#                             the AWS_* variables for it, and sets moto_pid (the caller stops it)
venv=.venv
moto_spec='moto[server]>=5.2,<5.3'

install_emulator() {
    if ! "$venv/bin/python" -c 'import moto.server' 2>/dev/null; then
        echo "==> installing the AWS emulator ($moto_spec) into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
        "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" "$moto_spec"
    fi
}

start_emulator() {
    local log=$1 port
    echo "==> starting the AWS emulator on 127.0.0.1" >&2
    port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" > "$log" 2>&1 &
    moto_pid=$!
    if ! "$venv/bin/python" - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/moto-api/"
for _ in range(200):
    try:
        urllib.request.urlopen(url, timeout=1)
        sys.exit(0)
    except Exception:
        time.sleep(0.1)
sys.exit(1)
PY
    then
        echo "the AWS emulator did not start:" >&2
        tail -20 "$log" >&2
        return 1
    fi
    export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
    export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
    unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_DYNAMODB AWS_ENDPOINT_URL_SQS
}
