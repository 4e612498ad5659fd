"""Coercion: one source value -> what the API accepts for a trait's type.

Pure. `as_text`, `as_number`, ... convert one value or raise `Invalid` with
the reason; `converter()` picks (once per field) the function a row's value
goes through, with the commonest cases tried first (it runs once per value).
A change here that can send a different value for the same row must bump
`transform.TRANSFORM_VERSION`.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from etl.model import Field, TraitType, Unrepresentable

# Doubles represent integers exactly only up to 2**53 (JavaScript's Number).
MAX_SAFE_INTEGER = 2**53 - 1
# Python refuses int <-> str conversions past this many digits (ValueError, 3.11+).
MAX_INT_DIGITS = 4300

UTC = dt.UTC
_ZERO = dt.timedelta(0)
# The objects that mean UTC. PostgreSQL sessions often report their zone as
# "Etc/UTC", so psycopg's datetimes carry that one. ZoneInfo caches its
# instances (kept alive here), so the set's identity hash finds psycopg's too;
# a zone not found here takes the exact (slower) path, never a wrong one.
_UTC_ZONES = frozenset(
    {UTC, *(ZoneInfo(name) for name in ("UTC", "Etc/UTC", "Etc/UCT", "Etc/Universal", "Etc/Zulu"))}
)
# orjson writes a datetime as isoformat() does (four-digit year, microseconds only
# when non-zero), "+00:00" as "Z", a naive one as UTC: 4x faster than isoformat().
_AS_UTC_Z = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z


def _iso_z(value: dt.datetime) -> str:
    """A UTC (or naive, meaning UTC) datetime as ISO-8601 text ending in Z."""
    if type(value) is dt.datetime:  # orjson refuses subclasses
        return orjson.dumps(value, option=_AS_UTC_Z)[1:-1].decode()
    text = value.replace(tzinfo=None).isoformat()
    return text + "Z"


class Invalid(ValueError):
    """A value that cannot become what the API accepts; the message is the reason."""


def _utc_text(value: dt.datetime, tz: dt.tzinfo) -> str:
    zone = value.tzinfo
    # the common case first: a value already in UTC
    if zone in _UTC_ZONES or (zone is None and tz in _UTC_ZONES):
        return _iso_z(value)
    aware = value if zone is not None else value.replace(tzinfo=tz)
    if aware.utcoffset() == _ZERO:
        utc = aware  # already UTC: the common case, and astimezone() is not free
    else:
        try:
            utc = aware.astimezone(UTC)
        except OverflowError as exc:
            raise Invalid(f"datetime {value.isoformat()} is out of range in UTC") from exc
    return _iso_z(utc)


def _parse_datetime_text(text: str) -> dt.datetime:
    try:
        # 3.11 reads "2021-01-20 09:55:35", "...T...Z", offsets and fractions.
        return dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise Invalid(f"{text[:40]!r} is not an ISO-8601 datetime") from exc


def as_datetime(value: Any, tz: dt.tzinfo) -> str:
    if isinstance(value, dt.datetime):
        return _utc_text(value, tz)
    if isinstance(value, dt.date):
        return _utc_text(dt.datetime(value.year, value.month, value.day), tz)
    if isinstance(value, str):
        return _utc_text(_parse_datetime_text(value), tz)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # epoch seconds, as some apps store them
        try:
            return _utc_text(dt.datetime.fromtimestamp(float(_finite(value)), UTC), tz)
        except (OverflowError, OSError, ValueError) as exc:
            raise Invalid(f"{_brief(value)} is not a valid epoch timestamp") from exc
    raise _cannot(value, "a datetime")


def as_date(value: Any, tz: dt.tzinfo) -> str:
    if isinstance(value, dt.datetime):
        # an aware value comes in the session's zone: take its date in the stream's
        try:
            local = value.astimezone(tz) if value.tzinfo is not None else value
        except OverflowError as exc:
            raise Invalid(f"datetime {value.isoformat()} is out of range") from exc
        return local.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip()[:10]).isoformat()
        except ValueError as exc:
            raise Invalid(f"{value[:40]!r} is not a YYYY-MM-DD date") from exc
    raise _cannot(value, "a date")


def _cannot(value: Any, what: str) -> Invalid:
    """Why `value` (of a type no branch took) cannot be `what`."""
    if isinstance(value, Unrepresentable):
        # PostgreSQL's ±infinity: psycopg cannot load it, etl.source.pgtypes reads it as this
        return Invalid(
            f"{value.type_name} {value.text!r} has no ISO-8601 form — store a real value"
            ' or NULL, or map it with sql: "CASE WHEN isfinite(col) THEN col END"'
        )
    if what == "an array":
        return Invalid(f"{type(value).__name__} value is not an array")
    return Invalid(f"{type(value).__name__} value cannot be {what}")


def _finite(value: float | Decimal) -> float | Decimal:
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid(f"{value} is not a finite number")
    if isinstance(value, Decimal) and not value.is_finite():
        raise Invalid(f"{value} is not a finite number")
    return value


def _brief(value: Any) -> str:
    """A value for a message: str() of a huge int raises, and a long one helps nobody."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a {value.bit_length()}-bit integer"
    try:
        return str(value)
    except ValueError:  # a huge int inside a list or dict
        return f"a {type(value).__name__}"


def _safe_int(value: int) -> int:
    if abs(value) > MAX_SAFE_INTEGER:
        raise Invalid(
            f"{_brief(value)} is beyond 2^53 and would lose precision — map it as type: text"
        )
    return value


def as_number(value: Any, tz: dt.tzinfo) -> int | float:
    if isinstance(value, bool):
        raise Invalid("a boolean is not a number — use type: boolean")
    if isinstance(value, int):
        return _safe_int(value)
    if isinstance(value, float):
        return float(_finite(value))
    if isinstance(value, Decimal):
        _finite(value)
        if value == value.to_integral_value():
            # compare before int(): int(Decimal("1E+999999999")) never returns;
            # copy_abs, not abs(): abs() rounds to the context and overflows
            if value.copy_abs() > MAX_SAFE_INTEGER:
                raise Invalid(
                    f"{value} is beyond 2^53 and would lose precision — map it as type: text"
                )
            return int(value)
        number = float(value)
        if not math.isfinite(number):
            raise Invalid(f"{value} is out of the range of a double")
        return number
    if isinstance(value, str):
        try:
            return as_number(Decimal(value.strip()), tz)
        except InvalidOperation as exc:
            raise Invalid(f"{value[:40]!r} is not a number") from exc
    raise _cannot(value, "a number")


def as_integer(value: Any, tz: dt.tzinfo) -> int:
    number = as_number(value, tz)
    if isinstance(number, float):
        if not number.is_integer():
            raise Invalid(f"{number} is not an integer")
        return _safe_int(int(number))
    return number


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def as_boolean(value: Any, tz: dt.tzinfo) -> bool:
    if isinstance(value, bool):
        return value
    # is_finite first: comparing a signalling NaN raises InvalidOperation
    is_number = isinstance(value, int) or (isinstance(value, Decimal) and value.is_finite())
    if is_number and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, Unrepresentable):
        raise _cannot(value, "a boolean")
    raise Invalid(f"{_brief(value)[:40]!r} is not a boolean")


def as_text(value: Any, tz: dt.tzinfo, encoding: str | None = None) -> str:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        if encoding is None:
            raise Invalid("binary value — map it with type: text and an encoding, e.g. utf-8")
        try:
            return _clean_text(bytes(value).decode(encoding))
        except UnicodeDecodeError as exc:
            raise Invalid(f"binary value is not valid {encoding}") from exc
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return _whole_text(value, tz)
    if isinstance(value, float):
        return str(as_number(value, tz))
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return _utc_text(value, tz)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    raise _cannot(value, "text")


def _whole_text(value: int | Decimal, tz: dt.tzinfo) -> str:
    """A whole number as text with every digit: text is the advice for ids past 2^53."""
    if isinstance(value, Decimal) and not (
        value.is_finite() and value == value.to_integral_value()
    ):
        return str(as_number(value, tz))
    if isinstance(value, Decimal) and value.adjusted() >= MAX_INT_DIGITS:
        raise Invalid(f"{value} has too many digits to be text")
    try:
        return str(int(value))
    except ValueError as exc:
        raise Invalid(f"{_brief(value)} has too many digits to be text") from exc


def _clean_text(text: str) -> str:
    if "\x00" in text:
        raise Invalid("text contains a NUL character")
    if text.isascii():  # O(1) for most strings: no surrogates possible
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # lone surrogates: what invalid UTF-8 read from SQLite becomes
        raise Invalid("text is not valid UTF-8") from exc
    return text


def as_string_array(value: Any, tz: dt.tzinfo) -> list[str]:
    if type(value) is list and all(
        type(v) is str and v.isascii() and "\x00" not in v for v in value
    ):
        return value  # a jsonb/array column of plain text: nothing to convert
    items = value
    if isinstance(value, str):
        try:
            items = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise Invalid(f"{value[:40]!r} is not a JSON array") from exc
    if not isinstance(items, list | tuple):
        raise _cannot(items, "an array")
    out: list[str] = []
    for index, item in enumerate(items):
        if item is None:
            raise Invalid(f"array element {index} is null")
        if isinstance(item, dict | list | tuple):
            raise Invalid(f"array element {index} is nested — flatten it with sql:")
        out.append(as_text(item, tz))
    return out


def infer(value: Any, tz: dt.tzinfo) -> Any:
    """Coerce a value whose trait declares no type, by its Python type."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return as_number(value, tz)
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, dt.datetime):
        return _utc_text(value, tz)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return as_string_array(value, tz)
    if isinstance(value, dict):
        raise Invalid("nested object — flatten it with sql:, e.g. sql: \"data->>'plan'\"")
    return as_text(value, tz)


COERCE: dict[TraitType, Callable[[Any, dt.tzinfo], Any]] = {
    "text": as_text,
    "number": as_number,
    "integer": as_integer,
    "boolean": as_boolean,
    "datetime": as_datetime,
    "date": as_date,
    "string_array": as_string_array,
}


def coerce(value: Any, field: Field, tz: dt.tzinfo) -> Any:
    """One value as the API wants it, per the field's declared or inferred type."""
    if field.type == "text" and field.encoding:
        return as_text(value, tz, field.encoding)
    if field.type is None:
        return infer(value, tz)
    return COERCE[field.type](value, tz)


def converter(field: Field, tz: dt.tzinfo, *, is_id: bool) -> Callable[[Any], Any]:
    """The function that turns one non-NULL value of this field into what is sent."""
    typed = _typed(field, tz) if field.type is not None else None
    if is_id:
        # SPEC §2: ids and url are strings whatever type the mapping reads them as
        if typed is None:
            return lambda raw: as_text(raw, tz)
        return lambda raw: as_text(typed(raw), tz)
    return typed if typed is not None else _inferrer(tz)


def _typed(field: Field, tz: dt.tzinfo) -> Callable[[Any], Any]:
    if field.type == "text" and field.encoding:
        encoding = field.encoding
        return lambda raw: as_text(raw, tz, encoding)
    if field.type == "datetime":
        return _datetimes(tz)
    if field.type == "boolean":
        return lambda raw: raw if type(raw) is bool else as_boolean(raw, tz)
    if field.type == "string_array":
        return _string_arrays(tz)
    function = COERCE[field.type]  # type: ignore[index]
    return lambda raw: function(raw, tz)


def _string_arrays(tz: dt.tzinfo) -> Callable[[Any], Any]:
    """`as_string_array` with the commonest case first: a list of plain ASCII text
    (one join tells, instead of a check per element)."""

    def convert(raw: Any) -> Any:
        if type(raw) is list:
            try:
                joined = "".join(raw)
            except TypeError:  # an element that is not text
                return as_string_array(raw, tz)
            if joined.isascii() and "\x00" not in joined:
                return raw  # (a str subclass joins too; JSON writes it as text)
        return as_string_array(raw, tz)

    return convert


def _datetimes(tz: dt.tzinfo) -> Callable[[Any], Any]:
    """`as_datetime` with the commonest case first: a datetime already in UTC."""

    def convert(raw: Any) -> Any:
        if type(raw) is dt.datetime and raw.tzinfo in _UTC_ZONES:
            return orjson.dumps(raw, option=_AS_UTC_Z)[1:-1].decode()
        return as_datetime(raw, tz)

    return convert


def _inferrer(tz: dt.tzinfo) -> Callable[[Any], Any]:
    """`infer` with the two commonest exact types first (text and timestamps)."""

    def convert(raw: Any) -> Any:
        kind = type(raw)
        if kind is str:
            return _clean_text(raw)
        if kind is dt.datetime:
            return _utc_text(raw, tz)
        return infer(raw, tz)

    return convert
