"""`--metrics-file`: the run's figures in the Prometheus text format, after success or failure."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from support import cli_env, copy_mappings, run_cli, seed, user_id, users

from etl.model import StreamReport
from etl.monitor.metrics import RUN_METRICS, STREAM_METRICS, previous_success, render
from etl.monitor.outcome import RunOutcome
from etl.state.store import StateStore

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(path: Path) -> tuple[Samples, dict[str, tuple[str, str]]]:
    """Every sample by (name, labels), and (type, help) by family, as Prometheus reads them."""
    samples: Samples = {}
    families = {}
    for family in text_string_to_metric_families(path.read_text()):
        families[family.name] = (family.type, family.documentation)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families


def run_figures(samples: Samples, command: str = "sync") -> dict[str, float]:
    labels = frozenset({("command", command)})
    return {name: value for (name, lab), value in samples.items() if lab == labels}


def stream_figures(samples: Samples, stream: str, command: str = "sync") -> dict[str, float]:
    labels = frozenset({("command", command), ("stream", stream)})
    return {name: value for (name, lab), value in samples.items() if lab == labels}


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, str]:
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    (tmp_path / "textfile").mkdir()
    return cli_env(
        tmp_path, sqlite_url, receiver.url, ETL_METRICS_FILE=str(tmp_path / "textfile" / "etl.prom")
    )


def test_a_sync_writes_exact_figures_per_stream(env: dict[str, str], tmp_path: Path) -> None:
    """After a first sync: success 1, exit code 0, and every stream's exact counts."""
    before = time.time()
    result = run_cli(["sync"], env)
    after = time.time()
    assert result.exit_code == 0, result.stderr
    samples, families = parse(Path(env["ETL_METRICS_FILE"]))
    run = run_figures(samples)
    assert run["etl_run_success"] == 1
    assert run["etl_run_exit_code"] == 0
    assert before - 0.01 <= run["etl_last_run_timestamp_seconds"] <= after + 0.01
    assert run["etl_last_success_timestamp_seconds"] == run["etl_last_run_timestamp_seconds"]
    assert 0 <= run["etl_run_duration_seconds"] <= after - before + 0.01
    users_figures = stream_figures(samples, "users")
    assert {k: v for k, v in users_figures.items() if k.startswith("etl_records_")} == {
        "etl_records_read": 10,
        "etl_records_new": 10,
        "etl_records_changed": 0,
        "etl_records_unchanged": 0,
        "etl_records_invalid": 0,
        "etl_records_rejected": 0,
        "etl_records_gone": 0,
        "etl_records_sent": 10,
        "etl_records_future": 0,
    }
    assert users_figures["etl_stream_batches"] == 1
    assert users_figures["etl_stream_retries"] == 0
    assert users_figures["etl_stream_duration_seconds"] >= 0
    assert stream_figures(samples, "workspaces")["etl_records_sent"] == 3
    # every family is a documented gauge
    names = {name for name, _ in RUN_METRICS} | {name for name, _, _ in STREAM_METRICS}
    assert set(families) == names
    assert all(kind == "gauge" and text for kind, text in families.values())

    # a second sync with nothing to send: all unchanged, nothing sent
    assert run_cli(["sync", "--full"], env).exit_code == 0
    samples, _ = parse(Path(env["ETL_METRICS_FILE"]))
    again = stream_figures(samples, "users")
    assert (again["etl_records_unchanged"], again["etl_records_sent"]) == (10, 0)


def test_a_failed_sync_writes_success_0_and_keeps_the_last_success(
    env: dict[str, str], sqlite_url: str
) -> None:
    """A wrong token (exit 1): success 0, exit code 1, the previous success timestamp kept."""
    path = Path(env["ETL_METRICS_FILE"])
    assert run_cli(["sync"], env).exit_code == 0
    first = run_figures(parse(path)[0])
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:  # something to send, so the API is asked (and says 401)
        conn.execute(
            users.update()
            .where(users.c.id == user_id(2))
            .values(role="admin", updated_at=sa.func.current_timestamp())
        )
    engine.dispose()
    result = run_cli(["sync"], {**env, "HYPERENGAGE_TOKEN": "wrong-token-value"})
    assert result.exit_code == 1
    samples, _ = parse(path)
    run = run_figures(samples)
    assert run["etl_run_success"] == 0
    assert run["etl_run_exit_code"] == 1
    assert run["etl_last_success_timestamp_seconds"] == first["etl_last_run_timestamp_seconds"]
    assert run["etl_last_run_timestamp_seconds"] > first["etl_last_run_timestamp_seconds"]
    # the counts of a failed run are unknown: no per-stream series rather than zeros
    assert not stream_figures(samples, "users")
    assert "wrong-token-value" not in path.read_text()


def test_a_first_run_that_fails_has_no_last_success(env: dict[str, str]) -> None:
    """With no earlier success known, the last success timestamp is 0 (alerts fire)."""
    result = run_cli(["sync"], {**env, "HYPERENGAGE_TOKEN": "wrong-token-value"})
    assert result.exit_code == 1
    run = run_figures(parse(Path(env["ETL_METRICS_FILE"]))[0])
    assert run["etl_run_success"] == 0
    assert run["etl_last_success_timestamp_seconds"] == 0


def test_a_partial_run_is_a_success_with_its_invalid_records_counted(
    env: dict[str, str], sqlite_url: str
) -> None:
    """Exit 3: success 1 (the run finished), exit code 3, the invalid record counted."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == user_id(7)).values(email=""))
    engine.dispose()
    assert run_cli(["backfill"], env).exit_code == 3
    path = Path(env["ETL_METRICS_FILE"])
    samples, _ = parse(path)
    run = run_figures(samples, "backfill")
    assert (run["etl_run_success"], run["etl_run_exit_code"]) == (1, 3)
    figures = stream_figures(samples, "users", "backfill")
    assert (figures["etl_records_invalid"], figures["etl_records_sent"]) == (1, 9)
    assert user_id(7) not in path.read_text()


def test_the_file_is_replaced_atomically_and_readable_by_the_collector(
    env: dict[str, str],
) -> None:
    """Only the .prom file remains (no temporary file); it is world-readable (0644)."""
    path = Path(env["ETL_METRICS_FILE"])
    path.write_text("stale\n")
    assert run_cli(["sync"], env).exit_code == 0
    assert [p.name for p in path.parent.iterdir()] == ["etl.prom"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert "stale" not in path.read_text()


def test_a_missing_directory_is_a_usage_error_before_anything_is_sent(
    env: dict[str, str], tmp_path: Path, receiver: Any
) -> None:
    """--metrics-file in a directory that does not exist: exit 2, nothing read or sent."""
    missing = tmp_path / "nowhere" / "etl.prom"
    result = run_cli(["sync", "--metrics-file", str(missing)], env)
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert receiver.events() == []


def test_a_locked_run_leaves_the_file_to_the_lock_holder(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Exit 4 writes nothing: the run that holds the lock reports when it ends."""
    path = Path(env["ETL_METRICS_FILE"])
    assert run_cli(["sync"], env).exit_code == 0
    written = path.read_text()
    holder = StateStore(env["ETL_STATE_URL"])
    try:
        holder.acquire("sync")
        assert run_cli(["sync"], env).exit_code == 4
    finally:
        holder.close()
    assert path.read_text() == written


def test_render_escapes_labels_and_reads_back_only_its_own_command() -> None:
    """Label values are escaped; the previous success is looked up per command."""
    report = StreamReport(stream='we"ird\\name', event_type="user_identify", read=2, sent=2)
    done = RunOutcome(
        command="sync",
        status="ok",
        exit_code=0,
        started_at=100.0,
        finished_at=160.5,
        streams=(report,),
    )
    text = render(done, last_success=160.5)
    assert 'stream="we\\"ird\\\\name"' in text
    parsed = {
        (s.name, s.labels.get("stream")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert parsed[("etl_records_sent", 'we"ird\\name')] == 2
    assert parsed[("etl_run_duration_seconds", None)] == 60.5
    assert previous_success(text, "sync") == 160.5
    assert previous_success(text, "backfill") is None
    assert previous_success("garbage", "sync") is None
