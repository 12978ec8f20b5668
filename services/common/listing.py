"""Newest-first, cursor-paginated listings of what a key owns.

Each owner has a sorted set per kind (edit jobs, dataset runs): member the id, score the
creation time. A page is read newest first from just below the cursor; the cursor is
opaque to clients (base64 of the last item's score and id), so a listing stays stable
while new items arrive at the top. Records that expired or were deleted are skipped and
dropped from the set as they are met.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

T = TypeVar("T")

MAX_PAGE = 100
# A filtered page reads at most this many ids per page asked for, so that a filter
# that matches nothing cannot make one request scan a whole history.
SCAN_FACTOR = 10


class BadCursor(ValueError):
    pass


def owner_index_key(namespace: str, kind: str, owner: str) -> str:
    return f"{namespace}:owner:{owner}:{kind}"


def encode_cursor(score: float, item_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}|{item_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, item_id = raw.split("|", 1)
        if not math.isfinite(float(score)):
            raise ValueError(score)
        return float(score), item_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursor("the cursor is not one this API returned") from None


def page(
    client: redis.Redis,
    index_key: str,
    load: Callable[[Sequence[str]], Sequence[T | None]],
    limit: int,
    cursor: str | None = None,
    keep: Callable[[T], bool] = lambda _: True,
) -> tuple[list[T], str | None]:
    """Up to `limit` items newest first from below `cursor` that `keep` accepts, and the
    cursor of the next page (None at the end). `load` reads records by id (None: gone)."""
    if cursor is None:
        max_score, after_id = "+inf", None
    else:
        score, after_id = decode_cursor(cursor)
        max_score = repr(score)
    items: list[T] = []
    scanned = 0
    budget = limit * SCAN_FACTOR
    while scanned < budget:
        batch = client.zrevrangebyscore(
            index_key,
            max_score,
            "-inf",
            start=0,
            num=limit + 1 + (1 if after_id else 0),
            withscores=True,
        )
        entries = [(member.decode(), score) for member, score in batch]
        if after_id is not None:
            # Members with the cursor's score sort by id, descending: skip through it.
            entries = _after(entries, float(max_score), after_id)
        if not entries:
            return items, None
        records = load([item_id for item_id, _ in entries])
        gone = []
        for (item_id, score), record in zip(entries, records, strict=True):
            scanned += 1
            if record is None:
                gone.append(item_id)
            elif keep(record):
                items.append(record)
            last = (score, item_id)
            if len(items) == limit:
                break
        if gone:
            client.zrem(index_key, *gone)
        if len(items) == limit or scanned >= budget:
            return items, encode_cursor(*last)
        max_score, after_id = repr(last[0]), last[1]
    return items, None


def _after(
    entries: list[tuple[str, float]], score: float, after_id: str
) -> list[tuple[str, float]]:
    """The entries strictly after (score, after_id) in newest-first order."""
    return [(i, s) for i, s in entries if s < score or (s == score and i < after_id)]
