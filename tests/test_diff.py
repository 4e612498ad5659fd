"""diff: each record's verdict against what was last sent, and what changed field by field."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.model import Record
from etl.run.diff import (
    ABSENT,
    changes,
    field_changes,
    fingerprint,
    row_fingerprint,
    row_fingerprints,
)
from etl.run.transform import canonical
from etl.state.store import LastSent


def payload(traits: dict[str, Any], **ids: str) -> dict[str, Any]:
    """A payload as transform builds it: ids (u1/w1 unless given) and traits."""
    return {"user_id": "u1", "account_id": "w1", "anonymous_id": "", **ids, "traits": traits}


def record(key: str, traits: dict[str, Any], **ids: str) -> Record:
    """A valid record with its canonical bytes."""
    body = payload(traits, **ids)
    return Record(key=key, cursor=None, payload=body, canonical=canonical(body))


def invalid(key: str, reason: str = "email: text contains a NUL character") -> Record:
    """An invalid record, as transform makes it."""
    return Record(key=key, cursor=None, payload=None, reason=reason)


def sent(previous: Record, *, with_payload: bool = True) -> LastSent:
    """What the state store remembers after `previous` was acknowledged."""
    assert previous.canonical is not None
    body = previous.canonical if with_payload else None
    return LastSent(hash=fingerprint(previous.canonical), payload=body)


FREE = {"name": "Acme", "plan": "free", "seats": 5}
PRO = {"name": "Acme", "plan": "pro", "seats": 5}


# ---------------------------------------------------------------- verdicts


def test_a_key_never_sent_is_new() -> None:
    """A valid record whose key the state store does not know is new, with its hash."""
    fresh = record("1", FREE)
    [change] = changes([fresh], {})
    assert change.kind == "new"
    assert change.record is fresh
    assert fresh.canonical is not None
    assert change.hash == fingerprint(fresh.canonical)
    assert change.old is None
    assert change.fields == {}


def test_the_same_payload_is_unchanged() -> None:
    """A record whose payload hash equals the last-sent hash is unchanged."""
    again = record("1", dict(reversed(FREE.items())))
    [change] = changes([again], {"1": sent(record("1", FREE))})
    assert change.kind == "unchanged"
    assert change.hash == sent(record("1", FREE)).hash
    assert change.fields == {}


def test_a_different_payload_is_changed_with_its_old_payload_and_fields() -> None:
    """A record whose hash differs is changed, with the old payload and the differing fields."""
    now = record("1", PRO)
    [change] = changes([now], {"1": sent(record("1", FREE))})
    assert change.kind == "changed"
    assert now.canonical is not None
    assert change.hash == fingerprint(now.canonical)
    assert change.old == payload(FREE)
    assert change.fields == {"plan": ("free", "pro")}


def test_a_change_without_the_stored_payload_has_no_field_detail() -> None:
    """When only the hash was kept, a change is reported without old payload or fields."""
    [change] = changes([record("1", PRO)], {"1": sent(record("1", FREE), with_payload=False)})
    assert change.kind == "changed"
    assert change.old is None
    assert change.fields == {}


def test_an_invalid_record_passes_through_as_invalid() -> None:
    """Invalid records are reported as invalid, whatever was sent for their key."""
    bad = invalid("1")
    [change] = changes([bad], {"1": sent(record("1", FREE))})
    assert change.kind == "invalid"
    assert change.record is bad
    assert change.record.reason == "email: text contains a NUL character"
    assert change.hash is None


def test_verdicts_come_in_record_order_each_against_its_own_key() -> None:
    """A mixed page gives one verdict per record, in order, each against its key's state."""
    last = {"2": sent(record("2", FREE)), "3": sent(record("3", FREE))}
    page = [record("1", FREE), record("2", FREE), record("3", PRO), invalid("4")]
    verdicts = [(change.record.key, change.kind) for change in changes(page, last)]
    assert verdicts == [("1", "new"), ("2", "unchanged"), ("3", "changed"), ("4", "invalid")]


def test_changes_streams_one_record_at_a_time() -> None:
    """changes() is lazy: it gives verdicts from an endless stream of records."""

    def endless() -> Iterator[Record]:
        for n in itertools.count():
            yield record(str(n), FREE)

    first = list(itertools.islice(changes(endless(), {}), 3))
    assert [(c.record.key, c.kind) for c in first] == [("0", "new"), ("1", "new"), ("2", "new")]


# ---------------------------------------------------------------- field changes


def test_field_changes_lists_only_the_fields_that_differ() -> None:
    """Equal traits and ids are left out; differing ones map to (old, new)."""
    old = payload({"name": "Acme", "plan": "free", "seats": 5, "tags": ["a", "b"]})
    new = payload({"name": "Acme", "plan": "pro", "seats": 6, "tags": ["a", "b"]})
    assert field_changes(old, new) == {"plan": ("free", "pro"), "seats": (5, 6)}


def test_field_changes_include_id_fields() -> None:
    """A changed user_id or anonymous_id is reported like a trait."""
    old = payload(FREE, user_id="u1", anonymous_id="")
    new = payload(FREE, user_id="u2", anonymous_id="anon-7")
    assert field_changes(old, new) == {"user_id": ("u1", "u2"), "anonymous_id": ("", "anon-7")}


def test_a_field_missing_on_one_side_is_absent() -> None:
    """A trait or url present on only one side has ABSENT on the other."""
    old = payload({"name": "Acme", "plan": "free"})
    new = payload({"name": "Acme", "seats": 5}, url="https://app.example")
    assert field_changes(old, new) == {
        "url": (ABSENT, "https://app.example"),
        "plan": ("free", ABSENT),
        "seats": (ABSENT, 5),
    }
    assert repr(ABSENT) == "ABSENT"


def test_a_null_trait_is_not_an_absent_one() -> None:
    """A trait sent as null (omit_null false) differs from a trait left out."""
    assert field_changes(payload({"plan": None}), payload({})) == {"plan": (None, ABSENT)}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (1, 1.0),
        (1, True),
        (1.0, True),
        (0, False),
        (0.0, -0.0),
        ("1", 1),
        ([], ""),
        (["1"], [1]),
        (["a", "b"], ["b", "a"]),
        (None, ""),
    ],
)
def test_values_equal_in_python_but_not_in_json_are_a_change(old: Any, new: Any) -> None:
    """field_changes tells 1 from 1.0 from true (and 0.0 from -0.0), as the hash does."""
    assert field_changes(payload({"v": old}), payload({"v": new})) == {"v": (old, new)}
    assert canonical(payload({"v": old})) != canonical(payload({"v": new}))


@pytest.mark.parametrize("value", [1, 1.5, True, None, "", "é😀", ["a", "b"], []])
def test_equal_json_values_are_no_change(value: Any) -> None:
    """The same value of the same JSON type on both sides is not reported."""
    assert field_changes(payload({"v": value}), payload({"v": value})) == {}


def test_changed_fields_reflect_the_json_round_trip_of_the_stored_payload() -> None:
    """A float that looks whole is still a float after the state store round trip."""
    [change] = changes(
        [record("1", {"name": "Acme", "v": 1})],
        {"1": sent(record("1", {"name": "Acme", "v": 1.0}))},
    )
    assert change.kind == "changed"
    assert change.fields == {"v": (1.0, 1)}
    assert isinstance(change.fields["v"][0], float)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_128_bit_hex() -> None:
    """A fingerprint is 32 lowercase hex digits."""
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint(canonical(payload(FREE))))


def test_equal_canonical_payloads_have_equal_fingerprints() -> None:
    """Payloads equal as canonical JSON, whatever their key order, share a fingerprint."""
    one = payload({"name": "Acme", "plan": "free"})
    two = {"traits": {"plan": "free", "name": "Acme"}, "anonymous_id": "", "account_id": "w1"}
    two["user_id"] = "u1"
    assert canonical(one) == canonical(two)
    assert fingerprint(canonical(one)) == fingerprint(canonical(two))


@pytest.mark.parametrize(
    "other",
    [
        payload({**FREE, "seats": 5.0}),
        payload({**FREE, "plan": "Free"}),
        payload({**FREE, "extra": None}),
        payload(FREE, user_id="u2"),
        payload(FREE, url=""),
    ],
    ids=["float", "case", "null-trait", "user-id", "url"],
)
def test_any_difference_changes_the_fingerprint(other: dict[str, Any]) -> None:
    """Changing any value, its JSON type, or adding a key gives another fingerprint."""
    assert fingerprint(canonical(other)) != fingerprint(canonical(payload(FREE)))


# ---------------------------------------------------------------- property


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=5),
    st.lists(st.text(st.characters(codec="utf-8"), max_size=3), max_size=3),
)
trait_dicts = st.dictionaries(st.sampled_from(["name", "plan", "seats", "tags"]), json_values)
id_values = st.sampled_from(["", "u1", "u2"])


@settings(max_examples=300, deadline=None)
@given(
    old_traits=trait_dicts,
    new_traits=trait_dicts,
    old_user=id_values,
    new_user=id_values,
)
def test_verdicts_and_field_changes_agree_with_canonical_json(
    old_traits: dict[str, Any], new_traits: dict[str, Any], old_user: str, new_user: str
) -> None:
    """A record is unchanged exactly when its canonical JSON is, and then no field differs."""
    before = record("k", old_traits, user_id=old_user)
    after = record("k", new_traits, user_id=new_user)
    [change] = changes([after], {"k": sent(before)})
    same = before.canonical == after.canonical
    assert change.kind == ("unchanged" if same else "changed")
    assert before.payload is not None
    assert after.payload is not None
    fields = field_changes(before.payload, after.payload)
    assert (fields == {}) is same
    if not same:
        assert change.fields == fields
    for name, (old, new) in fields.items():
        sides = [side if side is ABSENT else canonical({"v": side}) for side in (old, new)]
        assert sides[0] != sides[1], name


# ---------------------------------------------------------------- row digests


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((1, None), (1, float("nan"))),
        ((1, 1), (1, 1.0)),
        ((1, 1), (1, True)),
        ((1, "1"), (1, 1)),
        ((dt.datetime(2024, 1, 1),), (dt.datetime(2024, 1, 1, tzinfo=dt.UTC),)),
        ((Decimal("1.0"),), (Decimal("1.00"),)),
        ((b"ab",), ("6162",)),
        ((["a", "b"],), (["a,b"],)),
        ((2**70,), (2**70 + 1,)),
    ],
)
def test_row_digests_tell_apart_rows_that_could_map_differently(
    a: tuple[Any, ...], b: tuple[Any, ...]
) -> None:
    """Values JSON would confuse (NaN and NULL, 1 and 1.0 and true) get different digests."""
    assert row_fingerprint(a, b"salt") != row_fingerprint(b, b"salt")


def test_row_digests_are_stable_and_salted() -> None:
    """The same row gives the same digest; another mapping (salt) gives another."""
    row = ("k1", dt.datetime(2024, 1, 1, tzinfo=dt.UTC), {"plan": "pro"}, [1, 2], None, True)
    assert row_fingerprint(row, b"m1") == row_fingerprint(tuple(row), b"m1")
    assert row_fingerprint(row, b"m1") != row_fingerprint(row, b"m2")


row_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.binary(max_size=8),
    st.decimals(),
    st.datetimes(timezones=st.sampled_from([None, dt.UTC])),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(row_values, min_size=3, max_size=3).map(tuple), max_size=6))
def test_a_pages_row_digests_are_each_rows_digest(rows: list[tuple[Any, ...]]) -> None:
    """row_fingerprints (a page at a time) gives row_fingerprint of each row, floats,
    bytes, big integers and NULLs included."""
    assert row_fingerprints(rows, b"salt") == [row_fingerprint(row, b"salt") for row in rows]
