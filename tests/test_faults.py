"""A fault plan is read from JSON with every problem reported at once, and replayed
repeatably: its sequence first, then draws seeded by the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etl.errors import UsageError
from etl.receiver.faults import NO_FAULT, Fault, FaultPicker, FaultPlan, load_fault_plan

# --- parsing ----------------------------------------------------------------------


def test_fault_plan_file_is_parsed(tmp_path: Path) -> None:
    """A fault plan file becomes a FaultPlan, with drawn 429/503 carrying the plan's retry_after."""
    path = tmp_path / "faults.json"
    path.write_text(
        json.dumps(
            {
                "seed": 5,
                "sequence": [503, "429", {"status": 429, "retry_after": 2}, "drop"],
                "probabilities": {"503": 0.1, "accept_then_500": 0.05},
                "retry_after": 4,
                "latency_ms": [1, 3],
                "max_request_bytes": 1000,
                "reject_events_where": {"user_id": "u-9"},
            }
        )
    )
    assert load_fault_plan(path) == FaultPlan(
        seed=5,
        sequence=(
            Fault("status", 503),
            Fault("status", 429),
            Fault("status", 429, 2),
            Fault("drop"),
        ),
        probabilities=((Fault("status", 503, 4.0), 0.1), (Fault("accept_then_500"), 0.05)),
        retry_after=4.0,
        latency_ms=(1.0, 3.0),
        max_request_bytes=1000,
        reject_events_where=(("user_id", "u-9"),),
    )


def test_fault_plan_reports_every_problem_at_once() -> None:
    """Every problem of a fault plan is reported in one error, each prefixed with its source."""
    text = json.dumps(
        {
            "colour": "red",
            "sequence": [503, "dorp", 200],
            "probabilities": {"500": 0.8, "503": 0.5},
            "latency_ms": [50, 10],
        }
    )
    with pytest.raises(UsageError) as raised:
        FaultPlan.from_json(text, source="faults.json")
    problems = str(raised.value).splitlines()
    assert [problem.split(":")[1].strip() for problem in problems] == [
        "colour",
        "sequence[1]",
        "sequence[2]",
        "probabilities",
        "latency_ms",
    ]
    assert all(problem.startswith("faults.json: ") for problem in problems)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ("[503]", "a fault plan is a JSON object"),
    ],
)
def test_fault_plan_that_is_not_a_json_object_is_refused(text: str, problem: str) -> None:
    """A plan that is not JSON, or not an object, is one UsageError naming its source."""
    with pytest.raises(UsageError, match=f"^faults.json: {problem}"):
        FaultPlan.from_json(text, source="faults.json")


def test_unreadable_fault_plan_file_is_a_usage_error(tmp_path: Path) -> None:
    """A missing plan file is a UsageError naming the file."""
    missing = tmp_path / "missing.json"
    with pytest.raises(UsageError, match="cannot read the fault plan"):
        load_fault_plan(missing)


# --- picking ----------------------------------------------------------------------


def test_picker_replays_the_sequence_then_draws_by_seed() -> None:
    """The sequence comes first, in order; the draws after it repeat for one seed."""
    plan = FaultPlan.from_json(
        json.dumps({"seed": 3, "sequence": ["drop", 503], "probabilities": {"500": 0.5}})
    )
    first, second = FaultPicker(plan), FaultPicker(plan)
    picks = [first.pick()[0] for _ in range(20)]
    assert picks[:2] == [Fault("drop"), Fault("status", 503)]
    assert set(picks[2:]) == {NO_FAULT, Fault("status", 500)}
    assert [second.pick()[0] for _ in range(20)] == picks


def test_picker_latency_does_not_change_the_faults_drawn() -> None:
    """Adding latency leaves the drawn faults alone; each latency lies within the range."""
    table = {"seed": 9, "probabilities": {"500": 0.3, "drop": 0.2}}
    plain = FaultPicker(FaultPlan.from_json(json.dumps(table)))
    slow = FaultPicker(FaultPlan.from_json(json.dumps({**table, "latency_ms": [10, 20]})))
    plain_picks = [plain.pick() for _ in range(30)]
    slow_picks = [slow.pick() for _ in range(30)]
    assert [fault for fault, _ in slow_picks] == [fault for fault, _ in plain_picks]
    assert all(latency == 0.0 for _, latency in plain_picks)
    assert all(0.010 <= latency <= 0.020 for _, latency in slow_picks)
