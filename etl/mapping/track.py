"""The keys only a track stream has (SPEC §10), validated like the rest.

A track stream (`kind: track`) turns each row of an append-only table into one
event: `event_type` names it (a bare string, or `{column: ...}` / `{sql: ...}`
for a name per row), `timestamp` says when it happened, `properties` are value
sources with the same rules as traits. `cursor` is required: it is how new rows
are found, and it must not move once set.
"""

from __future__ import annotations

from typing import Any

from etl.mapping.fields import Problems, describe, valid_field, valid_traits_like
from etl.mapping.keys import TRACK_ONLY
from etl.model import EVENT_TYPES, Field, Track

# Keys that would re-read or re-send below a track stream's floor (SPEC §10).
NOT_FOR_TRACK = {
    "traits": "rename it to properties: a track event carries properties",
    "related": "remove it: a track event is sent once per key, a related change cannot re-send it",
    "full_every": "remove it: track streams never re-read below their floor; "
    "use `etl backfill` to send history",
    "on_gone": "remove it: a track event is sent once, a deleted row changes nothing",
}
_NAME_KINDS = ("column", "sql", "const")


def reserved_name_problem(name: str) -> str | None:
    """Why `name` cannot be a track event's name, or None (SPEC §10)."""
    if not name.strip():
        return "the event name is empty"
    if name in EVENT_TYPES:
        return f"{name!r} is reserved for identify events"
    return None


def not_track(data: dict[Any, Any], problems: Problems) -> None:
    """Report the track-only keys of an identify stream."""
    for name in TRACK_ONLY:
        if name in data:
            problems.add(name, "only applies to kind: track", "add kind: track, or remove this key")


def valid_track(data: dict[Any, Any], problems: Problems) -> Track | None:
    """A track stream's name and timestamp, else None and their problems; also
    reports the keys that do not apply to track streams."""
    for name, fix in NOT_FOR_TRACK.items():
        if name in data:
            problems.add(name, "does not apply to kind: track", fix)
    name_field = _event_name(data["event_type"], problems) if "event_type" in data else None
    timestamp = None
    if "timestamp" in data:
        timestamp = valid_field(data["timestamp"], "timestamp", "timestamp", problems)
        if timestamp is not None and timestamp.type not in (None, "datetime"):
            problems.add(
                "timestamp.type",
                f"must be datetime, got {timestamp.type}",
                "remove the type, or write type: datetime",
            )
            timestamp = None
        elif timestamp is not None and timestamp.kind == "const":
            problems.add(
                "timestamp",
                "is a constant: every event would have the same time",
                "use the column that says when each event happened",
            )
            timestamp = None
    if name_field is None or timestamp is None:
        return None
    return Track(name=name_field, timestamp=timestamp)


def _event_name(spec: object, problems: Problems) -> Field | None:
    """`event_type:` of a track stream: a bare name (a constant) or a field spec."""
    if isinstance(spec, str):
        spec = {"const": spec}
    if not isinstance(spec, dict):
        problems.add(
            "event_type",
            f"must be an event name or a mapping, got {describe(spec)}",
            "write event_type: invoice_paid, or event_type: {column: COLUMN}",
        )
        return None
    field = valid_field(spec, "event_type", "event_type", problems)
    if field is None:
        return None
    if field.kind == "const":
        if not isinstance(field.value, str):
            problems.add(
                "event_type", f"must be text, got {describe(field.value)}", "quote the name"
            )
            return None
        problem = reserved_name_problem(field.value)
        if problem:
            problems.add(
                "event_type", problem, "name what happened, e.g. invoice_paid or project_created"
            )
            return None
    return Field(name="event_type", kind=field.kind, value=field.value, type="text")


def valid_properties(value: object, problems: Problems) -> tuple[Field, ...]:
    """`properties:` (optional) -> Fields in file order, with the rules of traits."""
    if value is None:
        return ()
    return valid_traits_like(value, "properties", problems)
