"""A dry run's records: what would be sent, field by field, and what is gone.

`collect()` reads classified pages and keeps the records a diff report lists
(new, changed, invalid, and after a full read the keys sent before that are no
longer in the source: etl.run.gone). Writes nothing anywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from etl.model import Change, DiffRecord
from etl.run.classify import ClassifiedPage
from etl.run.diff import ABSENT, field_changes
from etl.run.plan import StreamPlan
from etl.run.ports import StatePort

# The order records are listed in: what needs a person first.
ORDER = ("invalid", "changed", "new", "gone")


@dataclass(frozen=True, slots=True)
class DryRun:
    """The records of one stream's dry run; `truncated` past `limit`; how many changed
    records change each trait."""

    records: tuple[DiffRecord, ...]
    truncated: int
    gone: int
    changed_traits: dict[str, int]


def collect(
    pages: Iterable[ClassifiedPage],
    *,
    plan: StreamPlan,
    state: StatePort,
    limit: int | None,
) -> DryRun:
    """Every record a sync would act on, invalid ones first (they need a person), then
    changed, new and gone, up to `limit` listed (the rest counted; memory holds at most
    `limit` records of each kind); gone keys come as `gone` changes (etl.run.gone, on a
    full read)."""
    listed: dict[str, list[DiffRecord]] = {kind: [] for kind in ORDER}
    total = 0
    gone = 0
    changed_traits: Counter[str] = Counter()
    for page in pages:
        for change, _, _ in page.changes:
            if change.kind == "unchanged":
                continue
            total += 1
            gone += change.kind == "gone"
            if change.kind == "changed":
                changed_traits.update(change.fields.keys())
            bucket = listed[change.kind]
            if limit is None or len(bucket) < limit:
                bucket.append(_diff_record(change))
    records = [record for kind in ORDER for record in listed[kind]][:limit]
    traits = dict(changed_traits.most_common())
    return DryRun(tuple(records), truncated=total - len(records), gone=gone, changed_traits=traits)


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
    user_id, account_id = _id(payload.get("user_id")), _id(payload.get("account_id"))
    if change.kind == "new":
        return DiffRecord(
            key=record.key, kind="new", traits=traits, user_id=user_id, account_id=account_id
        )
    return DiffRecord(
        key=record.key,
        kind="changed",
        traits=traits,
        changes={name: _sides(old, new) for name, (old, new) in change.fields.items()},
        user_id=user_id,
        account_id=account_id,
    )


def _id(value: Any) -> str | None:
    return None if value is None else str(value)


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
