"""A local Hyperengage-compatible receiver, for the demo, the end-to-end tests
and users rehearsing failures before going live (SPEC §2, §3).

`POST /api/v1/s2s/event?token=T` judges a body as the real server does (401 on
an unknown token, whole-request 400s, the 51,200-bytes-per-event rule, a 500
after partial acceptance on a `null` element), stores what it accepts in a
SQLite file and answers `{"status":"ok"}`; the rules it copies are in
etl.receiver.rules. A `FaultPlan` (etl.receiver.faults) makes it misbehave on purpose and
repeatably (seeded). `GET /health` and `GET /stats` serve demos.

    start_receiver(...)  serve in a background thread (a context manager)
    serve(...)           serve until Ctrl-C or SIGTERM: `etl receiver`
    read_events(path)    what a store file holds, without a server
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from etl.errors import UsageError
from etl.receiver.faults import (
    Fault,
    FaultPicker,
    FaultPlan,
)
from etl.receiver.rules import (
    OK_ANSWER,
    Answer,
    Verdict,
    count_events,
    error_answer,
    json_answer,
    judge,
)
from etl.receiver.store import Store

# The public API, with the names that moved to etl.receiver.faults and etl.receiver.rules.

EVENT_PATH = "/api/v1/s2s/event"
# Bodies are held in memory whole: refuse absurd ones unread.
MAX_BODY_BYTES = 64 * 1024 * 1024

log = structlog.get_logger()


# --- fault answers -----------------------------------------------------------


def _canned_answer(fault: Fault) -> Answer | None:
    """The answer of a fault that never looks at the body (None: hang up)."""
    if fault.name == "drop":
        return None
    if fault.name == "html_200":  # a proxy's login page
        return Answer(200, b"<html>login</html>", "text/html")
    if fault.name == "empty_200":
        return Answer(200, b"", None)
    if fault.name == "redirect":
        return Answer(302, b"", None, (("Location", "/login"),))
    headers = () if fault.retry_after is None else (("Retry-After", f"{fault.retry_after:g}"),)
    return replace(
        error_answer(fault.status or 500, f"injected fault: HTTP {fault.status}"), headers=headers
    )


# --- serving -----------------------------------------------------------------


class _Receiver:
    """Decides every answer (the fault plan first, then the real server's rules)
    and records every event POST in the store."""

    def __init__(self, *, store: Store, tokens: frozenset[str], plan: FaultPlan) -> None:
        self.store = store
        self._tokens = tokens
        self._plan = plan
        self._picker = FaultPicker(plan)
        # Set on stop: wakes requests sleeping in a hang or latency.
        self.stopping = threading.Event()

    def answer_post(self, body: bytes, token: str | None) -> Answer | None:
        """The answer to one event POST, or None to hang up without one."""
        cap = self._plan.max_request_bytes
        if cap is not None and len(body) > cap:  # before any other fault, as a proxy would
            message = f"request of {len(body)} bytes is over the {cap}-byte limit"
            verdict = Verdict(
                error_answer(413, message), (), count_events(body), "max_request_bytes"
            )
        else:
            fault, latency = self._picker.pick()
            verdict = self._apply(fault, body, token, latency)
        self.store.add(verdict, len(body))
        log.info(
            "request.answered",
            status=verdict.answer.status if verdict.answer else None,
            n_events=verdict.n_events,
            n_bytes=len(body),
            stored=len(verdict.accepted),
            fault=verdict.fault,
        )
        return verdict.answer

    def _apply(self, fault: Fault, body: bytes, token: str | None, latency: float) -> Verdict:
        if latency and self.stopping.wait(latency):
            return Verdict(None, n_events=count_events(body), fault="stopping")
        if fault.name == "hang" and self.stopping.wait(self._plan.hang_seconds):
            return Verdict(None, n_events=count_events(body), fault="hang")
        if fault.name not in ("ok", "hang", "accept_then_500"):
            return Verdict(_canned_answer(fault), n_events=count_events(body), fault=fault.label)
        verdict = judge(body, token, tokens=self._tokens, reject=self._plan.reject_events_where)
        if fault.name == "accept_then_500" and verdict.answer == OK_ANSWER:
            # The ambiguous failure: stored, yet the client is told it failed.
            failed = error_answer(500, "injected fault: accepted, then failed")
            return replace(verdict, answer=failed, fault=fault.label)
        return replace(verdict, fault=verdict.fault or fault.label)

    def answer_get(self, path: str) -> Answer:
        """Health and stats for demos; the event path only takes POST."""
        if path == "/health":
            return OK_ANSWER
        if path == "/stats":
            return json_answer(200, self.store.stats())
        if path == EVENT_PATH:
            return replace(error_answer(405, "use POST"), headers=(("Allow", "POST"),))
        return error_answer(404, f"no such path: {path}")


def _split_target(target: str) -> tuple[str, str | None]:
    """The path and the `token` query parameter of a request target."""
    parts = urlsplit(target)
    tokens = parse_qs(parts.query).get("token")
    return parts.path, tokens[0] if tokens else None


class _Handler(BaseHTTPRequestHandler):
    """One connection's HTTP plumbing; every decision is the receiver's."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client pools its connections
    timeout = 60  # an idle keep-alive connection must not pin a thread forever
    # Headers and body go out in two writes: without this, Nagle's algorithm and
    # the client's delayed ACK add ~40 ms to every answer on a kept-alive connection.
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        path, token = _split_target(self.path)
        body = self._read_body()
        if body is None:
            return
        if path != EVENT_PATH:
            self._send(error_answer(404, f"no such path: {path}"))
            return
        answer = self.server.receiver.answer_post(body, token)
        if answer is None:  # "drop": close without a word
            self.close_connection = True
        else:
            self._send(answer)

    def do_GET(self) -> None:
        path, _ = _split_target(self.path)
        self._send(self.server.receiver.answer_get(path))

    def _refuse_method(self) -> None:
        self.close_connection = True  # the body, if any, was not read
        self._send(replace(error_answer(405, "use POST or GET"), headers=(("Allow", "GET, POST"),)))

    do_PUT = do_PATCH = do_DELETE = _refuse_method

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering why it cannot be read."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            self._send(error_answer(411, "a Content-Length header is required"))
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(error_answer(413, f"request body over {MAX_BODY_BYTES} bytes"))
            return None
        return self.rfile.read(int(length))

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        if answer.content_type:
            self.send_header("Content-Type", answer.content_type)
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: the receiver logs each request itself, without the URL."""

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: http.server would print the raw request line, token and all."""


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can stop promptly with clients still connected."""

    daemon_threads = False  # joined in server_close(), so no handler outlives the store
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], receiver: _Receiver) -> None:
        self.receiver = receiver
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind() looks the host name up (a DNS query): not needed.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def hang_up_all(self) -> None:
        """Shut every open connection, waking handler threads that wait on a client."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # it may have closed meanwhile
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            # Routine here: clients time out on "hang" and stop() hangs up on them.
            log.debug("connection.lost", error=repr(error))
        else:
            log.error("request.failed", error=repr(error))


class RunningReceiver:
    """A receiver serving in a background thread: where it listens, what it holds,
    and how to stop it."""

    def __init__(self, server: _Server, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False
        self.port: int = server.server_port
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{self.port}"
        self.url = self.base_url + EVENT_PATH  # the endpoint to configure the client with

    def events(self) -> list[dict[str, Any]]:
        """Every stored event, in arrival order."""
        return self._server.receiver.store.events()

    def requests(self) -> list[dict[str, Any]]:
        """The request log: id, received_at, status (None: dropped), n_events, n_bytes, fault."""
        return self._server.receiver.store.requests()

    def stats(self) -> dict[str, Any]:
        """What `GET /stats` answers: events stored, requests by status and by fault."""
        return self._server.receiver.store.stats()

    def wait(self) -> None:
        """Block until the receiver stops; Ctrl-C interrupts (for `serve`)."""
        while self._thread.is_alive():
            self._thread.join(0.2)  # short joins keep signals prompt

    def stop(self) -> None:
        """Stop serving, end in-flight requests, join every thread, close the store."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.receiver.stopping.set()
        self._server.hang_up_all()
        self._server.server_close()  # closes the socket and joins the handler threads
        self._thread.join()
        self._server.receiver.store.close()


def _check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(
            f"receiver: refusing to listen on {host}: not a loopback address, and the "
            "receiver has no TLS or access control — use 127.0.0.1, or allow remote "
            "access explicitly"
        )


@contextlib.contextmanager
def start_receiver(
    *,
    store: Path,
    tokens: Collection[str],
    faults: FaultPlan | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
) -> Iterator[RunningReceiver]:
    """Serve in a background thread for the duration of a `with` block.

    Port 0 picks a free port (see `RunningReceiver.port`). Only tokens in
    `tokens` are accepted; the store file is created or appended to.
    """
    _check_host(host, allow_remote)
    accepted = frozenset(tokens)
    if not accepted:
        raise UsageError("receiver: no accepted token — give at least one")
    db = Store(store)
    receiver = _Receiver(store=db, tokens=accepted, plan=faults or FaultPlan())
    try:
        server = _Server((host, port), receiver)
    except OSError as exc:
        db.close()
        raise UsageError(f"receiver: cannot listen on {host}:{port} ({exc.strerror})") from exc
    # A short poll interval: stop() waits up to one interval for the loop to notice.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="receiver", daemon=True
    )
    thread.start()
    running = RunningReceiver(server, thread, host)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (kill, docker stop, Kubernetes) like Ctrl-C while serving."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    *,
    store: Path,
    tokens: Collection[str],
    faults: FaultPlan | None,
    host: str,
    port: int,
    allow_remote: bool = False,
    on_start: Callable[[str], None] | None = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly (`etl receiver`);
    `on_start` is called with the endpoint URL once it listens."""
    receiving = start_receiver(
        store=store, tokens=tokens, faults=faults, host=host, port=port, allow_remote=allow_remote
    )
    with _sigterm_as_interrupt(), contextlib.suppress(KeyboardInterrupt), receiving as running:
        log.info(
            "receiver.started", host=host, port=running.port, store=str(store), url=running.url
        )
        if on_start is not None:
            on_start(running.url)
        running.wait()
    log.info("receiver.stopped", store=str(store))
