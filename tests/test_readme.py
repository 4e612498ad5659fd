"""README.md and docs/ stay true: every command, option, env var, exit code and mapping key
is documented, every link between the pages resolves, and the README stays a short front door."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from etl.cli import EXIT_CODES, main
from etl.mapping import keys as mapping_keys

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {path: path.read_text(encoding="utf-8") for path in sorted((ROOT / "docs").glob("*.md"))}
REFERENCE = PAGES[ROOT / "docs" / "reference.md"]
MAPPINGS = PAGES[ROOT / "docs" / "mappings.md"]
README_MAX_LINES = 120


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
    """Each command appears as `etl NAME` in docs/reference.md with its long options and env."""
    assert f"etl {path}" in REFERENCE
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in REFERENCE, f"etl {path}: option {opt} is not in docs/reference.md"
        if isinstance(param.envvar, str):
            assert param.envvar in REFERENCE, f"etl {path}: env {param.envvar} not in reference"


@pytest.mark.parametrize(
    "name", ["HYPERENGAGE_TOKEN", "HYPERENGAGE_API_KEY", "HYPERENGAGE_WORKSPACE_KEY"]
)
def test_environment_only_variables_are_documented(name: str) -> None:
    """The secrets, which have no flag, are in the reference and in the README's quick start."""
    assert f"`{name}`" in REFERENCE
    assert name in README


def test_every_exit_code_is_documented() -> None:
    """The reference's exit-code table lists every code the CLI can return."""
    codes = {code for _, code in EXIT_CODES} | {0, 3}
    for code in codes:
        assert re.search(rf"^\| {code} \|", REFERENCE, re.MULTILINE), f"exit code {code}"


KEYS = [
    *mapping_keys.MAPPING.names,
    *(f"source.{k}" for k in mapping_keys.SOURCE.names),
    *mapping_keys.FIELD.names,
    *(f"related.{k}" for k in mapping_keys.RELATED.names),
    *(f"on_gone.{k}" for k in mapping_keys.ON_GONE.names),
]


@pytest.mark.parametrize("key", KEYS)
def test_every_mapping_key_is_documented(key: str) -> None:
    """Each key a mapping file accepts has a row in docs/mappings.md's key tables."""
    assert f"| `{key}` |" in MAPPINGS


def test_readme_is_a_short_front_door() -> None:
    """The README stays at most 120 lines and shows set-up, the receiver line and the daily
    commands."""
    assert len(README.splitlines()) <= README_MAX_LINES
    for needle in ("make demo", "make test", "HYPERENGAGE_ENDPOINT=http://127.0.0.1:"):
        assert needle in README
    for command in ("etl diff", "etl backfill", "etl sync"):
        assert command in README


def test_readme_links_every_docs_page() -> None:
    """Every page in docs/ is reachable from the README."""
    for path in PAGES:
        assert f"](docs/{path.name})" in README, f"{path.name} is not linked from README.md"


LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)")


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_links_between_pages_resolve(path: Path) -> None:
    """Each relative link to a .md page names a file that exists, and its #anchor a heading."""
    for target, anchor in LINK.findall(path.read_text(encoding="utf-8")):
        linked = (path.parent / target).resolve()
        assert linked.is_file(), f"{path.name}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(linked.read_text(encoding="utf-8")), (
                f"{path.name}: no heading for #{anchor} in {target}"
            )


def test_shell_completion_is_documented() -> None:
    """The reference shows the click completion line for bash, zsh and fish."""
    for shell in ("bash", "zsh", "fish"):
        assert f"_ETL_COMPLETE={shell}_source etl" in REFERENCE


def test_the_editor_schema_comment_is_documented() -> None:
    """docs/mappings.md shows how to write the schema and the yaml-language-server line."""
    assert "etl schema mapping --output" in MAPPINGS
    assert "# yaml-language-server: $schema=mapping.schema.json" in MAPPINGS
