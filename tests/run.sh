#!/usr/bin/env bash
# Runs every test of the workspace, the AWS-emulator ones included. This is the README's test
# command and CI calls exactly this. On a fresh machine it installs what the tests need (a Python
# venv with moto, the AWS emulator), starts the emulator on 127.0.0.1, and fails when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# The style gate first: it is cheap and says exactly what to fix.
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (warnings are errors; unwrap/expect only in tests and start-up code)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

source tests/emulator.sh
install_emulator

echo "==> building the binaries the end-to-end tests run"
cargo build --workspace --bins --locked

mkdir -p target
moto_pid=
trap '[[ -n $moto_pid ]] && kill "$moto_pid" 2>/dev/null || true' EXIT
start_emulator target/moto.log

echo "==> running every test"
rm -f target/cost-figures.json target/fault-figures.json
TIDINGS_COST_REPORT="$PWD/target/cost-figures.json" \
TIDINGS_FAULT_REPORT="$PWD/target/fault-figures.json" \
    cargo test --workspace --all-features --locked --no-fail-fast
# What a delivery costs on AWS, as the end-to-end run measured it (docs/cost.md).
echo "==> DynamoDB and SQS usage per delivery (target/cost-figures.json)"
cat target/cost-figures.json
# The fault suite's books (docs/architecture.md): accepted, delivered, dead, lost (0), faults by kind.
if [[ -f target/fault-figures.json ]]; then
    echo "==> under faults and SIGKILLs (target/fault-figures.json)"
    cat target/fault-figures.json
fi

# ==== Deployment checks (issue 4; docs/deploy.md) ============================================
# After the tests: the SAM template must pass cfn-lint and `sam validate --lint`, the three Lambda
# functions must build for arm64 with cargo-lambda, and the documented operator and integrator
# commands (API key, SQS publish, Python receiver) must work against the emulator started above.
# Each step fails the script (set -e); the durations are printed at the end.
infra_started=$(date +%s)
infra_times=()
timed() { # timed LABEL COMMAND...: runs COMMAND, records how long it took
    local label=$1 started
    shift
    echo "==> $label"
    started=$(date +%s)
    "$@"
    infra_times+=("$(printf '%5ss  %s' $(($(date +%s) - started)) "$label")")
}

# sam build needs sam and cargo-lambda in one environment; cargo-lambda finds zig through the
# first python3 on PATH. Installed with moto in one resolution, so none of them breaks another.
deploy_tools=('cfn-lint==1.*' 'aws-sam-cli==1.*' 'cargo-lambda==1.9.*' 'ziglang==0.17.*' 'awscli==1.*' 'standardwebhooks==1.*')
timed "installing the deployment tools into $venv" \
    "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" "$moto_spec" "${deploy_tools[@]}"
export PATH="$PWD/$venv/bin:$PATH" SAM_CLI_TELEMETRY=0

timed "cfn-lint infra/template.yaml" cfn-lint infra/template.yaml
timed "sam validate --lint" sam validate --lint --template infra/template.yaml

# The aarch64 standard library comes from rustup (cargo-lambda would add it itself; here it is
# explicit, so a missing target fails with rustup's own message).
timed "rustup target add aarch64-unknown-linux-gnu" rustup target add aarch64-unknown-linux-gnu
# -p, not --bin: selecting the three packages keeps other members' features (SQLite) out.
timed "cargo lambda build --release --arm64 (api, deliver, sweep)" \
    cargo lambda build --release --arm64 --locked -p tidings-api -p tidings-deliver -p tidings-sweep
for bin in tidings-api tidings-deliver tidings-sweep; do
    bootstrap="target/lambda/$bin/bootstrap"
    file "$bootstrap" | grep -q 'ARM aarch64' || { echo "$bootstrap is not an arm64 binary" >&2; exit 1; }
    printf '    %-16s %s bytes (arm64, release profile)\n' "$bin" "$(stat -c %s "$bootstrap")"
done

timed "the documented commands against the emulator (infra/check_docs.py)" \
    "$venv/bin/python" infra/check_docs.py

echo "==> deployment checks: $(($(date +%s) - infra_started))s"
printf '%s\n' "${infra_times[@]}"
