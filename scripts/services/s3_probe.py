#!/usr/bin/env python3
"""Minimal SigV4 S3 probe for scripts/services/s3.sh (standard library only).

Usage:
  s3_probe.py wait    ENDPOINT ACCESS SECRET REGION PID TIMEOUT_S
  s3_probe.py buckets ENDPOINT ACCESS SECRET REGION BUCKET...

`wait` blocks until a signed ListBuckets answers 200 (fails early if PID dies).
`buckets` creates any missing bucket, then checks that every bucket is listed
and that an unsigned request is refused.
"""

import datetime
import hashlib
import hmac
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Talk to the local server directly, whatever *_proxy variables say.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _hmac(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def request(endpoint, method, path, creds=None, timeout=5.0):
    """Send a request (SigV4-signed if creds) and return (status, body)."""
    url = urllib.parse.urlsplit(endpoint)
    headers = {}
    if creds is not None:
        access, secret, region = creds
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = now.strftime("%Y%m%d")
        headers = {
            "host": url.netloc,
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": amz_date,
        }
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                method,
                urllib.parse.quote(path, safe="/-_.~"),
                "",
                "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                signed,
                EMPTY_SHA256,
            ]
        )
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = _hmac(("AWS4" + secret).encode(), day)
        for part in (region, "s3", "aws4_request"):
            key = _hmac(key, part)
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        del headers["host"]  # urllib sets it (same value)
    req = urllib.request.Request(endpoint.rstrip("/") + path, method=method, headers=headers)
    if method == "PUT":
        req.data = b""
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def list_buckets(endpoint, creds):
    status, body = request(endpoint, "GET", "/", creds)
    if status != 200:
        raise RuntimeError(f"ListBuckets answered {status}: {body[:300]}")
    return set(re.findall(r"<Name>([^<]+)</Name>", body))


def alive(pid):
    """True while pid runs (a zombie, not yet reaped by its parent, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmd_wait(endpoint, creds, pid, timeout):
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not alive(pid):
            print(f"s3_probe: server process {pid} exited", file=sys.stderr)
            return 1
        try:
            status, body = request(endpoint, "GET", "/", creds, timeout=2.0)
            if status == 200:
                return 0
            last = f"HTTP {status}: {body[:200]}"
        except (OSError, urllib.error.URLError) as err:
            last = str(err)
        time.sleep(0.2)
    print(f"s3_probe: {endpoint} not ready after {timeout}s ({last})", file=sys.stderr)
    return 1


def cmd_buckets(endpoint, creds, names):
    have = list_buckets(endpoint, creds)
    for name in names:
        if name in have:
            continue
        status, body = request(endpoint, "PUT", "/" + name, creds)
        # 409 = created concurrently (e.g. by `weed mini -bucket`): fine.
        if status not in (200, 409):
            print(f"s3_probe: CreateBucket {name} answered {status}: {body[:300]}", file=sys.stderr)
            return 1
    have = list_buckets(endpoint, creds)
    missing = [n for n in names if n not in have]
    if missing:
        print(f"s3_probe: buckets missing after create: {missing}", file=sys.stderr)
        return 1
    status, _ = request(endpoint, "GET", "/" + names[0])
    if status != 403:
        print(f"s3_probe: unsigned request answered {status}, expected 403", file=sys.stderr)
        return 1
    return 0


def main(argv):
    if len(argv) < 6:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, endpoint, access, secret, region = argv[1:6]
    creds = (access, secret, region)
    if cmd == "wait" and len(argv) == 8:
        return cmd_wait(endpoint, creds, int(argv[6]), float(argv[7]))
    if cmd == "buckets" and len(argv) > 6:
        try:
            return cmd_buckets(endpoint, creds, argv[6:])
        except (OSError, RuntimeError) as err:
            print(f"s3_probe: {err}", file=sys.stderr)
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
