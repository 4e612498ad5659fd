"""transform: a source row becomes a Record (SPEC §2 payload, §4 coercion and validity)."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from etl.model import MAX_EVENT_BYTES, TRAIT_TYPES, Field, Mapping, Record, Source, TraitType
from etl.run.transform import (
    EventContext,
    canonical,
    event_body,
    event_id,
    event_ids,
    make_transformer,
    to_event,
    to_record,
)

UTC = dt.UTC
CONTEXT = EventContext(event_type="account_identify", api_key="ak-1", workspace_key="ws-1")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{6})?Z$")
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
EVENT_FIELDS = {
    "event_id",
    "anonymous_id",
    "user_id",
    "account_id",
    "api_key",
    "workspace_key",
    "src",
    "library",
    "event_type",
    "traits",
    "screen_resolution",
}


def column(name: str, type: TraitType | None = None, **options: Any) -> Field:
    """A field read from the column of the same name."""
    return Field(name=name, kind="column", value=name, type=type, **options)


def const(name: str, value: Any, type: TraitType | None = None) -> Field:
    """A field whose value is a constant of the mapping."""
    return Field(name=name, kind="const", value=value, type=type)


def users(
    *extra: Field,
    key: tuple[str, ...] = ("id",),
    cursor: str | None = None,
    anonymous_id: Field | None = None,
    url: Field | None = None,
    timezone: str = "UTC",
) -> Mapping:
    """A user_identify mapping with the required traits email, name, created_at."""
    return Mapping(
        stream="users",
        path="mappings/users.yml",
        event_type="user_identify",
        source=Source(table="users"),
        key=key,
        cursor=cursor,
        user_id=column("user_id"),
        account_id=column("account_id"),
        traits=(column("email"), column("name"), column("created_at", "datetime"), *extra),
        anonymous_id=anonymous_id,
        url=url,
        timezone=timezone,
    )


def accounts(*extra: Field, timezone: str = "UTC") -> Mapping:
    """An account_identify mapping: key, user_id, account_id, then trait name and extras."""
    return Mapping(
        stream="workspaces",
        path="mappings/workspaces.yml",
        event_type="account_identify",
        source=Source(table="workspaces"),
        key=("id",),
        cursor=None,
        user_id=column("user_id"),
        account_id=column("account_id"),
        traits=(column("name"), *extra),
        timezone=timezone,
    )


def trait(value: Any, type: TraitType | None = None, tz: str = "UTC", **options: Any) -> Record:
    """The record of a workspace row whose trait `v` holds `value`."""
    mapping = accounts(column("v", type, **options), timezone=tz)
    return to_record((1, "u1", "w1", "Acme", value), mapping, tz=ZoneInfo(tz))


def value_of(record: Record) -> Any:
    """Trait `v` of a valid record."""
    assert record.payload is not None, record.reason
    return record.payload["traits"]["v"]


def reason_of(record: Record) -> str:
    """The reason of an invalid record."""
    assert record.payload is None, record.payload
    assert record.reason
    return record.reason


CREATED = dt.datetime(2021, 1, 20, 9, 55, 35, tzinfo=UTC)


# ---------------------------------------------------------------- payload shape


def test_row_becomes_the_payload_with_ids_and_traits() -> None:
    """A user row becomes user_id, account_id, an empty anonymous_id and its traits."""
    record = to_record((7, "u7", "w1", "ann@example.com", "Ann", CREATED), users())
    assert record.key == "7"
    assert record.cursor is None
    assert record.reason is None
    assert record.payload == {
        "user_id": "u7",
        "account_id": "w1",
        "anonymous_id": "",
        "traits": {
            "email": "ann@example.com",
            "name": "Ann",
            "created_at": "2021-01-20T09:55:35Z",
        },
    }
    assert record.canonical == canonical(record.payload)


def test_anonymous_id_and_url_come_from_their_columns() -> None:
    """A mapped anonymous_id and url are read after the ids, before the traits."""
    mapping = users(anonymous_id=column("anonymous_id"), url=column("url"))
    row = (7, "u7", "w1", "anon-9", "https://app.example.com/u/7", "a@x.io", "Ann", CREATED)
    payload = to_record(row, mapping).payload
    assert payload is not None
    assert payload["anonymous_id"] == "anon-9"
    assert payload["url"] == "https://app.example.com/u/7"
    assert payload["traits"]["email"] == "a@x.io"


def test_url_is_left_out_when_not_mapped_or_null() -> None:
    """Without a url mapping, or with a NULL url, the payload has no url key."""
    unmapped = to_record((7, "u7", "w1", "a@x.io", "Ann", CREATED), users()).payload
    mapping = users(url=column("url"))
    null = to_record((7, "u7", "w1", None, "a@x.io", "Ann", CREATED), mapping).payload
    assert unmapped is not None
    assert null is not None
    assert "url" not in unmapped
    assert "url" not in null


def test_constants_are_filled_in_without_a_column() -> None:
    """Constant traits and a constant url take no place in the row."""
    mapping = users(const("source_system", "postgres"), url=const("url", "https://app.example"))
    assert [f.name for f in mapping.selected_fields] == [
        "user_id",
        "account_id",
        "email",
        "name",
        "created_at",
    ]
    payload = to_record((7, "u7", "w1", "a@x.io", "Ann", CREATED), mapping).payload
    assert payload is not None
    assert payload["url"] == "https://app.example"
    assert payload["traits"]["source_system"] == "postgres"


def test_cursor_value_is_kept_on_the_record_not_in_the_payload() -> None:
    """The cursor column follows the key and is carried on the record only."""
    updated = dt.datetime(2024, 5, 1, 12, 0)
    record = to_record(
        (7, updated, "u7", "w1", "a@x.io", "Ann", CREATED), users(cursor="updated_at")
    )
    assert record.cursor == updated
    assert record.payload is not None
    assert record.payload["user_id"] == "u7"
    assert "updated_at" not in record.payload["traits"]


def test_default_replaces_null() -> None:
    """A NULL value takes the field's default, coerced like a real value."""
    record = to_record(
        (7, "u7", "w1", "a@x.io", "Ann", CREATED, None, None),
        users(column("plan", default="free"), column("seats", "number", default="5")),
    )
    assert record.payload is not None
    assert record.payload["traits"]["plan"] == "free"
    assert record.payload["traits"]["seats"] == 5


def test_null_trait_is_left_out_by_default() -> None:
    """With omit_null true (the default) a NULL trait is not in the payload."""
    assert trait(None).payload == {
        "user_id": "u1",
        "account_id": "w1",
        "anonymous_id": "",
        "traits": {"name": "Acme"},
    }


def test_null_trait_is_sent_as_null_when_omit_null_is_false() -> None:
    """With omit_null false a NULL trait is kept as None (JSON null)."""
    record = trait(None, omit_null=False)
    assert record.payload is not None
    assert record.payload["traits"] == {"name": "Acme", "v": None}
    assert record.canonical is not None
    assert b'"v":null' in record.canonical


def test_composite_key_becomes_a_json_array_of_texts() -> None:
    """A key of several columns is the compact JSON array of their texts."""
    mapping = users(key=("org_id", "id"))
    record = to_record((12, "a-7", "u7", "w1", "a@x.io", "Ann", CREATED), mapping)
    assert record.key == '["12","a-7"]'
    assert record.payload is not None


def test_single_key_is_the_text_of_its_value() -> None:
    """A UUID key is its text and a binary key its hex digits."""
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert to_record((uid, "u7", "w1", "a@x.io", "Ann", CREATED), users()).key == str(uid)
    assert to_record((b"\x01\xff", "u7", "w1", "a@x.io", "Ann", CREATED), users()).key == "01ff"


def test_key_with_a_lone_surrogate_is_escaped() -> None:
    """A key holding invalid UTF-8 read from SQLite is escaped, never an exception."""
    mapping = users(key=("org_id", "id"))
    record = to_record(("a\ud800", 1, "u7", "w1", "a@x.io", "Ann", CREATED), mapping)
    assert record.key == '["a\\\\ud800","1"]'
    record.key.encode("utf-8")


@pytest.mark.parametrize(
    ("key", "row_key"),
    [(("id",), (None,)), (("org_id", "id"), (12, None))],
    ids=["single", "composite"],
)
def test_null_key_makes_the_record_invalid(key: tuple[str, ...], row_key: tuple[Any]) -> None:
    """A NULL in any key column makes the record invalid."""
    record = to_record((*row_key, "u7", "w1", "a@x.io", "Ann", CREATED), users(key=key))
    assert reason_of(record) == "key column is NULL"


# ---------------------------------------------------------------- coercion: numbers


@pytest.mark.parametrize(
    ("value", "type", "expected"),
    [
        (Decimal("12"), None, 12),
        (Decimal("12.000"), "number", 12),
        (Decimal("12.50"), None, 12.5),
        (Decimal("-0.25"), "number", -0.25),
        (Decimal(2**53 - 1), None, 2**53 - 1),
        (7, None, 7),
        (2.5, "number", 2.5),
        ("42", "number", 42),
        (" 3.25 ", "number", 3.25),
        ("1e3", "number", 1000),
        (3.0, "integer", 3),
        ("4", "integer", 4),
        (Decimal("5.0"), "integer", 5),
    ],
)
def test_numbers_keep_their_value_and_integers_stay_integers(
    value: Any, type: TraitType | None, expected: float
) -> None:
    """Decimals, numeric text and floats become numbers; integral Decimals and text stay int."""
    result = value_of(trait(value, type))
    assert result == expected
    assert result.__class__ is expected.__class__


@pytest.mark.parametrize("type", [None, "number", "integer", "text"])
@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
    ],
    ids=repr,
)
def test_nan_and_infinity_make_the_record_invalid(value: Any, type: TraitType | None) -> None:
    """NaN and ±Infinity, float or Decimal, make the record invalid with the reason."""
    reason = reason_of(trait(value, type))
    assert reason.startswith("v: ")
    assert "is not a finite number" in reason


@pytest.mark.parametrize("text", ["nan", "Infinity", "-inf"])
def test_non_finite_numeric_text_is_invalid(text: str) -> None:
    """Text spelling NaN or Infinity is no number either."""
    assert "is not a finite number" in reason_of(trait(text, "number"))


@pytest.mark.parametrize(
    ("value", "type"),
    [
        (2**53, None),
        (-(2**53), "number"),
        (2**64, "integer"),
        (10**5000, None),
        (Decimal("9007199254740993"), None),
        (Decimal("1E+999999999"), "number"),
        ("1e20", "number"),
        (1e20, "integer"),
    ],
    ids=["2^53", "-2^53", "2^64", "10^5000", "decimal", "huge-exponent", "text", "float"],
)
def test_integers_beyond_2_53_make_the_record_invalid(value: Any, type: TraitType | None) -> None:
    """An integer a double cannot hold exactly is invalid, with the advice to map it as text."""
    reason = reason_of(trait(value, type))
    assert "beyond 2^53" in reason
    assert "type: text" in reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**64, "18446744073709551616"),
        (Decimal("12345678901234567890"), "12345678901234567890"),
        (Decimal("1E+20"), "100000000000000000000"),
        (Decimal("2.50"), "2.5"),
        (42, "42"),
        (True, "true"),
    ],
)
def test_type_text_keeps_every_digit_of_big_integers(value: Any, expected: str) -> None:
    """Mapped as text, a bigint or numeric(20) id keeps every digit, as the advice promises."""
    assert value_of(trait(value, "text")) == expected


def test_number_too_large_for_a_double_is_invalid() -> None:
    """A fractional Decimal past the range of a double is invalid, not sent as null."""
    reason = reason_of(trait(Decimal("1" + "0" * 400 + ".5"), "number"))
    assert "out of the range of a double" in reason


@pytest.mark.parametrize(
    ("value", "type", "words"),
    [
        ("twelve", "number", "is not a number"),
        (True, "number", "boolean is not a number"),
        (2.5, "integer", "is not an integer"),
        ([1], "number", "list value cannot be a number"),
    ],
)
def test_values_that_are_not_numbers_are_invalid(value: Any, type: TraitType, words: str) -> None:
    """Text, booleans and lists do not pass as numbers."""
    assert words in reason_of(trait(value, type))


# ---------------------------------------------------------------- coercion: booleans


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, False),
        (1, True),
        (Decimal(1), True),
        (True, True),
        ("t", True),
        ("f", False),
        ("false", False),
        (" TRUE ", True),
        ("yes", True),
        ("0", False),
        ("1", True),
    ],
)
def test_booleans_from_numbers_and_text(value: Any, expected: bool) -> None:
    """0/1, 't'/'f', 'true'/'false', 'yes' and '0'/'1' become JSON booleans."""
    assert value_of(trait(value, "boolean")) is expected


@pytest.mark.parametrize("value", [2, "maybe", "", 1.0, Decimal("sNaN"), [True]], ids=repr)
def test_other_values_are_not_booleans(value: Any) -> None:
    """Anything else typed boolean makes the record invalid."""
    assert "is not a boolean" in reason_of(trait(value, "boolean"))


def test_untyped_boolean_stays_a_boolean() -> None:
    """A Python bool without a declared type is sent as a JSON boolean, not 1."""
    assert value_of(trait(True)) is True


# ---------------------------------------------------------------- coercion: datetimes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2021, 1, 20, 9, 55, 35, tzinfo=UTC), "2021-01-20T09:55:35Z"),
        (
            dt.datetime(2021, 1, 20, 11, 55, 35, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2021-01-20T09:55:35Z",
        ),
        (dt.datetime(2021, 1, 20, 9, 55, 35, 120000, tzinfo=UTC), "2021-01-20T09:55:35.120000Z"),
        (dt.datetime(2021, 1, 20, 9, 55, 35), "2021-01-20T09:55:35Z"),
        (dt.date(2021, 1, 20), "2021-01-20T00:00:00Z"),
        (1611136535, "2021-01-20T09:55:35Z"),
    ],
    ids=["utc", "offset", "micro", "naive", "date", "epoch"],
)
def test_datetimes_become_utc_text_ending_in_z(value: Any, expected: str) -> None:
    """Datetimes are ISO-8601 in UTC with a Z; microseconds only when non-zero."""
    assert value_of(trait(value, "datetime")) == expected


def test_untyped_datetime_becomes_utc_text() -> None:
    """A datetime in an untyped trait is converted just like a typed one."""
    aware = dt.datetime(2021, 1, 20, 11, 55, 35, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert value_of(trait(aware)) == "2021-01-20T09:55:35Z"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2021, 1, 20, 10, 55, 35), "2021-01-20T09:55:35Z"),
        (dt.datetime(2021, 7, 20, 11, 55, 35), "2021-07-20T09:55:35Z"),
        (dt.datetime(2021, 10, 31, 2, 30, fold=0), "2021-10-31T00:30:00Z"),
        (dt.datetime(2021, 10, 31, 2, 30, fold=1), "2021-10-31T01:30:00Z"),
        ("2021-01-20 10:55:35", "2021-01-20T09:55:35Z"),
    ],
    ids=["winter", "summer", "fall-back-first", "fall-back-second", "text"],
)
def test_naive_datetimes_are_read_in_the_mapping_timezone(value: Any, expected: str) -> None:
    """Naive values are Europe/Berlin local time: CET, CEST, and both 02:30s of the fall-back."""
    assert value_of(trait(value, "datetime", tz="Europe/Berlin")) == expected


@given(
    value=st.datetimes(
        min_value=dt.datetime(2, 1, 1),
        max_value=dt.datetime(9998, 12, 31),
        timezones=st.sampled_from(
            [
                UTC,
                ZoneInfo("UTC"),
                ZoneInfo("Etc/UTC"),
                ZoneInfo("Europe/Berlin"),
                dt.timezone(dt.timedelta(hours=-5)),
            ]
        ),
    ),
    typed=st.booleans(),
)
def test_any_aware_datetime_is_its_utc_isoformat_with_z(value: dt.datetime, typed: bool) -> None:
    """Whatever its zone (psycopg's Etc/UTC included), a datetime is sent as
    isoformat() of the same instant in UTC, with Z for +00:00."""
    expected = value.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
    assert value_of(trait(value, "datetime" if typed else None)) == expected


def test_aware_datetimes_ignore_the_mapping_timezone() -> None:
    """A value that carries its own offset is not re-read in the stream's zone."""
    aware = dt.datetime(2021, 1, 20, 9, 55, 35, tzinfo=UTC)
    assert value_of(trait(aware, "datetime", tz="Europe/Berlin")) == "2021-01-20T09:55:35Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-01-20 09:55:35", "2021-01-20T09:55:35Z"),
        ("2021-01-20T09:55:35", "2021-01-20T09:55:35Z"),
        ("2021-01-20T09:55:35Z", "2021-01-20T09:55:35Z"),
        ("2021-01-20 09:55:35.123", "2021-01-20T09:55:35.123000Z"),
        ("2021-01-20 09:55:35.123456", "2021-01-20T09:55:35.123456Z"),
        ("2021-01-20T11:55:35+02:00", "2021-01-20T09:55:35Z"),
        ("2021-01-20 11:55:35.5+02:00", "2021-01-20T09:55:35.500000Z"),
        ("2021-01-20", "2021-01-20T00:00:00Z"),
        (" 2021-01-20 09:55:35 ", "2021-01-20T09:55:35Z"),
    ],
)
def test_text_timestamps_as_sqlite_apps_write_them(text: str, expected: str) -> None:
    """Space or T, Z, fractions and offsets in text timestamps all parse to UTC."""
    assert value_of(trait(text, "datetime")) == expected


@pytest.mark.parametrize("text", ["yesterday", "20/01/2021", "", "2021-13-01 00:00:00"])
def test_text_that_is_no_timestamp_is_invalid(text: str) -> None:
    """Text that is not ISO-8601 makes the record invalid."""
    assert "is not an ISO-8601 datetime" in reason_of(trait(text, "datetime"))


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        (dt.datetime(1, 1, 1), "UTC", "0001-01-01T00:00:00Z"),
        ("0001-01-01 00:00:00", "UTC", "0001-01-01T00:00:00Z"),
        (dt.datetime(999, 12, 31, 23, 59), "UTC", "0999-12-31T23:59:00Z"),
        (dt.datetime(1, 1, 1, 5), "Europe/Berlin", "0001-01-01T04:06:32Z"),
        (dt.datetime(1, 1, 1), "Europe/Berlin", None),
        (dt.datetime(9999, 12, 31, 23, 59, 59, 999999), "UTC", "9999-12-31T23:59:59.999999Z"),
        (dt.datetime(9999, 12, 31, 23, 30), "America/New_York", None),
        (dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-1))), "UTC", None),
        (10**400, "UTC", None),
        (2**70, "UTC", None),
    ],
    ids=[
        "year-1",
        "year-1-text",
        "year-999",
        "year-1-berlin-lmt",
        "before-year-1-in-utc",
        "year-9999",
        "after-year-9999-in-utc",
        "aware-after-9999",
        "huge-epoch",
        "big-epoch",
    ],
)
def test_extreme_years_give_iso_text_or_an_invalid_record(
    value: Any, tz: str, expected: str | None
) -> None:
    """Years 1 and 9999 give four-digit ISO text, or an invalid record when UTC leaves 1..9999."""
    record = trait(value, "datetime", tz=tz)
    if expected is None:
        assert reason_of(record).startswith("v: ")
    else:
        assert value_of(record) == expected
        assert ISO_UTC.match(expected)


# ---------------------------------------------------------------- coercion: dates, uuids


@pytest.mark.parametrize(
    ("value", "tz", "expected"),
    [
        (dt.date(2021, 1, 20), "UTC", "2021-01-20"),
        (dt.date(1, 1, 1), "UTC", "0001-01-01"),
        (dt.date(9999, 12, 31), "UTC", "9999-12-31"),
        (dt.datetime(2021, 1, 20, 23, 30), "UTC", "2021-01-20"),
        (dt.datetime(2021, 1, 20, 23, 30, tzinfo=UTC), "Europe/Berlin", "2021-01-21"),
        ("2021-01-20", "UTC", "2021-01-20"),
        ("2021-01-20 09:55:35", "UTC", "2021-01-20"),
    ],
)
def test_dates_become_yyyy_mm_dd(value: Any, tz: str, expected: str) -> None:
    """Dates, datetimes (aware ones on the stream's calendar) and date text become YYYY-MM-DD."""
    assert value_of(trait(value, "date", tz=tz)) == expected


def test_untyped_date_becomes_yyyy_mm_dd() -> None:
    """A date in an untyped trait is sent as YYYY-MM-DD."""
    assert value_of(trait(dt.date(2021, 1, 20))) == "2021-01-20"


@pytest.mark.parametrize("value", ["20th of January", 20210120.5, [2021]])
def test_values_that_are_not_dates_are_invalid(value: Any) -> None:
    """Text that is no date, and numbers or lists typed date, are invalid."""
    assert reason_of(trait(value, "date")).startswith("v: ")


@pytest.mark.parametrize("type", [None, "text"])
def test_uuid_becomes_its_text(type: TraitType | None) -> None:
    """A UUID value is sent as its canonical text."""
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert value_of(trait(uid, type)) == "12345678-1234-5678-1234-567812345678"


# ---------------------------------------------------------------- coercion: text and bytes


@pytest.mark.parametrize("value", [b"ann", bytearray(b"ann"), memoryview(b"ann")])
@pytest.mark.parametrize("type", [None, "text"])
def test_bytes_without_an_encoding_are_invalid(value: Any, type: TraitType | None) -> None:
    """Binary values are invalid unless the trait is type text with an encoding."""
    assert "binary value" in reason_of(trait(value, type))


@pytest.mark.parametrize(
    ("value", "encoding", "expected"),
    [
        (b"Ann \xf0\x9f\x98\x80", "utf-8", "Ann 😀"),
        (memoryview(b"caf\xc3\xa9"), "utf-8", "café"),
        (b"caf\xe9", "latin-1", "café"),
    ],
)
def test_bytes_with_an_encoding_are_decoded(value: Any, encoding: str, expected: str) -> None:
    """Type text with an encoding decodes binary values."""
    assert value_of(trait(value, "text", encoding=encoding)) == expected


def test_bytes_that_are_not_valid_in_the_encoding_are_invalid() -> None:
    """Invalid UTF-8 under encoding utf-8 makes the record invalid."""
    assert "is not valid utf-8" in reason_of(trait(b"caf\xe9", "text", encoding="utf-8"))


def test_decoded_nul_is_invalid() -> None:
    """A NUL decoded from bytes is refused like a NUL in text."""
    assert "NUL" in reason_of(trait(b"a\x00b", "text", encoding="utf-8"))


@pytest.mark.parametrize("type", [None, "text"])
@pytest.mark.parametrize(
    ("value", "words"),
    [("a\x00b", "NUL character"), ("caf\udce9", "not valid UTF-8"), ("\ud83d", "not valid UTF-8")],
    ids=["nul", "surrogateescape", "lone-high-surrogate"],
)
def test_nul_and_lone_surrogates_are_invalid(
    value: str, words: str, type: TraitType | None
) -> None:
    """Text with NUL characters or lone surrogates makes the record invalid."""
    assert words in reason_of(trait(value, type))


@pytest.mark.parametrize("type", [None, "text"])
def test_emoji_and_other_scripts_pass_unchanged(type: TraitType | None) -> None:
    """Astral-plane characters and non-Latin scripts are valid text, sent as UTF-8."""
    record = trait("Zoë 😀 東京 👩‍💻", type)
    assert value_of(record) == "Zoë 😀 東京 👩‍💻"
    assert record.canonical is not None
    assert "Zoë 😀 東京 👩‍💻".encode() in record.canonical


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2.5, "2.5"), (dt.date(2021, 1, 20), "2021-01-20"), (CREATED, "2021-01-20T09:55:35Z")],
)
def test_scalars_typed_text_become_their_text(value: Any, expected: str) -> None:
    """Numbers, dates and datetimes typed text are sent as their text."""
    assert value_of(trait(value, "text")) == expected


# ---------------------------------------------------------------- coercion: arrays, objects


@pytest.mark.parametrize(
    ("value", "type", "expected"),
    [
        (["a", "b"], "string_array", ["a", "b"]),
        (["a", 1, 1.5, True, Decimal("2"), uuid.UUID(int=1)], "string_array", None),
        (("x", "y"), "string_array", ["x", "y"]),
        ('["a", 2, false]', "string_array", ["a", "2", "false"]),
        ("[]", "string_array", []),
        (["a", 1], None, ["a", "1"]),
    ],
    ids=["list", "scalars", "tuple", "json-text", "empty", "untyped"],
)
def test_arrays_of_scalars_become_arrays_of_strings(
    value: Any, type: TraitType | None, expected: list[str] | None
) -> None:
    """Lists, tuples and JSON array text become arrays of strings, scalars stringified."""
    if expected is None:
        expected = ["a", "1", "1.5", "true", "2", "00000000-0000-0000-0000-000000000001"]
    assert value_of(trait(value, type)) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["a", ["b"]], "array element 1 is nested"),
        ([{"plan": "pro"}], "array element 0 is nested"),
        (["a", None], "array element 1 is null"),
        ('["a", null]', "array element 1 is null"),
        ('[["a"]]', "array element 0 is nested"),
        ('{"a": 1}', "dict value is not an array"),
        ("a,b", "is not a JSON array"),
        (["a\x00"], "NUL character"),
        ([math.nan], "is not a finite number"),
        ([b"a"], "binary value"),
        (7, "int value is not an array"),
    ],
)
def test_arrays_that_are_not_flat_arrays_of_scalars_are_invalid(value: Any, words: str) -> None:
    """Nested or null elements, objects and non-JSON text make the record invalid."""
    assert words in reason_of(trait(value, "string_array"))


@pytest.mark.parametrize("type", [None, "text"])
def test_objects_are_invalid(type: TraitType | None) -> None:
    """A dict (a JSON object column) makes the record invalid."""
    reason = reason_of(trait({"plan": "pro"}, type))
    assert reason.startswith("v: ")
    assert "dict" in reason or "nested object" in reason


# ---------------------------------------------------------------- validity


@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize(("position", "name"), [(1, "user_id"), (2, "account_id")])
def test_missing_or_empty_id_makes_the_record_invalid(position: int, name: str, value: Any) -> None:
    """A NULL or empty user_id or account_id makes the record invalid, naming the field."""
    row: list[Any] = [7, "u7", "w1", "a@x.io", "Ann", CREATED]
    row[position] = value
    assert reason_of(to_record(row, users())) == f"{name} is missing or empty"


@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize(("position", "name"), [(3, "email"), (4, "name"), (5, "created_at")])
def test_missing_or_empty_required_trait_makes_the_record_invalid(
    position: int, name: str, value: Any
) -> None:
    """A NULL or empty email, name or created_at makes a user record invalid, naming it."""
    row: list[Any] = [7, "u7", "w1", "a@x.io", "Ann", CREATED]
    row[position] = value
    record = to_record(row, users())
    reason = reason_of(record)
    assert name in reason
    assert "missing or empty" in reason or "not an ISO-8601 datetime" in reason


@pytest.mark.parametrize("value", [" ", "  \t\n", "\u00a0"])
@pytest.mark.parametrize(("position", "name"), [(3, "email"), (4, "name")])
def test_a_required_trait_of_only_whitespace_makes_the_record_invalid(
    position: int, name: str, value: str
) -> None:
    """Empty means empty: a required trait that is only whitespace is invalid, naming it."""
    row: list[Any] = [7, "u7", "w1", "a@x.io", "Ann", CREATED]
    row[position] = value
    assert reason_of(to_record(row, users())) == (
        f"required trait {name!r} is only whitespace ({value!r})"
    )


@pytest.mark.parametrize(("position", "name"), [(1, "user_id"), (2, "account_id")])
def test_an_id_of_only_whitespace_makes_the_record_invalid(position: int, name: str) -> None:
    """A user_id or account_id that is only whitespace is as unusable as an empty one."""
    row: list[Any] = [7, "u7", "w1", "a@x.io", "Ann", CREATED]
    row[position] = "  "
    assert reason_of(to_record(row, users())) == f"{name} is only whitespace"


def test_a_name_with_inner_spaces_is_valid() -> None:
    """Spaces around real characters are kept as sent: only all-whitespace is empty."""
    row: list[Any] = [7, "u7", "w1", "a@x.io", " Ann  Lee ", CREATED]
    assert to_record(row, users()).payload is not None


def test_account_requires_a_name() -> None:
    """An account record without a name is invalid."""
    record = to_record((1, "u1", "w1", None), accounts())
    assert reason_of(record) == "required trait 'name' is missing or empty"


@pytest.mark.parametrize(
    ("type", "value", "expected"),
    [(None, 42, "42"), ("integer", "42", "42"), ("text", b"u-42", "u-42")],
)
def test_ids_are_always_sent_as_text(type: TraitType | None, value: Any, expected: str) -> None:
    """An id column read as a number or bytes is still sent as a string (SPEC §2)."""
    encoding = "utf-8" if type == "text" else None
    mapping = Mapping(
        stream="users",
        path="users.yml",
        event_type="account_identify",
        source=Source(table="users"),
        key=("id",),
        cursor=None,
        user_id=Field("user_id", "column", "owner_id", type=type, encoding=encoding),
        account_id=column("account_id"),
        traits=(column("name"),),
    )
    payload = to_record((1, value, 9, "Acme"), mapping).payload
    assert payload is not None
    assert payload["user_id"] == expected
    assert payload["account_id"] == "9"


def test_invalid_id_value_names_the_field() -> None:
    """An id that cannot be text makes the record invalid, naming the id field."""
    record = to_record((7, b"\x00", "w1", "a@x.io", "Ann", CREATED), users())
    assert reason_of(record).startswith("user_id: binary value")


def test_event_over_32_kb_is_invalid_and_says_its_size() -> None:
    """A 100 KB text trait makes an invalid record whose reason gives the event's size."""
    big = "x" * 100_000
    mapping = accounts(column("notes"))
    transform = make_transformer(mapping, CONTEXT)
    record = transform((1, "u1", "w1", "Acme", big))
    unlimited = to_record((1, "u1", "w1", "Acme", big), mapping, max_payload_bytes=10**9)
    assert unlimited.payload is not None
    size = len(to_event(unlimited.payload, event_id=str(uuid.uuid4()), context=CONTEXT))
    assert reason_of(record) == (
        f"event is {size:,} bytes, over the 32 KB limit — drop or trim big traits"
    )
    assert size > 100_000


def test_event_of_exactly_32_kb_is_valid_and_one_byte_more_is_not() -> None:
    """The size limit applies to the whole serialized event, envelope included."""
    mapping = accounts(column("notes"))
    transform = make_transformer(mapping, CONTEXT)
    probe = transform((1, "u1", "w1", "Acme", ""))
    assert probe.payload is not None
    empty = len(to_event(probe.payload, event_id=str(uuid.uuid4()), context=CONTEXT))
    fits = transform((1, "u1", "w1", "Acme", "x" * (MAX_EVENT_BYTES - empty)))
    assert fits.payload is not None
    assert len(to_event(fits.payload, event_id=str(uuid.uuid4()), context=CONTEXT)) == 32 * 1024
    over = transform((1, "u1", "w1", "Acme", "x" * (MAX_EVENT_BYTES - empty + 1)))
    assert "event is 32,769 bytes" in reason_of(over)


# ---------------------------------------------------------------- events


def sample_event(payload: dict[str, Any], context: EventContext = CONTEXT) -> dict[str, Any]:
    """to_event's bytes for `payload`, parsed back."""
    eid = event_id(workspace_key="ws-1", event_type="account_identify", key="1", payload_hash="h")
    event: dict[str, Any] = json.loads(to_event(payload, event_id=eid, context=context))
    return event


def test_event_has_exactly_the_spec_fields_and_constants() -> None:
    """to_event writes the SPEC §2 fields with src, library and screen_resolution fixed."""
    record = make_transformer(accounts(column("seats", "number")), CONTEXT)(
        (1, "u1", "w1", "Acme", Decimal("5"))
    )
    assert record.payload is not None
    eid = event_id(workspace_key="ws-1", event_type="account_identify", key="1", payload_hash="h")
    assert sample_event(record.payload) == {
        "event_id": eid,
        "anonymous_id": "",
        "user_id": "u1",
        "account_id": "w1",
        "api_key": "ak-1",
        "workspace_key": "ws-1",
        "src": "hyperengage",
        "library": "http",
        "event_type": "account_identify",
        "traits": {"name": "Acme", "seats": 5},
        "screen_resolution": "0",
    }


def test_event_has_url_only_when_the_payload_has_one() -> None:
    """The url field is written when mapped and omitted when absent."""
    payload = {"user_id": "u", "account_id": "a", "anonymous_id": "x", "traits": {"name": "n"}}
    assert set(sample_event(payload)) == EVENT_FIELDS
    with_url = sample_event({**payload, "url": "https://app.example"})
    assert set(with_url) == EVENT_FIELDS | {"url"}
    assert with_url["url"] == "https://app.example"
    assert with_url["anonymous_id"] == "x"


def test_event_type_comes_from_the_context() -> None:
    """A user stream's context makes user_identify events."""
    context = EventContext(event_type="user_identify", api_key="ak", workspace_key="wk")
    payload = {"user_id": "u", "account_id": "a", "anonymous_id": "", "traits": {}}
    event = sample_event(payload, context)
    assert event["event_type"] == "user_identify"
    assert (event["api_key"], event["workspace_key"]) == ("ak", "wk")


def test_event_bytes_start_with_a_brace() -> None:
    """An event is compact JSON starting with `{`, no BOM or whitespace."""
    payload = {"user_id": "u", "account_id": "a", "anonymous_id": "", "traits": {"n": "😀"}}
    body = to_event(payload, event_id="e", context=CONTEXT)
    assert body.startswith(b'{"event_id":"e",')
    assert b": " not in body
    assert "😀".encode() in body


ID_PARTS = {
    "workspace_key": "ws-1",
    "event_type": "user_identify",
    "key": "7",
    "payload_hash": "ab",
    "previous": "",
}


def test_event_id_is_a_deterministic_uuid5() -> None:
    """The same workspace, event type, key, payload hash and previous id always give the
    same UUIDv5, computed as uuid.uuid5 would."""
    first = event_id(**ID_PARTS)
    assert uuid.UUID(first).version == 5
    assert str(uuid.UUID(first)) == first
    assert event_id(**ID_PARTS) == first
    name = "\x1f".join(ID_PARTS.values())
    assert first == str(uuid.uuid5(uuid.UUID("6f1c1a52-3c0e-4f43-9a43-1d2f6b7e0c11"), name))


@given(parts=st.lists(st.text(st.characters(blacklist_categories=["Cs"])), min_size=5, max_size=5))
def test_a_streams_event_ids_are_uuid5(parts: list[str]) -> None:
    """event_ids (one stream's ids, as the sender makes them) gives uuid.uuid5 of the
    five parts joined, for any text."""
    workspace_key, event_type, key, payload_hash, previous = parts
    ids = event_ids(workspace_key=workspace_key, event_type=event_type)
    name = "\x1f".join(parts)
    expected = str(uuid.uuid5(uuid.UUID("6f1c1a52-3c0e-4f43-9a43-1d2f6b7e0c11"), name))
    assert ids(key, payload_hash, previous) == expected


def test_a_payload_that_returns_chains_a_new_event_id() -> None:
    """free -> pro -> free: the second `free` chains the `pro` event's id, so it is a new
    event id that a downstream de-duplication cannot drop (SPEC §2)."""
    free = event_id(**{**ID_PARTS, "payload_hash": "free"})
    pro = event_id(**{**ID_PARTS, "payload_hash": "pro", "previous": free})
    free_again = event_id(**{**ID_PARTS, "payload_hash": "free", "previous": pro})
    assert len({free, pro, free_again}) == 3


@pytest.mark.parametrize("part", sorted(ID_PARTS))
def test_event_id_changes_when_any_part_changes(part: str) -> None:
    """Changing any one of the five inputs gives another event id."""
    assert event_id(**{**ID_PARTS, part: ID_PARTS[part] + "x"}) != event_id(**ID_PARTS)


def test_event_id_parts_cannot_run_into_each_other() -> None:
    """Moving text from one part to the next gives another id."""
    one = event_id(workspace_key="ab", event_type="c", key="1", payload_hash="h")
    two = event_id(workspace_key="a", event_type="bc", key="1", payload_hash="h")
    assert one != two


def test_transformer_reads_naive_values_in_the_mapping_timezone() -> None:
    """make_transformer binds the mapping's time zone."""
    mapping = accounts(column("v", "datetime"), timezone="Europe/Berlin")
    record = make_transformer(mapping, CONTEXT)((1, "u1", "w1", "Acme", dt.datetime(2021, 7, 1)))
    assert record.payload is not None
    assert record.payload["traits"]["v"] == "2021-06-30T22:00:00Z"


# ---------------------------------------------------------------- canonical


def test_canonical_is_sorted_compact_utf8() -> None:
    """canonical() sorts keys at every level, has no spaces, and writes UTF-8 unescaped."""
    payload = {"user_id": "u", "traits": {"b": 1, "a": [" x", "é"], "c": 1.0}, "account_id": "a"}
    assert canonical(payload) == (
        '{"account_id":"a","traits":{"a":[" x","é"],"b":1,"c":1.0},"user_id":"u"}'.encode()
    )


def test_canonical_does_not_depend_on_insertion_order() -> None:
    """Two equal payloads built in different orders give the same bytes."""
    one = {"a": 1, "traits": {"x": True, "y": None}}
    two = {"traits": {"y": None, "x": True}, "a": 1}
    assert canonical(one) == canonical(two)


def test_canonical_tells_1_from_1_0_from_true() -> None:
    """Values equal in Python but not in JSON give different bytes."""
    texts = {canonical({"v": value}) for value in (1, 1.0, True)}
    assert texts == {b'{"v":1}', b'{"v":1.0}', b'{"v":true}'}


# ---------------------------------------------------------------- any row


def _with_surrogate(text: str) -> str:
    return text + "\udc80"


def _power_of_ten(digits: int) -> int:
    # built on draw: hypothesis cannot repr() a strategy holding 10**5000
    magnitude: int = 10 ** abs(digits)
    return -magnitude if digits < 0 else magnitude


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**70),
    st.sampled_from([5000, -400, 64]).map(_power_of_ten),  # 10**5000: str() refuses it
    st.floats(),
    st.decimals(),
    st.sampled_from(
        [Decimal("sNaN"), Decimal("-Infinity"), Decimal("1E+999999999"), Decimal("-0")]
    ),
    st.text(),
    st.text().map(_with_surrogate),
    st.sampled_from(
        [
            "",
            "a\x00b",
            "😀",
            "t",
            "false",
            "1.5",
            "nan",
            "1e999999999",
            "2021-01-20 09:55:35",
            "2021-01-20T09:55:35.5+02:00",
            "0001-01-01 00:00:00",
            '["a", 1, true]',
            '["a", null]',
            '{"a": 1}',
        ]
    ),
    st.binary(max_size=8),
    st.datetimes(),
    st.datetimes(timezones=st.timezones()),
    st.dates(),
    st.times(),
    st.uuids(),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.lists(st.lists(st.text(max_size=2), max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
ids = st.one_of(st.just("u1"), scalars)
EVERY_TYPE: tuple[Field, ...] = (
    column("untyped"),
    column("kept", omit_null=False),
    column("defaulted", "number", default=0),
    column("encoded", "text", encoding="utf-8"),
    const("constant", "postgres"),
    *(column(f"as_{name}", name) for name in TRAIT_TYPES),
)
PROPERTY_MAPPINGS = [
    Mapping(
        stream="any",
        path="any.yml",
        event_type="account_identify",
        source=Source(table="t"),
        key=("org", "id"),
        cursor="updated_at",
        user_id=column("user_id"),
        account_id=column("account_id"),
        traits=(column("name"), *EVERY_TYPE),
        anonymous_id=column("anonymous_id"),
        url=column("url"),
        timezone=timezone,
    )
    for timezone in ("UTC", "Europe/Berlin", "America/New_York", "Pacific/Kiritimati")
]
TYPES = {field.name: field.type for field in EVERY_TYPE}
SCALAR_TYPES = (bool, int, float, str)


def _check_trait(name: str, value: Any) -> None:
    """One trait of a valid event is what SPEC §2 allows for its type."""
    if value is None:
        assert name == "kept"
        return
    if isinstance(value, list):
        assert all(isinstance(item, str) for item in value)
    else:
        assert isinstance(value, SCALAR_TYPES)
    kind = TYPES.get(name)
    if kind == "datetime":
        assert ISO_UTC.match(value)
        assert dt.datetime.fromisoformat(value).tzinfo == UTC
    elif kind == "date":
        assert ISO_DATE.match(value)
        dt.date.fromisoformat(value)
    elif kind in ("number", "integer"):
        assert isinstance(value, int | float)
        assert not isinstance(value, bool)
        assert math.isfinite(value)
        assert abs(value) <= 2**53 or isinstance(value, float)
    elif kind == "boolean":
        assert isinstance(value, bool)
    elif kind in ("text", "string_array"):
        assert isinstance(value, str if kind == "text" else list)
    if isinstance(value, int) and not isinstance(value, bool):
        assert abs(value) <= 2**53


SAFE_INTS = st.integers(-(2**53) + 1, 2**53 - 1)
FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
CLEAN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))
# Values a column of each type plausibly holds: rows made of them are mostly valid.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "untyped": st.one_of(
        st.booleans(),
        SAFE_INTS,
        FINITE_FLOATS,
        CLEAN_TEXT,
        st.datetimes(),
        st.dates(),
        st.uuids(),
        st.lists(CLEAN_TEXT, max_size=3),
    ),
    "text": st.one_of(CLEAN_TEXT, st.integers(), st.uuids(), st.datetimes()),
    "encoded": CLEAN_TEXT.map(str.encode),
    "number": st.one_of(
        SAFE_INTS,
        FINITE_FLOATS,
        st.decimals(allow_nan=False, allow_infinity=False),
        SAFE_INTS.map(str),
    ),
    "integer": st.one_of(SAFE_INTS, SAFE_INTS.map(Decimal)),
    "boolean": st.one_of(st.booleans(), st.sampled_from([0, 1, "t", "f", "true", "false"])),
    "datetime": st.one_of(
        st.datetimes(), st.datetimes(timezones=st.timezones()), st.datetimes().map(str)
    ),
    "date": st.one_of(st.dates(), st.dates().map(str)),
    "string_array": st.one_of(
        st.lists(st.one_of(CLEAN_TEXT, SAFE_INTS), max_size=3),
        st.lists(CLEAN_TEXT, max_size=3).map(json.dumps),
    ),
}
PLAUSIBLE_ID = st.one_of(CLEAN_TEXT.filter(bool), st.integers(), st.uuids())


def _plausible(field: Field) -> st.SearchStrategy[Any]:
    """A value a column behind `field` plausibly holds, NULL included."""
    kind = "encoded" if field.encoding else (field.type or "untyped")
    return st.one_of(st.none(), PLAUSIBLE[kind])


SELECTED_TRAITS = [field for field in EVERY_TYPE if field.kind != "const"]
# key (2 columns), cursor, user_id, account_id, anonymous_id, url, name, then the rest
plausible_rows = st.tuples(
    st.integers(),
    CLEAN_TEXT,
    st.datetimes(),
    *([PLAUSIBLE_ID] * 4),
    CLEAN_TEXT.filter(bool),
    *(_plausible(field) for field in SELECTED_TRAITS),
)
wild_rows = st.tuples(*([scalars] * 3), *([ids] * 5), *(values for _ in SELECTED_TRAITS))


def _one_wild(row_index_value: tuple[tuple[Any, ...], int, Any]) -> tuple[Any, ...]:
    """A plausible row with one value replaced by anything at all."""
    row, index, value = row_index_value
    return (*row[:index], value, *row[index + 1 :])


one_wild_rows = st.tuples(plausible_rows, st.integers(0, 7 + len(SELECTED_TRAITS)), values).map(
    _one_wild
)


@settings(max_examples=300, deadline=None)
@given(
    mapping=st.sampled_from(PROPERTY_MAPPINGS),
    row=st.one_of(plausible_rows, one_wild_rows, wild_rows),
)
def test_any_row_becomes_a_valid_event_or_an_invalid_record(
    mapping: Mapping, row: tuple[Any, ...]
) -> None:
    """Any row gives a SPEC §2 event or an invalid record with a reason, never an exception."""
    assert len(row) == 3 + len(mapping.selected_fields)
    cursor = row[2]
    record = make_transformer(mapping, CONTEXT)(row)
    assert isinstance(record.key, str)
    record.key.encode("utf-8")
    assert record.cursor is cursor
    event("valid" if record.valid else "invalid")
    if record.payload is None:
        assert record.reason
        assert record.canonical is None
        return
    assert record.reason is None
    assert record.canonical == canonical(record.payload)
    body = to_event(record.payload, event_id=str(uuid.uuid4()), context=CONTEXT)
    assert len(body) <= MAX_EVENT_BYTES
    sent = json.loads(body)
    assert set(sent) in (EVENT_FIELDS, EVENT_FIELDS | {"url"})
    for field in EVENT_FIELDS - {"traits"}:
        assert isinstance(sent[field], str)
    assert sent["user_id"]
    assert sent["account_id"]
    assert sent["traits"]["name"] not in (None, "")
    assert sent["traits"]["constant"] == "postgres"
    for trait_name, value in sent["traits"].items():
        _check_trait(trait_name, value)
    assert orjson.loads(record.canonical) == record.payload


@given(
    traits=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.text(max_size=20),
            st.integers(-(2**63), 2**63 - 1),
            st.booleans(),
            st.lists(st.text()),
        ),
        max_size=5,
    ),
    url=st.one_of(st.none(), st.text(max_size=10)),
    ids=st.tuples(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10)),
)
@settings(max_examples=150)
def test_the_event_made_from_canonical_bytes_is_the_same_event(
    traits: dict[str, Any], url: str | None, ids: tuple[str, str]
) -> None:
    """event_body (from the canonical payload's bytes) is the same JSON object as
    to_event (from the payload), Unicode, url or not, with the same event_id."""
    payload: dict[str, Any] = {
        "anonymous_id": "",
        "user_id": ids[0],
        "account_id": ids[1],
        "traits": traits,
    }
    if url is not None:
        payload["url"] = url
    eid = str(uuid.uuid4())
    body = event_body(canonical(payload), event_id=eid, context=CONTEXT)
    assert body.startswith(b"{")
    assert orjson.loads(body) == orjson.loads(to_event(payload, event_id=eid, context=CONTEXT))
