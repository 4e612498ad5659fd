"""Source row -> Record: coerce values to the API's types and decide validity.

Pure: no connection, clock or logger. A row is the tuple extract selects:
the key columns, the cursor (when the mapping has one), then one value per
`Mapping.selected_fields`. Constants are filled in here.

Every failure becomes an invalid Record with a reason; nothing here raises for
bad data (SPEC §4: one bad row never stops a run). Values are converted by
`coerce`; this module builds records and events.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from etl.mapping.track import reserved_name_problem
from etl.model import MAX_EVENT_BYTES, REQUIRED_TRAITS, Mapping, Record, key_part
from etl.run.coerce import Invalid, converter

# Namespace of every event_id (a fixed random UUID: ids must never change).
EVENT_NAMESPACE = uuid.UUID("6f1c1a52-3c0e-4f43-9a43-1d2f6b7e0c11")
_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
# Bump when a change here or in coerce.py can map the same row to a different
# payload: stored row digests are salted with it, so every row is transformed
# again once.
TRANSFORM_VERSION = 1
UTC = dt.UTC


@dataclass(frozen=True)
class EventContext:
    """What every event of one stream shares; built once per run."""

    event_type: str
    api_key: str
    workspace_key: str
    track: bool = False  # track events: name, utc_time and properties come from the payload

    def envelope_bytes(self) -> int:
        """Bytes an event adds around its payload (ids, keys, constants)."""
        empty: dict[str, Any] = {"user_id": "", "account_id": "", "anonymous_id": ""}
        if self.track:
            empty |= {"event_type": "", "utc_time": "", "properties": {}}
        else:
            empty["traits"] = {}
        return len(to_event(empty, event_id=str(EVENT_NAMESPACE), context=self)) - len(
            canonical(empty)
        )

    @functools.cached_property
    def envelope(self) -> bytes:
        """The opening of every event of the stream, up to its event_id's value:
        `{"api_key":...,"screen_resolution":"0","event_id":"` (see `event_body`)."""
        fixed = orjson.dumps(
            {
                "api_key": self.api_key,
                "workspace_key": self.workspace_key,
                "src": "hyperengage",
                "library": "http",
                "event_type": self.event_type,
                "screen_resolution": "0",
            }
        )
        return fixed[:-1] + b',"event_id":"'


def canonical(payload: dict[str, Any]) -> bytes:
    """The payload as canonical JSON: sorted keys, compact, UTF-8."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def event_id(
    *, workspace_key: str, event_type: str, key: str, payload_hash: str, previous: str = ""
) -> str:
    """SPEC §2: UUIDv5 over (workspace_key, event_type, record key, payload hash,
    the record's previous sent event_id or "").

    A retry or re-run of the same send gets the same id (`previous` moves only
    once a send was acknowledged); a record that returns to an earlier payload
    (free -> pro -> free, or back after on_gone) chains a different previous id,
    so it gets a new one that no downstream de-duplication drops. The same
    text as `str(uuid.uuid5(...))` (`event_ids` makes many of one stream).
    """
    return event_ids(workspace_key=workspace_key, event_type=event_type)(
        key, payload_hash, previous
    )


def event_ids(*, workspace_key: str, event_type: str) -> Callable[[str, str, str], str]:
    """`event_id` of one stream's events: (key, payload_hash, previous) -> id.

    This runs once per event sent: the namespace and the stream's part of the
    name are hashed once, each id copies that SHA-1 state, and the UUID text is
    cut from the hex digest (no UUID object, no bytearray).
    """
    stream = hashlib.sha1(
        _NAMESPACE_BYTES + f"{workspace_key}\x1f{event_type}\x1f".encode(), usedforsecurity=False
    )

    def one(key: str, payload_hash: str, previous: str) -> str:
        sha = stream.copy()
        sha.update(f"{key}\x1f{payload_hash}\x1f{previous}".encode())
        h = sha.hexdigest()
        # RFC 4122: version 5 in the 13th hex digit, the variant in the 17th's top bits
        return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"

    return one


# A hex digit n -> (n & 0b0011) | 0b1000 in hex: the RFC 4122 variant bits set.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def track_event_id(*, workspace_key: str, stream: str, key: str) -> str:
    """SPEC §10: UUIDv5 over (workspace_key, stream, record key) — one id per key,
    whatever the row holds, so a re-sent track event can be dropped downstream."""
    name = "\x1f".join(("track", workspace_key, stream, key))
    return str(uuid.uuid5(EVENT_NAMESPACE, name))


def event_body(canonical_payload: bytes, *, event_id: str, context: EventContext) -> bytes:
    """The serialized event of SPEC §2, made from the canonical payload's bytes.

    A payload's fields (anonymous_id, user_id, account_id, url, traits) are
    event fields as they are, so the event is the stream's fixed envelope, the
    event_id, then the payload's own members: the traits are serialized once,
    for the hash, the state and the request body alike. Same JSON object as
    `to_event` (members in another order).
    """
    if context.track:  # a track payload holds its own event_type: to_event builds those
        raise ValueError("event_body makes identify events only")
    return b'%s%s",%s' % (context.envelope, event_id.encode(), canonical_payload[1:])


def to_event(payload: dict[str, Any], *, event_id: str, context: EventContext) -> bytes:
    """The serialized event of SPEC §2 (§10 for track events) for one record's payload."""
    if context.track:
        return _to_track_event(payload, event_id=event_id, context=context)
    event: dict[str, Any] = {
        "event_id": event_id,
        "anonymous_id": payload.get("anonymous_id", ""),
        "user_id": payload["user_id"],
        "account_id": payload["account_id"],
        "api_key": context.api_key,
        "workspace_key": context.workspace_key,
        "src": "hyperengage",
        "library": "http",
        "event_type": context.event_type,
        "traits": payload["traits"],
        "screen_resolution": "0",
    }
    if "url" in payload:
        event["url"] = payload["url"]
    return orjson.dumps(event)


def _to_track_event(payload: dict[str, Any], *, event_id: str, context: EventContext) -> bytes:
    # `utc_time`, not `_timestamp`: Jitsu overwrites `_timestamp` with its receive time
    event: dict[str, Any] = {
        "event_id": event_id,
        "anonymous_id": payload.get("anonymous_id", ""),
        "user_id": payload["user_id"],
        "account_id": payload["account_id"],
        "api_key": context.api_key,
        "workspace_key": context.workspace_key,
        "src": "hyperengage",
        "library": "http",
        "event_type": payload["event_type"],
        "utc_time": payload["utc_time"],
        "properties": payload["properties"],
        "screen_resolution": "0",
    }
    if "url" in payload:
        event["url"] = payload["url"]
    return orjson.dumps(event)


# ---------------------------------------------------------------- records


def record_key(values: Sequence[Any]) -> str:
    """The canonical text of a key: the value, or a JSON array for composite keys."""
    if len(values) == 1:
        return key_part(values[0])
    return orjson.dumps([key_part(v) for v in values]).decode()


def make_transformer(mapping: Mapping, context: EventContext) -> Callable[[Sequence[Any]], Record]:
    """`to_record` compiled for one stream: its fields, time zone and size budget."""
    compiled = _Compiled(
        mapping, ZoneInfo(mapping.timezone), MAX_EVENT_BYTES - context.envelope_bytes()
    )
    return compiled.record


def to_record(
    row: Sequence[Any],
    mapping: Mapping,
    *,
    tz: dt.tzinfo = UTC,
    max_payload_bytes: int = MAX_EVENT_BYTES,
) -> Record:
    """One row as a Record: valid with its payload, or invalid with the reason."""
    return _Compiled(mapping, tz, max_payload_bytes).record(row)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one field's value sits in the row (or its constant), and how to convert it."""

    name: str
    index: int  # position in the row; -1 for a constant
    const: Any
    default: Any
    convert: Callable[[Any], Any]  # a non-NULL raw value -> what is sent; raises Invalid
    keep_null: bool  # a trait with omit_null: false
    # a plain ASCII str without NUL is sent as it is (ids, text and untyped
    # fields): checked inline, it saves the converter's calls on most values
    str_as_is: bool = False


class _Compiled:
    """A mapping turned into slots once, so each row costs a loop, not a lookup
    of every field's kind, type and converter (this runs once per row read)."""

    def __init__(self, mapping: Mapping, tz: dt.tzinfo, max_payload_bytes: int) -> None:
        self.mapping = mapping
        self.max_payload_bytes = max_payload_bytes
        self.n_keys = len(mapping.key)
        self.has_cursor = bool(mapping.cursor)
        position = self.n_keys + (1 if mapping.cursor else 0)
        slots: list[_Slot] = []
        n_ids = len(mapping.id_fields) + len(mapping.track_fields)
        for declared in (*mapping.id_fields, *mapping.track_fields, *mapping.traits):
            index = -1
            if declared.kind != "const":
                index, position = position, position + 1
            field = declared
            if mapping.track is not None and declared is mapping.track.timestamp:
                # any source form of a time (naive, text, epoch) -> ISO-8601 UTC with Z
                field = dataclasses.replace(declared, name="utc_time", type="datetime")
            slots.append(
                _Slot(
                    name=field.name,
                    index=index,
                    const=field.value if field.kind == "const" else None,
                    default=field.default,
                    convert=converter(field, tz, is_id=len(slots) < n_ids),
                    keep_null=not field.omit_null,
                    str_as_is=field.type is None or (field.type == "text" and not field.encoding),
                )
            )
        self.id_slots = tuple(slots[:n_ids])
        self.trait_slots = tuple(slots[n_ids:])
        self.values_key = "properties" if mapping.track is not None else "traits"

    def record(self, row: Sequence[Any]) -> Record:
        key_values = row[: self.n_keys]
        key = record_key(key_values)
        cursor = row[self.n_keys] if self.has_cursor else None
        if None in key_values:
            return Record(key=key, cursor=cursor, payload=None, reason="key column is NULL")
        payload: dict[str, Any] = {"anonymous_id": ""}
        traits: dict[str, Any] = {}
        slot = self.id_slots[0]
        try:
            for slot in self.id_slots:
                raw = row[slot.index] if slot.index >= 0 else slot.const
                if raw is None:
                    raw = slot.default
                if raw is None:
                    continue
                if slot.str_as_is and type(raw) is str and raw.isascii() and "\x00" not in raw:
                    payload[slot.name] = raw
                else:
                    payload[slot.name] = slot.convert(raw)
            for slot in self.trait_slots:
                raw = row[slot.index] if slot.index >= 0 else slot.const
                if raw is None:
                    raw = slot.default
                if raw is None:
                    if slot.keep_null:
                        traits[slot.name] = None
                elif slot.str_as_is and type(raw) is str and raw.isascii() and "\x00" not in raw:
                    traits[slot.name] = raw
                else:
                    traits[slot.name] = slot.convert(raw)
        except Invalid as exc:
            return Record(key=key, cursor=cursor, payload=None, reason=f"{slot.name}: {exc}")
        payload[self.values_key] = traits
        reason = _missing(payload, self.mapping)
        if reason:
            return Record(key=key, cursor=cursor, payload=None, reason=reason)
        body = canonical(payload)
        if len(body) > self.max_payload_bytes:
            # the budget is the event limit less the envelope: add it back to name the event's size
            size = len(body) + MAX_EVENT_BYTES - self.max_payload_bytes
            return Record(
                key=key,
                cursor=cursor,
                payload=None,
                reason=f"event is {size:,} bytes, over the 32 KB limit — drop or trim big traits",
            )
        return Record(key=key, cursor=cursor, payload=payload, canonical=body)


def _missing(payload: dict[str, Any], mapping: Mapping) -> str | None:
    """Why a mandatory id or required trait is unusable, else None.

    Empty means empty (SPEC §9): text that is only whitespace counts as empty,
    e.g. Django's `first_name || ' ' || last_name` over two empty strings.
    """
    for name in ("user_id", "account_id"):
        value = payload.get(name)
        if not value:
            return f"{name} is missing or empty"
        if isinstance(value, str) and value.isspace():
            return f"{name} is only whitespace"
    if mapping.track is not None:
        if "utc_time" not in payload:
            return "timestamp is NULL — a track event needs the time it happened"
        name = payload.get("event_type", "")
        return reserved_name_problem(name) if name.strip() else "event_type is missing or empty"
    for name in REQUIRED_TRAITS[mapping.event_type]:  # type: ignore[index]
        value = payload["traits"].get(name)
        if value is None or value == "":
            return f"required trait {name!r} is missing or empty"
        if isinstance(value, str) and value.isspace():
            return f"required trait {name!r} is only whitespace ({value!r})"
    return None
