"""The benchmark's cheap sink: parse each POSTed body, count its events, store nothing.

`etl receiver` judges and stores every event in SQLite (tens of µs of CPU per
event); on a 2-core machine that cost competes with the measured client and
hides it (SPEC §8). This sink does what the API must do at the least: check
the token, parse the JSON array, refuse a `null` element, count, answer
`{"status":"ok"}` — a few µs of CPU per event, reported by the bench as the
sink's CPU time. HTTP/1.1 keep-alive, so neither client pays a connect per request.

    python -m bench.sink --port 0      # prints {"event": "receiver.started", "port": N}

`GET /stats` answers {"requests", "events", "bytes", "by_status"}. The token
is HYPERENGAGE_TOKEN from the environment. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

EVENT_PATH = "/api/v1/s2s/event"


class Tally:
    """What the sink saw; one lock, since requests are served on threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.events = 0
        self.bytes = 0
        self.by_status: Counter[str] = Counter()

    def add(self, status: int, events: int, size: int) -> None:
        with self.lock:
            self.requests += 1
            self.events += events
            self.bytes += size
            self.by_status[str(status)] += 1

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "events": self.events,
                "bytes": self.bytes,
                "by_status": dict(self.by_status),
            }


def judge(body: bytes) -> tuple[int, int]:
    """(HTTP status, events accepted) for one body: a JSON array of objects."""
    if not body.startswith(b"["):
        return 400, 0
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 400, 0
    if not all(type(e) is dict for e in events):
        return 400, 0
    return 200, len(events)


def make_handler(token: str, tally: Tally) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        # headers and body go out as two writes: without TCP_NODELAY the second
        # waits for the client's delayed ACK (~40 ms a request)
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(size)
            url = urlsplit(self.path)
            given = parse_qs(url.query).get("token", [""])[0]
            if url.path != EVENT_PATH:
                status, events = 404, 0
            elif given != token:
                status, events = 401, 0
            else:
                status, events = judge(body)
            tally.add(status, events, size)
            answer = b'{"status":"ok"}' if status == 200 else b'{"message":"refused","error":""}'
            self._send(status, answer)

        def do_GET(self) -> None:
            if urlsplit(self.path).path == "/stats":
                self._send(200, orjson.dumps(tally.as_dict()))
            else:
                self._send(404, b'{"message":"not found","error":""}')

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line a request would cost more than the parse

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    tally = Tally()
    server = ThreadingHTTPServer(
        (args.host, args.port), make_handler(os.environ["HYPERENGAGE_TOKEN"], tally)
    )
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(
        json.dumps({"event": "receiver.started", "port": server.server_address[1]}),
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
