"""Administration of the API: `python -m services.api keys create|list|revoke`.

Reads the same INSTRUCTEDIT_* settings as the API (INSTRUCTEDIT_REDIS_URL above all), so
it manages the keys the running API checks. Prints JSON, one object per line.
"""

from __future__ import annotations

import argparse
import json
import sys

import redis

from services.common.api_keys import KeyNotFound, KeyStore
from services.common.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.api", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="create a key; prints it, the only time it is shown")
    create.add_argument("--name", required=True, help="who or what the key is for")
    keys.add_parser("list", help="every key (without secrets), oldest first")
    revoke = keys.add_parser("revoke", help="revoke a key: it stops working at once")
    revoke.add_argument("id", help="the key's id (the part after `ie_`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = KeyStore(redis.Redis.from_url(get_settings().redis_url))
    try:
        if args.command == "create":
            if not args.name.strip():
                print("error: --name must not be blank", file=sys.stderr)
                return 2
            print(store.create(args.name.strip()).model_dump_json())
        elif args.command == "list":
            for key in store.list():
                print(json.dumps({**key.model_dump(mode="json"), "active": key.active}))
        else:
            print(store.revoke(args.id).model_dump_json())
    except KeyNotFound:
        print(f"error: no API key with id {args.id!r}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis cannot be reached: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
