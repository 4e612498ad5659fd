"""The local receiver answers like the Hyperengage events API (SPEC §2), stores
what it accepts, and misbehaves exactly as its fault plan says."""

from __future__ import annotations

import ast
import contextlib
import copy
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import TEST_TOKEN
from support import cli_env, copy_mappings, run_cli, user_id, users
from support import seed as seed_source

import etl.model
from etl.errors import UsageError
from etl.receiver.faults import FaultPlan
from etl.receiver.server import RunningReceiver, start_receiver
from etl.receiver.store import read_events

USER_EVENT: dict[str, Any] = {
    "event_id": "6f1c9a52-7d8e-5b3a-9c41-2e7f0d8b6a13",
    "anonymous_id": "",
    "user_id": "u-1",
    "account_id": "w-1",
    "api_key": "api-key",
    "workspace_key": "workspace-key",
    "src": "hyperengage",
    "library": "http",
    "event_type": "user_identify",
    "screen_resolution": "0",
    "traits": {
        "email": "ada@example.com",
        "name": "Ada",
        "created_at": "2021-01-20T09:55:35Z",
        "seats": 3,
        "score": 0.5,
        "is_admin": True,
        "tags": ["beta", "eu"],
    },
}
ACCOUNT_EVENT: dict[str, Any] = {
    **USER_EVENT,
    "event_id": "0b7e4d21-3c5f-5a8e-8d12-9f6a4b3c2e10",
    "event_type": "account_identify",
    "url": "https://acme.example",
    "traits": {"name": "Acme", "plan_name": "pro"},
}


def user(event_id: str = "e-1", **traits: Any) -> dict[str, Any]:
    """A valid user_identify event with this id and these traits set."""
    event = copy.deepcopy(USER_EVENT)
    event["event_id"] = event_id
    event["traits"].update(traits)
    return event


def changed(**fields: Any) -> dict[str, Any]:
    """A user event with these top-level fields replaced."""
    return {**user("e-2"), **fields}


def without(field: str, *, trait: bool = False) -> dict[str, Any]:
    """A user event lacking this field (or this trait)."""
    event = user("e-2")
    del (event["traits"] if trait else event)[field]
    return event


def array(*events: Any) -> bytes:
    """A request body holding these events."""
    return json.dumps(list(events)).encode()


def post(client: httpx.Client, receiver: RunningReceiver, body: Any) -> httpx.Response:
    """POST `body` (bytes as they are, anything else as JSON) with the test token."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(receiver.url, params={"token": TEST_TOKEN}, content=content)


def outcome(client: httpx.Client, receiver: RunningReceiver) -> str:
    """What one valid POST came back as: its status, or "drop" for a hang-up."""
    try:
        return str(post(client, receiver, [user()]).status_code)
    except httpx.RemoteProtocolError:
        return "drop"


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """An HTTP client with a short timeout; like the real client, it never follows redirects."""
    with httpx.Client(timeout=5) as http:
        yield http


StartFaulty = Callable[[dict[str, Any]], RunningReceiver]


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[StartFaulty]:
    """Starts receivers with the given JSON fault plans; stops them all afterwards."""
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(plan: dict[str, Any]) -> RunningReceiver:
            store = tmp_path / f"faulty-{next(numbers)}.db"
            faults = FaultPlan.from_json(json.dumps(plan))
            return stack.enter_context(
                start_receiver(store=store, tokens={TEST_TOKEN}, faults=faults)
            )

        yield start


# --- what the real server does -----------------------------------------------


def test_valid_array_is_stored_and_acknowledged(
    receiver: RunningReceiver, client: httpx.Client
) -> None:
    """A valid array is answered 200 {"status":"ok"} and every event is stored in order."""
    body = array(USER_EVENT, ACCOUNT_EVENT)
    response = post(client, receiver, body)
    assert response.status_code == 200
    assert response.content == b'{"status":"ok"}'
    assert receiver.events() == [USER_EVENT, ACCOUNT_EVENT]
    [logged] = receiver.requests()
    assert {key: logged[key] for key in ("status", "n_events", "n_bytes", "fault")} == {
        "status": 200,
        "n_events": 2,
        "n_bytes": len(body),
        "fault": None,
    }


def test_single_object_body_is_one_event(receiver: RunningReceiver, client: httpx.Client) -> None:
    """A body that is one event object rather than an array is stored as that one event."""
    assert post(client, receiver, USER_EVENT).status_code == 200
    assert receiver.events() == [USER_EVENT]


@pytest.mark.parametrize(
    ("params", "echoed"),
    [
        pytest.param({}, "", id="missing"),
        pytest.param({"token": "wrong-token"}, "wrong-token", id="wrong"),
    ],
)
def test_bad_token_is_401_echoing_it(
    receiver: RunningReceiver, client: httpx.Client, params: dict[str, str], echoed: str
) -> None:
    """A missing or unknown token is answered 401 with the token echoed, and nothing is stored."""
    response = client.post(receiver.url, params=params, json=[USER_EVENT])
    assert response.status_code == 401
    assert response.json() == {"message": f"invalid token: {echoed}", "error": ""}
    assert receiver.events() == []


MALFORMED = [
    pytest.param(b" " + array(user()), "must start with '[' or '{'", id="leading whitespace"),
    pytest.param(b"\xef\xbb\xbf" + array(user()), "must start with '[' or '{'", id="BOM"),
    pytest.param(b'[{"event_id": "e-1",]', "not valid JSON", id="bad JSON"),
    pytest.param(b'[{"event_id": NaN}]', "not valid JSON", id="NaN"),
    pytest.param(b"[]", "holds no events", id="empty array"),
    pytest.param(array(user(), 42), "event 1: must be an object, not number", id="not an object"),
    pytest.param(
        array(user(), without("api_key")), "event 1: field 'api_key' is missing", id="missing field"
    ),
    pytest.param(
        array(user(), changed(user_id="")),
        "event 1: field 'user_id' must not be empty",
        id="empty user_id",
    ),
    pytest.param(
        array(user(), changed(account_id=7)),
        "event 1: field 'account_id' must be a string",
        id="number id",
    ),
    pytest.param(
        array(user(), changed(event_type="invoice_paid")),
        "event 1: properties must be an object, not null",
        id="track event without properties",
    ),
    pytest.param(
        array(user(), changed(event_type=" ")),
        "event 1: field 'event_type' must not be empty",
        id="empty event_type",
    ),
    pytest.param(
        array(user(), changed(src="web")), "event 1: field 'src' must be 'hyperengage'", id="src"
    ),
    pytest.param(
        array(user(), changed(url=None)), "event 1: field 'url' must be a string", id="null url"
    ),
    pytest.param(
        array(user(), user("e-2", address={"city": "Oslo"})),
        "event 1: traits.address must be a number, boolean, string or array of strings, not object",
        id="object trait",
    ),
    pytest.param(array(user(), user("e-2", phone=None)), "event 1: traits.phone", id="null trait"),
    pytest.param(
        array(user(), user("e-2", tags=["a", 1])), "event 1: traits.tags", id="mixed array trait"
    ),
    pytest.param(
        array(user(), without("email", trait=True)),
        "event 1: traits.email is required for user_identify",
        id="missing required trait",
    ),
    pytest.param(
        array(user(), {**ACCOUNT_EVENT, "traits": {"plan_name": "pro"}}),
        "event 1: traits.name is required for account_identify",
        id="account without name",
    ),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_malformed_request_is_rejected_whole(
    receiver: RunningReceiver, client: httpx.Client, body: bytes, message: str
) -> None:
    """A malformed body or any invalid event gets a 400 naming the problem; nothing is stored."""
    response = post(client, receiver, body)
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert response.json()["error"] == ""
    assert receiver.events() == []


def test_null_element_is_500_after_storing_earlier_events(
    receiver: RunningReceiver, client: httpx.Client
) -> None:
    """A null element is answered 500, yet the events before it are stored, like the real server."""
    response = post(client, receiver, [user("e-1"), user("e-2"), None, user("e-4")])
    assert response.status_code == 500
    assert "event 2" in response.json()["message"]
    assert [event["event_id"] for event in receiver.events()] == ["e-1", "e-2"]


def test_size_rule_is_51200_bytes_per_event_on_average(
    receiver: RunningReceiver, client: httpx.Client
) -> None:
    """A 60 KB event alone is refused, but passes with a small one beside it (51,200 B × events)."""
    big = user("big", bio="x" * 60_000)
    alone = post(client, receiver, [big])
    assert alone.status_code == 400
    assert "51200 bytes per event" in alone.json()["message"]
    assert post(client, receiver, [big, user("small")]).status_code == 200
    assert [event["event_id"] for event in receiver.events()] == ["big", "small"]


def test_other_paths_methods_health_and_stats(
    receiver: RunningReceiver, client: httpx.Client
) -> None:
    """Unknown paths are 404, wrong methods 405, and /health and /stats answer JSON."""
    assert client.post(receiver.base_url + "/api/v1/s2s/other", json=[]).status_code == 404
    wrong_method = client.get(receiver.url)
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert client.put(receiver.url, json=[]).status_code == 405
    assert client.get(receiver.base_url + "/health").json() == {"status": "ok"}
    post(client, receiver, [USER_EVENT])
    client.post(receiver.url, json=[USER_EVENT])  # no token: 401
    assert client.get(receiver.base_url + "/stats").json() == {
        "events": 1,
        "requests": 2,
        "by_status": {"200": 1, "401": 1},
        "by_fault": {},
    }


# --- the fault plan ------------------------------------------------------------


def test_sequence_is_applied_in_order_then_normal(
    faulty: StartFaulty, client: httpx.Client
) -> None:
    """Sequence entries answer one request each, in order; then requests are handled normally."""
    receiver = faulty({"sequence": [503, {"status": 429, "retry_after": 2}, "ok", 500]})
    responses = [post(client, receiver, [user(f"e-{i}")]) for i in range(6)]
    assert [r.status_code for r in responses] == [503, 429, 200, 500, 200, 200]
    assert responses[1].headers["retry-after"] == "2"
    assert "retry-after" not in responses[0].headers
    assert [event["event_id"] for event in receiver.events()] == ["e-2", "e-4", "e-5"]
    assert [r["fault"] for r in receiver.requests()] == ["503", "429", None, "500", None, None]


def test_drawn_429_carries_retry_after(faulty: StartFaulty, client: httpx.Client) -> None:
    """A 429 drawn from the probabilities carries the plan's Retry-After."""
    receiver = faulty({"probabilities": {"429": 1.0}, "retry_after": 3})
    response = post(client, receiver, [user()])
    assert (response.status_code, response.headers["retry-after"]) == (429, "3")
    assert receiver.events() == []


def test_same_seed_repeats_the_same_outcomes(faulty: StartFaulty, client: httpx.Client) -> None:
    """Receivers with one seed answer a series of requests identically; another seed differs."""
    probabilities = {"500": 0.3, "503": 0.2, "drop": 0.1}
    runs = []
    for seed in (42, 42, 43):
        receiver = faulty({"seed": seed, "probabilities": probabilities})
        runs.append([outcome(client, receiver) for _ in range(30)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {"200", "500", "503", "drop"}
    assert runs[2] != runs[0]


def test_concurrent_requests_draw_the_same_faults(
    faulty: StartFaulty, client: httpx.Client
) -> None:
    """Requests from four threads at once draw the same faults as as many sent one by one."""
    plan = {"seed": 7, "probabilities": {"500": 0.4, "503": 0.2}}
    one_by_one = faulty(plan)
    sequential = Counter(outcome(client, one_by_one) for _ in range(40))
    at_once = faulty(plan)
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = Counter(pool.map(lambda _: outcome(client, at_once), range(40)))
    assert concurrent == sequential
    assert len(at_once.requests()) == 40


def test_drop_closes_the_connection_without_an_answer(
    faulty: StartFaulty, client: httpx.Client
) -> None:
    """A "drop" hangs up without answering and stores nothing; the next request is served."""
    receiver = faulty({"sequence": ["drop"]})
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, receiver, [user("e-1")])
    assert post(client, receiver, [user("e-2")]).status_code == 200
    assert [event["event_id"] for event in receiver.events()] == ["e-2"]
    assert [(r["status"], r["fault"]) for r in receiver.requests()] == [(None, "drop"), (200, None)]


def test_accept_then_500_stores_and_answers_500(faulty: StartFaulty, client: httpx.Client) -> None:
    """ "accept_then_500" stores the events yet answers 500: the ambiguous failure."""
    receiver = faulty({"sequence": ["accept_then_500"]})
    response = post(client, receiver, [user("e-1"), user("e-2")])
    assert response.status_code == 500
    assert [event["event_id"] for event in receiver.events()] == ["e-1", "e-2"]
    assert receiver.requests()[0]["fault"] == "accept_then_500"


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("html_200", (200, "text/html", b"<html>login</html>", None)),
        ("empty_200", (200, None, b"", None)),
        ("redirect", (302, None, b"", "/login")),
    ],
)
def test_proxy_like_answers_store_nothing(
    faulty: StartFaulty, client: httpx.Client, fault: str, expected: tuple[Any, ...]
) -> None:
    """A login page, an empty 200 and a redirect answer as a broken proxy would, storing nothing."""
    receiver = faulty({"sequence": [fault]})
    response = post(client, receiver, [user()])
    content_type, location = response.headers.get("content-type"), response.headers.get("location")
    assert (response.status_code, content_type, response.content, location) == expected
    assert receiver.events() == []


def test_max_request_bytes_answers_413_before_other_faults(
    faulty: StartFaulty, client: httpx.Client
) -> None:
    """A body over max_request_bytes gets 413 without using up a sequence entry."""
    receiver = faulty({"max_request_bytes": 2000, "sequence": [503]})
    too_big = post(client, receiver, [user(f"e-{i}") for i in range(10)])
    assert too_big.status_code == 413
    assert post(client, receiver, [user()]).status_code == 503
    assert post(client, receiver, [user()]).status_code == 200
    assert receiver.requests()[0]["fault"] == "max_request_bytes"
    assert receiver.requests()[0]["n_events"] == 10


def test_reject_events_where_refuses_only_requests_with_a_match(
    faulty: StartFaulty, client: httpx.Client
) -> None:
    """A request holding a matching event is refused whole (400 naming the key); others pass."""
    receiver = faulty({"reject_events_where": {"traits.email": "bounce@example.com"}})
    refused = post(client, receiver, [user("e-1"), user("e-2", email="bounce@example.com")])
    assert refused.status_code == 400
    assert refused.json()["message"] == (
        'event 1: refused by the fault plan: traits.email == "bounce@example.com"'
    )
    assert post(client, receiver, [user("e-3")]).status_code == 200
    assert [event["event_id"] for event in receiver.events()] == ["e-3"]
    assert receiver.requests()[0]["fault"] == "reject_events_where"


def test_hang_makes_the_client_time_out_though_the_events_are_stored(faulty: StartFaulty) -> None:
    """A "hang" outlasts the client's read timeout, then stores the events all the same."""
    receiver = faulty({"sequence": ["hang"], "hang_seconds": 0.5})
    with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
        post(impatient, receiver, [user()])
    for _ in range(50):  # the server answers 0.3 s after the client gave up
        if receiver.requests():
            break
        time.sleep(0.05)
    assert [(r["status"], r["fault"]) for r in receiver.requests()] == [(200, "hang")]
    assert receiver.events() == [user()]


def test_stop_is_prompt_while_a_request_hangs(tmp_path: Path) -> None:
    """Stopping the receiver ends a long hang at once, storing nothing."""
    faults = FaultPlan.from_json('{"sequence": ["hang"], "hang_seconds": 60}')
    with start_receiver(store=tmp_path / "r.db", tokens={TEST_TOKEN}, faults=faults) as receiver:
        with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
            post(impatient, receiver, [user()])
        started = time.monotonic()
        receiver.stop()
        assert time.monotonic() - started < 2
    assert read_events(tmp_path / "r.db") == []


def test_latency_delays_every_answer(faulty: StartFaulty, client: httpx.Client) -> None:
    """latency_ms holds each answer back by an amount within the range."""
    receiver = faulty({"latency_ms": [150, 150]})
    started = time.monotonic()
    assert post(client, receiver, [user()]).status_code == 200
    assert time.monotonic() - started >= 0.15


# --- starting, stopping, reading ---------------------------------------------------


def test_refuses_non_loopback_hosts(tmp_path: Path) -> None:
    """The receiver will not listen beyond loopback unless asked to, and creates no store then."""
    with (
        pytest.raises(UsageError, match="not a loopback address"),
        start_receiver(store=tmp_path / "r.db", tokens={TEST_TOKEN}, host="0.0.0.0"),  # noqa: S104
    ):
        pass
    assert not (tmp_path / "r.db").exists()


def test_read_events_reads_a_store_across_restarts(tmp_path: Path, client: httpx.Client) -> None:
    """read_events returns what two successive receivers stored in one file, without a server."""
    store = tmp_path / "received.db"
    for event_id in ("e-1", "e-2"):
        with start_receiver(store=store, tokens={TEST_TOKEN}) as receiver:
            assert post(client, receiver, [user(event_id)]).status_code == 200
    assert read_events(store) == [user("e-1"), user("e-2")]
    with pytest.raises(UsageError, match="not a receiver store"):
        read_events(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


SERVE = (
    "import pathlib, sys\n"
    "from etl.receiver.server import serve\n"
    "serve(store=pathlib.Path(sys.argv[1]), tokens={sys.argv[2]}, faults=None,"
    " host='127.0.0.1', port=0)\n"
)


def started_port(log_file: Path) -> int:
    """The port `serve` logged in its receiver.started line (waits up to 10 s)."""
    for _ in range(200):
        text = re.sub(r"\x1b\[[0-9;]*m", "", log_file.read_text())  # no colour codes
        if found := re.search(r"receiver\.started.*\bport=(\d+)", text):
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError(f"serve never logged receiver.started:\n{text}")


def test_serve_stops_cleanly_on_sigterm_and_never_logs_the_token(
    tmp_path: Path, client: httpx.Client
) -> None:
    """`serve` logs its port, stores what it gets, exits 0 on SIGTERM, and never logs the token."""
    store, log_file = tmp_path / "served.db", tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", SERVE, str(store), TEST_TOKEN]
    with (
        log_file.open("w") as output,
        subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env) as process,
    ):
        try:
            url = f"http://127.0.0.1:{started_port(log_file)}/api/v1/s2s/event"
            response = client.post(url, params={"token": TEST_TOKEN}, json=[user()])
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert response.status_code == 200
    logged = log_file.read_text()
    assert "receiver.stopped" in logged
    assert TEST_TOKEN not in logged
    assert read_events(store) == [user()]


# --- the receiver's own copy of the API's rules ----------------------------------


def test_the_receiver_imports_nothing_of_the_client() -> None:
    """etl/receiver/ imports only etl.errors and its own modules, never the client's rules."""
    root = Path(__file__).resolve().parent.parent / "etl" / "receiver"
    imported = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name == "etl" or name.startswith("etl.")}
    assert ours, "the receiver's imports were not found"
    assert {name for name in ours if not name.startswith("etl.receiver")} <= {"etl.errors"}


def test_a_wrong_client_constant_does_not_change_the_receivers_verdict(
    monkeypatch: pytest.MonkeyPatch, receiver: RunningReceiver, client: httpx.Client
) -> None:
    """With the client believing a user needs only an email, the receiver still wants a name."""
    monkeypatch.setitem(etl.model.REQUIRED_TRAITS, "user_identify", ("email",))
    response = post(client, receiver, [without("name", trait=True)])
    assert response.status_code == 400
    assert "traits.name is required for user_identify" in response.json()["message"]


def test_a_client_with_a_wrong_required_trait_list_fails_end_to_end(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str, receiver: RunningReceiver
) -> None:
    """A client that forgets `name` is required sends a nameless user: the receiver refuses it."""
    seed_source(sqlite_url, n_users=3)
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == user_id(2)).values(first_name=None))
    engine.dispose()
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)

    monkeypatch.setitem(etl.model.REQUIRED_TRAITS, "user_identify", ("email", "created_at"))
    result = run_cli(["sync"], env)

    assert result.exit_code == 3  # finished, one record rejected by the server
    assert "traits.name is required for user_identify" in result.stderr
    stored = {e["user_id"] for e in receiver.events() if e["event_type"] == "user_identify"}
    assert user_id(2) not in stored
    assert len(stored) == 2
