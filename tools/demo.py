"""`make demo`: the real job, end to end, on an embedded sample. No network, no token.

1. writes a deterministic SQLite database: 300 workspaces, 3,000 users (and two
   deliberately broken users, to show how invalid rows are reported), and a
   year of paid invoices (a track stream, docs/track.md);
2. starts the local receiver on 127.0.0.1 (a free port);
3. runs `etl sync` as a real subprocess: every valid record goes out; the
   invoices' track stream starts at the safe horizon and sends no history;
4. `etl backfill --stream invoices_paid --since 90d` sends the last 90 days of
   paid invoices, once each;
5. changes three rows, pays two invoices and shows `etl diff`: exactly those;
6. syncs again (only the changed records and the new events go out), shows the
   receiver's store; a paid invoice is then corrected, and `etl diff` reports it
   as changed after sending (never re-sent); `etl state show` and `etl runs`;
   then stops the receiver.
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
# The demo's own mappings (its track stream), next to the shipped examples.
DEMO_MAPPINGS = Path(__file__).resolve().parent / "mappings"
INVOICES = 2000
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
    _create_invoices(conn, rng, [(str(u[0]), str(u[1])) for u in users[:USERS]])
    conn.commit()
    conn.close()


def _create_invoices(
    conn: sqlite3.Connection, rng: random.Random, payers: list[tuple[str, str]]
) -> None:
    """A year of invoices before now (an append-only table); one in ten unpaid."""
    conn.executescript(
        """
        CREATE TABLE invoices (
          id INTEGER PRIMARY KEY, workspace_id TEXT, paid_by TEXT, amount_cents INTEGER,
          currency TEXT, plan TEXT, created_at TIMESTAMP, paid_at TIMESTAMP);
        CREATE INDEX invoices_paid ON invoices (paid_at, id);
        """
    )
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
    rows = []
    for i in range(1, INVOICES + 1):
        user, workspace = rng.choice(payers)
        created = now - dt.timedelta(minutes=rng.randrange(60, 365 * 24 * 60))
        paid = created + dt.timedelta(minutes=rng.randrange(1, 50)) if i % 10 else None
        plan = rng.choice(PLANS[:4])
        amount = {"free": 0, "starter": 2900, "growth": 9900, "enterprise": 49900}[plan]
        rows.append((i, workspace, user, amount, "EUR", plan, stamp(created), paid and stamp(paid)))
    conn.executemany("INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?)", rows)


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
    # two invoices paid just now: new track events
    conn.execute(
        "INSERT INTO invoices SELECT id + 100000, workspace_id, paid_by, 9900, 'EUR', 'growth', "
        f"{now}, {now} FROM invoices ORDER BY id LIMIT 2"
    )
    conn.commit()
    conn.close()


def correct_an_invoice(path: Path) -> None:
    """A paid invoice corrected after it was sent: a track event is not sent again."""
    conn = sqlite3.connect(path)
    conn.execute("UPDATE invoices SET amount_cents = 8900 WHERE id = 100001")
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
    print(
        f"sample database: {source} ({WORKSPACES} workspaces, {USERS + 2} users, 2 broken; "
        f"{INVOICES} invoices over the last year)"
    )
    mappings = WORKDIR / "mappings"
    mappings.mkdir()
    for path in [*sorted((ROOT / "mappings").glob("*.yml")), *DEMO_MAPPINGS.glob("*.yml")]:
        shutil.copy(path, mappings / path.name)
    token = secrets.token_hex(16)  # a throwaway token shared by the demo's two ends
    with start_receiver(store=WORKDIR / "received.db", tokens={token}) as receiver:
        print(f"local receiver: {receiver.base_url}")
        env = {
            **os.environ,
            "ETL_SOURCE_URL": f"sqlite:///{source}",
            "ETL_STATE_URL": f"sqlite:///{WORKDIR / 'etl-state.db'}",
            "ETL_MAPPINGS": str(mappings),
            "ETL_LOG_FORMAT": "console",
            "HYPERENGAGE_ENDPOINT": receiver.url,
            "HYPERENGAGE_TOKEN": token,
            "HYPERENGAGE_API_KEY": "demo-api-key",
            "HYPERENGAGE_WORKSPACE_KEY": "demo-workspace",
        }
        steps = [
            (("validate", "--check-source"), {0}),
            (("sync",), {3}),  # 3: finished, two invalid rows reported
            # the track stream's history, on purpose: the last 90 days of paid invoices
            (("backfill", "--stream", "invoices_paid", "--since", "90d"), {0}),
        ]
        for args, expected in steps:
            if etl(*args, env=env) not in expected:
                return 1
        first = len(receiver.events())
        print(f"\nreceiver holds {first} events after the first sync and the backfill")
        change_some_rows(source)
        print(
            "\nchanged 2 users and 1 workspace, 2 invoices paid; the dry run shows exactly those:"
        )
        # 3: the two broken users stay invalid; they are re-checked on every run
        if etl("diff", env=env) not in {0, 3}:
            return 1
        if etl("sync", env=env) not in {0, 3}:
            return 1
        events = read_events(WORKDIR / "received.db")
        print(f"\nreceiver holds {len(events)} events: the second sync sent {len(events) - first}")
        for event in events[first:]:
            values = event.get("traits", event.get("properties"))
            print(f"  {event['event_type']:<17} {event['user_id']}  {values}")
        correct_an_invoice(source)
        print("\nan invoice corrected after it was sent: reported, never re-sent")
        if etl("diff", "--stream", "invoices_paid", env=env) != 0:
            return 1
        etl("state", "show", env=env)
        etl("runs", "--limit", "3", env=env)
    print("\nreceiver stopped. Everything is in ./demo (delete it freely).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
