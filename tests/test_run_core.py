"""The stream core in parts: plan, classify, ledger, send, dry run, against an
in-memory state store (`memory_state.MemoryState`), no database or receiver
needed — except the last tests, which run one whole stream from a real SQLite
source into the in-memory store."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from memory_state import T0, MemoryState

from etl.errors import StateError
from etl.mapping.parse import parse_mapping
from etl.model import BatchResult, Mapping, Outgoing, Record, Shard
from etl.run.classify import (
    Classified,
    ClassifiedPage,
    Counts,
    RetriedRejects,
    Row,
    classify,
)
from etl.run.dryrun import collect
from etl.run.gone import with_gone
from etl.run.ledger import Ledger, Ref
from etl.run.options import Collaborators, RunOptions
from etl.run.pipeline import run_stream
from etl.run.plan import StreamPlan, plan_stream
from etl.run.ports import StatePort
from etl.run.send import events
from etl.settings import DeliverySettings, EventIdentity
from etl.state.store import PendingReject, Sent, StateStore, StreamState

WORKSPACES = """
stream: workspaces
event_type: account_identify
source: {table: workspaces}
key: id
cursor: updated_at
user_id: owner_id
account_id: id
traits:
  name: name
  plan: plan
"""
QUERY = WORKSPACES.replace("source: {table: workspaces}", 'source: {query: "SELECT * FROM w"}')


def mapping(text: str = WORKSPACES) -> Mapping:
    return parse_mapping(text, path="mappings/workspaces.yml")


def make_plan(
    m: Mapping | None = None, previous: StreamState | None = None, **options: Any
) -> StreamPlan:
    return plan_stream(
        m or mapping(),
        previous,
        options=RunOptions(**options),
        api_key="ak-1",
        workspace_key="ws-1",
    )


def row(i: int, name: str | None = "Acme", plan: str = "free") -> Row:
    """A workspaces row as extract selects it: key, cursor, user_id, account_id, traits."""
    return (f"w{i}", T0, f"u{i}", f"w{i}", name, plan)


def run_classify(
    pages: Sequence[list[Row]],
    plan: StreamPlan,
    state: MemoryState,
    *,
    retries: RetriedRejects | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[list[Classified]], Counts]:
    """The changes of each page (each consumed before the next page, as a sender does)."""
    counts = Counts()
    pages_read = classify(
        iter(pages), plan=plan, state=state, counts=counts, retries=retries, stop=stop
    )
    return [list(page.changes) for page in pages_read], counts


def as_pages(changes: list[list[Classified]]) -> Iterator[ClassifiedPage]:
    """Classified pages again, from their changes, to hand to a sender."""
    for page in changes:
        keyed = [(change.record.key, row) for change, row, _ in page]
        yield ClassifiedPage(iter(page), keyed, page[-1][1][:1])


def kinds(pages: list[list[Classified]]) -> list[tuple[str, str]]:
    return [(change.kind, change.record.key) for page in pages for change, _, _ in page]


def send_all(state: MemoryState, plan: StreamPlan, pages: Sequence[list[Row]]) -> None:
    """Classify and record `pages` as if the API acknowledged every event at once."""
    ledger = Ledger(
        state=state,
        stream="workspaces",
        state_name="workspaces",
        n_keys=1,
        clear_rejects=True,
        checkpoints=False,
    )
    classified = classify(iter(pages), plan=plan, state=state, counts=Counts())
    outgoing = list(events(classified, plan=plan, ledger=ledger, stop=threading.Event()))
    ledger.on_result(BatchResult(acked=tuple(outgoing)))


# ---------------------------------------------------------------- the plan


def test_plan_incremental_reads_from_the_watermark() -> None:
    """A stream synced before with the same mapping is read by cursor from its watermark."""
    m = mapping()
    plan = make_plan(m, StreamState("workspaces", T0, m.fingerprint, None, T0))
    assert (plan.order, plan.since, plan.full, plan.mapping_changed) == ("cursor", T0, False, False)
    assert plan.state_name == "workspaces"
    assert plan.checkpoint is None


def test_plan_first_run_reads_every_row_with_a_cursor() -> None:
    """Without a watermark, every row that has a cursor is read (a full diff)."""
    plan = make_plan()
    assert (plan.order, plan.since, plan.full) == ("cursor", None, True)


def test_plan_mapping_changed_rereads_everything() -> None:
    """A stored fingerprint that differs from the mapping's forces a full diff."""
    plan = make_plan(previous=StreamState("workspaces", T0, "old-fingerprint", None, T0))
    assert (plan.order, plan.since, plan.mapping_changed) == ("cursor", None, True)


def test_plan_full_and_no_cursor_read_by_key() -> None:
    """--full, and a mapping without a cursor, read every row in key order."""
    m = mapping()
    previous = StreamState("workspaces", T0, m.fingerprint, None, T0)
    assert make_plan(m, previous, mode="full").order == "key"
    no_cursor = mapping(WORKSPACES.replace("cursor: updated_at\n", ""))
    assert make_plan(no_cursor, previous).order == "key"


def test_plan_backfill_resumes_after_its_checkpoint_unless_restarted() -> None:
    """A backfill resumes after the stored checkpoint; --restart ignores it."""
    previous = StreamState("workspaces", None, None, ["w41"], T0)
    plan = make_plan(previous=previous, mode="backfill")
    assert (plan.order, plan.checkpoint, plan.backfill) == ("key", ("w41",), True)
    assert make_plan(previous=previous, mode="backfill", restart=True).checkpoint is None
    assert make_plan(previous=previous, mode="full").checkpoint is None


def test_plan_of_a_shard_keeps_its_own_state_name_and_owns_its_keys() -> None:
    """A shard's watermark lives under `stream#I/N`, and it owns only its share of keys."""
    shard = Shard(1, 3)
    plan = make_plan(shard=shard)
    assert plan.state_name == "workspaces#1/3"
    keys = [f"w{i}" for i in range(30)]
    assert [k for k in keys if plan.owns(k)] == [k for k in keys if shard.owns(k)]
    assert 0 < sum(map(plan.owns, keys)) < 30


def test_plan_says_whether_duplicates_can_happen() -> None:
    """Only a `query:` source can repeat a key; the salt follows the mapping."""
    assert make_plan().duplicates_possible is False
    assert make_plan(mapping(QUERY)).duplicates_possible is True
    assert make_plan().salt != make_plan(mapping(QUERY)).salt


# ---------------------------------------------------------------- classify


def test_classify_new_changed_unchanged_and_invalid() -> None:
    """Rows become new, changed, unchanged or invalid against what was last sent."""
    state = MemoryState()
    plan = make_plan(force=True)  # force: transform every row, no digest shortcut
    send_all(state, plan, [[row(1), row(2)]])
    pages, counts = run_classify(
        [[row(1), row(2, plan="pro"), row(3), row(4, name=None)]], plan, state
    )
    assert kinds(pages) == [
        ("unchanged", "w1"),
        ("changed", "w2"),
        ("new", "w3"),
        ("invalid", "w4"),
    ]
    assert (counts.read, counts.new, counts.changed, counts.unchanged, counts.invalid) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert counts.invalid_records[0][0] == "w4"
    assert "name" in counts.invalid_records[0][1]


def test_classify_skips_the_transform_of_a_row_whose_digest_matches() -> None:
    """A row whose source digest equals the stored one is unchanged without being
    transformed, counted, and not listed."""
    state = MemoryState()
    send_all(state, make_plan(), [[row(1), row(2)]])
    transformed: list[str] = []
    plan = make_plan()

    def counting(values: Sequence[Any]) -> Record:
        transformed.append(values[0])
        return plan.transform(values)

    pages, counts = run_classify(
        [[row(1), row(2, plan="pro")]], dataclasses.replace(plan, transform=counting), state
    )
    assert transformed == ["w2"]
    assert kinds(pages) == [("changed", "w2")]
    assert (counts.unchanged, counts.changed, counts.read) == (1, 1, 2)


def test_classify_marks_a_key_repeated_by_a_query_invalid() -> None:
    """A `query:` source that returns a key twice: the second row is invalid."""
    state = MemoryState()
    pages, counts = run_classify(
        [[row(1), row(2)], [row(1, plan="pro")]], make_plan(mapping(QUERY)), state
    )
    assert kinds(pages) == [("new", "w1"), ("new", "w2"), ("invalid", "w1")]
    assert "duplicate key" in counts.invalid_records[0][1]
    table_pages, _ = run_classify([[row(1)], [row(1)]], make_plan(), state)
    assert kinds(table_pages) == [("new", "w1"), ("new", "w1")]  # a table key is not checked


def test_classify_trusts_the_shard_predicate_of_its_pages() -> None:
    """A shard's rows are chosen in SQL (test_shard: each shard query reads exactly
    the keys Python says it owns), so classify hashes no key again: what the pages
    hold is what it considers."""
    shard = Shard(0, 2)
    rows = [row(i) for i in range(20) if shard.owns(f"w{i}")]
    pages, counts = run_classify([rows], make_plan(shard=shard), MemoryState())
    assert [key for _, key in kinds(pages)] == [r[0] for r in rows]
    assert counts.read == len(rows) < 20


def test_classify_reads_a_retried_reject_once_and_settles_the_rest() -> None:
    """A retried reject that comes again in the cursor window is dropped; rejects
    never read, or unchanged since last delivered, are settled."""
    state = MemoryState()
    plan = make_plan()
    send_all(state, plan, [[row(3)]])
    retries = RetriedRejects(["w1", "w2", "w3"])
    pages, counts = run_classify([[row(1), row(3)], [row(1), row(4)]], plan, state, retries=retries)
    assert kinds(pages) == [("new", "w1"), ("new", "w4")]
    assert counts.read == 3  # w1, w3 (unchanged), w4; the second w1 is not read again
    assert retries.settled() == ["w2", "w3"]  # w2 gone from the source, w3 unchanged


def test_classify_stops_between_pages_when_asked() -> None:
    """Once the stop event is set, no further page is classified."""
    stop = threading.Event()
    seen: list[list[Classified]] = []
    pages = [[row(1)], [row(2)]]
    for page in classify(
        iter(pages), plan=make_plan(), state=MemoryState(), counts=Counts(), stop=stop
    ):
        seen.append(list(page.changes))
        stop.set()
    assert kinds(seen) == [("new", "w1")]


def test_classify_asks_the_state_once_per_page() -> None:
    """The last-sent state is read one page of keys at a time, never per row."""
    state = MemoryState()
    run_classify([[row(1), row(2), row(3)], [row(4), row(5)]], make_plan(), state)
    assert state.count("last_sent") == 2


# ---------------------------------------------------------------- the ledger


def ledger_of(state: MemoryState, *, checkpoints: bool = True) -> Ledger:
    return Ledger(
        state=state,
        stream="workspaces",
        state_name="workspaces",
        n_keys=1,
        clear_rejects=True,
        checkpoints=checkpoints,
    )


def numbered(ledger: Ledger, keys: Sequence[str]) -> list[Outgoing[Ref]]:
    return [
        Outgoing(
            key=k,
            event_id=f"e-{k}",
            body=b"{}",
            ref=ledger.ref(Sent(k, "h", b"{}", f"e-{k}"), (k, T0)),
        )
        for k in keys
    ]


def test_ledger_saves_a_checkpoint_only_below_the_first_unacknowledged_event() -> None:
    """A page's checkpoint is saved once every event up to its end was reported,
    even when a later batch is reported first."""
    state = MemoryState()
    ledger = ledger_of(state)
    first = numbered(ledger, ["a", "b"])
    ledger.page_done(("b",))
    second = numbered(ledger, ["c", "d"])
    ledger.page_done(("d",))
    ledger.page_done(("e",))  # a page of unchanged rows: nothing new to wait for
    ledger.on_result(BatchResult(acked=tuple(second)))
    assert state.count("save_checkpoint") == 0
    ledger.on_result(BatchResult(acked=(first[0],), rejected=((first[1], "HTTP 400: bad"),)))
    assert state.streams["workspaces"].checkpoint == ["e"]
    assert state.count("save_checkpoint") == 1


def test_ledger_without_checkpoints_never_saves_one() -> None:
    """Outside a backfill the ledger saves no checkpoint."""
    state = MemoryState()
    ledger = ledger_of(state, checkpoints=False)
    ledger.on_result(BatchResult(acked=tuple(numbered(ledger, ["a"]))))
    ledger.page_done(("a",))
    assert state.count("save_checkpoint") == 0
    assert state.commits == [("a",)]


def test_ledger_records_refused_events_with_their_key_values() -> None:
    """A refused event is kept as a pending reject with its key's column values and
    the server's message, and counted."""
    state = MemoryState()
    ledger = ledger_of(state)
    out = numbered(ledger, ["a", "b"])
    ledger.on_result(BatchResult(acked=(out[0],), rejected=((out[1], "HTTP 400: bad email"),)))
    (reject,) = state.rejects.values()
    assert (reject.key, reject.key_values, reject.message) == ("b", ("b",), "HTTP 400: bad email")
    assert (ledger.rejected, ledger.rejected_records) == (1, [("b", "HTTP 400: bad email")])
    assert ("workspaces", "a") in state.records


def test_ledger_writes_in_order_on_its_writer_thread() -> None:
    """While writing, commits run on the state-writer thread, in the order reported."""
    state = MemoryState()
    ledger = ledger_of(state, checkpoints=False)
    batches = [numbered(ledger, [f"k{i}a", f"k{i}b"]) for i in range(20)]
    with ledger.writing():
        futures = [ledger.on_result(BatchResult(acked=tuple(b))) for b in batches]
    assert all(f is not None and f.done() for f in futures)
    assert state.commits == [tuple(o.key for o in b) for b in batches]
    threads = {thread for method, _, thread in state.calls if method == "commit_batch"}
    assert threads == {"etl-state-writer_0"}


def test_ledger_surfaces_a_failed_write() -> None:
    """A commit that fails on the writer thread is raised when the writing ends."""
    state = MemoryState(fail_commits=StateError("state store: disk full"))
    ledger = ledger_of(state)
    with pytest.raises(StateError, match="disk full"), ledger.writing():
        ledger.on_result(BatchResult(acked=tuple(numbered(ledger, ["a"]))))


def test_ledger_surfaces_a_failed_write_at_the_next_write() -> None:
    """A failed commit stops the run at the next write, not only at the end."""
    state = MemoryState(fail_commits=StateError("state store: disk full"))
    ledger = ledger_of(state, checkpoints=False)
    with contextlib.suppress(StateError), ledger.writing():
        first = ledger.on_result(BatchResult(acked=tuple(numbered(ledger, ["a"]))))
        assert first is not None
        first.exception()  # wait until it failed
        with pytest.raises(StateError, match="disk full"):
            ledger.on_result(BatchResult(acked=tuple(numbered(ledger, ["b"]))))
    assert state.count("commit_batch") == 1  # "b" was never written


# ---------------------------------------------------------------- sending and dry runs


def test_events_are_numbered_and_leave_out_what_needs_no_sending() -> None:
    """Only new and changed records become events (all valid ones with force),
    numbered in order, each body carrying its deterministic event_id."""
    state = MemoryState()
    plan = make_plan()
    send_all(state, plan, [[row(1)]])
    pages, _ = run_classify(
        [[row(1), row(2), row(3, name=None)]], dataclasses.replace(plan, force=True), state
    )
    ledger = ledger_of(state, checkpoints=False)
    out = list(events(as_pages(pages), plan=plan, ledger=ledger, stop=threading.Event()))
    assert [(o.key, o.ref.seq) for o in out] == [("w2", 0)]
    assert orjson.loads(out[0].body)["event_id"] == out[0].event_id
    forced = list(
        events(
            as_pages(pages),
            plan=dataclasses.replace(plan, force=True),
            ledger=ledger,
            stop=threading.Event(),
        )
    )
    assert [(o.key, o.ref.seq) for o in forced] == [("w1", 1), ("w2", 2)]


def test_events_stop_mid_page_when_asked() -> None:
    """A stop signal queues nothing more, not even the rest of the page."""
    pages, _ = run_classify([[row(1), row(2), row(3)]], make_plan(), MemoryState())
    stop = threading.Event()
    ledger = ledger_of(MemoryState(), checkpoints=False)
    taken = []
    for outgoing in events(as_pages(pages), plan=make_plan(), ledger=ledger, stop=stop):
        taken.append(outgoing.key)
        stop.set()
    assert taken == ["w1"]


def test_dry_run_lists_changes_up_to_the_limit_and_the_gone() -> None:
    """A dry run lists invalid, changed and new records up to its limit (the rest
    counted as truncated) and, after a full read (with_gone), keys no longer in the
    source."""
    state = MemoryState()
    plan = make_plan()
    send_all(state, plan, [[row(1), row(2), row(9)]])
    counts = Counts()
    pages = classify(
        iter([[row(1), row(2, plan="pro"), row(3), row(4, name=None)]]),
        plan=plan,
        state=state,
        counts=counts,
        with_payload=True,
    )
    full = with_gone(pages, plan=plan, state=state, counts=counts, stop=threading.Event())
    dry = collect(full, plan=plan, state=state, limit=10)
    assert [(r.key, r.kind) for r in dry.records] == [
        ("w4", "invalid"),
        ("w2", "changed"),
        ("w3", "new"),
        ("w9", "gone"),
    ]
    assert dry.records[1].changes == {"plan": {"old": "free", "new": "pro"}}
    assert (dry.gone, dry.truncated) == (1, 0)
    again = classify(
        iter([[row(2, plan="pro"), row(3)]]),
        plan=plan,
        state=state,
        counts=Counts(),
        with_payload=True,
    )
    short = collect(again, plan=plan, state=state, limit=1)
    assert ([r.key for r in short.records], short.truncated, short.gone) == (["w2"], 1, 0)


# ---------------------------------------------------------------- the port


@pytest.mark.parametrize("store", [StateStore, MemoryState])
def test_state_stores_match_the_port(store: type) -> None:
    """The real store and the in-memory one both take every call of StatePort
    with the same parameters."""
    for name, member in inspect.getmembers(StatePort, inspect.isfunction):
        if name.startswith("_"):
            continue
        expected = list(inspect.signature(member).parameters)
        assert list(inspect.signature(getattr(store, name)).parameters) == expected, name


# ---------------------------------------------------------------- one whole stream


@pytest.fixture
def source(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE workspaces (id TEXT PRIMARY KEY, updated_at TIMESTAMP, "
            "owner_id TEXT, name TEXT, plan TEXT)"
        )
        conn.exec_driver_sql(
            "INSERT INTO workspaces VALUES (?, ?, ?, ?, ?)",
            [(f"w{i}", "2024-03-01 12:00:00", f"u{i}", f"Acme {i}", "free") for i in range(12)],
        )
    yield engine
    engine.dispose()


def collaborators(source: sa.Engine, state: MemoryState, refuse: set[str]) -> Collaborators:
    """The I/O of a run: the API answers in-process, refusing the events of `refuse`
    (a whole batch with one refused event gets a 400; bisection isolates it)."""

    def answer(request: httpx.Request) -> httpx.Response:
        accounts = {e["account_id"] for e in orjson.loads(request.content)}
        if accounts & refuse:
            return httpx.Response(400, json={"message": "bad event", "error": ""})
        return httpx.Response(200, json={"status": "ok"})

    client = httpx.Client(transport=httpx.MockTransport(answer))
    return Collaborators(
        source=source,
        state=state,
        identity=EventIdentity(api_key="ak", workspace_key="ws"),
        delivery=DeliverySettings(endpoint="http://127.0.0.1:9/e", batch_size=5),
        client=client,
        sleep=lambda _: None,
    )


def test_a_stream_reads_its_rejects_once_and_records_what_was_acknowledged(
    source: sa.Engine,
) -> None:
    """One whole sync into the in-memory store: acknowledged records and the refused
    one are recorded, the watermark saved, and pending rejects read once per run of
    the stream; the next run retries the reject and settles it once delivered."""
    state = MemoryState()
    m = mapping()
    report, diff = run_stream(m, options=RunOptions(), io=collaborators(source, state, {"w3"}))
    assert diff is None
    assert (report.read, report.new, report.sent, report.rejected) == (12, 12, 11, 1)
    assert [r.key for r in state.rejects.values()] == ["w3"]
    assert state.count("rejected") == 1
    assert state.streams["workspaces"].watermark is not None
    again, _ = run_stream(m, options=RunOptions(), io=collaborators(source, state, set()))
    assert (again.read, again.new, again.sent, again.rejected) == (1, 1, 1, 0)
    assert state.rejects == {}
    assert state.count("rejected") == 2


def test_a_dry_run_stream_writes_nothing(source: sa.Engine) -> None:
    """A dry run reads and diffs like a sync, lists the records, and writes nothing."""
    state = MemoryState()
    state.rejects["workspaces", "w1"] = PendingReject(
        "workspaces", "w1", ("w1",), "e", "m", 1, T0, T0
    )
    report, diff = run_stream(
        mapping(), options=RunOptions(dry_run=True), io=collaborators(source, state, set())
    )
    assert diff is not None
    assert diff.counts["new"] == 12 == len(diff.records)
    writes = {"commit_batch", "forget_rejects", "save_checkpoint", "save_watermark"}
    assert not [c for c in state.calls if c[0] in writes]
    assert state.count("rejected") == 1
    assert report.read == 12


def test_a_backfill_checkpoints_its_pages_and_resumes_after_the_last(source: sa.Engine) -> None:
    """A backfill saves a checkpoint as its pages are acknowledged and clears it when
    done; started again from a checkpoint, it reads only the keys after it."""
    state = MemoryState()
    backfill = RunOptions(mode="backfill", page_size=4)
    report, _ = run_stream(mapping(), options=backfill, io=collaborators(source, state, set()))
    assert (report.read, report.sent) == (12, 12)
    assert state.count("save_checkpoint") == 3  # one a page of 4
    assert state.streams["workspaces"].checkpoint is None  # cleared with the watermark
    state.save_checkpoint("workspaces", ["w5"])  # keys in text order: w0 w1 w10 w11 w2 ... w9
    again, _ = run_stream(mapping(), options=backfill, io=collaborators(source, state, set()))
    assert again.read == 4  # w6, w7, w8, w9
