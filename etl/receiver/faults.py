"""The local receiver's fault plan: how it misbehaves on purpose, repeatably.

A `FaultPlan` is read from JSON (`etl receiver --faults FILE`), with every
problem reported at once in one UsageError. A `FaultPicker` replays it: the
plan's `sequence` first, then draws seeded by the plan, so a run can be
rehearsed again with the same faults. `etl.receiver.server` decides what each fault
does to a request.

    load_fault_plan(path)     a plan file -> FaultPlan
    FaultPlan.from_json(...)  the same from text
    FaultPicker(plan).pick()  the next request's fault and extra latency
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from etl.errors import UsageError

NAMED_FAULTS = ("ok", "drop", "accept_then_500", "html_200", "empty_200", "redirect", "hang")
PLAN_KEYS = (
    "seed",
    "sequence",
    "probabilities",
    "latency_ms",
    "retry_after",
    "hang_seconds",
    "max_request_bytes",
    "reject_events_where",
)


@dataclass(frozen=True)
class Fault:
    """One way to answer a request: normally ("ok"), with an error `status`, or
    with a named misbehaviour such as "drop" (see NAMED_FAULTS)."""

    name: str  # "status" or one of NAMED_FAULTS
    status: int | None = None
    retry_after: float | None = None  # sent as Retry-After with a status

    @property
    def label(self) -> str | None:
        """How the request log names this fault; None for a normal answer."""
        if self.name == "status":
            return str(self.status)
        return None if self.name == "ok" else self.name


NO_FAULT = Fault("ok")


@dataclass(frozen=True)
class FaultPlan:
    """How the receiver misbehaves, so users and tests can rehearse failures.

    From JSON (every key optional):

        {"seed": 7,
         "sequence": [503, {"status": 429, "retry_after": 2}, "drop", "ok"],
         "probabilities": {"500": 0.2, "503": 0.05, "drop": 0.03, "accept_then_500": 0.02},
         "latency_ms": [5, 50], "retry_after": 1, "hang_seconds": 5,
         "max_request_bytes": 1048576,
         "reject_events_where": {"traits.email": "bounce@example.com"}}

    Each event POST first meets `max_request_bytes` (413), then takes the next
    `sequence` entry or, once those are used up, a seeded draw from
    `probabilities`; faults come before the token check, as a proxy's would.
    `reject_events_where` refuses (400) a request holding any event whose dotted
    path equals the value. A fault is an HTTP status 400-599 (Retry-After only
    from `{"status", "retry_after"}`, or `retry_after` for a drawn 429/503) or:
    "ok"; "drop" (hang up without an answer); "accept_then_500" (store, then
    500); "html_200" (a proxy's login page); "empty_200"; "redirect" (302);
    "hang" (answer normally after `hang_seconds`, client timeouts permitting).
    """

    seed: int = 0
    sequence: tuple[Fault, ...] = ()
    probabilities: tuple[tuple[Fault, float], ...] = ()
    latency_ms: tuple[float, float] | None = None
    retry_after: float = 1.0  # for 429 and 503 drawn from `probabilities`
    hang_seconds: float = 5.0
    max_request_bytes: int | None = None
    reject_events_where: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_json(cls, text: str, *, source: str = "fault plan") -> FaultPlan:
        """Parse a plan; every problem is reported at once in one UsageError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: not valid JSON ({exc}) — fix the file") from exc
        return _parse_plan(data, source)


def load_fault_plan(path: Path) -> FaultPlan:
    """Read a fault plan file (`etl receiver --faults FILE`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the fault plan ({exc.strerror})") from exc
    return FaultPlan.from_json(text, source=str(path))


def _parse_plan(data: Any, source: str) -> FaultPlan:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a fault plan is a JSON object — see FaultPlan for its keys")
    problems = [
        f"{key}: unknown key — use one of: {', '.join(PLAN_KEYS)}"
        for key in data
        if key not in PLAN_KEYS
    ]
    retry_after = _seconds(data, "retry_after", 1.0, problems)
    plan = FaultPlan(
        seed=_integer(data, "seed", problems, minimum=0) or 0,
        sequence=_parse_sequence(data.get("sequence", []), problems),
        probabilities=_parse_probabilities(data.get("probabilities", {}), retry_after, problems),
        latency_ms=_parse_latency(data.get("latency_ms"), problems),
        retry_after=retry_after,
        hang_seconds=_seconds(data, "hang_seconds", 5.0, problems),
        max_request_bytes=_integer(data, "max_request_bytes", problems, minimum=1),
        reject_events_where=_parse_reject(data.get("reject_events_where", {}), problems),
    )
    if problems:
        raise UsageError("\n".join(f"{source}: {problem}" for problem in problems))
    return plan


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(data: dict[str, Any], key: str, problems: list[str], *, minimum: int) -> int | None:
    value = data.get(key)
    if value is None or (
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    ):
        return value
    problems.append(f"{key}: expected a whole number >= {minimum}, got {value!r}")
    return None


def _seconds(data: dict[str, Any], key: str, default: float, problems: list[str]) -> float:
    value = data.get(key, default)
    if _is_number(value) and value >= 0:
        return float(value)
    problems.append(f"{key}: expected a number of seconds >= 0, got {value!r}")
    return default


def _parse_sequence(entries: Any, problems: list[str]) -> tuple[Fault, ...]:
    if not isinstance(entries, list):
        problems.append('sequence: expected a list such as [503, "drop", "ok"]')
        return ()
    return tuple(_parse_fault(entry, f"sequence[{i}]", problems) for i, entry in enumerate(entries))


def _parse_fault(entry: Any, where: str, problems: list[str]) -> Fault:
    """One fault from its JSON form: 503, "503", "drop" or {"status": 429, "retry_after": 2}."""
    if isinstance(entry, dict):
        after = entry.get("retry_after")
        if set(entry) - {"status", "retry_after"} or not (after is None or _is_number(after)):
            problems.append(f'{where}: expected {{"status": 400-599, "retry_after": seconds}}')
            return NO_FAULT
        return _status_fault(entry.get("status"), where, problems, retry_after=after)
    if isinstance(entry, str) and entry in NAMED_FAULTS:
        return Fault(entry)
    if isinstance(entry, str) and entry.isdigit():
        entry = int(entry)
    return _status_fault(entry, where, problems, retry_after=None)


def _status_fault(status: Any, where: str, problems: list[str], *, retry_after: Any) -> Fault:
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return Fault("status", status, retry_after)
    problems.append(
        f"{where}: unknown fault {status!r} — use an HTTP status 400-599 "
        f"or one of: {', '.join(NAMED_FAULTS)}"
    )
    return NO_FAULT


def _parse_probabilities(
    table: Any, retry_after: float, problems: list[str]
) -> tuple[tuple[Fault, float], ...]:
    if not isinstance(table, dict):
        problems.append('probabilities: expected an object such as {"500": 0.2, "drop": 0.05}')
        return ()
    pairs = []
    for key, p in table.items():
        fault = _parse_fault(key, f"probabilities.{key}", problems)
        if fault.status in (429, 503):
            fault = replace(fault, retry_after=retry_after)
        if not (_is_number(p) and 0 <= p <= 1):
            problems.append(f"probabilities.{key}: expected a probability in [0, 1], got {p!r}")
        pairs.append((fault, float(p) if _is_number(p) else 0.0))
    if sum(p for _, p in pairs) > 1 + 1e-9:
        problems.append("probabilities: they add up to more than 1 — lower some of them")
    return tuple(pairs)


def _parse_latency(value: Any, problems: list[str]) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value):
        low, high = float(value[0]), float(value[1])
        if 0 <= low <= high:
            return (low, high)
    problems.append(f"latency_ms: expected [min, max] with 0 <= min <= max, got {value!r}")
    return None


def _parse_reject(table: Any, problems: list[str]) -> tuple[tuple[str, Any], ...]:
    if not isinstance(table, dict) or not all(table):
        problems.append('reject_events_where: expected an object such as {"traits.email": "x@y"}')
        return ()
    return tuple(table.items())


class FaultPicker:
    """Hands out one (fault, latency) per request: the sequence first, then seeded
    draws. The lock makes the order of requests, not thread timing, decide."""

    def __init__(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._lock = threading.Lock()
        self._used = 0
        # Not for security: a repeatable stream of faults is the point.
        self._rng = random.Random(plan.seed)  # noqa: S311
        # A separate stream, so adding latency does not change which faults are drawn.
        self._latency_rng = random.Random(plan.seed + 1)  # noqa: S311

    def pick(self) -> tuple[Fault, float]:
        """The next request's fault and its extra latency in seconds."""
        with self._lock:
            return self._next_fault(), self._next_latency()

    def _next_fault(self) -> Fault:
        if self._used < len(self._plan.sequence):
            self._used += 1
            return self._plan.sequence[self._used - 1]
        if not self._plan.probabilities:
            return NO_FAULT
        draw, cumulative = self._rng.random(), 0.0
        for fault, p in self._plan.probabilities:
            cumulative += p
            if draw < cumulative:
                return fault
        return NO_FAULT

    def _next_latency(self) -> float:
        if self._plan.latency_ms is None:
            return 0.0
        return self._latency_rng.uniform(*self._plan.latency_ms) / 1000
