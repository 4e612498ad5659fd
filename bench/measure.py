"""Run one command as a child process and measure it: wall time and peak RSS.

`os.wait4` reaps the child and hands back *its own* rusage, so `ru_maxrss`
is that process's peak resident set (KB on Linux), not a running maximum over
every child the benchmark ever had. Output goes to temporary files (never
pipes, which a chatty child could fill and block on); a timer kills a child
that overruns its timeout.

`Receiver` runs the cheap sink (bench/sink.py) in its own process (so it does
not share a GIL with the measured run), on a port the OS picks, one per run, and
reports the CPU time it spent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class Measured:
    """One finished (or killed) child process."""

    returncode: int | None  # None: killed after its timeout
    seconds: float
    cpu_seconds: float  # user + system time of the process itself
    max_rss_kb: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.stderr.splitlines()[-lines:])


def measure(
    argv: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: Path | None = None
) -> Measured:
    """Run `argv` to completion (or kill it at `timeout`), timing the whole process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        timed_out = threading.Event()
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C of the bench is ours to pass on
        )
        timer = threading.Timer(timeout, _kill, (proc.pid, timed_out))
        timer.start()
        reaped = False
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped = True
        finally:
            timer.cancel()
            if not reaped:  # interrupted while waiting: do not leave it running
                _kill(proc.pid, timed_out)
                os.waitpid(proc.pid, 0)
            proc.returncode = -1  # reaped here; Popen must not wait for it again
        seconds = time.monotonic() - started
        code = None if timed_out.is_set() else os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=code,
            seconds=seconds,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            max_rss_kb=usage.ru_maxrss,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def _kill(pid: int, flag: threading.Event) -> None:
    flag.set()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def json_lines(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects among a process's log lines (others are skipped)."""
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


class Receiver:
    """The cheap sink (bench/sink.py) in a child process, on a free port."""

    def __init__(self, env: Mapping[str, str], *, start_timeout: float = 30) -> None:
        self.cpu_seconds: float | None = None  # known once stopped
        self._log = tempfile.NamedTemporaryFile(prefix="etl-bench-sink-", suffix=".log")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sink", "--host", "127.0.0.1", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=dict(env),
            start_new_session=True,
        )
        try:
            self.port = self._wait_for_port(start_timeout)
            self.base_url = f"http://127.0.0.1:{self.port}"
            self.endpoint = self.base_url + "/api/v1/s2s/event"
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited with {self.proc.returncode}: {self.log()}")
            for line in json_lines(self.log()):
                if line.get("event") == "receiver.started":
                    return int(line["port"])
            time.sleep(0.05)
        raise RuntimeError(f"receiver did not start within {timeout:g} s: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        """GET /stats: events counted, requests (by status)."""
        response = httpx.get(self.base_url + "/stats", timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after 15 s; always reaped,
        with os.wait4 so `cpu_seconds` tells what the receiver itself spent."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            if not self._reap(15):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self._reap(15)
        if not self._log.closed:
            self._log.close()

    def _reap(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, _, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = -1  # reaped here; Popen must not wait for it again
                self.cpu_seconds = usage.ru_utime + usage.ru_stime
                return True
            time.sleep(0.02)
        return False

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
