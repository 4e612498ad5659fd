"""The CLI as users meet it: diff formats, state and runs tables, usage errors, help."""

from __future__ import annotations

import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import cli_env, copy_mappings, run_cli, seed, user_id, users

from etl.report.render import DIFF_JSON_SCHEMA


@pytest.fixture
def env(tmp_path: Path, sqlite_url: str, receiver: Any) -> dict[str, str]:
    """A synced SQLite source with two users changed since, and one made invalid."""
    seed(sqlite_url, n_users=20)
    copy_mappings(tmp_path / "mappings")
    environment = cli_env(tmp_path, sqlite_url, receiver.url)
    assert run_cli(["sync"], environment).exit_code == 0
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            users.update()
            .where(users.c.id.in_([user_id(3), user_id(5)]))
            .values(role="owner", updated_at=sa.func.current_timestamp())
        )
        conn.execute(
            users.update()
            .where(users.c.id == user_id(9))
            .values(email="", updated_at=sa.func.current_timestamp())
        )
    engine.dispose()
    return environment


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_diff_json_follows_the_documented_schema(env: dict[str, str]) -> None:
    """`diff --format json` validates against the published JSON Schema."""
    jsonschema = pytest.importorskip("jsonschema")
    result = run_cli(["diff", "--format", "json"], env)
    assert result.exit_code == 3  # one invalid record
    data = json.loads(result.stdout)
    jsonschema.validate(data, DIFF_JSON_SCHEMA)
    stream = next(s for s in data["streams"] if s["stream"] == "users")
    kinds = {r["key"]: r["kind"] for r in stream["records"]}
    assert kinds == {user_id(3): "changed", user_id(5): "changed", user_id(9): "invalid"}
    assert stream["counts"]["changed"] == 2


def test_diff_leaves_the_state_store_byte_for_byte_unchanged(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Every format and --full read the state without writing a byte of it."""
    state = tmp_path / "state.db"
    before = digest(state)
    for args in (["diff"], ["diff", "--full", "--format", "html"], ["sync", "--dry-run"]):
        run_cli(args, env)
    assert digest(state) == before


def test_diff_on_a_missing_state_store_creates_nothing(env: dict[str, str], tmp_path: Path) -> None:
    """A dry run against a state store that does not exist lists everything as new."""
    missing = tmp_path / "nowhere.db"
    result = run_cli(["diff", "--format", "json"], {**env, "ETL_STATE_URL": f"sqlite:///{missing}"})
    assert not missing.exists()
    data = json.loads(result.stdout)
    assert sum(s["counts"]["new"] for s in data["streams"]) == 3 + 19


@pytest.mark.parametrize("fmt", ["text", "markdown", "html"])
def test_diff_formats_show_the_changes(env: dict[str, str], fmt: str, tmp_path: Path) -> None:
    """Each human format names the changed keys and the old → new values."""
    out = tmp_path / f"report.{fmt}"
    result = run_cli(["diff", "--format", fmt, "--output", str(out)], env)
    assert result.exit_code == 3
    text = out.read_text()
    assert user_id(3) in text
    assert "member" in text
    assert "owner" in text
    assert "required trait" in text


def test_diff_html_is_one_self_contained_page(env: dict[str, str], tmp_path: Path) -> None:
    """The HTML report parses, has a summary table and references nothing outside."""
    out = tmp_path / "report.html"
    run_cli(["diff", "--format", "html", "--output", str(out)], env)
    html = out.read_text()
    tags: list[str] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.append(tag)
            for name, value in attrs:
                if name in ("src", "href") and value:
                    assert value.startswith("#")

    Collect().feed(html)
    assert "table" in tags
    assert "style" in tags
    assert "<script" not in html


def test_diff_limit_and_redact(env: dict[str, str]) -> None:
    """--limit caps listed records, invalid ones first (counts stay exact); --redact masks
    emails and names."""
    result = run_cli(["diff", "--format", "json", "--limit", "1", "--redact"], env)
    stream = next(s for s in json.loads(result.stdout)["streams"] if s["stream"] == "users")
    assert [r["kind"] for r in stream["records"]] == ["invalid"]
    assert stream["truncated"] == 2
    assert stream["counts"]["changed"] == 2
    result = run_cli(["diff", "--format", "json", "--limit", "2", "--redact"], env)
    stream = next(s for s in json.loads(result.stdout)["streams"] if s["stream"] == "users")
    assert [r["kind"] for r in stream["records"]] == ["invalid", "changed"]
    traits = stream["records"][1]["traits"]
    assert traits["email"].startswith("u***@e***.")
    assert "example.com" not in result.stdout


def test_dry_run_agrees_with_the_following_sync(env: dict[str, str], receiver: Any) -> None:
    """The records diff lists as new/changed are exactly those sync then sends (and --full)."""
    for extra in ([], ["--full"]):
        dry = json.loads(run_cli(["diff", "--format", "json", *extra], env).stdout)
        listed = {
            (s["event_type"], r["key"])
            for s in dry["streams"]
            for r in s["records"]
            if r["kind"] in ("new", "changed")
        }
        before = len(receiver.events())
        run_cli(["sync", *extra], env)
        sent = {
            (
                e["event_type"],
                e["user_id"] if e["event_type"] == "user_identify" else e["account_id"],
            )
            for e in receiver.events()[before:]
        }
        assert listed == sent
    assert listed == set()  # the second round: nothing left to send


def test_state_show_and_runs_in_text_and_json(env: dict[str, str]) -> None:
    """`state show` and `runs` print readable tables and stable JSON."""
    shown = run_cli(["state", "show"], env)
    assert shown.exit_code == 0
    assert "users" in shown.output
    assert "watermark" in shown.output
    data = json.loads(run_cli(["state", "show", "--format", "json"], env).stdout)
    users_state = next(s for s in data["streams"] if s["stream"] == "users")
    assert users_state["records"] == 20
    runs = json.loads(run_cli(["runs", "--format", "json"], env).stdout)
    assert runs[0]["command"] == "sync"
    assert runs[0]["status"] == "ok"
    assert {s["stream"] for s in runs[0]["streams"]} == {"users", "workspaces"}
    text = run_cli(["runs"], env).output
    assert "20 sent" in text


def test_state_reset_forgets_a_stream(env: dict[str, str], receiver: Any) -> None:
    """After a reset, the next sync re-sends every record of that stream."""
    result = run_cli(["state", "reset", "--stream", "workspaces"], env)
    assert result.exit_code == 0
    assert "forgot 3 record(s)" in result.output
    before = len(receiver.events())
    run_cli(["sync", "--stream", "workspaces"], env)
    assert len(receiver.events()) - before == 3


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("HYPERENGAGE_TOKEN", "HYPERENGAGE_TOKEN"),
        ("HYPERENGAGE_API_KEY", "HYPERENGAGE_API_KEY"),
        ("HYPERENGAGE_WORKSPACE_KEY", "HYPERENGAGE_WORKSPACE_KEY"),
        ("ETL_SOURCE_URL", "--source"),
    ],
)
def test_missing_configuration_exits_2_before_anything_is_read(
    tmp_path: Path, sqlite_url: str, missing: str, named: str
) -> None:
    """No token, api key, workspace key or source: exit 2, naming it, no state created."""
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, "http://127.0.0.1:9/api/v1/s2s/event")
    env[missing] = ""
    result = run_cli(["sync"], env)
    assert result.exit_code == 2
    assert named in result.stderr
    assert not (tmp_path / "state.db").exists()


def test_a_plain_http_endpoint_off_loopback_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    """http:// to a remote host would send the token in clear: exit 2."""
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, "http://events.example.com/api/v1/s2s/event")
    result = run_cli(["sync"], env)
    assert result.exit_code == 2
    assert "https" in result.stderr.lower()


def test_help_teaches(tmp_path: Path) -> None:
    """`etl --help` lists the commands, exit codes and where secrets come from."""
    result = run_cli(["--help"], {})
    assert result.exit_code == 0
    for word in ("sync", "backfill", "diff", "validate", "HYPERENGAGE_TOKEN", "Exit codes"):
        assert word in result.output
    sync_help = run_cli(["sync", "--help"], {}).output
    assert "ETL_SOURCE_URL" in sync_help
    assert "--batch-size" in sync_help


def test_validate_without_a_source_checks_the_files_only(tmp_path: Path) -> None:
    """`etl validate` works with no database at all."""
    copy_mappings(tmp_path / "mappings")
    result = run_cli(["validate", "--mappings", str(tmp_path / "mappings")], {})
    assert result.exit_code == 0
    assert "valid" in result.output


def test_validate_check_source_reports_every_problem(tmp_path: Path, sqlite_url: str) -> None:
    """A wrong column and a broken SQL expression are both reported, with the fix."""
    seed(sqlite_url)
    mappings = copy_mappings(tmp_path / "mappings")
    users_yml = mappings / "users.yml"
    users_yml.write_text(
        users_yml.read_text()
        .replace("  email: email", "  email: mail")
        .replace("first_name || ' ' || last_name", "first_name ||| last_name")
    )
    result = run_cli(["validate", "--check-source"], cli_env(tmp_path, sqlite_url, ""))
    assert result.exit_code == 2
    assert "users.yml: traits.email: no column 'mail'" in result.stderr
    assert "traits.name.sql" in result.stderr
    assert "fix" in result.stderr


def test_an_unexpected_error_exits_1_without_the_token(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug deep inside still exits 1, with a traceback that has the token masked."""
    from support import TOKEN

    from etl.run import pipeline

    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(f"boom at https://events.example.com/e?token={TOKEN} ({TOKEN})")

    monkeypatch.setattr(pipeline, "run", explode)
    monkeypatch.setattr("etl.api.run", explode)
    result = run_cli(["sync"], env)
    assert result.exit_code == 1
    assert "RuntimeError" in result.stderr
    assert "Traceback" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_max_transaction_age_is_checked_before_anything_is_read(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """A malformed --max-transaction-age exits 2 with the accepted forms; a good one runs."""
    seed(sqlite_url)
    copy_mappings(tmp_path / "mappings")
    env = cli_env(tmp_path, sqlite_url, receiver.url)
    bad = run_cli(["sync", "--max-transaction-age", "soon"], env)
    assert bad.exit_code == 2
    assert "30s, 10m, 2h, 1d" in bad.stderr
    assert not (tmp_path / "state.db").exists()
    good = run_cli(["sync"], {**env, "ETL_MAX_TRANSACTION_AGE": "90m"})
    assert good.exit_code == 0


@pytest.mark.parametrize(
    "command",
    [
        ["validate"],
        ["sync"],
        ["backfill"],
        ["diff"],
        ["state", "show"],
        ["state", "reset"],
        ["runs"],
        ["receiver"],
        ["init"],
    ],
)
def test_every_command_takes_log_format(command: list[str]) -> None:
    """`--log-format` (ETL_LOG_FORMAT) works everywhere, so cron logs stay JSON."""
    result = run_cli([*command, "--help"], {})
    assert result.exit_code == 0
    assert "--log-format" in result.output
