"""A dry run's records: what would be sent, field by field, and what is gone.

`collect()` reads classified pages and keeps the records a diff report lists
(new, changed, invalid, and after a full read the keys sent before that are no
longer in the source: etl.run.gone). Writes nothing anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from etl.model import Change, DiffRecord
from etl.run.classify import ClassifiedPage
from etl.run.diff import ABSENT, field_changes
from etl.run.plan import StreamPlan
from etl.run.ports import StatePort


@dataclass(frozen=True, slots=True)
class DryRun:
    """The records of one stream's dry run; `truncated` past `limit`."""

    records: tuple[DiffRecord, ...]
    truncated: int
    gone: int


def collect(
    pages: Iterable[ClassifiedPage],
    *,
    plan: StreamPlan,
    state: StatePort,
    limit: int | None,
) -> DryRun:
    """Every record a sync would act on, up to `limit` listed (the rest counted);
    gone keys come as `gone` changes (etl.run.gone, on a full read)."""
    records: list[DiffRecord] = []
    truncated = 0
    gone = 0
    for page in pages:
        for change, _, _ in page.changes:
            if change.kind == "unchanged":
                continue
            gone += change.kind == "gone"
            if limit is not None and len(records) >= limit:
                truncated += 1
            else:
                records.append(_diff_record(change))
    return DryRun(records=tuple(records), truncated=truncated, gone=gone)


def _diff_record(change: Change) -> DiffRecord:
    record = change.record
    if change.kind == "invalid":
        return DiffRecord(key=record.key, kind="invalid", reason=record.reason)
    if change.kind == "gone":
        # with on_gone and not sent yet: the gone payload's traits, and what on_gone sets
        traits = dict((record.payload or {}).get("traits", {}))
        return DiffRecord(
            key=record.key,
            kind="gone",
            traits=traits,
            changes={name: _sides(old, new) for name, (old, new) in _gone_fields(change).items()},
        )
    payload = record.payload or {}
    traits = dict(payload.get("traits", {}))
    if change.kind == "new":
        return DiffRecord(key=record.key, kind="new", traits=traits)
    return DiffRecord(
        key=record.key,
        kind="changed",
        traits=traits,
        changes={name: _sides(old, new) for name, (old, new) in change.fields.items()},
    )


def _gone_fields(change: Change) -> dict[str, tuple[Any, Any]]:
    if change.old is None or change.record.payload is None:
        return {}
    return field_changes(change.old, change.record.payload)


def _sides(old: Any, new: Any) -> dict[str, Any]:
    """{"old", "new"} of one changed field; a side that is absent is left out."""
    sides = {}
    if old is not ABSENT:
        sides["old"] = old
    if new is not ABSENT:
        sides["new"] = new
    return sides
