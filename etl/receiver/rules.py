"""The real Hyperengage server's verdict on one event POST, copied (SPEC §2, §3, §10).

An unknown token is a 401; a body that is not a JSON array or object, empty,
or over 51,200 bytes per event is a whole-request 400; the first event that
breaks SPEC §2 makes a 400 (an `event_type` other than the two identify names
is a track event, which needs a `properties` object, as Jitsu takes it); a
`null` element a 500 after the events before it were kept. A fault plan's
`reject_events_where` refuses events the same way. Pure: `judge()` returns the
answer and the events to store; the receiver serves and stores them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson

# The API's rules as SPEC §2 states them, copied here on purpose rather than
# imported from the client (etl.model): the receiver stands for the real server,
# so a wrong constant on the client's side fails the end-to-end tests instead of
# passing on both sides. Data, not code: an event type is a row of this table.
# The traits each identify event requires; any other event type is a track event.
IDENTIFY_TRAITS: dict[str, tuple[str, ...]] = {
    "user_identify": ("email", "name", "created_at"),
    "account_identify": ("name",),
}
# The real server refuses an array longer than this many bytes times its events.
BYTES_PER_EVENT = 51_200
STRING_FIELDS = (
    "event_id",
    "user_id",
    "account_id",
    "api_key",
    "workspace_key",
    "src",
    "library",
    "event_type",
    "screen_resolution",
    "anonymous_id",
)
NON_EMPTY_FIELDS = ("event_id", "user_id", "account_id")
CONSTANT_FIELDS = {"src": "hyperengage", "library": "http", "screen_resolution": "0"}


@dataclass(frozen=True)
class Answer:
    """An HTTP answer to write back."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Verdict:
    """What to do with one event POST: the answer (None: hang up without one),
    the events to store, and what the request log says about it."""

    answer: Answer | None
    accepted: tuple[dict[str, Any], ...] = ()
    n_events: int = 0
    fault: str | None = None


def json_answer(status: int, payload: Any) -> Answer:
    return Answer(status, orjson.dumps(payload))


def error_answer(status: int, message: str) -> Answer:
    """An error in the real server's shape."""
    return json_answer(status, {"message": message, "error": ""})


OK_ANSWER = json_answer(200, {"status": "ok"})


def judge(
    body: bytes, token: str | None, *, tokens: Collection[str], reject: tuple[tuple[str, Any], ...]
) -> Verdict:
    """The real server's verdict on one POST, plus the fault plan's refusals."""
    if token is None or token not in tokens:
        # Echoed as the real server does: clients must never log bodies raw.
        return Verdict(error_answer(401, f"invalid token: {token or ''}"))
    events = _parse_body(body)
    if isinstance(events, str):
        return Verdict(error_answer(400, events), n_events=count_events(body))
    for index, event in enumerate(events):
        if event is None:  # the real server crashes here, keeping what came before
            message = f"event {index}: null element (internal error after {index} events)"
            return Verdict(error_answer(500, message), tuple(events[:index]), len(events))
        if problem := _event_problem(event):
            return Verdict(error_answer(400, f"event {index}: {problem}"), n_events=len(events))
        if rule := _matching_rule(event, reject):
            message = f"event {index}: refused by the fault plan: {rule}"
            return Verdict(
                error_answer(400, message), n_events=len(events), fault="reject_events_where"
            )
    return Verdict(OK_ANSWER, tuple(events), len(events))


def _parse_body(body: bytes) -> list[Any] | str:
    """The events of a body, or why the whole request is malformed."""
    if body[:1] not in (b"[", b"{"):
        return "body must start with '[' or '{' (no leading whitespace or byte order mark)"
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"body is not valid JSON: {exc}"
    events = data if isinstance(data, list) else [data]
    if not events:
        return "the array holds no events"
    if len(body) > BYTES_PER_EVENT * len(events):
        return (
            f"body of {len(body)} bytes is over {BYTES_PER_EVENT} bytes "
            f"per event for {len(events)} events"
        )
    return events


def count_events(body: bytes) -> int:
    """How many events a body holds, for the request log; 0 when it is not JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0
    return len(data) if isinstance(data, list) else 1


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string"}
    names |= {list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _event_problem(event: Any) -> str | None:
    """Why one event breaks SPEC §2, or None."""
    if not isinstance(event, dict):
        return f"must be an object, not {_json_type(event)}"
    for name in STRING_FIELDS:
        if name not in event:
            return f"field '{name}' is missing"
        if not isinstance(event[name], str):
            return f"field '{name}' must be a string, not {_json_type(event[name])}"
        if name in NON_EMPTY_FIELDS and not event[name]:
            return f"field '{name}' must not be empty"
    if not event["event_type"].strip():
        return "field 'event_type' must not be empty"
    for name, expected in CONSTANT_FIELDS.items():
        if event[name] != expected:
            return f"field '{name}' must be {expected!r}, not {event[name]!r}"
    if "url" in event and not isinstance(event["url"], str):
        return f"field 'url' must be a string, not {_json_type(event['url'])}"
    if event["event_type"] not in IDENTIFY_TRAITS:
        return _track_problem(event)
    return _traits_problem(event["event_type"], event.get("traits"))


def _track_problem(event: dict[str, Any]) -> str | None:
    """A track event (any other name, as Jitsu takes it): `properties` an object,
    `utc_time` (when it happened) text when present."""
    properties = event.get("properties")
    if not isinstance(properties, dict):
        return f"properties must be an object, not {_json_type(properties)}"
    if "utc_time" in event and not isinstance(event["utc_time"], str):
        return f"field 'utc_time' must be a string, not {_json_type(event['utc_time'])}"
    return None


def _traits_problem(event_type: str, traits: Any) -> str | None:
    if not isinstance(traits, dict):
        return f"traits must be an object, not {_json_type(traits)}"
    for name, value in traits.items():
        if not _is_trait_value(value):
            return (
                f"traits.{name} must be a number, boolean, string or array of strings, "
                f"not {_json_type(value)}"
            )
    for name in IDENTIFY_TRAITS[event_type]:
        if traits.get(name) in (None, "", []):
            return f"traits.{name} is required for {event_type}"
    return None


def _is_trait_value(value: Any) -> bool:
    if isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _matching_rule(event: dict[str, Any], reject: tuple[tuple[str, Any], ...]) -> str | None:
    """The first `reject_events_where` rule this event matches, as `path == value`."""
    for path, expected in reject:
        value: Any = event
        for part in path.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value == expected:
            return f"{path} == {json.dumps(expected)}"
    return None


_MISSING = object()
