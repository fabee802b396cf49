#!/usr/bin/env python3
"""Write a copy of a HubSpot CRM v3 OpenAPI spec for the optional Prism
contract check (connectors/src/hubspot/tests.rs, `prism_contract_check`)
with one known error corrected: the published specs type the search
request's `sorts` as an array of strings, while HubSpot's CRM search guide
documents (and the API honours) an array of `{"propertyName", "direction"}`
objects; HubSpot's own SDK issue trackers report string sorts being
ignored. Everything else is left as published.

    scripts/hubspot-prism-spec.py ../shared/contracts/hubspot/contacts.v3.json OUT.json
    prism mock OUT.json -d -p 4710 -h 127.0.0.1
"""
import json
import sys

SORT = {
    "type": "object",
    "required": ["propertyName"],
    "properties": {
        "propertyName": {"type": "string"},
        "direction": {"type": "string", "enum": ["ASCENDING", "DESCENDING"]},
    },
}


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = sys.argv[1:]
    with open(src, encoding="utf-8") as f:
        spec = json.load(f)
    req = spec["components"]["schemas"]["PublicObjectSearchRequest"]
    items = req["properties"]["sorts"]["items"]
    if items.get("type") != "string":
        print(f"{src}: sorts items are {items!r}, not strings: nothing to correct", file=sys.stderr)
        return 1
    req["properties"]["sorts"]["items"] = SORT
    with open(out, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
