"""A stand-in Lambda function for testing tidings-aws-local itself (no Tidings code involved).

It speaks the Lambda runtime API like a custom runtime and logs what it sees, one JSON object per
line, to $FAKE_LOG. Its behaviour depends on AWS_LAMBDA_FUNCTION_NAME:
- tidings-api: answers every API Gateway v2 event with the event itself (path /error: reports an
  error; path /crash: exits).
- tidings-deliver: per SQS record body: "fail…" is reported in batchItemFailures; "crash" and
  "hang" exit / sleep past the deadline on their first receive; anything else succeeds.
  A DynamoDB stream event (Records[0].eventSource == "aws:dynamodb") is logged record by record;
  by the new image's `behaviour` attribute: "fail" is reported in batchItemFailures (by its
  SequenceNumber) every time, "fail-once" the first time only, "crash" exits the process the first
  time it is seen; anything else succeeds.
- tidings-sweep: logs the scheduled event.
"""

import json
import os
import time
import urllib.request

API = os.environ["AWS_LAMBDA_RUNTIME_API"]
NAME = os.environ["AWS_LAMBDA_FUNCTION_NAME"]
BASE = f"http://{API}/2018-06-01/runtime"


def log(kind, value):
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"fn": NAME, "pid": os.getpid(), "kind": kind, "value": value}) + "\n")


def first_sight(what):
    """True the first time `what` is asked about, across processes (a marker file beside the log)."""
    marker = os.environ["FAKE_LOG"] + ".seen-" + what
    if os.path.exists(marker):
        return False
    open(marker, "w").close()
    return True


def stream_batch(event, meta):
    failures = []
    for record in event["Records"]:
        change = record["dynamodb"]
        seq = change["SequenceNumber"]
        behaviour = change.get("NewImage", {}).get("behaviour", {}).get("S")
        log("stream-record", {"pk": change["Keys"]["pk"]["S"], "seq": seq, "behaviour": behaviour,
                              "record": record, "meta": meta})
        if behaviour == "crash" and first_sight(seq):
            os._exit(3)
        if behaviour == "fail" or (behaviour == "fail-once" and first_sight(seq)):
            failures.append({"itemIdentifier": seq})
    return {"batchItemFailures": failures}


def post(path, payload, headers=None):
    data = json.dumps(payload).encode()
    request = urllib.request.Request(BASE + path, data=data, method="POST", headers=headers or {})
    with urllib.request.urlopen(request) as r:
        return r.status


log("start", {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "TIDINGS_", "FAKE_", "_HANDLER", "LAMBDA_"))})

while True:
    with urllib.request.urlopen(BASE + "/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
        meta = {
            "requestId": rid,
            "deadlineMs": int(r.headers["Lambda-Runtime-Deadline-Ms"]),
            "arn": r.headers["Lambda-Runtime-Invoked-Function-Arn"],
            "traceId": r.headers["Lambda-Runtime-Trace-Id"],
            "nowMs": int(time.time() * 1000),
        }
        event = json.loads(r.read())

    if NAME == "tidings-api":
        log("request", {"meta": meta, "event": event})
        if event["rawPath"] == "/error":
            post(f"/invocation/{rid}/error", {"errorType": "Boom", "errorMessage": "asked to fail"},
                 {"Lambda-Runtime-Function-Error-Type": "Boom"})
            continue
        if event["rawPath"] == "/crash":
            os._exit(7)
        answer = {
            "statusCode": 200,
            "headers": {"content-type": "application/json", "x-fn": NAME},
            "multiValueHeaders": {"x-many": ["1", "2"]},
            "cookies": ["c=1; Path=/"],
            "body": json.dumps({"event": event, "meta": meta}),
            "isBase64Encoded": False,
        }
    elif NAME == "tidings-deliver" and event["Records"][0].get("eventSource") == "aws:dynamodb":
        answer = stream_batch(event, meta)
    elif NAME == "tidings-deliver":
        failures = []
        for record in event["Records"]:
            body = record["body"]
            count = record["attributes"]["ApproximateReceiveCount"]
            log("record", {"body": body, "receiveCount": count, "record": record, "meta": meta})
            if body == "crash" and count == "1":
                os._exit(3)
            if body == "hang" and count == "1":
                time.sleep(600)
            if body.startswith("fail"):
                failures.append({"itemIdentifier": record["messageId"]})
        answer = {"batchItemFailures": failures}
    else:
        log("scheduled", event)
        answer = None

    post(f"/invocation/{rid}/response", answer)
