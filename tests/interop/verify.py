"""Checks captured deliveries with the official Python libraries, as a receiver would.

Usage: verify.py CASES_JSON. Prints one JSON object: for every case, whether the
Standard Webhooks library accepted it (and its error), and for CloudEvents cases
the event the CloudEvents SDK parsed. tests/interop.rs judges the outcome; the
lines docs/user-guide.md shows are used here verbatim (the test checks that too).
"""

import base64
import json
import sys

from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from standardwebhooks import Webhook


def check(case):
    key = case["key"].encode()
    body = base64.b64decode(case["body_b64"])
    headers = case["headers"]
    result = {"accepted": False, "error": None, "event": None}
    try:
        payload = Webhook("whsec_" + base64.b64encode(key).decode()).verify(body, headers)  # raises if invalid
    except Exception as e:  # noqa: BLE001 - the error text is the result
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    result["accepted"] = payload is not None
    if case["format"] == "cloudevents":
        event = from_http_event(HTTPMessage(headers=headers, body=body))  # format: cloudevents
        result["event"] = {
            "specversion": event.get_specversion(),
            "type": event.get_type(),
            "source": event.get_source(),
            "subject": event.get_subject(),
            "id": event.get_id(),
            "time": event.get_time().isoformat(),
            "datacontenttype": event.get_datacontenttype(),
            "data": event.get_data(),
        }
    return result


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    print(json.dumps({case["name"]: check(case) for case in cases}))


if __name__ == "__main__":
    main()
