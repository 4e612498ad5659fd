"""Full reads, `full_every` and gone keys as pure parts (SPEC §9): the plan's
decision, the flat-memory key set, and the gone changes `on_gone` makes."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from memory_state import MemoryState
from test_run_core import WORKSPACES, mapping, row, send_all

from etl.model import BatchResult, Change, Mapping
from etl.run.classify import ClassifiedPage, Counts, classify
from etl.run.gone import SeenKeys, with_gone
from etl.run.ledger import Ledger
from etl.run.options import RunOptions
from etl.run.plan import StreamPlan, full_every_due, plan_stream
from etl.run.send import events
from etl.state.store import Sent, StateStore, StreamState

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)
ON_GONE = "\nfull_every: 1d\non_gone:\n  traits: {deleted: true}\n"


def state_at(m: Mapping, *, first: dt.datetime | None, full: dt.datetime | None) -> StreamState:
    return StreamState(
        "workspaces", NOW, m.fingerprint, None, NOW, full_read_at=full, first_run_at=first
    )


def plan_of(m: Mapping, previous: StreamState | None, **options: object) -> StreamPlan:
    return plan_stream(
        m,
        previous,
        options=RunOptions(**options),  # type: ignore[arg-type]
        api_key="ak",
        workspace_key="ws",
        now=NOW,
    )


def test_full_every_counts_from_the_last_full_read_else_the_first_run() -> None:
    """Due when the last full read (or, before any, the first run) is older than
    full_every; never without a clock or with `never`."""
    mapping_text = WORKSPACES + "full_every: 1d\n"
    m = mapping(mapping_text)
    day = dt.timedelta(days=1)
    assert full_every_due(m, state_at(m, first=NOW - 2 * day, full=None), NOW)
    assert not full_every_due(m, state_at(m, first=NOW - 2 * day, full=NOW - day / 2), NOW)
    assert full_every_due(m, state_at(m, first=NOW, full=NOW - day), NOW)
    assert not full_every_due(m, state_at(m, first=None, full=None), NOW)
    assert not full_every_due(m, None, NOW)
    never = mapping(mapping_text.replace("1d", "never"))
    assert not full_every_due(never, state_at(never, first=NOW - 9 * day, full=None), NOW)


def test_a_due_sync_is_a_full_read_and_a_remap_or_a_resumed_backfill_is_not() -> None:
    """full_every turns an incremental plan into a key-order full read that finds gone
    keys; the re-read after a mapping change is not a full read; a backfill resumed
    after a checkpoint restarts the clock but cannot find gone keys."""
    m = mapping(WORKSPACES + "full_every: 1d\n")
    due = plan_of(m, state_at(m, first=NOW - dt.timedelta(days=3), full=None))
    assert (due.order, due.full_every_due, due.full_read, due.finds_gone) == (
        "key",
        True,
        True,
        True,
    )
    fresh = plan_of(m, state_at(m, first=NOW, full=None))
    assert (fresh.order, fresh.full_read) == ("cursor", False)
    changed = StreamState("workspaces", NOW, "other", None, NOW, first_run_at=NOW)
    remap = plan_of(m, changed)
    assert (remap.order, remap.since, remap.mapping_changed, remap.full_read) == (
        "cursor",
        None,
        True,
        False,
    )
    resumed = plan_of(
        m,
        StreamState("workspaces", NOW, m.fingerprint, ["w5"], NOW),
        mode="backfill",
    )
    assert (resumed.full_read, resumed.finds_gone) == (True, False)


def test_seen_keys_answer_exactly_whatever_the_collation() -> None:
    """Keys that collations order differently (case, accents, digits as text) are found
    or missing exactly: no common sort order is needed."""
    seen = SeenKeys()
    try:
        seen.add(["a", "B", "é", "10", "2", "ß", '[1,"x"]'])
        asked = ["b", "B", "e", "é", "2", "10", "1", "ss", "ß", '[1,"x"]', "A"]
        assert seen.missing(asked) == ["b", "e", "1", "ss", "A"]
        assert seen.missing([]) == []
    finally:
        seen.close()


def test_gone_keys_get_the_on_gone_payload_once() -> None:
    """A key sent before and absent from a full read becomes a gone change carrying its
    last payload with on_gone's traits; once that payload is stored, the next full
    read counts it gone and sends nothing."""
    m = mapping(WORKSPACES + ON_GONE)
    state = MemoryState()
    plan = plan_of(m, None, mode="full")
    send_all(state, plan, [[row(1), row(2), row(3)]])

    def full_read() -> tuple[list[ClassifiedPage], Counts]:
        counts = Counts()
        pages = classify(iter([[row(1), row(3)]]), plan=plan, state=state, counts=counts)
        read = list(with_gone(pages, plan=plan, state=state, counts=counts, stop=threading.Event()))
        return read, counts

    pages, counts = full_read()
    gone = [c for page in pages for c, _, _ in page.changes if c.kind == "gone"]
    assert counts.gone == 1
    assert [c.record.key for c in gone] == ["w2"]
    payload = gone[0].record.payload
    assert payload is not None
    assert payload["traits"] == {"name": "Acme", "plan": "free", "deleted": True}
    assert (payload["user_id"], payload["account_id"]) == ("u2", "w2")
    assert gone[0].previous_event_id == state.records["workspaces", "w2"].event_id
    # as if sent: the stored payload becomes the gone payload
    send_all_gone(state, plan, gone)
    pages, counts = full_read()
    again = [c for page in pages for c, _, _ in page.changes if c.kind == "gone"]
    assert counts.gone == 1
    assert [c.record.payload for c in again] == [None]


def test_a_stream_never_sent_before_has_nothing_gone_and_keeps_no_key_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first backfill: every key the state store will hold is one this read sends,
    so with_gone passes the pages on as they are, without noting a key; once a key
    was sent, the next full read notes them again and finds what is gone."""
    m = mapping(WORKSPACES + ON_GONE)
    state = MemoryState()
    plan = plan_of(m, None, mode="full")
    noted: list[list[str]] = []
    monkeypatch.setattr(SeenKeys, "add", lambda self, keys: noted.append(keys))
    counts = Counts()
    pages = classify(iter([[row(1), row(2)]]), plan=plan, state=state, counts=counts)
    read = list(with_gone(pages, plan=plan, state=state, counts=counts, stop=threading.Event()))
    assert [key for page in read for key, _ in page.keyed] == ["w1", "w2"]
    assert (noted, counts.gone) == ([], 0)
    send_all(state, plan, [[row(1)]])
    monkeypatch.undo()
    counts = Counts()
    pages = classify(iter([[row(2)]]), plan=plan, state=state, counts=counts)
    list(with_gone(pages, plan=plan, state=state, counts=counts, stop=threading.Event()))
    assert counts.gone == 1


def send_all_gone(state: MemoryState, plan: StreamPlan, gone: list[Change]) -> None:
    """Send gone changes through `events` and acknowledge them all."""
    ledger = Ledger(
        state=state,
        stream="workspaces",
        state_name="workspaces",
        n_keys=1,
        clear_rejects=True,
        checkpoints=False,
    )
    page = ClassifiedPage(iter([(c, ("w2",), "") for c in gone]), [], ())
    outgoing = list(events(iter([page]), plan=plan, ledger=ledger, stop=threading.Event()))
    assert len(outgoing) == 1
    ledger.on_result(BatchResult(acked=tuple(outgoing)))


@pytest.mark.parametrize(
    "store_kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_real_store_finds_the_keys_a_full_read_did_not_meet(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """with_gone on a real store: a SQLite store answers by one anti-join with the key
    file (`sent_keys_unseen`), PostgreSQL by the walk; both find exactly the keys sent
    before and not read, of this stream only."""
    url = (
        f"sqlite:///{tmp_path / 'state.db'}"
        if store_kind == "sqlite"
        else request.getfixturevalue("pg_state")
    )
    store = StateStore(url)
    try:
        sent = [Sent(f"w{i}", "h" * 32, b'{"a":1}', f"e{i}", "s" * 32) for i in range(1, 8)]
        store.commit_batch("workspaces", sent, [])
        store.commit_batch("users", [Sent("w9", "h" * 32, b"{}", "e9", None)], [])
        m = mapping(WORKSPACES)
        plan = plan_of(m, None, mode="full")
        counts = Counts()
        pages = classify(
            iter([[row(1), row(3)], [row(4), row(7)]]), plan=plan, state=store, counts=counts
        )
        read = list(with_gone(pages, plan=plan, state=store, counts=counts, stop=threading.Event()))
        gone = sorted(c.record.key for page in read for c, _, _ in page.changes if c.kind == "gone")
        assert gone == ["w2", "w5", "w6"]
        assert counts.gone == 3
        seen = SeenKeys()
        try:
            seen.add(["w1"])
            seen.written()
            unseen = store.sent_keys_unseen("workspaces", seen.path)
            if store_kind == "sqlite":
                assert unseen is not None
                assert sorted(unseen) == ["w2", "w3", "w4", "w5", "w6", "w7"]
            else:
                assert unseen is None
        finally:
            seen.close()
    finally:
        store.close()
