"""README.md stays true: every command, option, env var, exit code and mapping key is in it."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from etl.cli import EXIT_CODES, main
from etl.mapping import fields as mapping_fields
from etl.mapping import parse as mapping

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        found.append((path, command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{path} ")
    return found


COMMANDS = _commands(main)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_and_its_options_are_documented(path: str, command: click.Command) -> None:
    """Each command appears as `etl NAME`, with each of its long options and env vars."""
    assert f"etl {path}" in README
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in README, f"etl {path}: option {opt} is not in README.md"
        if isinstance(param.envvar, str):
            assert param.envvar in README, f"etl {path}: env {param.envvar} not in README.md"


@pytest.mark.parametrize(
    "name", ["HYPERENGAGE_TOKEN", "HYPERENGAGE_API_KEY", "HYPERENGAGE_WORKSPACE_KEY"]
)
def test_environment_only_variables_are_documented(name: str) -> None:
    """The secrets, which have no flag, are documented too."""
    assert f"`{name}`" in README


def test_every_exit_code_is_documented() -> None:
    """The exit-code table lists every code the CLI can return."""
    codes = {code for _, code in EXIT_CODES} | {0, 3}
    for code in codes:
        assert re.search(rf"^\| {code} \|", README, re.MULTILINE), f"exit code {code}"


KEYS = (
    [*mapping._TOP_KEYS]
    + [f"source.{k}" for k in mapping_fields._SOURCE_KEYS]
    + list(mapping_fields._FIELD_KEYS)
)


@pytest.mark.parametrize("key", KEYS)
def test_every_mapping_key_is_documented(key: str) -> None:
    """Each key a mapping file accepts has a row in the README's mapping reference."""
    assert f"| `{key}` |" in README


def test_readme_shows_the_two_setup_commands() -> None:
    """`make demo` and `make test` are the set-up."""
    assert "make demo" in README
    assert "make test" in README
