"""The Hyperengage client: batching, retries, splitting, bisection, ordering,
rate limiting, endpoint checks, and a token that never leaks (SPEC §6)."""

from __future__ import annotations

import dataclasses
import email.utils
import itertools
import math
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import etl
from etl.delivery.load import LazyClient, batches, check_endpoint, deliver, make_client
from etl.errors import FatalApiError, RetriableApiError, UsageError
from etl.model import BatchResult, DeliveryStats, Outgoing, Secret
from etl.settings import DeliverySettings

TOKEN = "tok-3f9c2a7be1d04c55"  # a fake token; every test that can leak it greps for it
ENDPOINT = "http://127.0.0.1:9/api/v1/s2s/event"  # MockTransport answers; nothing is dialled
Handler = Callable[[httpx.Request], httpx.Response]
OK = {"status": "ok"}


def event(n: int, *, pad: int = 0) -> Outgoing:
    """Event number `n`, its body padded by `pad` bytes."""
    body = orjson.dumps({"event_id": f"id-{n}", "n": n, "traits": {"pad": "x" * pad}})
    return Outgoing(key=f"k{n}", event_id=f"id-{n}", body=body, ref=n)


def events(count: int) -> list[Outgoing]:
    return [event(n) for n in range(count)]


def numbers(request: httpx.Request) -> list[int]:
    """The event numbers in a request body."""
    return [item["n"] for item in orjson.loads(request.content)]


def refs(result: BatchResult) -> list[int]:
    return [item.ref for item in result.acked]


def make_config(**overrides: Any) -> DeliverySettings:
    base = DeliverySettings(endpoint=ENDPOINT, concurrency=1)
    return dataclasses.replace(base, **overrides)


def never_called(result: BatchResult) -> None:
    """An on_result for runs that must report nothing."""
    pytest.fail(f"on_result got {result}")


class FakeTime:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


@dataclass
class Run:
    """What one deliver() call reported."""

    results: list[BatchResult] = field(default_factory=list)
    time: FakeTime = field(default_factory=FakeTime)
    stats: DeliveryStats | None = None


def run_deliver(
    handler: Handler,
    outgoing: Any,
    *,
    run: Run | None = None,
    seed: int = 1,
    on_result: Callable[[BatchResult], None] | None = None,
    token: str = TOKEN,
    **overrides: Any,
) -> Run:
    """deliver() `outgoing` to `handler` through MockTransport, with fake time."""
    run = run or Run()
    config = make_config(**overrides)
    with make_client(config, Secret(token), transport=httpx.MockTransport(handler)) as client:
        run.stats = deliver(
            outgoing,
            settings=config,
            on_result=on_result or run.results.append,
            client=client,
            sleep=run.time.sleep,
            clock=run.time.clock,
            rng=random.Random(seed),
        )
    return run


def test_a_lazy_client_is_made_only_when_a_batch_is_sent() -> None:
    """Nothing to send makes no HTTP client; the first batch makes it, with the
    token in its query, and leaving the block closes it."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK)

    config = make_config()
    with LazyClient(config, Secret(TOKEN), transport=httpx.MockTransport(handler)) as lazy:
        stats = deliver([], settings=config, on_result=never_called, client=lazy)
        assert (stats.sent, lazy.made) == (0, False)
        results: list[BatchResult] = []
        deliver(events(3), settings=config, on_result=results.append, client=lazy)
        assert lazy.made
        made = lazy.client()
    assert [refs(result) for result in results] == [[0, 1, 2]]
    assert [numbers(request) for request in seen] == [[0, 1, 2]]
    assert parse_qs(urlsplit(str(seen[0].url)).query)["token"] == [TOKEN]
    assert (lazy.made, made.is_closed) == (False, True)


def scripted(*answers: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler giving `answers` in turn, then 200 ok; and the requests it saw."""
    queue = list(answers)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = queue.pop(0) if queue else httpx.Response(200, json=OK)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler, seen


def assert_no_token(*texts: object) -> None:
    """None of `texts` (exceptions with their chains, logs, anything) shows the token."""
    for text in texts:
        if isinstance(text, BaseException):
            shown = "".join(traceback.format_exception(text))
            chain = [text, text.__cause__, text.__context__]
            shown += " ".join(f"{e!s} {e!r}" for e in chain if e is not None)
        else:
            shown = repr(text)
        assert TOKEN not in shown


# -- batches -----------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=120), max_size=60),
    max_events=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=2, max_value=400),
)
def test_batches_respect_both_caps_keep_order_and_lose_nothing(
    sizes: list[int], max_events: int, max_bytes: int
) -> None:
    """Any sizes give greedy batches within both caps (or a lone oversize event), losing nothing."""
    items = [
        Outgoing(key=str(n), event_id=str(n), body=b"x" * size, ref=n)
        for n, size in enumerate(sizes)
    ]
    cut = list(batches(items, max_events=max_events, max_bytes=max_bytes))

    assert [item for batch in cut for item in batch] == items
    for number, batch in enumerate(cut):
        body = b"[" + b",".join(item.body for item in batch) + b"]"
        assert 1 <= len(batch) <= max_events
        assert len(body) <= max_bytes or len(batch) == 1
        if number + 1 < len(cut) and len(batch) < max_events:
            # greedy: the next event would not have fitted
            assert len(body) + 1 + len(cut[number + 1][0].body) > max_bytes


def test_batches_reads_no_further_than_a_full_batch() -> None:
    """A full batch is handed out before the next event is read."""
    pulled: list[int] = []

    def source() -> Iterator[Outgoing]:
        for n in range(100):
            pulled.append(n)
            yield event(n)

    first = next(batches(source(), max_events=3, max_bytes=10_000))

    assert [item.ref for item in first] == [0, 1, 2]
    assert pulled == [0, 1, 2]


def test_batches_refuses_a_batch_size_below_one() -> None:
    """A batch size of 0 is a usage error naming the option."""
    with pytest.raises(UsageError, match="--batch-size"):
        list(batches(events(3), max_events=0, max_bytes=100))


# -- delivery basics ------------------------------------------------------------


def test_deliver_posts_json_arrays_with_the_token_and_acks_everything() -> None:
    """Every event goes out once, in arrays of batch_size, with the token as a query parameter."""
    handler, seen = scripted()

    run = run_deliver(handler, events(7), batch_size=3)

    assert [numbers(r) for r in seen] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(r.url.params["token"] == TOKEN for r in seen)
    assert all(r.headers["content-type"] == "application/json" for r in seen)
    assert [refs(result) for result in run.results] == [[0, 1, 2], [3, 4, 5], [6]]
    assert run.stats == DeliveryStats(sent=7, rejected=0, batches=3, requests=3, retries=0)
    assert run.time.sleeps == []


def test_deliver_of_nothing_sends_nothing() -> None:
    """An empty input makes no request and reports nothing."""
    handler, seen = scripted()

    run = run_deliver(handler, [])

    assert seen == []
    assert run.results == []
    assert run.stats == DeliveryStats()


def test_make_client_has_explicit_timeouts_no_redirects_and_a_user_agent() -> None:
    """The client times out explicitly, never follows redirects and names itself."""
    with make_client(make_config(timeout_seconds=12.5, concurrency=3), Secret(TOKEN)) as client:
        assert client.timeout == httpx.Timeout(12.5, connect=10.0)
        assert client.follow_redirects is False
        assert client.headers["user-agent"] == f"etl/{etl.__version__}"
        assert client.headers["content-type"] == "application/json"


# -- retries -----------------------------------------------------------------------

TRANSIENT = [
    pytest.param(httpx.Response(500), id="500"),
    pytest.param(httpx.Response(503), id="503"),
    pytest.param(httpx.Response(429), id="429"),
    pytest.param(httpx.Response(408), id="408"),
    pytest.param(httpx.ConnectTimeout("connect timed out"), id="connect-timeout"),
    pytest.param(httpx.ReadTimeout("read timed out"), id="read-timeout"),
    pytest.param(httpx.WriteTimeout("write timed out"), id="write-timeout"),
    pytest.param(httpx.PoolTimeout("pool timed out"), id="pool-timeout"),
    pytest.param(httpx.RemoteProtocolError("server disconnected"), id="dropped"),
]


@pytest.mark.parametrize("failure", TRANSIENT)
def test_a_transient_failure_is_retried_then_delivered(
    failure: httpx.Response | Exception,
) -> None:
    """A transient failure costs one retry after a backoff pause, then the batch is acked."""
    handler, seen = scripted(failure)

    with capture_logs() as logs:
        run = run_deliver(handler, events(3), batch_size=10)

    assert len(seen) == 2
    assert [refs(result) for result in run.results] == [[0, 1, 2]]
    assert run.stats == DeliveryStats(sent=3, rejected=0, batches=1, requests=2, retries=1)
    assert len(run.time.sleeps) == 1
    assert 0 <= run.time.sleeps[0] <= 0.5
    retry = next(entry for entry in logs if entry["event"] == "batch.retry")
    assert retry["attempt"] == 1
    assert retry.get("status") or retry.get("error")


def test_a_refused_connection_before_any_answer_fails_at_once() -> None:
    """A connection refused before the endpoint ever answered is a wrong endpoint, not a
    transient failure: FatalApiError naming the host and HYPERENGAGE_ENDPOINT, no retry."""
    handler, seen = scripted(httpx.ConnectError("[Errno 111] Connection refused"))

    with capture_logs() as logs, pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(3), batch_size=10)

    assert len(seen) == 1
    assert str(info.value).startswith("cannot reach ")
    assert "— check HYPERENGAGE_ENDPOINT" in str(info.value)
    assert not [entry for entry in logs if entry["event"] == "batch.retry"]


def test_a_refused_connection_after_an_answer_is_retried() -> None:
    """Once the endpoint has answered, a refused connection (a restart) is retried."""
    handler, _ = scripted(httpx.ConnectError("[Errno 111] Connection refused"))
    calls: list[int] = []

    def answered_first(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, json={"status": "ok"})
        return handler(request)

    run = run_deliver(answered_first, events(2), batch_size=1, concurrency=1)

    assert [refs(result) for result in run.results] == [[0], [1]]
    assert run.stats.retries == 1


def test_retry_after_in_seconds_is_a_minimum_delay() -> None:
    """A 429 with Retry-After: 7 waits at least 7 seconds."""
    handler, _ = scripted(httpx.Response(429, headers={"retry-after": "7"}))

    run = run_deliver(handler, events(1))

    assert len(run.time.sleeps) == 1
    assert run.time.sleeps[0] >= 7


def test_retry_after_as_an_http_date_is_a_minimum_delay() -> None:
    """A 503 with Retry-After two minutes from now waits about two minutes."""
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    handler, _ = scripted(httpx.Response(503, headers={"retry-after": later}))

    run = run_deliver(handler, events(1))

    assert len(run.time.sleeps) == 1
    assert 110 <= run.time.sleeps[0] <= 121


def test_attempts_are_bounded() -> None:
    """A server that always answers 503 gets max_attempts requests, then RetriableApiError."""
    handler, seen = scripted(*[httpx.Response(503)] * 10)
    run = Run()

    with pytest.raises(RetriableApiError) as info:
        run_deliver(handler, events(2), run=run, max_attempts=3)

    assert len(seen) == 3
    assert len(run.time.sleeps) == 2
    assert run.results == []
    message = str(info.value)
    assert "3 attempt" in message
    assert "HTTP 503" in message
    assert "run again later" in message


def test_total_retry_time_is_bounded() -> None:
    """Retry-After 100 s against a 250 s budget stops at the third attempt, not sleeping past it."""
    handler, seen = scripted(*[httpx.Response(429, headers={"retry-after": "100"})] * 10)
    run = Run()

    with pytest.raises(RetriableApiError) as info:
        run_deliver(handler, events(1), run=run, max_attempts=50, max_retry_seconds=250)

    assert len(seen) == 3
    assert run.time.sleeps == [100, 100]
    assert "3 attempt" in str(info.value)
    assert "Retry-After 100" in str(info.value)


def test_backoff_is_full_jitter_within_exponential_bounds() -> None:
    """Each pause lies in [0, min(30, 0.5 * 2**n)], spread over the range, the same for one seed."""

    def pauses(seed: int) -> list[float]:
        handler, _ = scripted(*[httpx.Response(500)] * 11)
        return run_deliver(handler, events(1), seed=seed, max_attempts=12).time.sleeps

    delays = pauses(seed=42)

    assert len(delays) == 11
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(11)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # full jitter, not "equal jitter": some pauses fall in the lower half of their range
    assert any(d < c / 2 for d, c in zip(delays, ceilings, strict=True))
    assert pauses(seed=42) == delays
    assert pauses(seed=43) != delays


# -- 413 split and 400 bisection -------------------------------------------------------


def test_a_413_splits_the_batch_until_every_part_is_delivered() -> None:
    """A server taking at most 4 events per request still gets all 20, each acked once."""
    accepted: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got = numbers(request)
        if len(got) > 4:
            return httpx.Response(413, json={"message": "too large", "error": ""})
        accepted.extend(got)
        return httpx.Response(200, json=OK)

    with capture_logs() as logs:
        run = run_deliver(handler, events(20), batch_size=20)

    assert accepted == list(range(20))
    assert [refs(result) for result in run.results] == [list(range(20))]
    assert run.stats is not None
    assert run.stats.batches == 1
    assert run.stats.sent == 20
    splits = [entry for entry in logs if entry["event"] == "batch.split"]
    assert splits[0] == {"event": "batch.split", "log_level": "info", "reason": 413, "size": 20}


def test_a_single_event_too_large_for_the_server_is_rejected() -> None:
    """An event refused with 413 on its own becomes a reject carrying the server's message."""
    big = event(1, pad=5000)

    def handler(request: httpx.Request) -> httpx.Response:
        if 1 in numbers(request):
            return httpx.Response(413, json={"message": "body too large", "error": ""})
        return httpx.Response(200, json=OK)

    run = run_deliver(handler, [event(0), big, event(2)], batch_size=10)

    assert refs(run.results[0]) == [0, 2]
    [(rejected, message)] = run.results[0].rejected
    assert rejected == big
    assert message.startswith("HTTP 413 ")
    assert message.endswith(": body too large")


@settings(max_examples=60, deadline=None)
@given(bad=st.lists(st.booleans(), min_size=1, max_size=40))
@example(bad=[n in {3, 17, 36} for n in range(37)])
def test_a_400_is_bisected_down_to_exactly_the_refused_events(bad: list[bool]) -> None:
    """Whatever events are bad, bisection rejects exactly those, acks the rest, in few requests."""
    refused = {n for n, is_bad in enumerate(bad) if is_bad}
    requests: list[list[int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got = numbers(request)
        requests.append(got)
        culprits = refused.intersection(got)
        if culprits:
            return httpx.Response(400, json={"message": f"bad event {min(culprits)}", "error": ""})
        return httpx.Response(200, json=OK)

    run = run_deliver(handler, events(len(bad)), batch_size=50)

    [result] = run.results
    assert refs(result) == [n for n in range(len(bad)) if n not in refused]
    assert [(item.ref, message) for item, message in result.rejected] == [
        (n, f"HTTP 400 Bad Request: bad event {n}") for n in sorted(refused)
    ]
    assert run.stats == DeliveryStats(
        sent=len(bad) - len(refused),
        rejected=len(refused),
        batches=1,
        requests=len(requests),
        retries=0,
    )
    depth = math.ceil(math.log2(len(bad))) if len(bad) > 1 else 0
    assert len(requests) <= 1 + 2 * len(refused) * depth


# -- fatal answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cause"),
    [
        (401, "check HYPERENGAGE_TOKEN"),
        (403, "lacks access to this workspace"),
        (404, "check HYPERENGAGE_ENDPOINT"),
    ],
)
def test_auth_and_endpoint_errors_stop_at_once_naming_the_cause(status: int, cause: str) -> None:
    """401/403/404 raise FatalApiError naming the cause, without retrying or reporting the batch."""
    echo = {"message": f"token {TOKEN} is not valid", "error": TOKEN}
    handler, seen = scripted(httpx.Response(status, json=echo))
    run = Run()

    with capture_logs() as logs, pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(3), run=run)

    assert cause in str(info.value)
    assert f"HTTP {status}" in str(info.value)
    assert len(seen) == 1
    assert run.results == []
    assert run.time.sleeps == []
    assert_no_token(info.value, logs)


def test_a_redirect_is_fatal_and_not_followed() -> None:
    """A 302 raises FatalApiError naming the redirect; the new location is never requested."""
    location = f"https://login.example.test/sso?next=/event&token={TOKEN}"
    handler, seen = scripted(httpx.Response(302, headers={"location": location}))
    run = Run()

    with pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(2), run=run)

    assert len(seen) == 1
    assert run.results == []
    message = str(info.value)
    assert "HTTP 302 redirect to https://login.example.test/sso" in message
    assert "POST into a GET" in message
    assert_no_token(info.value)


@pytest.mark.parametrize(
    ("answer", "shape"),
    [
        (
            httpx.Response(200, html="<html><title>Sign in</title></html>"),
            "a non-JSON body (text/html",
        ),
        (httpx.Response(200, content=b""), "an empty body"),
    ],
    ids=["html", "empty"],
)
def test_a_2xx_that_is_not_the_apis_json_is_fatal(answer: httpx.Response, shape: str) -> None:
    """An HTML login page or an empty body with 200 is blamed on a proxy, and nothing is acked."""
    handler, _ = scripted(answer)
    run = Run()

    with pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(2), run=run)

    assert shape in str(info.value)
    assert "proxy or login page" in str(info.value)
    assert "HYPERENGAGE_ENDPOINT" in str(info.value)
    assert run.results == []


def test_a_2xx_json_refusal_is_fatal_with_the_servers_message() -> None:
    """A 200 whose JSON says status error with a message raises FatalApiError quoting it."""
    refusal = {"status": "error", "message": "workspace disabled"}
    handler, _ = scripted(httpx.Response(200, json=refusal))

    with pytest.raises(FatalApiError, match="refused the batch: workspace disabled"):
        run_deliver(handler, events(1))


def test_other_4xx_are_fatal_with_the_redacted_server_message() -> None:
    """A 422 raises FatalApiError with the server's words, the token blanked out."""
    handler, _ = scripted(httpx.Response(422, json={"message": f"api_key for {TOKEN} unknown"}))

    with pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(1))

    assert "HTTP 422 Unprocessable Entity: api_key for *** unknown" in str(info.value)
    assert_no_token(info.value)


# -- concurrency, order, back-pressure, rate -----------------------------------------


def test_results_come_in_submission_order_in_the_callers_thread() -> None:
    """With 4 in flight and batch 0 answered last, on_result gets 0, 1, 2... in our thread."""
    four_in_flight, others_answered = threading.Event(), threading.Event()
    lock = threading.Lock()
    answered: list[int] = []
    in_flight = [0, 0]  # now, most ever
    threads: set[int] = set()
    results: list[BatchResult] = []

    def handler(request: httpx.Request) -> httpx.Response:
        [n] = numbers(request)
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            if in_flight[0] == 4:
                four_in_flight.set()
        if n < 4:
            assert four_in_flight.wait(timeout=5)
        if n == 0:
            assert others_answered.wait(timeout=5)
        with lock:
            in_flight[0] -= 1
            answered.append(n)
            if {1, 2, 3} <= set(answered):
                others_answered.set()
        return httpx.Response(200, json=OK)

    def on_result(result: BatchResult) -> None:
        threads.add(threading.get_ident())
        results.append(result)

    run_deliver(handler, events(10), on_result=on_result, batch_size=1, concurrency=4)

    assert answered[:4] != [0, 1, 2, 3]
    assert answered.index(0) == 3
    assert [refs(result) for result in results] == [[n] for n in range(10)]
    assert threads == {threading.get_ident()}
    assert in_flight[1] == 4


def test_deliver_reads_ahead_at_most_one_batch_beyond_those_in_flight() -> None:
    """While 2 slow batches are in flight, only the next batch has been read from the source."""
    pulled: list[int] = []
    pulled_while_blocked: list[int] = []
    looked = threading.Event()

    def source() -> Iterator[Outgoing]:
        for n in range(12):
            pulled.append(n)
            yield event(n)

    def handler(request: httpx.Request) -> httpx.Response:
        first = numbers(request)[0]
        if first == 0:
            # Without back-pressure the source would be drained within this pause.
            threading.Event().wait(timeout=0.2)
            pulled_while_blocked.append(len(pulled))
            looked.set()
        elif first == 2:
            assert looked.wait(timeout=5)  # batch 1 stays in flight until batch 0 looked
        return httpx.Response(200, json=OK)

    run = run_deliver(handler, source(), batch_size=2, concurrency=2)

    assert pulled_while_blocked == [3 * 2]  # two batches in flight plus the one read next
    assert run.stats is not None
    assert run.stats.sent == 12


def test_a_fatal_answer_in_a_later_batch_reports_only_what_came_before() -> None:
    """When batch 1 gets 401, batch 0 stays reported and nothing after it is reported."""
    first_reported = threading.Event()
    results: list[BatchResult] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if numbers(request) == [1]:
            assert first_reported.wait(timeout=5)
            return httpx.Response(401, json={"message": "unknown token"})
        return httpx.Response(200, json=OK)

    def on_result(result: BatchResult) -> None:
        results.append(result)
        first_reported.set()

    with pytest.raises(FatalApiError, match="HTTP 401"):
        run_deliver(handler, events(6), on_result=on_result, batch_size=1, concurrency=2)

    assert [refs(result) for result in results] == [[0]]


def test_a_fatal_answer_is_raised_without_waiting_for_earlier_batches() -> None:
    """A 401 on batch 1 ends delivery while batch 0 is still in flight; batch 0 is not reported."""
    batch_1_answered = threading.Event()
    results: list[BatchResult] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if numbers(request) == [1]:
            batch_1_answered.set()
            return httpx.Response(401)
        assert batch_1_answered.wait(timeout=5)
        threading.Event().wait(timeout=0.5)  # batch 0 answers slowly: deliver() must not wait
        return httpx.Response(200, json=OK)

    with pytest.raises(FatalApiError, match="HTTP 401"):
        run_deliver(handler, events(2), on_result=results.append, batch_size=1, concurrency=2)

    assert results == []


def test_a_fatal_answer_stops_other_workers_before_their_next_attempt() -> None:
    """A worker backing off from a 503 makes no further attempt once another batch got 401."""
    attempts: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        [n] = numbers(request)
        attempts.append(n)
        return httpx.Response(401 if n == 1 else 503)

    def slow_sleep(seconds: float) -> None:
        threading.Event().wait(timeout=0.3)  # time for deliver() to see the 401

    config = make_config(batch_size=1, concurrency=2, max_attempts=5)
    with (
        make_client(config, Secret(TOKEN), transport=httpx.MockTransport(handler)) as client,
        pytest.raises(FatalApiError, match="HTTP 401"),
    ):
        deliver(events(2), settings=config, on_result=never_called, client=client, sleep=slow_sleep)

    assert attempts.count(1) == 1
    assert attempts.count(0) <= 2


def test_an_error_in_on_result_stops_delivery() -> None:
    """An exception from on_result propagates and no further batch is sent."""
    handler, seen = scripted()

    def on_result(result: BatchResult) -> None:
        raise RuntimeError("state store down")

    with pytest.raises(RuntimeError, match="state store down"):
        run_deliver(handler, events(10), on_result=on_result, batch_size=1)

    assert len(seen) <= 2


def test_max_rps_spaces_requests() -> None:
    """With max_rps 4, request starts are at least 0.25 s apart on the injected clock."""
    run = Run()
    starts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        starts.append(run.time.clock())
        return httpx.Response(200, json=OK)

    run_deliver(handler, events(8), run=run, batch_size=1, max_rps=4.0)

    assert len(starts) == 8
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert min(gaps) >= 0.25 - 1e-9
    assert starts[-1] == pytest.approx(7 * 0.25)


# -- check_endpoint -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://events.hyperengage.io/api/v1/s2s/event",
        "http://127.0.0.1:8001/api/v1/s2s/event",
        "http://127.8.9.10/api/v1/s2s/event",
        "http://[::1]:8001/api/v1/s2s/event",
        "http://localhost:8001/api/v1/s2s/event",
    ],
)
def test_check_endpoint_accepts_https_and_loopback_http(url: str) -> None:
    """https anywhere, and plain http to this machine, are accepted."""
    check_endpoint(url)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://events.hyperengage.io/api/v1/s2s/event", "use https://"),
        ("http://10.0.0.5:8001/api/v1/s2s/event", "use https://"),
        ("http://127.0.0.1.example.test/x", "use https://"),
        ("ftp://events.hyperengage.io/x", "not an https:// URL"),
        ("events.hyperengage.io/api/v1/s2s/event", "not an https:// URL"),
        ("https://", "not an https:// URL"),
        ("http://127.0.0.1:port/x", "not a valid URL"),
        ("https://events.hyperengage .io/x", "not a valid URL"),
        ("https://events.hyperengage.io/x\n", "not a valid URL"),
        ("http://[::1/x", "not a valid URL"),
    ],
)
def test_check_endpoint_refuses_what_would_expose_the_token(url: str, complaint: str) -> None:
    """Plain http off this machine, other schemes and broken URLs are usage errors with the fix."""
    with pytest.raises(UsageError, match=complaint):
        check_endpoint(url)


def test_check_endpoint_refuses_a_token_in_the_url_without_repeating_it() -> None:
    """A URL with token= is refused, pointing at HYPERENGAGE_TOKEN, without echoing the token."""
    with pytest.raises(UsageError, match="HYPERENGAGE_TOKEN") as info:
        check_endpoint(f"https://events.hyperengage.io/api/v1/s2s/event?token={TOKEN}")

    assert_no_token(info.value)


def test_deliver_refuses_a_plain_http_endpoint_before_sending() -> None:
    """deliver() itself checks the endpoint, so the token never travels in clear text."""
    handler, seen = scripted()

    with pytest.raises(UsageError):
        run_deliver(handler, events(1), endpoint="http://events.hyperengage.io/api/v1/s2s/event")

    assert seen == []


# -- the token never leaks -------------------------------------------------------------


def test_a_connect_error_quoting_the_url_does_not_leak_the_token() -> None:
    """A connect error whose text holds the full URL never shows the token."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}", request=request)

    with capture_logs() as logs, pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(1), max_attempts=3)

    assert "ConnectError: cannot connect to" in str(info.value)
    assert "token=***" in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert_no_token(info.value, logs)


def test_a_rejected_event_whose_message_echoes_the_token_is_redacted() -> None:
    """A 400 message quoting the token is stored and logged with the token blanked out."""
    handler, _ = scripted(httpx.Response(400, json={"message": f"bad token {TOKEN} in event"}))

    with capture_logs() as logs:
        run = run_deliver(handler, events(1))

    [(_, message)] = run.results[0].rejected
    assert message == "HTTP 400 Bad Request: bad token *** in event"
    assert [entry["event"] for entry in logs] == ["batch.rejected"]
    assert_no_token(run.results, logs, run.stats)


def test_a_url_encoded_token_is_redacted_too() -> None:
    """A token with characters that URL-encoding changes is blanked in both spellings."""
    token = "tok+3f9c/2a7b=e1d0"

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}", request=request)

    with pytest.raises(FatalApiError) as info:
        run_deliver(handler, events(1), token=token, max_attempts=1)

    assert "tok%2B3f9c%2F2a7b%3De1d0" not in str(info.value)
    assert token not in str(info.value)


# -- over real HTTP on 127.0.0.1 ----------------------------------------------------------


@dataclass
class Seen:
    """One request as the stdlib server received it."""

    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads


@contextmanager
def http_server(script: list[str]) -> Iterator[tuple[str, list[Seen]]]:
    """A stdlib HTTP/1.1 server on 127.0.0.1 acting out `script` ("drop", "503", then 200 ok)."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            action = script.pop(0) if script else "200"
            if action == "drop":  # hang up without answering
                self.close_connection = True
                return
            status = int(action)
            reply = orjson.dumps(OK if status == 200 else {"message": "busy", "error": ""})
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.send_header("retry-after", "0")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test asserts on `seen`, not on stderr."""

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1/s2s/event", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_real_http_survives_a_dropped_connection_and_a_503() -> None:
    """Over real HTTP, a hang-up and a 503 are retried and every event arrives with the token."""
    with http_server(["drop", "503"]) as (url, seen):
        config = make_config(endpoint=url, batch_size=2)
        results: list[BatchResult] = []
        fake = FakeTime()
        with make_client(config, Secret(TOKEN)) as client:
            stats = deliver(
                events(5),
                settings=config,
                on_result=results.append,
                client=client,
                sleep=fake.sleep,
                clock=fake.clock,
            )

    assert stats == DeliveryStats(sent=5, rejected=0, batches=3, requests=5, retries=2)
    assert [refs(result) for result in results] == [[0, 1], [2, 3], [4]]
    delivered = [item["n"] for s in seen[2:] for item in orjson.loads(s.body)]
    assert delivered == [0, 1, 2, 3, 4]
    assert all(parse_qs(urlsplit(s.path).query) == {"token": [TOKEN]} for s in seen)
    assert all(s.headers["content-type"] == "application/json" for s in seen)
    assert all(s.headers["user-agent"] == f"etl/{etl.__version__}" for s in seen)
    assert all(s.body.startswith(b"[{") for s in seen)


def test_real_http_connection_refused_says_cannot_reach_at_once() -> None:
    """A port nobody listens on ends at the first attempt in "cannot reach 127.0.0.1 —
    check HYPERENGAGE_ENDPOINT", without a pause and without leaking the token."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(endpoint=f"http://127.0.0.1:{port}/api/v1/s2s/event", max_attempts=2)
    fake = FakeTime()

    with (
        capture_logs() as logs,
        make_client(config, Secret(TOKEN)) as client,
        pytest.raises(FatalApiError, match="ConnectError") as info,
    ):
        deliver(
            events(1),
            settings=config,
            on_result=never_called,
            client=client,
            sleep=fake.sleep,
            clock=fake.clock,
        )

    assert str(info.value).startswith("cannot reach 127.0.0.1 — check HYPERENGAGE_ENDPOINT")
    assert fake.sleeps == []
    assert_no_token(info.value, logs)


def test_a_batch_keeps_its_slot_until_the_caller_has_recorded_it() -> None:
    """Acknowledged-but-unrecorded batches count as in flight: never more than
    `concurrency` are sent or unrecorded, which bounds what a crash re-sends."""
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    open_batches = 0  # sent, and not yet recorded
    worst = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal open_batches, worst
        with lock:
            open_batches += 1
            worst = max(worst, open_batches)
        return httpx.Response(200, json=OK)

    def record(_result: BatchResult) -> None:
        nonlocal open_batches
        time.sleep(0.01)  # a slow state commit
        with lock:
            open_batches -= 1

    with ThreadPoolExecutor(1) as writer:
        items = [Outgoing(key=str(i), event_id=str(i), body=b"{}", ref=i) for i in range(40)]
        run_deliver(
            handler,
            iter(items),
            on_result=lambda result: writer.submit(record, result),
            batch_size=2,
            concurrency=2,
        )
    assert open_batches == 0
    assert worst == 2


def test_a_failed_recording_stops_delivery() -> None:
    """A state commit that fails (disk full) ends delivery with its error."""
    from concurrent.futures import Future

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=OK)

    def on_result(_result: BatchResult) -> Any:
        failed: Future[None] = Future()
        failed.set_exception(OSError("database or disk is full"))
        return failed

    items = [Outgoing(key=str(i), event_id=str(i), body=b"{}", ref=i) for i in range(10)]
    with pytest.raises(OSError, match="disk is full"):
        run_deliver(handler, iter(items), on_result=on_result, batch_size=2)
