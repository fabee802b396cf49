#!/usr/bin/env python3
"""Write a copy of Slack's Web API spec (slackapi/slack-api-specs,
web-api/slack_web_openapi_v2.json) for the optional Prism contract check
(connectors/src/slack/tests.rs, `prism_contract_check`) with one known
error corrected: the spec declares `auth.test`'s token as a required
*header* named `token`. Slack has no such header: its Web API reference
takes the token as `Authorization: Bearer` (what the connector sends, as
for every other method, where the spec lists `token` as an optional query
parameter) or as a `token` form field. The parameter is dropped; everything
else is left as published.

    scripts/slack-prism-spec.py ../shared/contracts/slack/slack_web_openapi_v2.json OUT.json
    prism mock OUT.json -p 4711 -h 127.0.0.1
"""
import json
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = sys.argv[1:]
    with open(src, encoding="utf-8") as f:
        spec = json.load(f)
    op = spec["paths"]["/auth.test"]["get"]
    params = op.get("parameters", [])
    kept = [p for p in params if not (p.get("in") == "header" and p.get("name") == "token")]
    if len(kept) == len(params):
        print(f"{src}: auth.test has no `token` header parameter: nothing to correct", file=sys.stderr)
        return 1
    op["parameters"] = kept
    with open(out, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
