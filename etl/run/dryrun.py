"""A dry run's records: what would be sent, field by field, and what is gone.

`collect()` reads classified pages and keeps the records a diff report lists
(new, changed, invalid; with `list_gone`, keys sent before that are no longer
in the source). Writes nothing anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from etl.model import Change, DiffRecord
from etl.run.classify import ClassifiedPage
from etl.run.diff import ABSENT
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
    list_gone: bool,
) -> DryRun:
    """Every record a sync would act on, up to `limit` listed (the rest counted)."""
    records: list[DiffRecord] = []
    truncated = 0
    seen: set[str] | None = set() if list_gone else None
    for page in pages:
        if seen is not None:
            seen.update(key for key, _ in page.keyed)
        for change, _, _ in page.changes:
            if change.kind == "unchanged":
                continue
            if limit is not None and len(records) >= limit:
                truncated += 1
            else:
                records.append(_diff_record(change))
    gone = 0
    if seen is not None:
        # Keys sent before and no longer in the source (information only).
        for key in state.sent_keys(plan.mapping.stream):
            if key in seen or not plan.owns(key):
                continue
            gone += 1
            if limit is not None and len(records) >= limit:
                truncated += 1
            else:
                records.append(DiffRecord(key=key, kind="gone"))
    return DryRun(records=tuple(records), truncated=truncated, gone=gone)


def _diff_record(change: Change) -> DiffRecord:
    record = change.record
    if change.kind == "invalid":
        return DiffRecord(key=record.key, kind="invalid", reason=record.reason)
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


def _sides(old: Any, new: Any) -> dict[str, Any]:
    """{"old", "new"} of one changed field; a side that is absent is left out."""
    sides = {}
    if old is not ABSENT:
        sides["old"] = old
    if new is not ABSENT:
        sides["new"] = new
    return sides
