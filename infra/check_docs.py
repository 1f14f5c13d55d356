#!/usr/bin/env python3
"""Runs the commands the deployment docs give, against the AWS emulator, and fails if one of them
does not do what the docs say. Called by tests/run.sh (which starts moto and exports
AWS_ENDPOINT_URL, the region and test credentials) with the repository root as the current
directory and the venv's bin/ (aws, standardwebhooks) first on PATH.

1. starts target/debug/tidings-aws-local (the real Lambda binaries over moto);
2. docs/deploy.md `check:create-api-key`: the documented `aws dynamodb put-item` creates a key;
   the API answers 200 with it and 401 with a wrong key;
3. docs/consumers.md `check:python-receiver`: the Python receiver verifies real deliveries
   (one event published through the API, one through the documented SQS `send-message` of
   docs/producers.md `check:send-message`) and rejects a forged one;
4. docs/producers.md `check:redrive-events`: a producer message without eventId, sitting in the
   events DLQ, is redriven by the documented script and published under the event id derived
   from its first message id and send time (as `EventId::for_message` derives it), once;
5. docs/deploy.md `check:revoke-api-key`: after it (and the functions' key cache time), the key
   gets 401.
"""

import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path.cwd()
WORK = ROOT / "target" / "infra-check"
TENANT = "acme"  # the tenant docs/producers.md's send-message example publishes for
KEY_CACHE_SECONDS = 1  # TIDINGS_API_KEY_CACHE of the functions under test


def fail(message):
    sys.exit(f"infra/check_docs.py: {message}")


def doc_block(doc, marker):
    """The fenced code block right after `<!-- check:MARKER ... -->` in docs/DOC."""
    text = (ROOT / "docs" / doc).read_text()
    m = re.search(r"<!-- check:" + re.escape(marker) + r"\b[^>]*-->\s*```[a-z]*\n(.*?)\n```", text, re.S)
    if not m:
        fail(f"no `check:{marker}` code block in docs/{doc}")
    return m.group(1)


def aws_shim():
    """A directory with an `aws` that is the venv's AWS CLI pointed at the emulator. AWS CLI v1
    (the one on PyPI) ignores AWS_ENDPOINT_URL for `aws sqs` in us-east-1 (it pins
    queue.amazonaws.com unless --endpoint-url is given), so the shim passes --endpoint-url; the
    documented commands themselves run unchanged."""
    real = shutil.which("aws")
    if real is None:
        fail("no `aws` on PATH (tests/run.sh installs awscli into the venv)")
    shim = WORK / "bin"
    shim.mkdir(exist_ok=True)
    (shim / "aws").write_text(f'#!/bin/sh\nexec "{real}" --endpoint-url "$AWS_ENDPOINT_URL" "$@"\n')
    (shim / "aws").chmod(0o755)
    return str(shim)


def run_block(doc, marker, env):
    """Runs a shell block of the docs with bash -euo pipefail; returns its stdout."""
    script = doc_block(doc, marker)
    path = f"{aws_shim()}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, **env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        fail(f"docs/{doc} `{marker}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    print(f"    docs/{doc} `{marker}`: ok")
    return done.stdout


def http(method, url, key=None, body=None, headers=None):
    request = urllib.request.Request(url, method=method, data=body)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    if key is not None:
        request.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event_id_for_message(sent_at_ms, message_id):
    """`EventId::for_message` (shared/src/domain/ids.rs): a ULID of the send time and the first
    10 bytes of the message id's SHA-256, lower-case, prefixed `evt_`."""
    value = (sent_at_ms << 80) | int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:10], "big")
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    return "evt_" + "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def run_python_block(doc, marker, env):
    """Runs a Python block of the docs with this interpreter (the venv's: boto3); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", doc_block(doc, marker)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        fail(f"docs/{doc} `{marker}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    print(f"    docs/{doc} `{marker}`: ok ({done.stdout.strip()})")
    return done.stdout


def wait_for(what, predicate, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    fail(f"timed out after {timeout} s waiting for {what}")


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    processes = []

    def stop_all():
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        # ---- 1. the functions over the emulator
        aws_local_log = open(WORK / "aws-local.log", "w")
        aws_local = subprocess.Popen(
            [
                "target/debug/tidings-aws-local",
                "--listen", "127.0.0.1:0",
                "--bin-dir", "target/debug",
                "--sweep-interval", "0s",
                "--env", "TIDINGS_ALLOW_CALLBACK_CIDRS=127.0.0.0/8",
                # A short key cache, so the documented revocation is seen to take effect.
                "--env", f"TIDINGS_API_KEY_CACHE={KEY_CACHE_SECONDS}s",
                "--cleanup",
            ],
            stdout=subprocess.PIPE,
            stderr=aws_local_log,
            text=True,
        )
        processes.append(aws_local)
        ready, _, _ = select.select([aws_local.stdout], [], [], 120)
        line = aws_local.stdout.readline() if ready else ""
        if not line:
            fail(f"tidings-aws-local did not start: see {WORK / 'aws-local.log'}")
        local = json.loads(line)
        api, table, queue = local["apiUrl"], local["tableName"], local["eventsQueueUrl"]
        print(f"    tidings-aws-local: {api}, table {table}")

        # ---- 2. the documented API key
        out = run_block("deploy.md", "create-api-key", {"TABLE": table, "TENANT": TENANT})
        m = re.search(r"API key of tenant " + TENANT + r": (tdk_[A-Za-z0-9_-]{32})$", out.strip())
        if not m:
            fail(f"the create-api-key block printed no key:\n{out}")
        key = m.group(1)
        status, body = http("GET", f"{api}/webhook-subscriptions", key)
        if status != 200:
            fail(f"GET /webhook-subscriptions with the new key: {status} {body!r}")
        status, _ = http("GET", f"{api}/webhook-subscriptions", key[:-1] + ("A" if key[-1] != "A" else "B"))
        if status != 401:
            fail(f"GET /webhook-subscriptions with a wrong key: {status}, expected 401")
        print("    the key authenticates (200), a wrong key does not (401)")

        # ---- 3. the documented Python receiver, fed by the real deliver function
        port = free_port()
        status, body = http(
            "POST", f"{api}/webhook-subscriptions", key,
            json.dumps({"eventType": "order.*", "callbackUrl": f"http://127.0.0.1:{port}/hooks"}).encode(),
            {"content-type": "application/json"},
        )
        if status != 201:
            fail(f"creating a subscription: {status} {body!r}")
        secret = json.loads(body)["secret"]
        receiver_py = WORK / "receiver.py"
        receiver_py.write_text(doc_block("consumers.md", "python-receiver") + "\n")
        receiver_out = WORK / "receiver.out"
        receiver_out.write_text("")
        receiver = subprocess.Popen(
            [sys.executable, str(receiver_py)],
            env={**os.environ, "TIDINGS_SECRET": secret, "HOST": "127.0.0.1", "PORT": str(port)},
            stdout=open(receiver_out, "a"),
            stderr=open(WORK / "receiver.err", "w"),
        )
        processes.append(receiver)

        def receiver_up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for("the Python receiver to listen", receiver_up, 30)
        status, _ = http(
            "POST", f"http://127.0.0.1:{port}/hooks", body=b'{"eventType":"order.forged","data":1}',
            headers={
                "content-type": "application/json",
                "webhook-id": "dlv_forged",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            },
        )
        if status != 400:
            fail(f"the receiver answered {status} to a forged delivery, expected 400")

        status, body = http(
            "POST", f"{api}/events", key,
            json.dumps({"eventType": "order.paid", "data": {"via": "api"}}).encode(),
            {"content-type": "application/json"},
        )
        if status != 202:
            fail(f"POST /events: {status} {body!r}")
        run_block("producers.md", "send-message", {"QUEUE": queue})

        def lines():
            return [l.split(" ", 2) for l in receiver_out.read_text().splitlines() if l.strip()]

        wait_for(
            "both deliveries at the Python receiver",
            lambda: {tuple(l[1:]) for l in lines()} >= {
                ("order.paid", '{"via": "api"}'),
                ("order.shipped", '{"orderId": 42}'),
            },
        )
        for webhook_id, event_type, data in lines():
            print(f"    receiver verified {webhook_id} {event_type} {data}")
        if any(l[1] == "order.forged" for l in lines()):
            fail("the receiver accepted the forged delivery")

        # ---- 4. the documented redrive of the events DLQ: a message without eventId that sits
        # there (a move into the DLQ keeps its id and send time) comes back under the same event
        import boto3

        sqs = boto3.client("sqs")
        dlq = local["eventsDlqUrl"]
        sent = sqs.send_message(
            QueueUrl=dlq,
            MessageBody=json.dumps({"eventType": "order.redriven", "data": {"n": 1}}),
            MessageAttributes={"tenant": {"DataType": "String", "StringValue": TENANT}},
        )
        peek = sqs.receive_message(QueueUrl=dlq, AttributeNames=["SentTimestamp"], VisibilityTimeout=0)
        [first] = peek["Messages"]
        if first["MessageId"] != sent["MessageId"]:
            fail(f"expected the one message in the events DLQ, got {first}")
        expected = event_id_for_message(int(first["Attributes"]["SentTimestamp"]), first["MessageId"])
        out = run_python_block("producers.md", "redrive-events", {"EVENTS_DLQ_URL": dlq, "EVENTS_QUEUE_URL": queue})
        if "moved 1 messages" not in out:
            fail(f"the redrive script moved something other than the one message: {out}")
        wait_for(
            f"the redriven event {expected}",
            lambda: http("GET", f"{api}/events/{expected}", key)[0] == 200,
        )
        wait_for("its delivery", lambda: any(l[1] == "order.redriven" for l in lines()))
        time.sleep(2)  # a second publish would deliver within this
        redriven = [l for l in lines() if l[1] == "order.redriven"]
        if len(redriven) != 1:
            fail(f"the redriven event was delivered {len(redriven)} times: {redriven}")
        print(f"    the redriven message was published as {expected}, once")

        # ---- 5. the documented revocation
        run_block("deploy.md", "revoke-api-key", {"TABLE": table, "KEY": key})
        # A warm api function remembers a key for TIDINGS_API_KEY_CACHE (documented).
        time.sleep(KEY_CACHE_SECONDS + 0.5)
        status, _ = http("GET", f"{api}/webhook-subscriptions", key)
        if status != 401:
            fail(f"GET /webhook-subscriptions with the revoked key: {status}, expected 401")
        print(f"    the revoked key gets 401 (after the {KEY_CACHE_SECONDS} s key cache)")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
