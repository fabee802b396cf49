#!/usr/bin/env python3
"""Write a single OpenAPI document for the optional Prism contract check of
the Matrix connector (connectors/src/matrix/tests.rs, `prism_contract_check`).
The Matrix client-server spec (matrix-org/matrix-spec data/api/client-server)
is published as one fragment per topic with relative $refs; Prism mocks one
document, so this writes a root whose paths are $refs (by absolute file
path, so the fragments' own relative $refs keep working) to the fragments'
path items for the endpoints the connector calls. The fragments are not
changed, with one addition for a Prism limitation: the spec lets
`GET /rooms/{roomId}/state/{eventType}/{stateKey}` take an empty state key
("Defaults to an empty string. When an empty string, the trailing slash on
this endpoint is optional"; the connector asks for `m.room.name`,
`m.room.encryption` … as `/state/{eventType}/`), but Prism refuses an empty
path parameter as missing; the root also lists that operation as
`/rooms/{roomId}/state/{eventType}/` without the `stateKey` parameter
(read with PyYAML, its relative $refs made absolute). The fragments'
servers put every path under /_matrix/client/v3, which Prism ignores: the
check's proxy strips that prefix.

    scripts/matrix-prism-spec.py ../shared/contracts/matrix/data/api/client-server OUT.json
    prism mock OUT.json -p 4714 -h 127.0.0.1
"""
import json
import os
import sys

import yaml

# fragment file -> paths the connector calls
PATHS = {
    "login.yaml": ["/login"],
    "whoami.yaml": ["/account/whoami"],
    "list_joined_rooms.yaml": ["/joined_rooms"],
    "directory.yaml": ["/directory/room/{roomAlias}"],
    "rooms.yaml": [
        "/rooms/{roomId}/state/{eventType}/{stateKey}",
        "/rooms/{roomId}/event/{eventId}",
    ],
    "sync.yaml": ["/sync"],
    "message_pagination.yaml": ["/rooms/{roomId}/messages"],
}


def pointer(path: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1")


def absolute(node, base_file):
    """`node` with every $ref made absolute (relative to `base_file`)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                if v.startswith("#"):
                    v = base_file + v
                elif not os.path.isabs(v.split("#")[0]):
                    v = os.path.normpath(os.path.join(os.path.dirname(base_file), v))
            out[k] = absolute(v, base_file)
        return out
    if isinstance(node, list):
        return [absolute(v, base_file) for v in node]
    return node


def empty_state_key(src: str) -> dict:
    """The GET of a state event with the empty state key as its own path."""
    f = os.path.join(src, "rooms.yaml")
    with open(f, encoding="utf-8") as fi:
        doc = yaml.safe_load(fi)
    item = doc["paths"]["/rooms/{roomId}/state/{eventType}/{stateKey}"]
    op = absolute(item["get"], f)
    op["operationId"] += "EmptyKey"
    op["parameters"] = [p for p in op["parameters"] if p.get("name") != "stateKey"]
    return {"get": op}


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out = sys.argv[1:]
    src = os.path.abspath(src)
    paths = {}
    for frag, ps in PATHS.items():
        f = os.path.join(src, frag)
        text = open(f, encoding="utf-8").read()
        for p in ps:
            if f'"{p}":' not in text and f"  {p}:" not in text:
                print(f"{f}: no path {p}", file=sys.stderr)
                return 1
            paths[p] = {"$ref": f + pointer(p)}
    paths["/rooms/{roomId}/state/{eventType}/"] = empty_state_key(src)
    sec = os.path.join(src, "definitions", "security.yaml")
    root = {
        "openapi": "3.1.0",
        "info": {"title": "Matrix client-server API (custos contract-check subset)", "version": "1.0.0"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "accessTokenBearer": {"$ref": sec + "#/accessTokenBearer"},
            }
        },
    }
    with open(out, "w", encoding="utf-8") as fo:
        json.dump(root, fo, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
