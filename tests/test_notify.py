"""`--notify-url`: a small JSON summary POSTed on success and on failure, with no PII."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, copy_mappings, run_cli, seed, user_id, users, ws_id

from etl.model import StreamReport
from etl.monitor.notify import send_notification, summary
from etl.monitor.outcome import RunOutcome, safe_message


@dataclass
class Pings:
    """What the local monitoring endpoint received, and what it answers."""

    url: str
    received: list[tuple[str, dict[str, Any], bytes]] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def pings() -> Iterator[Pings]:
    """A stdlib HTTP server on 127.0.0.1 standing in for healthchecks.io."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append((self.path, json.loads(body), body))
            self.send_response(state.status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Pings(url=f"http://127.0.0.1:{server.server_address[1]}/ping/abc")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, receiver: Any, pings: Pings) -> dict[str, str]:
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    return cli_env(tmp_path, sqlite_url, receiver.url, ETL_NOTIFY_URL=pings.url + "/{exit_code}")


def assert_no_secrets_or_pii(body: bytes) -> None:
    """No token, api key, record key, e-mail or name in what leaves for monitoring."""
    text = body.decode()
    for word in (TOKEN, "wrong-token-value", "api-key-1", "ws-key-1", "@example.com", "Lovelace"):
        assert word not in text
    for i in range(10):
        assert user_id(i) not in text
    for i in range(3):
        assert ws_id(i) not in text


def test_a_successful_sync_posts_its_counts(env: dict[str, str], pings: Pings) -> None:
    """Exit 0: one POST to .../0 with status ok, the command, per-stream counts, no error."""
    result = run_cli(["sync"], env)
    assert result.exit_code == 0, result.stderr
    ((path, data, body),) = pings.received
    assert path == "/ping/abc/0"
    assert data["status"] == "ok"
    assert data["command"] == "sync"
    assert data["exit_code"] == 0
    assert data["error"] is None
    assert isinstance(data["run_id"], int)
    assert data["duration_seconds"] >= 0
    assert data["finished_at"].endswith("Z")
    by_name = {s["stream"]: s for s in data["streams"]}
    assert by_name["users"]["sent"] == 10
    assert by_name["workspaces"]["new"] == 3
    assert set(by_name["users"]) == {
        "stream",
        "event_type",
        "read",
        "new",
        "changed",
        "unchanged",
        "invalid",
        "rejected",
        "sent",
        "batches",
        "retries",
        "seconds",
    }
    assert_no_secrets_or_pii(body)


def test_a_failed_sync_posts_the_error_class_and_a_redacted_message(
    env: dict[str, str], pings: Pings
) -> None:
    """Exit 1 (wrong token): a POST to .../1, status failed, FatalApiError, no token."""
    result = run_cli(["sync"], {**env, "HYPERENGAGE_TOKEN": "wrong-token-value"})
    assert result.exit_code == 1
    ((path, data, body),) = pings.received
    assert path == "/ping/abc/1"
    assert data["status"] == "failed"
    assert data["exit_code"] == 1
    assert data["streams"] == []
    assert data["error"]["class"] == "FatalApiError"
    assert "HYPERENGAGE_TOKEN" in data["error"]["message"]
    assert_no_secrets_or_pii(body)


def test_a_partial_sync_posts_counts_but_not_the_invalid_keys(
    env: dict[str, str], pings: Pings, sqlite_url: str
) -> None:
    """Exit 3: status partial with the invalid count; the invalid record's key is not sent."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == user_id(7)).values(email=""))
    engine.dispose()
    assert run_cli(["sync"], env).exit_code == 3
    ((path, data, body),) = pings.received
    assert path == "/ping/abc/3"
    assert data["status"] == "partial"
    assert next(s for s in data["streams"] if s["stream"] == "users")["invalid"] == 1
    assert_no_secrets_or_pii(body)


def test_a_configuration_error_is_notified_with_exit_2(env: dict[str, str], pings: Pings) -> None:
    """A missing API key stops the run (exit 2), and monitoring hears of it."""
    result = run_cli(["backfill"], {**env, "HYPERENGAGE_API_KEY": ""})
    assert result.exit_code == 2
    ((path, data, _),) = pings.received
    assert path == "/ping/abc/2"
    assert (data["command"], data["status"], data["error"]["class"]) == (
        "backfill",
        "failed",
        "UsageError",
    )


@pytest.mark.parametrize("answer", [500, "unreachable"])
def test_a_failing_notification_does_not_change_the_exit_code(
    env: dict[str, str], pings: Pings, answer: int | str
) -> None:
    """A 500 or a closed port is a `notify.failed` warning; the run still exits 0."""
    if answer == "unreachable":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**env, "ETL_NOTIFY_URL": f"http://127.0.0.1:{port}/ping/secret-uuid"}
    else:
        pings.status = int(answer)
    result = run_cli(["sync"], env)
    assert result.exit_code == 0
    warnings = [
        json.loads(line) for line in result.stderr.splitlines() if '"notify.failed"' in line
    ]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert "secret-uuid" not in result.stderr
    assert "/ping/abc" not in result.stderr


def test_a_notify_url_that_is_not_http_is_a_usage_error(env: dict[str, str], receiver: Any) -> None:
    """--notify-url must be http(s): exit 2 before anything is read or sent."""
    result = run_cli(["sync", "--notify-url", "mailto:ops@example.com"], env)
    assert result.exit_code == 2
    assert "--notify-url" in result.stderr
    assert receiver.events() == []


def test_summary_holds_counts_only() -> None:
    """Invalid and rejected record keys and reasons never reach the summary."""
    stream = StreamReport(
        stream="users",
        event_type="user_identify",
        read=3,
        invalid=1,
        rejected=1,
        sent=1,
        invalid_records=(("key-1", "required trait 'email' is missing"),),
        rejected_records=(("key-2", "bad email ada@example.com"),),
    )
    done = RunOutcome("sync", "partial", 3, 0.0, 1.0, streams=(stream,), run_id=7)
    text = json.dumps(summary(done, host="h"))
    assert "key-1" not in text
    assert "key-2" not in text
    assert "email" not in text
    assert summary(done, host="h")["started_at"] == "1970-01-01T00:00:00Z"


def test_error_messages_are_redacted_and_bounded() -> None:
    """E-mail addresses and token= are masked, the first line kept, the length capped."""
    error = RuntimeError("row ada@example.com failed at ?token=abc123 \nsecond line")
    message = safe_message(error)
    assert "ada@example.com" not in message
    assert "abc123" not in message
    assert message.endswith("(and 1 more line(s))")
    assert len(safe_message(RuntimeError("x" * 5000))) == 300


def test_send_notification_never_raises() -> None:
    """A transport error is reported as False, not raised."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    done = RunOutcome("sync", "ok", 0, 0.0, 1.0)
    assert not send_notification(
        "https://hc.example/ping", done, transport=httpx.MockTransport(refuse)
    )
    ok = httpx.MockTransport(lambda request: httpx.Response(200, text="OK"))
    assert send_notification("https://hc.example/ping/{exit_code}", done, transport=ok)
