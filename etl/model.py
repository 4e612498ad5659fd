"""Frozen data shared by the stages: what a mapping says, what a row became,
what changed, what goes over the wire, and what a run did.

Nothing here does I/O. Each stage takes and returns these objects, so a test
can build any of them by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping as ReadOnlyDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import orjson

from etl.settings import READ

EventType = Literal["user_identify", "account_identify"]
# SPEC §10: identify streams (the default) send traits; track streams send one
# event per row of an append-only table.
StreamKind = Literal["identify", "track"]
STREAM_KINDS: tuple[StreamKind, ...] = ("identify", "track")
TraitType = Literal["text", "number", "integer", "boolean", "datetime", "date", "string_array"]
FieldKind = Literal["column", "sql", "const"]
ChangeKind = Literal["new", "changed", "unchanged", "invalid", "gone"]
# How a run ended: "partial" finished with invalid or rejected records (exit 3).
RunStatus = Literal["ok", "partial", "failed"]
# A stream's watermark: a timestamp cursor's horizon, or an integer cursor's largest value.
Watermark = dt.datetime | int
# What the sender of an `Outgoing` event wants back with its acknowledgement.
Ref = TypeVar("Ref")

EVENT_TYPES: tuple[EventType, ...] = ("account_identify", "user_identify")
# What `event_type` reads in reports for a track stream whose names come from the rows.
PER_ROW_EVENT_TYPE = "(per row)"
TRAIT_TYPES: tuple[TraitType, ...] = (
    "text",
    "number",
    "integer",
    "boolean",
    "datetime",
    "date",
    "string_array",
)
# SPEC §2: traits the API requires per event type.
REQUIRED_TRAITS: dict[EventType, tuple[str, ...]] = {
    "user_identify": ("email", "name", "created_at"),
    "account_identify": ("name",),
}
# SPEC §4: an event bigger than this is an invalid record, not a request.
MAX_EVENT_BYTES = 32 * 1024


# The text a shard hashes: the key's columns as text, joined by this (a character
# no key text holds in practice; a composite key is two or more parts).
SHARD_SEPARATOR = "\x1f"


def key_part(value: Any) -> str:
    """One key column's value as text: what record keys are made of, and what
    a shard hashes (the same text PostgreSQL's `::text` and MariaDB's
    `CAST(... AS CHAR)` give for int, bigint, text and uuid keys)."""
    if type(value) is str and value.isascii():  # the common case, on every row read
        return value
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    try:
        text = str(value)
    except ValueError:  # an int past Python's 4,300-digit str() limit (or a list of one)
        text = hex(value) if isinstance(value, int) else f"<{type(value).__name__}>"
    # a lone surrogate (bad UTF-8 read from SQLite) cannot be JSON or stored: escape it
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shard_bucket(text: str) -> int:
    """The first 4 bytes of the MD5 of `text` (UTF-8), as an unsigned integer.

    PostgreSQL and MariaDB compute the same natively (`md5()`, see
    `etl.source.extract.shard_predicate`), SQLite through a registered function,
    so a worker's query reads only the rows it owns. MD5 is a spreading
    function here, not a security measure.
    """
    digest = hashlib.md5(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class Shard:
    """Worker `index` of `count` (`--shard I/N`, 0 <= I < N): owns the records whose
    key text's `shard_bucket` is `index` modulo `count`, with its own watermark and
    lock in a shared state store. Rows with a NULL key column (invalid records)
    belong to shard 0."""

    index: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    def owns_values(self, key_values: Sequence[Any]) -> bool:
        """Whether this shard owns the row with these key column values."""
        if None in key_values:
            return self.index == 0
        text = SHARD_SEPARATOR.join(key_part(v) for v in key_values)
        return shard_bucket(text) % self.count == self.index

    def owns(self, key: str, *, composite: bool = False) -> bool:
        """Whether this shard owns the record key `key` (as the state stores it:
        a composite key is a JSON array of its parts)."""
        text = SHARD_SEPARATOR.join(orjson.loads(key)) if composite else key
        return shard_bucket(text) % self.count == self.index

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N` -> Shard; ValueError with the fix otherwise."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"{text!r} is not I/N — e.g. 0/3 for the first of three workers")
        shard = cls(int(index), int(count))
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"{text!r}: I must be between 0 and N-1 — e.g. 0/3, 1/3, 2/3")
        return shard


class Secret:
    """A string that never shows itself in repr(), str(), logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Field:
    """Where one value of an event comes from: a column, a SQL expression or a constant.

    `name` is the trait name, or `user_id` / `account_id` / `anonymous_id` / `url`
    for the id fields. `value` is the column name, the SQL text or the constant.
    """

    name: str
    kind: FieldKind
    value: Any
    type: TraitType | None = None
    default: Any = None
    omit_null: bool = True
    encoding: str | None = None


@dataclass(frozen=True)
class Source:
    """Which rows a stream reads: a table (optionally in a schema, filtered) or a query."""

    table: str | None = None
    schema: str | None = None
    where: str | None = None
    query: str | None = None


@dataclass(frozen=True)
class Related:
    """A table (or query) whose changes re-send records of a stream (SPEC §9).

    Read incrementally for `key` only (the stream's key columns as this table
    names them, same number and order), by its own `cursor` with its own
    watermark and `lookback_seconds`.
    """

    source: Source
    key: tuple[str, ...]
    cursor: str
    lookback_seconds: float = READ.lookback_seconds

    @property
    def label(self) -> str:
        """A stable name for this entry's watermark: what it reads, by which key and cursor.

        Reordering `related:` entries keeps each watermark; changing what one
        reads starts it afresh.
        """
        if self.source.query is not None:
            what = "query:" + hashlib.sha256(self.source.query.encode()).hexdigest()[:16]
        else:
            what = (
                f"{self.source.schema}.{self.source.table}"
                if self.source.schema
                else (self.source.table or "")
            )
        if self.source.where:
            what += " where:" + hashlib.sha256(self.source.where.encode()).hexdigest()[:8]
        return f"{what}({','.join(self.key)})@{self.cursor}"


@dataclass(frozen=True)
class Track:
    """What only a track stream has (SPEC §10): where each event's name and time
    come from. `name` is a constant (`kind="const"`), a column or a SQL expression."""

    name: Field
    timestamp: Field


@dataclass(frozen=True)
class Mapping:
    """One validated mapping file: how rows of one source become events.

    An identify stream (`track` is None) sends `event_type` events with
    `traits`; a track stream sends one event per key, named by `track.name`,
    whose `traits` are the event's properties.
    """

    stream: str
    path: str
    event_type: str  # an EventType; for a track stream its constant name or PER_ROW_EVENT_TYPE
    source: Source
    key: tuple[str, ...]
    cursor: str | None
    user_id: Field
    account_id: Field
    traits: tuple[Field, ...]
    anonymous_id: Field | None = None
    url: Field | None = None
    lookback_seconds: float = READ.lookback_seconds
    timezone: str = "UTC"
    # SPEC §9: related tables, the full-read interval (None: never) and the gone traits.
    related: tuple[Related, ...] = ()
    full_every_seconds: float | None = READ.full_every_seconds
    on_gone: tuple[tuple[str, Any], ...] = ()  # (trait, value) pairs; () means no on_gone
    # sha256 over the normalised definition: a change forces a full diff (SPEC §5).
    fingerprint: str = ""
    track: Track | None = None

    @property
    def kind(self) -> StreamKind:
        return "identify" if self.track is None else "track"

    @property
    def id_fields(self) -> tuple[Field, ...]:
        """user_id, account_id and, when mapped, anonymous_id and url."""
        optional = tuple(f for f in (self.anonymous_id, self.url) if f is not None)
        return (self.user_id, self.account_id, *optional)

    @property
    def track_fields(self) -> tuple[Field, ...]:
        """A track stream's event name and timestamp fields (named `event_type`
        and `timestamp`); none for an identify stream."""
        return (self.track.name, self.track.timestamp) if self.track else ()

    @property
    def selected_fields(self) -> tuple[Field, ...]:
        """The fields the database computes, in the order extract selects them:
        id fields, track fields, then traits; constants are filled in by transform."""
        fields = (*self.id_fields, *self.track_fields, *self.traits)
        return tuple(f for f in fields if f.kind != "const")


@dataclass(frozen=True, slots=True)
class Unrepresentable:
    """A source value Python cannot hold, as the database spells it: PostgreSQL's
    `infinity` / `-infinity` timestamps and dates. `etl.source.pgtypes` reads them as
    this; transform makes their record invalid, naming the value."""

    text: str  # "infinity" or "-infinity"
    type_name: str  # "timestamp with time zone", "timestamp", "date"

    def __str__(self) -> str:
        return self.text


# Record, Change and Outgoing are made once per row read or event sent: named
# tuples, since a frozen dataclass's __init__ (a setattr call per field) costs
# 2-3 times as much to build. Immutable all the same.


class Record(NamedTuple):
    """One source row after transform.

    `payload` is what the diff compares and the state stores: `user_id`,
    `account_id`, `anonymous_id`, optional `url`, and `traits`. It is None when
    the record is invalid, and `reason` says why.
    """

    key: str
    cursor: Any
    payload: dict[str, Any] | None
    reason: str | None = None
    # the payload as canonical JSON (sorted keys, compact): hashed, stored, diffed
    canonical: bytes | None = None

    @property
    def valid(self) -> bool:
        return self.payload is not None


# Change.fields of every change that is not "changed": one shared, read-only mapping.
NO_FIELDS: ReadOnlyDict[str, tuple[Any, Any]] = MappingProxyType({})


class Change(NamedTuple):
    """What the diff concluded about one record against its last-sent payload."""

    kind: ChangeKind
    record: Record
    hash: str | None = None
    old: dict[str, Any] | None = None
    # trait (or id field) -> (old, new); only for kind == "changed"
    fields: ReadOnlyDict[str, tuple[Any, Any]] = NO_FIELDS
    # the event_id this key was last sent with ("" if never): the next one chains it
    previous_event_id: str = ""


class Outgoing(NamedTuple, Generic[Ref]):
    """One serialized event ready to send. `ref` is opaque to the loader and
    handed back in `BatchResult`, so the sender knows what was acknowledged."""

    key: str
    event_id: str
    body: bytes
    ref: Ref


@dataclass(frozen=True)
class BatchResult(Generic[Ref]):
    """The outcome of one batch: the events the API acknowledged and the ones it
    refused (each with the server's message, after bisection isolated it)."""

    acked: tuple[Outgoing[Ref], ...]
    rejected: tuple[tuple[Outgoing[Ref], str], ...] = ()


@dataclass(frozen=True)
class DeliveryStats:
    """What delivering one stream cost."""

    sent: int = 0
    rejected: int = 0
    batches: int = 0
    requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class StreamReport:
    """The canonical summary of one stream in one run (SPEC §3 `stream.done`)."""

    stream: str
    event_type: str
    read: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    invalid: int = 0
    rejected: int = 0
    sent: int = 0
    batches: int = 0
    retries: int = 0
    gone: int = 0
    null_cursor: int | None = None
    watermark: str | None = None
    seconds: float = 0.0
    full: bool = False
    # track streams: events whose time is later than the run's clock (sent as they are)
    future: int = 0
    full_read: bool = False  # a full read in SPEC §9's sense, read to its end
    # (key, reason) of every invalid and rejected record, for the run record
    invalid_records: tuple[tuple[str, str], ...] = ()
    rejected_records: tuple[tuple[str, str], ...] = ()

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "new": self.new,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "invalid": self.invalid,
            "rejected": self.rejected,
            "sent": self.sent,
            "gone": self.gone,
        }

    def summary(self) -> dict[str, Any]:
        """The fields of the stream's one summary line (SPEC §3 `stream.done`),
        shared by identify and track streams."""
        return {
            **{k: v for k, v in self.counts().items() if k != "gone"},
            "batches": self.batches,
            "retries": self.retries,
            "gone": self.gone,
            "watermark": self.watermark,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RunReport:
    """What one command did, stream by stream."""

    run_id: int | None
    command: str
    streams: tuple[StreamReport, ...]
    status: RunStatus = "ok"
    error: str | None = None


@dataclass(frozen=True)
class DiffRecord:
    """One record of a dry run, as the JSON report shows it (SPEC §3 `etl diff`)."""

    key: str
    kind: Literal["new", "changed", "invalid", "gone"]
    traits: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)  # {trait: {"old", "new"}}
    reason: str | None = None
    # track streams: the event's name, utc_time and ids (properties are in `traits`)
    event: dict[str, Any] = field(default_factory=dict)
    # who the event is about (new and changed records; None when invalid or gone)
    user_id: str | None = None
    account_id: str | None = None


@dataclass(frozen=True)
class DiffStream:
    """One stream of a dry run: its counts and the records that would change."""

    stream: str
    event_type: str
    counts: dict[str, int]  # read, new, changed, unchanged, invalid, gone
    records: tuple[DiffRecord, ...]
    truncated: int = 0  # records left out by --limit
    kind: StreamKind = "identify"
    # trait -> how many changed records change it (all of them, listed or not)
    changed_traits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffReport:
    """A whole dry run: `mode` is "incremental" or "full"."""

    mode: Literal["incremental", "full"]
    streams: tuple[DiffStream, ...]
