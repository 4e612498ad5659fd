"""The naive baseline: the sync script a user writes first, before reaching for etl.

Reads every workspace and user with SQLAlchemy (streamed, so not unfairly
slow or big), builds the same events as the benchmark's mapping files (the
fields of SPEC §2, with json.dumps), and POSTs them in arrays of 500, one
request after another. No diff, no retries, no state beyond one small file.

    python -m bench.naive --source URL --endpoint URL --state-file F            # all rows
    python -m bench.naive --source URL --endpoint URL --state-file F --since-last

`--since-last` is its incremental form: only rows with `updated_at` above the
largest value the previous run saw (kept in the state file). Both forms write
that file. The token comes from HYPERENGAGE_TOKEN. Prints one JSON line:
{"rows": ..., "requests": ..., "seconds": ...}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
import sqlalchemy as sa

BATCH = 500

WORKSPACES = """
SELECT id, name, domain, owner_id, plan, seats, tags, is_trial, created_at, updated_at
FROM workspaces WHERE deleted_at IS NULL {since}
"""
USERS = """
SELECT id, workspace_id, first_name, last_name, email, role, is_admin, last_login_at,
       tags, settings, created_at, updated_at
FROM users WHERE true {since}
"""


def iso(value):
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def event(event_type, user_id, account_id, traits):
    return {
        "event_id": str(uuid.uuid4()),
        "anonymous_id": "",
        "user_id": user_id,
        "account_id": account_id,
        "api_key": os.environ["HYPERENGAGE_API_KEY"],
        "workspace_key": os.environ["HYPERENGAGE_WORKSPACE_KEY"],
        "src": "hyperengage",
        "library": "http",
        "event_type": event_type,
        "traits": traits,
        "screen_resolution": "0",
    }


def workspace_event(row):
    traits = {
        "name": row.name,
        "created_at": iso(row.created_at),
        "plan_name": row.plan or "free",
        "website": "https://" + row.domain,
        "seats": row.seats,
        "tags": row.tags,
        "is_trial": row.is_trial,
    }
    return event("account_identify", row.owner_id, row.id, traits)


def user_event(row):
    traits = {
        "email": row.email,
        "name": f"{row.first_name} {row.last_name}",
        "created_at": iso(row.created_at),
        "role": row.role,
        "is_admin": row.is_admin,
        "tags": row.tags,
        "theme": row.settings["theme"],
        "locale": row.settings["locale"],
    }
    if row.last_login_at is not None:
        traits["last_login_at"] = iso(row.last_login_at)
    return event("user_identify", row.id, row.workspace_id, traits)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--since-last", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    last = json.loads(args.state_file.read_text()) if args.since_last else {}
    engine = sa.create_engine(args.source)
    client = httpx.Client(timeout=60)
    rows = requests = 0

    def post(batch):
        nonlocal requests
        response = client.post(
            args.endpoint,
            params={"token": os.environ["HYPERENGAGE_TOKEN"]},
            content=json.dumps(batch),
            headers={"content-type": "application/json"},
        )
        response.raise_for_status()
        requests += 1

    with engine.connect() as conn:
        for table, query, to_event in (
            ("workspaces", WORKSPACES, workspace_event),
            ("users", USERS, user_event),
        ):
            newest = dt.datetime.fromisoformat(last[table]) if table in last else None
            since = "AND updated_at > :since ORDER BY updated_at" if newest else ""
            result = conn.execution_options(stream_results=True, yield_per=10_000).execute(
                sa.text(query.format(since=since)), {"since": newest} if newest else {}
            )
            batch = []
            for row in result:
                rows += 1
                batch.append(to_event(row))
                if newest is None or row.updated_at > newest:
                    newest = row.updated_at
                if len(batch) == BATCH:
                    post(batch)
                    batch = []
            if batch:
                post(batch)
            if newest is not None:
                last[table] = newest.isoformat()
    args.state_file.write_text(json.dumps(last))
    seconds = round(time.monotonic() - started, 3)
    print(json.dumps({"rows": rows, "requests": requests, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
