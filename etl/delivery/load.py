"""The Hyperengage client (SPEC §6): batches, retries, 413 splits, 400 bisection,
bounded concurrency and rate, and results handed back in order.

Threads: the caller's thread reads `outgoing` (which reads the database) and
reports results; up to `concurrency` worker threads send. The token rides in the
URL's query string, so every foreign text put into a message or log line here
(the server's words, an exception's text, a header, the URL) goes through
`_Sender._foreign` first (etl.redact: our own words are never masked), and httpx
exceptions (whose text may hold the URL) are never chained into the errors raised.

httpx is imported by what sends (`make_client`, `_Sender`), not with this module:
a run with nothing to send (the no-change sync) never loads it (~25 ms of a
process start: docs/performance.md, "Fixed cost").
"""

from __future__ import annotations

import dataclasses
import email.utils
import ipaddress
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeAlias
from urllib.parse import urlsplit

import orjson
import structlog

from etl import __version__, redact
from etl.errors import FatalApiError, RetriableApiError, UsageError
from etl.model import BatchResult, DeliveryStats, Outgoing, Ref, Secret
from etl.settings import DELIVERY, DeliverySettings

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
MESSAGE_LIMIT = 300  # characters of a server message kept in errors and rejects
RETRIABLE_STATUSES = frozenset({408, 429, *range(500, 600)})
SPLIT_STATUSES = frozenset({400, 413})
FATAL_CAUSES = {
    401: "the token is wrong or missing — check HYPERENGAGE_TOKEN (or --token-file)",
    403: "the token lacks access to this workspace — check HYPERENGAGE_TOKEN and "
    "HYPERENGAGE_WORKSPACE_KEY",
    404: "no such endpoint — check HYPERENGAGE_ENDPOINT (it ends in /api/v1/s2s/event)",
}


def check_endpoint(url: str) -> None:
    """Refuse an endpoint the token must not be sent to: anything but https, except
    plain http to this machine (the local receiver), and any URL carrying a token."""
    where = "the endpoint (--endpoint / HYPERENGAGE_ENDPOINT)"
    if "token=" in url.lower():
        # Not quoting the URL: it holds a token.
        raise UsageError(
            f"{where} contains token=; a token in a URL ends up in logs and process lists"
            " — remove it from the URL and set HYPERENGAGE_TOKEN (or --token-file)"
        )
    try:
        parsed = urlsplit(url)
        host = parsed.hostname or ""
        parsed.port  # noqa: B018 - a port that is not a number raises here
        if any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError("it contains a space or a control character")
    except ValueError as exc:
        raise UsageError(f"{where} {url!r} is not a valid URL ({exc}) — fix it") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise UsageError(f"{where} {url!r} is not an https:// URL — use e.g. {DELIVERY.endpoint}")
    if parsed.scheme == "http" and not _is_loopback(host):
        raise UsageError(
            f"{where} {url!r} would send the token in clear text to {host}"
            " — use https:// (plain http is allowed only to 127.0.0.1, ::1 or localhost)"
        )


def make_client(
    settings: DeliverySettings, token: Secret, *, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """The one HTTP client of a run: explicit timeouts, no redirects, a connection
    pool as wide as `concurrency`, and the token as the query parameter every
    request carries (the API's only way to take it), as httpx clients carry
    their auth. `transport` lets tests answer in-process."""
    import httpx  # noqa: PLC0415 - only what sends loads httpx (module docstring)

    width = max(1, settings.concurrency)
    return httpx.Client(
        params={"token": token.reveal()},
        timeout=httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds),
        # A 301/302 turns a POST into a GET: a redirect is an error, never a detour.
        follow_redirects=False,
        headers={"content-type": "application/json", "user-agent": f"etl/{__version__}"},
        limits=httpx.Limits(max_connections=width, max_keepalive_connections=width),
        transport=transport,
        # Plain http is only ever allowed to loopback (check_endpoint): no TLS to
        # verify there, so skip loading the CA bundle (~0.1 s a run).
        verify=not settings.endpoint.startswith("http://"),
    )


class LazyClient:
    """`make_client`'s client, made on the first request: a run that has nothing
    to send (the no-change sync) never builds the pool and the transport (~0.02 s).
    Used as a context manager, like the client it stands for; thread-safe.
    `transport` lets tests answer in-process."""

    def __init__(
        self,
        settings: DeliverySettings,
        token: Secret,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._token = token
        self._transport = transport
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        """The token every request carries (for masking, like `Client.params`)."""
        return self._token.reveal()

    @property
    def made(self) -> bool:
        """Whether the client exists (something was sent)."""
        return self._client is not None

    @property
    def forkable(self) -> bool:
        """Whether another process can make the same client (`fresh`): not with a
        test's in-process transport, whose answers would stay in that process."""
        return self._transport is None

    def fresh(self) -> LazyClient:
        """A new, unmade client with the same settings and token (a forked worker's:
        the parent's pool and sockets are never shared)."""
        return LazyClient(self._settings, self._token, transport=self._transport)

    def client(self) -> httpx.Client:
        """The client, made now if this is the first request."""
        with self._lock:
            if self._client is None:
                self._client = make_client(self._settings, self._token, transport=self._transport)
            return self._client

    def post(self, url: str, *, content: bytes) -> httpx.Response:
        """`httpx.Client.post`, on the client made at the first call."""
        return self.client().post(url, content=content)

    def close(self) -> None:
        """Close the client if one was made."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> LazyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# What deliver() sends through: a client, or one made on the first request.
Client: TypeAlias = "httpx.Client | LazyClient"


def batches(
    outgoing: Iterable[Outgoing[Ref]], *, max_events: int, max_bytes: int
) -> Iterator[list[Outgoing[Ref]]]:
    """Group events, in order, into request bodies (`[a,b,...]`) of at most
    `max_events` events and `max_bytes` bytes; an event alone larger than
    `max_bytes` travels alone.

    Streams: a batch is handed out as soon as it is full, so at most one event
    of the next batch has been read.
    """
    if max_events < 1:
        raise UsageError(f"the batch size must be at least 1, not {max_events} — fix --batch-size")
    batch: list[Outgoing[Ref]] = []
    size = 2  # the brackets
    for item in outgoing:
        grown = size + len(item.body) + (1 if batch else 0)  # a comma between events
        if batch and grown > max_bytes:
            yield batch
            batch, grown = [], 2 + len(item.body)
        batch.append(item)
        size = grown
        if len(batch) >= max_events:
            yield batch
            batch, size = [], 2
    if batch:
        yield batch


def deliver(
    outgoing: Iterable[Outgoing[Ref]],
    *,
    settings: DeliverySettings,
    on_result: Callable[[BatchResult[Ref]], Future[Any] | None],
    client: Client,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    limiter: RateLimiter | None = None,
    stop: threading.Event | None = None,
) -> DeliveryStats:
    """Send every event through `client` (made by `make_client` or a `LazyClient`,
    which hold the token), `settings.concurrency` batches at a time, and give each
    batch's outcome to `on_result` in the caller's thread, in submission order.

    `on_result` may hand back a Future for work it finishes elsewhere (the
    pipeline commits acknowledged batches on a writer thread): the batch keeps
    its slot until that future is done, so sent-or-acknowledged-but-not-yet-
    recorded batches never exceed `concurrency` — what a crash can re-send.

    The first RetriableApiError or FatalApiError (or any error in `on_result`,
    its futures or `outgoing`) stops the workers and propagates; batches
    reported before it stay reported, nothing after it is.

    `limiter` spaces request starts (`--max-rps`); the run passes one for all
    its streams, so the rate holds across them (without one, `settings.max_rps`
    applies to this call). Once `stop` is set (SIGINT/SIGTERM) no request
    starts: not the next batch, not a retry, not a split half. Requests in
    flight finish (within the request timeout) and are reported in order up to
    the first batch that was given up; deliver() then returns what it reported.
    """
    check_endpoint(settings.endpoint)
    stop = stop or threading.Event()
    if limiter is None and settings.max_rps:
        limiter = RateLimiter(settings.max_rps, clock=clock, sleep=sleep)
    sender: _Sender | None = None  # made for the first batch: nothing to send, no httpx
    totals = _Totals()
    window: deque[Future[_Outcome[Ref]]] = deque()  # submitted, not yet reported, in order
    recording: deque[Future[Any]] = deque()  # reported, still being recorded by the caller
    width = max(1, settings.concurrency)
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="etl-load") as pool:
        try:
            for batch in batches(
                outgoing, max_events=settings.batch_size, max_bytes=settings.batch_bytes
            ):
                # Back-pressure: the batch just read waits for a free slot, so we
                # never read further ahead than `width` batches plus this one.
                _settle(window, recording, on_result, totals, outstanding=width - 1)
                if stop.is_set():
                    break  # a stop signal starts nothing new, not even this batch
                if sender is None:
                    sender = _Sender(
                        client,
                        settings,
                        sleep=sleep,
                        clock=clock,
                        rng=rng or random.Random(),  # noqa: S311 - jitter needs spread, not secrecy
                        limiter=limiter,
                        stop=stop,
                    )
                window.append(pool.submit(sender.send_batch, batch))
            _settle(window, recording, on_result, totals, outstanding=0)
        except _Stopped:
            # A batch given up after the stop: it and the batches after it are not
            # reported (the next run sends them, with the same event ids); the
            # ones before it were. Wait for the requests still in flight.
            if sender is not None:
                sender.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            while recording:
                recording.popleft().result()
        except BaseException:
            if sender is not None:
                sender.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return totals.freeze()


def _settle(
    window: deque[Future[_Outcome[Ref]]],
    recording: deque[Future[Any]],
    on_result: Callable[[BatchResult[Ref]], Future[Any] | None],
    totals: _Totals,
    *,
    outstanding: int,
) -> None:
    """Report finished batches from the front of `window` until at most
    `outstanding` batches are sent or still being recorded; raise a batch's (or
    a recording's) error as soon as it is known."""
    while True:  # each wait() below finishes at least one of a bounded window
        while window and window[0].done():
            outcome = window.popleft().result()  # raises that batch's error, in order
            pending = on_result(outcome.result)
            if pending is not None:
                recording.append(pending)
            totals.count(outcome)
        while recording and recording[0].done():
            recording.popleft().result()  # raises a failed recording (disk full...)
        if len(window) + len(recording) <= outstanding:
            return
        # A later batch that failed stops the run now, not when earlier ones finish.
        # (A batch given up on a stop signal is not such a failure: the batches
        # before it are still reported, in order.)
        for future in (*window, *recording):
            error = future.exception() if future.done() else None
            if error is not None and not isinstance(error, _Stopped):
                raise error
        busy = [f for f in (*window, *recording) if not f.done()]
        wait(busy, return_when=FIRST_COMPLETED)


@dataclass
class _Tally:
    """HTTP attempts spent on one batch, counted by the worker that sends it."""

    requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class _Outcome(Generic[Ref]):
    """What a worker hands back for one batch."""

    result: BatchResult[Ref]
    tally: _Tally


@dataclass
class _Totals:
    """DeliveryStats being summed in the caller's thread, one reported batch at a time."""

    sent: int = 0
    rejected: int = 0
    batches: int = 0
    requests: int = 0
    retries: int = 0

    def count(self, outcome: _Outcome[Any]) -> None:
        self.sent += len(outcome.result.acked)
        self.rejected += len(outcome.result.rejected)
        self.batches += 1
        self.requests += outcome.tally.requests
        self.retries += outcome.tally.retries

    def freeze(self) -> DeliveryStats:
        return DeliveryStats(self.sent, self.rejected, self.batches, self.requests, self.retries)


@dataclass(frozen=True)
class _Failure:
    """Why one attempt got no usable answer; `label` is already redacted."""

    label: str  # "HTTP 503 Service Unavailable: ..." or "ConnectError: ...", for messages
    status: int | None = None
    error: str | None = None  # the exception's class name
    retriable: bool = True
    retry_after: float | None = None
    unreachable: bool = False  # no connection at all, and none was ever made

    def log_fields(self) -> dict[str, object]:
        if self.status is not None:
            return {"status": self.status}
        return {"error": self.error, "detail": self.label}


class _Stopped(Exception):
    """Raised in a worker whose delivery was stopped; never leaves deliver()."""


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, across threads and, when
    one is shared by a run's deliver() calls, across streams (`--max-rps`)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")
        self._lock = threading.Lock()

    def wait_turn(self) -> None:
        with self._lock:  # reserve a start time; sleep outside the lock
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            self._sleep(start - now)


class _Sender:
    """Sends the batches of one deliver() call; shared by its worker threads."""

    def __init__(
        self,
        client: Client,
        settings: DeliverySettings,
        *,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        rng: random.Random,
        limiter: RateLimiter | None,
        stop: threading.Event,
    ) -> None:
        self._client = client
        self._settings = settings
        self._sleep = sleep
        self._clock = clock
        # random.Random.uniform is one atomic call under the GIL: safe to share.
        self._rng = rng
        self._limiter = limiter
        import httpx  # noqa: PLC0415 - only what sends loads httpx (module docstring)

        # The token rides in the client's query parameters (make_client); httpx
        # encodes a query value its own way: one more spelling to mask.
        token = client.token if isinstance(client, LazyClient) else client.params.get("token", "")
        self._secrets = (token, str(httpx.QueryParams({"t": token}))[2:]) if token else ()
        self._url = self._foreign(_display_url(settings.endpoint))
        self._stopped = threading.Event()  # this delivery failed: give up
        # Once the endpoint answered, a refused connection is a restart worth waiting
        # for; before, it is almost always a wrong HYPERENGAGE_ENDPOINT: say so at once.
        self._reached = threading.Event()
        self._host = httpx.URL(settings.endpoint).host
        self._signalled = stop  # the run was asked to stop: start nothing new

    def stop(self) -> None:
        """Make every worker give up before its next attempt."""
        self._stopped.set()

    def _halted(self) -> bool:
        return self._stopped.is_set() or self._signalled.is_set()

    def _pause(self, seconds: float) -> None:
        """Back off; with the real clock, a stop signal cuts the wait short."""
        if self._sleep is time.sleep:
            self._signalled.wait(seconds)
        else:
            self._sleep(seconds)

    def send_batch(self, batch: Sequence[Outgoing[Ref]]) -> _Outcome[Ref]:
        """Deliver one top-level batch (worker thread)."""
        tally = _Tally()
        return _Outcome(self._send(batch, tally), tally)

    def _send(self, items: Sequence[Outgoing[Ref]], tally: _Tally) -> BatchResult[Ref]:
        """Deliver `items`, halving them on 413 (too large) and on 400 (refused)
        until the refused events stand alone as rejects."""
        response = self._post(items, tally)
        if response.status_code not in SPLIT_STATUSES:
            self._accept(response)
            return BatchResult(acked=tuple(items))
        words = self._words(response)
        if len(items) == 1:
            log.warning("batch.rejected", key=items[0].key, message=words)
            return BatchResult(acked=(), rejected=((items[0], words),))
        log.info("batch.split", reason=response.status_code, size=len(items))
        half = len(items) // 2
        first, second = self._send(items[:half], tally), self._send(items[half:], tally)
        return BatchResult(first.acked + second.acked, first.rejected + second.rejected)

    def _post(self, items: Sequence[Outgoing[Ref]], tally: _Tally) -> httpx.Response:
        """POST `items` until the answer is not transient; RetriableApiError when the
        attempts or the time budget per request run out."""
        body = b"[" + b",".join(item.body for item in items) + b"]"
        started = self._clock()
        attempt = 0
        while True:  # bounded: every pass counts an attempt against max_attempts
            attempt += 1
            if self._halted():
                raise _Stopped
            if self._limiter is not None:
                self._limiter.wait_turn()
            if self._halted():
                raise _Stopped
            tally.requests += 1
            answer = self._attempt(body)
            if not isinstance(answer, _Failure):
                return answer
            if answer.unreachable:
                raise FatalApiError(
                    f"cannot reach {self._host} — check HYPERENGAGE_ENDPOINT "
                    f"(POST {self._url}: {answer.label})"
                )
            if not answer.retriable:
                raise FatalApiError(
                    f"POST {self._url} failed: {answer.label} — not a transient failure;"
                    " check HYPERENGAGE_ENDPOINT and any HTTPS_PROXY setting"
                )
            delay = max(self._jitter(attempt), answer.retry_after or 0.0)
            elapsed = self._clock() - started
            if attempt >= self._settings.max_attempts or (
                elapsed + delay > self._settings.max_retry_seconds
            ):
                raise RetriableApiError(self._exhausted(attempt, elapsed, answer))
            log.warning(
                "batch.retry",
                attempt=attempt,
                delay=round(delay, 3),
                events=len(items),
                **answer.log_fields(),
            )
            tally.retries += 1
            self._pause(delay)

    def _attempt(self, body: bytes) -> httpx.Response | _Failure:
        """One POST: a response worth interpreting, or what went wrong."""
        import httpx  # noqa: PLC0415 - only what sends loads httpx (module docstring)

        try:
            response = self._client.post(self._settings.endpoint, content=body)
        except httpx.ConnectError as exc:  # refused, or no such host
            failure = self._failure(exc, retriable=True)
            if self._reached.is_set():
                return failure
            return dataclasses.replace(failure, retriable=False, unreachable=True)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # timeouts, refused or reset connections, a server that hung up mid-answer:
            # all may work on the next try
            return self._failure(exc, retriable=True)
        except Exception as exc:
            # Anything else the HTTP stack raises (httpx.InvalidURL is no HTTPError;
            # a bug in a dependency) may quote the URL too: never let it escape as is,
            # or its traceback prints the token.
            return self._failure(exc, retriable=False)
        self._reached.set()
        status = response.status_code
        if status in RETRIABLE_STATUSES:
            wait_at_least = _retry_after(response.headers.get("retry-after"))
            return _Failure(self._words(response), status=status, retry_after=wait_at_least)
        return response

    def _failure(self, exc: Exception, *, retriable: bool) -> _Failure:
        """Describe an HTTP exception without keeping it: its text may hold the URL."""
        name = type(exc).__name__
        detail = " ".join(str(exc).split())
        label = (f"{name}: {self._foreign(detail)}" if detail else name)[:MESSAGE_LIMIT]
        return _Failure(label, error=name, retriable=retriable)

    def _jitter(self, attempt: int) -> float:
        """Full jitter: anywhere up to the exponential ceiling (AWS architecture blog)."""
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt - 1, 32))
        return self._rng.uniform(0, ceiling)

    def _exhausted(self, attempts: int, elapsed: float, last: _Failure) -> str:
        """The message for a request that ran out of attempts or time."""
        waited = f" (Retry-After {last.retry_after:g} s)" if last.retry_after else ""
        return (
            f"POST {self._url} gave up after {attempts} attempt(s) in {elapsed:.1f} s;"
            f" last answer: {last.label}{waited} — the API or the network is failing for now;"
            " run again later (acknowledged batches are kept and not re-sent)"
        )

    def _accept(self, response: httpx.Response) -> None:
        """Return if `response` acknowledges the batch; raise FatalApiError otherwise."""
        status = response.status_code
        if 200 <= status < 300:
            problem = _acknowledgement_problem(response, foreign=self._foreign)
            if problem is None:
                return
        elif 300 <= status < 400:
            target = self._foreign(response.headers.get("location", "").split("?", 1)[0])
            target = target or "nowhere"
            problem = (
                f"HTTP {status} redirect to {target}, not followed (a 301/302 turns a POST"
                " into a GET) — set HYPERENGAGE_ENDPOINT to the final URL"
            )
        elif status in FATAL_CAUSES:
            problem = f"HTTP {status}: {FATAL_CAUSES[status]}"
        else:
            problem = f"{self._words(response)} — not retriable; fix what the server names"
        raise FatalApiError(f"POST {self._url} answered {problem}")

    def _words(self, response: httpx.Response) -> str:
        """The status and the server's own explanation, masked and truncated."""
        # Masked before truncating, so no prefix of the token survives a cut.
        said = self._foreign(_server_said(response))
        text = f"HTTP {response.status_code} {self._foreign(response.reason_phrase)}".rstrip()
        return (f"{text}: {said}" if said else text)[:MESSAGE_LIMIT]

    def _foreign(self, text: str) -> str:
        """Foreign `text` with the token masked wherever it stands as a value."""
        return redact.foreign(text, self._secrets)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _display_url(endpoint: str) -> str:
    """The endpoint as messages show it: its query replaced by `token=***`."""
    return endpoint.split("#", 1)[0].split("?", 1)[0] + "?token=***"


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (delay-seconds or an HTTP-date)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # An HTTP-date is wall-clock time, so it is compared with the wall clock.
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _acknowledgement_problem(
    response: httpx.Response, *, foreign: Callable[[str], str]
) -> str | None:
    """Why a 2xx answer is not the API's acknowledgement, or None when it is;
    `foreign` masks the server's words quoted."""
    status = response.status_code
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        content_type = foreign(response.headers.get("content-type", "no content type"))
        shape = "an empty body" if not response.content.strip() else "a non-JSON body"
        return (
            f"HTTP {status} with {shape} ({content_type}) instead of the API's JSON — likely"
            " a proxy or login page in front of the endpoint; check HYPERENGAGE_ENDPOINT"
        )
    if not isinstance(document, dict):
        return None
    state = document.get("status")
    if state == "ok" or (state is None and "message" not in document):
        return None
    said = foreign(_server_said(response) or f"status {state!r}")
    return f"HTTP {status} but the API refused the batch: {said} — fix what the message names"


def _server_said(response: httpx.Response) -> str:
    """The server's explanation: its JSON `message` (and `error`), or plain text;
    an HTML page says nothing the status does not."""
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        text = response.text
        return "" if text.lstrip().startswith("<") else " ".join(text.split())
    if not isinstance(document, dict):
        return ""
    parts = [str(document[k]) for k in ("message", "error") if document.get(k)]
    return " ".join("; ".join(parts).split())
