"""`etl backfill`: resumable after kill -9 and Ctrl-C, with progress on a TTY and in logs."""

from __future__ import annotations

import collections
import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import TOKEN, cli_env, copy_mappings, etl_process, run_cli, seed

from etl.receiver.faults import FaultPlan
from etl.receiver.server import start_receiver

N_USERS = 1500


def checkpoint(state: Path) -> str | None:
    """The users stream's backfill checkpoint, read without disturbing the run."""
    if not state.exists():
        return None
    conn = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT checkpoint FROM etl_streams WHERE stream = 'users'").fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def wait_for_checkpoint(state: Path, proc: Any, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = checkpoint(state)
        if found:
            return found
        assert proc.poll() is None, "the backfill ended before any checkpoint"
        time.sleep(0.02)
    raise AssertionError("no checkpoint within the timeout")


def log_events(path: Path, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("event") == name]


@pytest.fixture
def slow_env(tmp_path: Path, sqlite_url: str) -> Any:
    """A source of 1,500 users and a receiver that takes 15 ms a request."""
    seed(sqlite_url, n_workspaces=5, n_users=N_USERS)
    copy_mappings(tmp_path / "mappings")
    plan = FaultPlan.from_json('{"latency_ms": [15, 15]}')
    with start_receiver(store=tmp_path / "received.db", tokens={TOKEN}, faults=plan) as rx:
        env = cli_env(tmp_path, sqlite_url, rx.url, ETL_BATCH_SIZE="25", ETL_PAGE_SIZE="100")
        yield env, rx


@pytest.mark.slow
def test_a_backfill_killed_midway_resumes_without_resending_acknowledged_pages(
    tmp_path: Path, slow_env: Any
) -> None:
    """kill -9 after a checkpoint; the re-run starts after it and delivers the rest."""
    env, rx = slow_env
    state = tmp_path / "state.db"
    proc = etl_process(["backfill"], env, tmp_path, "first")
    try:
        wait_for_checkpoint(state, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent_before = len(rx.events())
    assert 0 < sent_before < N_USERS + 5
    saved = json.loads(checkpoint(state) or "[]")
    assert saved

    second = etl_process(["backfill"], env, tmp_path, "second")
    assert second.wait(timeout=60) == 0
    resumed = log_events(tmp_path / "second.err", "backfill.resume")
    assert resumed[0]["after"] == saved
    done = {e["stream"]: e for e in log_events(tmp_path / "second.err", "stream.done")}
    users_before_checkpoint = len(
        {
            e["user_id"]
            for e in rx.events()[:sent_before]
            if e["event_type"] == "user_identify" and e["user_id"] <= saved[0]
        }
    )
    # acknowledged pages are not read again, let alone sent
    assert done["users"]["read"] <= N_USERS - users_before_checkpoint + 1
    events = [e for e in rx.events() if e["event_type"] == "user_identify"]
    counts = collections.Counter(e["user_id"] for e in events)
    assert len(counts) == N_USERS
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= 2 * 25  # at most the batches in flight at the kill
    # the nightly sync carries on from the backfill's horizon: nothing to send
    total = len(rx.events())
    after = run_cli(["sync"], env)
    assert after.exit_code == 0
    assert len(rx.events()) == total


@pytest.mark.slow
def test_ctrl_c_stops_after_in_flight_batches_and_the_rerun_finishes(
    tmp_path: Path, slow_env: Any
) -> None:
    """SIGINT: in-flight batches finish, the checkpoint is kept, exit 1; the re-run completes."""
    env, rx = slow_env
    state = tmp_path / "state.db"
    proc = etl_process(["backfill"], env, tmp_path, "first")
    try:
        wait_for_checkpoint(state, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "first.err").read_text()
    assert "run.stopping" in stderr
    assert "stopped by a signal" in stderr
    assert checkpoint(state)
    delivered = len(rx.events())
    assert delivered < N_USERS + 5
    second = etl_process(["backfill"], env, tmp_path, "second")
    assert second.wait(timeout=60) == 0
    users = {e["user_id"] for e in rx.events() if e["event_type"] == "user_identify"}
    assert len(users) == N_USERS


def test_progress_is_logged_when_not_on_a_tty(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """Without a TTY, backfill logs `backfill.progress` lines with done, total, rate."""
    seed(sqlite_url, n_users=300)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url, ETL_PAGE_SIZE="100")
    result = run_cli(["backfill"], env)
    assert result.exit_code == 0
    lines = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    progress = [e for e in lines if e["event"] == "backfill.progress"]
    assert progress
    assert {"stream", "done", "total", "rate", "eta_seconds"} <= set(progress[0])
    assert progress[0]["total"] >= progress[0]["done"] > 0


def test_progress_bar_on_a_tty(tmp_path: Path, sqlite_url: str, receiver: Any) -> None:
    """On a TTY, backfill draws a bar per stream with position and ETA."""
    seed(sqlite_url, n_users=300)
    copy_mappings(tmp_path / "mappings")
    env = {**os.environ, **cli_env(tmp_path, sqlite_url, receiver.url, ETL_PAGE_SIZE="50")}
    env["ETL_LOG_FORMAT"] = "json"
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "etl", "backfill"],
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
        close_fds=True,
    )
    os.close(child)
    chunks = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child side closed
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    screen = b"".join(chunks).decode(errors="replace")
    assert "users" in screen
    assert "300/300" in screen
    assert "100%" in screen
