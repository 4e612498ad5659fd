"""Every default lives once, in etl.settings: the CLI, the library API and the docs agree."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import re
from pathlib import Path
from typing import Any

import click
import pytest

import etl
from etl.api import delivery_settings, event_identity
from etl.cli import main
from etl.errors import UsageError
from etl.model import Mapping
from etl.run.options import RunOptions
from etl.settings import (
    DELIVERY,
    JOB,
    READ,
    RECEIVER,
    DeliverySettings,
    EventIdentity,
    duration_text,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# option -> the settings value it defaults to, as the CLI and the docs spell it
SETTINGS_DEFAULTS: dict[str, Any] = {
    "--state": JOB.state_url,
    "--mappings": JOB.mappings_dir,
    "--log-format": JOB.log_format,
    "--page-size": READ.page_size,
    "--max-transaction-age": duration_text(READ.max_transaction_age),
    "--reconnect-attempts": READ.reconnect_attempts,
    "--reconnect-time": duration_text(READ.reconnect_time),
    "--endpoint": DELIVERY.endpoint,
    "--batch-size": DELIVERY.batch_size,
    "--batch-bytes": DELIVERY.batch_bytes,
    "--concurrency": DELIVERY.concurrency,
    "--max-rps": DELIVERY.max_rps,
    "--host": RECEIVER.host,
    "--port": RECEIVER.port,
    "--store": RECEIVER.store,
}
# options only the CLI has: monitoring, logging, and the flags that pick the command
CLI_ONLY = {
    *("metrics_file", "notify_url", "log_format", "dry_run", "fmt", "output", "redact"),
    "show_all",  # diff --all: how much of the report to print, not what to read
    "quiet",
}


def _options(command: click.Command) -> dict[str, click.Option]:
    return {
        opt: param
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--")
    }


def _all_commands(group: click.Group) -> list[click.Command]:
    found: list[click.Command] = []
    for command in group.commands.values():
        found.append(command)
        if isinstance(command, click.Group):
            found += _all_commands(command)
    return found


def _doc_rows() -> dict[str, str]:
    """`--option` -> the default cell of its row in an options table of the docs."""
    rows: dict[str, str] = {}
    for page in DOCS:
        for line in page.read_text(encoding="utf-8").splitlines():
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            match = re.fullmatch(r"`(--[a-z-]+)[^`]*`", cells[0]) if len(cells) >= 4 else None
            if match:
                rows.setdefault(match[1], cells[2].strip("`"))
    return rows


@pytest.mark.parametrize("option", sorted(SETTINGS_DEFAULTS))
def test_cli_options_default_to_the_settings(option: str) -> None:
    """Every command taking an option with a settings default shows that very value."""
    commands = [c for c in _all_commands(main) if option in _options(c)]
    assert commands, f"no command takes {option}"
    for command in commands:
        assert _options(command)[option].default == SETTINGS_DEFAULTS[option], command.name


@pytest.mark.parametrize("option", sorted(o for o, v in SETTINGS_DEFAULTS.items() if v is not None))
def test_docs_options_table_shows_the_settings_default(option: str) -> None:
    """The options table in the docs gives each default exactly as settings holds it."""
    rows = _doc_rows()
    assert option in rows, f"{option} has no row in an options table of {[p.name for p in DOCS]}"
    assert rows[option] == str(SETTINGS_DEFAULTS[option])


def test_docs_give_the_retry_budget_from_settings() -> None:
    """The delivery section states the attempts and the time budget that settings holds."""
    page = " ".join((ROOT / "docs" / "reference.md").read_text(encoding="utf-8").split())
    minutes = DELIVERY.max_retry_seconds / 60
    assert f"bounded by {DELIVERY.max_attempts} attempts and {minutes:g} minutes" in page


@pytest.mark.parametrize("name", ["sync", "backfill", "diff"])
def test_library_api_defaults_are_the_cli_defaults(name: str) -> None:
    """Each keyword the library API shares with the CLI defaults to the same settings value."""
    function = getattr(etl, name)
    command = main.commands[name]
    defaults = {p.name: p.default for p in command.params if isinstance(p, click.Option)}
    checked = 0
    for param in inspect.signature(function).parameters.values():
        if param.name not in defaults or param.default in (inspect.Parameter.empty, None, False):
            continue
        cli_default = defaults[param.name]
        api_default = param.default
        if isinstance(api_default, dt.timedelta):
            api_default = duration_text(api_default)
        assert str(api_default) == str(cli_default), param.name
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", ["sync", "backfill", "diff"])
def test_every_cli_option_reaches_the_library(name: str) -> None:
    """The CLI hands options to the API by name: an option the API lacks would be dropped."""
    takes = set(inspect.signature(getattr(etl, name)).parameters)
    for param in main.commands[name].params:
        if param.name not in CLI_ONLY:
            assert param.name in takes, f"etl {name} --{param.name}: not a keyword of etl.{name}"


def test_stage_defaults_are_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataclasses the stages share default to the settings objects' values."""
    options = RunOptions()
    assert options.page_size == READ.page_size
    assert options.max_transaction_age == READ.max_transaction_age
    assert options.reconnect.attempts == READ.reconnect_attempts
    assert options.reconnect.seconds == READ.reconnect_time.total_seconds()
    lookback = {f.name: f.default for f in dataclasses.fields(Mapping)}["lookback_seconds"]
    assert lookback == READ.lookback_seconds
    monkeypatch.delenv("HYPERENGAGE_ENDPOINT", raising=False)
    sending = delivery_settings()
    assert sending == DELIVERY


def test_settings_are_frozen() -> None:
    """A settings object cannot be changed in place: a default is the same for everyone."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        READ.page_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3600, "1h"), (600, "10m"), (90, "90s"), (86_400, "1d"), (5400, "90m"), (1.5, "1.5s")],
)
def test_duration_text_uses_the_largest_whole_unit(seconds: float, text: str) -> None:
    """Durations read as the options are written: 1h, 10m, 90s."""
    assert duration_text(dt.timedelta(seconds=seconds)) == text


def test_event_identity_is_apart_from_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run takes the keys without an endpoint or token; sending requires both keys."""
    monkeypatch.delenv("HYPERENGAGE_API_KEY", raising=False)
    monkeypatch.setenv("HYPERENGAGE_WORKSPACE_KEY", "ws-1")
    identity = event_identity(required=False)
    assert identity == EventIdentity(api_key="", workspace_key="ws-1")
    with pytest.raises(UsageError, match="HYPERENGAGE_API_KEY not set"):
        event_identity(required=True)
    assert "token" not in {f.name for f in dataclasses.fields(DeliverySettings)}
