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
# After the tests: the SAM template must pass cfn-lint and `sam validate --lint`, `sam build` must
# build the three Lambda functions for arm64 with each bootstrap at most 6 MB (issue 9), and the
# documented operator and integrator commands (API key, SQS publish, Python receiver) must work
# against the emulator started above.
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
# The build users deploy (docs/deploy.md): `sam build` runs infra/Makefile, one `cargo lambda build
# --profile lambda-size --arm64` of the three functions. Into target/ rather than infra/.aws-sam/
# (SAM writes its build.toml beside the build directory, in target/sam/).
sam_build_dir=target/sam/build
timed "sam build (arm64, lambda-size profile)" \
    sam build --template infra/template.yaml --build-dir "$sam_build_dir"
# "At most 6 MB" read as 6,000,000 bytes, the stricter of the two readings (6 MiB is 6,291,456).
max_bootstrap_bytes=6000000
for logical_id in ApiFunction DeliverFunction SweepFunction; do
    bootstrap="$sam_build_dir/$logical_id/bootstrap"
    file "$bootstrap" | grep -q 'ARM aarch64' || { echo "$bootstrap is not an arm64 binary" >&2; exit 1; }
    bytes=$(stat -c %s "$bootstrap")
    printf '    %-16s %9d bytes (arm64, lambda-size profile)\n' "$logical_id" "$bytes"
    if ((bytes > max_bootstrap_bytes)); then
        echo "$bootstrap is $bytes bytes: over $max_bootstrap_bytes (issue 9: at most 6 MB)" >&2
        exit 1
    fi
done

timed "the documented commands against the emulator (infra/check_docs.py)" \
    "$venv/bin/python" infra/check_docs.py

echo "==> deployment checks: $(($(date +%s) - infra_started))s"
printf '%s\n' "${infra_times[@]}"
