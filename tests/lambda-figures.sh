#!/usr/bin/env bash
# The Lambda figures: the size of each function binary built with the workspace's `lambda-size` profile,
# and each function's cold start (process spawn to its first runtime-API `next` request) measured
# with the project's Lambda stand-in (tidings-aws-local, docs/aws-local.md) against the AWS
# emulator (moto), everything on 127.0.0.1.
#
#   tests/lambda-figures.sh            # 20 cold starts per function
#   LAMBDA_FIGURES_RUNS=5 tests/lambda-figures.sh
#
# Progress goes to stderr; the result is one JSON line on stdout:
#   {"arch":…,"profile":"lambda-size","runs":20,"functions":{"tidings-api":{"bytes":…,
#    "coldStartMs":{"median":…,"p90":…,"max":…,"min":…,"samples":[…]}},…}}
#
# Each function runs one execution environment; the stand-in's first processes (all started at
# once) are not counted. Then, one function at a time, the script SIGKILLs the process through the
# admin endpoint and waits for the replacement's first `next` before the next kill. The stand-in
# measures in whole milliseconds.
#
# Builds for this machine's architecture, so that the functions start natively: on x86_64 the
# sizes it prints are the x86_64 ones (about 1 MB larger than arm64). The deployed bootstraps are
# the arm64 ones `sam build` makes with the same profile (infra/Makefile); tests/run.sh checks
# their size. docs/deploy.md ("How the functions are built") has both sets of figures.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${LAMBDA_FIGURES_RUNS:-20}
functions=(tidings-api tidings-deliver tidings-sweep)
target_dir=${CARGO_TARGET_DIR:-target}
# Plain cargo puts a custom profile's output in <target dir>/<profile name>/ (the profile is not
# called `lambda`: `cargo lambda build` writes target/lambda/<function>/bootstrap).
bin_dir=$target_dir/lambda-size

source tests/emulator.sh
install_emulator

echo "==> building the functions with the lambda profile, and the stand-in" >&2
cargo build --locked --profile lambda-size -p tidings-api -p tidings-deliver -p tidings-sweep >&2
cargo build --locked --bin tidings-aws-local >&2

echo "==> binary sizes ($bin_dir, $(uname -m))" >&2
for f in "${functions[@]}"; do
    printf '%-16s %10d bytes\n' "$f" "$(stat -c %s "$bin_dir/$f")" >&2
done

work=$(mktemp -d)
moto_pid=
local_pid=
cleanup() {
    # The stand-in kills its function processes on SIGTERM.
    if [[ -n $local_pid ]]; then
        kill -TERM "$local_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$local_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$local_pid" 2>/dev/null || true
        wait "$local_pid" 2>/dev/null || true
    fi
    if [[ -n $moto_pid ]]; then
        kill "$moto_pid" 2>/dev/null || true
        wait "$moto_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_emulator "$work/moto.log"

echo "==> starting tidings-aws-local (one environment per function)" >&2
"$target_dir/debug/tidings-aws-local" --listen 127.0.0.1:0 --bin-dir "$bin_dir" \
    --sweep-interval 0s --api-instances 1 --deliver-instances 1 --cleanup \
    > "$work/local.json" 2> "$work/local.log" &
local_pid=$!

echo "==> $runs cold starts per function" >&2
python3 - "$work/local.json" "$local_pid" "$runs" "$(uname -m)" \
    "$bin_dir" "${functions[@]}" <<'PY' || { echo "--- tidings-aws-local log (tail):" >&2; tail -30 "$work/local.log" >&2; exit 1; }
import json, math, os, statistics, sys, time, urllib.request

info_path, local_pid, runs, arch, bin_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
functions = sys.argv[6:]


def alive():
    try:
        os.kill(local_pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_for(what, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if not alive():
            sys.exit(f"tidings-aws-local exited while waiting for {what}")
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.02)


def first_line():
    with open(info_path) as f:
        line = f.readline()
    return json.loads(line) if line.endswith("\n") else None


admin = wait_for("the stand-in's JSON line", first_line)["adminUrl"]


def call(method, path):
    request = urllib.request.Request(admin + path, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def row(name):
    rows = [r for r in call("GET", "/functions") if r["name"] == name]
    if len(rows) != 1:
        sys.exit(f"expected one environment of {name}, got {rows}")
    return rows[0]


def started(name, count):
    """The row once its instance has `count` cold starts and the current process has asked."""
    r = row(name)
    return r if len(r["coldStartsMs"]) >= count and r["coldStartMs"] is not None else None


figures = {}
for name in functions:
    first = wait_for(f"{name}'s first process", lambda: started(name, 1))
    seen, pid = len(first["coldStartsMs"]), first["pid"]
    samples = []
    for i in range(runs):
        killed = call("POST", f"/functions/{name}/kill")["killed"]
        if killed != [pid]:
            sys.exit(f"{name}: asked to kill {pid}, killed {killed}")
        r = wait_for(f"{name}'s restart {i + 1}", lambda: started(name, seen + 1), timeout=30)
        if r["pid"] == pid:
            sys.exit(f"{name}: the killed process {pid} is still the current one")
        seen, pid = len(r["coldStartsMs"]), r["pid"]
        samples.append(r["coldStartMs"])
    ordered = sorted(samples)
    stats = {
        "median": statistics.median(ordered),
        # Nearest rank.
        "p90": ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)],
        "max": ordered[-1],
        "min": ordered[0],
        "samples": samples,
    }
    figures[name] = {
        "bytes": os.path.getsize(os.path.join(bin_dir, name)),
        "coldStartMs": stats,
    }
    print(f"{name:16} median {stats['median']} ms, p90 {stats['p90']} ms, max {stats['max']} ms",
          file=sys.stderr)

print(json.dumps({"arch": arch, "profile": "lambda-size", "runs": runs, "functions": figures},
                 separators=(",", ":")))
PY
