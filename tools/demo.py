"""`make demo`: the real job, end to end, on an embedded sample. No network, no token.

1. writes a deterministic SQLite database: 300 workspaces, 3,000 users (and two
   deliberately broken users, to show how invalid rows are reported);
2. starts the local receiver on 127.0.0.1 (a free port);
3. runs `etl sync` as a real subprocess: every valid record goes out;
4. changes three rows and shows `etl diff`: exactly those three;
5. syncs again (only the changed records go out), shows the receiver's store,
   `etl state show` and `etl runs`; then stops the receiver.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import structlog

from etl.receiver.server import start_receiver
from etl.receiver.store import read_events

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = Path(os.environ.get("ETL_DEMO_DIR", "demo"))
WORKSPACES, USERS = 300, 3000
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Ken", "Margaret", "Linus", "Guido"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Thompson", "Hamilton"]
PLANS = ["free", "starter", "growth", "enterprise", None]
ROLES = ["member", "admin", "owner", "viewer"]


def hex_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(96):024x}"


def stamp(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def create_sample(path: Path) -> None:
    """The demo schema with deterministic rows (seeded), timestamps in the past."""
    rng = random.Random(20261126)  # noqa: S311 - sample data, deterministic on purpose
    base = dt.datetime(2025, 1, 1)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE workspaces (
          id TEXT PRIMARY KEY, name TEXT NOT NULL, domain TEXT, plan TEXT, seats INTEGER,
          owner_id TEXT, tags TEXT, created_at TIMESTAMP, updated_at TIMESTAMP,
          deleted_at TIMESTAMP);
        CREATE TABLE users (
          id TEXT PRIMARY KEY, workspace_id TEXT, email TEXT, first_name TEXT,
          last_name TEXT, role TEXT, is_admin BOOLEAN, last_login_at TIMESTAMP,
          created_at TIMESTAMP, updated_at TIMESTAMP);
        CREATE INDEX users_updated ON users (updated_at, id);
        CREATE INDEX workspaces_updated ON workspaces (updated_at, id);
        """
    )
    workspaces: list[tuple[object, ...]] = []
    for i in range(WORKSPACES):
        created = base + dt.timedelta(hours=rng.randrange(0, 8000))
        tags = rng.sample(["b2b", "saas", "eu", "us", "beta", "vip"], rng.randrange(0, 3))
        workspaces.append(
            (
                hex_id(rng),
                f"Workspace {i:03d}",
                f"ws{i:03d}.example.com",
                rng.choice(PLANS),
                rng.randrange(1, 200),
                None,
                str(tags).replace("'", '"'),
                stamp(created),
                stamp(created + dt.timedelta(days=rng.randrange(0, 300))),
                stamp(created) if i % 97 == 96 else None,
            )
        )
    users: list[tuple[object, ...]] = []
    owners: dict[str, str] = {}
    for i in range(USERS):
        ws = str(workspaces[i % WORKSPACES][0])
        first, last = rng.choice(FIRST), rng.choice(LAST)
        created = base + dt.timedelta(hours=rng.randrange(0, 8000))
        user_id = hex_id(rng)
        owners.setdefault(str(ws), user_id)
        users.append(
            (
                user_id,
                ws,
                f"{first.lower()}.{last.lower()}{i}@example.com",
                first,
                last,
                rng.choice(ROLES),
                rng.random() < 0.1,
                stamp(created + dt.timedelta(days=rng.randrange(1, 300))) if i % 5 else None,
                stamp(created),
                stamp(created + dt.timedelta(days=rng.randrange(0, 300))),
            )
        )
    # Two broken rows: an empty email, and a created_at that is not a date.
    users.append(
        (
            hex_id(rng),
            workspaces[0][0],
            "",
            "No",
            "Email",
            "member",
            False,
            None,
            stamp(base),
            stamp(base),
        )
    )
    users.append(
        (
            hex_id(rng),
            workspaces[1][0],
            "bad.date@example.com",
            "Bad",
            "Date",
            "member",
            False,
            None,
            "last tuesday",
            stamp(base),
        )
    )
    workspaces = [(*w[:5], owners.get(str(w[0])), *w[6:]) for w in workspaces]
    conn.executemany("INSERT INTO workspaces VALUES (?,?,?,?,?,?,?,?,?,?)", workspaces)
    conn.executemany("INSERT INTO users VALUES (?,?,?,?,?,?,?,?,?,?)", users)
    conn.commit()
    conn.close()


def change_some_rows(path: Path) -> None:
    """Three edits, stamped with SQLite's clock, as an app would write them."""
    now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    conn = sqlite3.connect(path)
    conn.execute(
        f"UPDATE users SET role = 'owner', updated_at = {now} "
        "WHERE id = (SELECT id FROM users ORDER BY id LIMIT 1)"
    )
    conn.execute(
        f"UPDATE users SET last_name = 'Hopper-Turing', updated_at = {now} "
        "WHERE id = (SELECT id FROM users ORDER BY id LIMIT 1 OFFSET 1)"
    )
    conn.execute(
        f"UPDATE workspaces SET plan = 'enterprise', seats = 250, updated_at = {now} "
        "WHERE id = (SELECT id FROM workspaces ORDER BY id LIMIT 1)"
    )
    conn.commit()
    conn.close()


def etl(*args: str, env: dict[str, str]) -> int:
    """Run the real CLI in a subprocess, echoing its output, and return its exit code."""
    print(f"\n$ etl {' '.join(args)}", flush=True)
    command = [sys.executable, "-m", "etl", *args]
    return subprocess.run(command, env=env, check=False).returncode  # noqa: S603 - our own CLI


def main() -> int:
    # The receiver runs in this process: keep its per-request lines out of the way.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if WORKDIR.exists():
        shutil.rmtree(WORKDIR)
    WORKDIR.mkdir(parents=True)
    source = WORKDIR / "app.db"
    create_sample(source)
    print(f"sample database: {source} ({WORKSPACES} workspaces, {USERS + 2} users, 2 broken)")
    token = secrets.token_hex(16)  # a throwaway token shared by the demo's two ends
    with start_receiver(store=WORKDIR / "received.db", tokens={token}) as receiver:
        print(f"local receiver: {receiver.base_url}")
        env = {
            **os.environ,
            "ETL_SOURCE_URL": f"sqlite:///{source}",
            "ETL_STATE_URL": f"sqlite:///{WORKDIR / 'etl-state.db'}",
            "ETL_MAPPINGS": str(ROOT / "mappings"),
            "ETL_LOG_FORMAT": "console",
            "HYPERENGAGE_ENDPOINT": receiver.url,
            "HYPERENGAGE_TOKEN": token,
            "HYPERENGAGE_API_KEY": "demo-api-key",
            "HYPERENGAGE_WORKSPACE_KEY": "demo-workspace",
        }
        steps = [
            (("validate", "--check-source"), {0}),
            (("sync",), {3}),  # 3: finished, two invalid rows reported
        ]
        for args, expected in steps:
            if etl(*args, env=env) not in expected:
                return 1
        first = len(receiver.events())
        print(f"\nreceiver holds {first} events after the first sync")
        change_some_rows(source)
        print("\nchanged 2 users and 1 workspace; the dry run shows exactly those:")
        if etl("diff", env=env) != 0:
            return 1
        if etl("sync", env=env) != 0:
            return 1
        events = read_events(WORKDIR / "received.db")
        print(f"\nreceiver holds {len(events)} events: the second sync sent {len(events) - first}")
        for event in events[first:]:
            print(f"  {event['event_type']:<17} {event['user_id']}  {event['traits']}")
        etl("state", "show", env=env)
        etl("runs", "--limit", "3", env=env)
    print("\nreceiver stopped. Everything is in ./demo (delete it freely).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
