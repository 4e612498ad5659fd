"""The check before a run (`check.prepare`): every stream's queries, with no rows,
against a real SQLite source; a stream that fails is explained problem by problem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import copy_mappings, seed

from etl.errors import MappingError
from etl.mapping.parse import load_mappings
from etl.source import check


@pytest.fixture
def source(tmp_path: Path) -> Iterator[sa.Engine]:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    seed(url, n_workspaces=1, n_users=2)
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def edited(tmp_path: Path, **edits: tuple[str, str]) -> Path:
    """The example mappings, with `file=(old, new)` replaced in each named file."""
    directory = copy_mappings(tmp_path / "mappings")
    for name, (old, new) in edits.items():
        path = directory / f"{name}.yml"
        path.write_text(path.read_text().replace(old, new))
    return directory


def statements(engine: sa.Engine) -> list[str]:
    """Every statement the engine runs from now on (a listener appends them)."""
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


def test_streams_whose_queries_run_are_prepared_without_looking_up_the_catalog(
    tmp_path: Path, source: sa.Engine
) -> None:
    """When a stream's page queries run with no rows, they are the whole check: no
    table or column look-up in the catalog, no probe per expression."""
    mappings = load_mappings(edited(tmp_path))
    seen = statements(source)
    check.prepare(source, mappings)
    assert [s for s in seen if "table_info" in s or "sqlite_master" in s] == []
    # one query per read order (key, cursor) per stream
    assert sum("LIMIT" in s for s in seen) == 2 * len(mappings)


def test_streams_whose_queries_fail_are_explained_problem_by_problem(
    tmp_path: Path, source: sa.Engine
) -> None:
    """A missing column and an expression that fails in one stream, a missing table
    in another: one MappingError names all three, each with its key and fix."""
    directory = edited(
        tmp_path,
        users=("email: email", "email: mail"),
        workspaces=("table: workspaces", "table: teams"),
    )
    path = directory / "users.yml"
    path.write_text(path.read_text().replace("' ' || last_name", "' ' ||| last_name"))
    with pytest.raises(MappingError) as raised:
        check.prepare(source, load_mappings(directory))
    text = str(raised.value)
    assert "users.yml: traits.email: no column 'mail' in the source" in text
    assert "users.yml: traits.name.sql: \"first_name || ' ' ||| last_name\" fails" in text
    assert "workspaces.yml: source.table: no table 'teams'" in text
