"""Administration of the API: `python -m services.api keys create|list|revoke` and
`python -m services.api adapters register|list|remove`.

Reads the same INSTRUCTEDIT_* settings as the API (INSTRUCTEDIT_REDIS_URL above all), so
it manages the keys the running API checks. Prints JSON, one object per line.
"""

from __future__ import annotations

import argparse
import json
import sys

import redis

from services.common.adapters import AdapterInvalid, AdapterNotFound, AdapterStore
from services.common.api_keys import KeyNotFound, KeyStore
from services.common.settings import get_settings
from services.common.storage import open_storage


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.api", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = keys.add_parser("create", help="create a key; prints it, the only time it is shown")
    create.add_argument("--name", required=True, help="who or what the key is for")
    keys.add_parser("list", help="every key (without secrets), oldest first")
    revoke = keys.add_parser("revoke", help="revoke a key: it stops working at once")
    revoke.add_argument("id", help="the key's id (the part after `ie_`)")
    adapters = groups.add_parser("adapters", help="LoRA adapters edits may use").add_subparsers(
        dest="command", required=True
    )
    register = adapters.add_parser(
        "register", help="register a diffusers LoRA for every key to use; prints it"
    )
    register.add_argument(
        "location",
        help="a directory holding pytorch_lora_weights.safetensors, readable by every "
        "worker, or storage:<prefix> for one in the service's storage",
    )
    register.add_argument("--name", required=True, help="what the adapter is")
    register.add_argument("--id", dest="adapter_id", help="its id (default: a random one)")
    adapters.add_parser("list", help="every adapter, oldest first")
    remove = adapters.add_parser("remove", help="forget an adapter (its files stay)")
    remove.add_argument("id", help="the adapter's id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.group == "adapters":
        return _adapters(args)
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


def _adapters(args) -> int:
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        if args.command == "register":
            if not args.name.strip():
                print("error: --name must not be blank", file=sys.stderr)
                return 2
            storage = open_storage(settings) if args.location.startswith("storage:") else None
            adapter = AdapterStore(client, storage).register(
                args.location, args.name.strip(), args.adapter_id
            )
            print(adapter.model_dump_json())
        elif args.command == "list":
            for adapter in AdapterStore(client).list():
                print(adapter.model_dump_json())
        else:
            print(AdapterStore(client).remove(args.id).model_dump_json())
    except AdapterInvalid as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AdapterNotFound:
        print(f"error: no adapter with id {args.id!r}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis cannot be reached: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
