"""``explainserve api-key``: make an API key for the gateway's ``--auth-keys`` file."""

from __future__ import annotations

import json

from explainserve.sidecar.auth import key_sha256, new_key


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "api-key", help="make a new API key: prints the key (give it to the client) and its --auth-keys entry",
        description="Prints a new random API key on the first line, for the client (send it as "
                    "`authorization: Bearer <key>`, or set $EXPLAINSERVE_TOKEN), and on the second the JSON "
                    "entry to add to the gateway's --auth-keys file, which holds only the key's sha256.")
    parser.add_argument("--name", required=True, help="who holds the key (logged on refusals)")
    parser.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="limit the key to this model (repeat for several; default: every model)")
    parser.set_defaults(func=main)


def main(args) -> int:
    key = new_key()
    entry = {"name": args.name, "sha256": key_sha256(key)}
    if args.models:
        entry["models"] = sorted(set(args.models))
    print(key)
    print(json.dumps(entry))
    return 0
