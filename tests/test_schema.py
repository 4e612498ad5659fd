"""`etl schema mapping`: the JSON Schema and the validator accept and refuse the same keys."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support import REPO, run_cli

from etl.errors import MappingError
from etl.mapping import fields, parse
from etl.mapping.keys import KEY_SETS, KeySet
from etl.mapping.schema import mapping_schema
from etl.mapping.yaml12 import MappingLoader

SCHEMA = mapping_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _yaml(text: str) -> Any:
    loader = MappingLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _examples() -> list[tuple[str, str]]:
    """The shipped mapping files and every mapping example in docs/ (a YAML block with a
    `source:`), as (where, text)."""
    found = [(str(p.relative_to(REPO)), p.read_text()) for p in sorted(REPO.glob("mappings/*.yml"))]
    for page in sorted((REPO / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", page.read_text(), re.DOTALL)):
            if re.search(r"^source:", block, re.MULTILINE):
                found.append((f"docs/{page.name}#{i}", block))
    return found


EXAMPLES = _examples()
# A valid mapping, and where in it each key set is checked by the validator.
BASE = _yaml((REPO / "mappings" / "users.yml").read_text())
PLACES: dict[str, tuple[str, ...]] = {
    "mapping": (),
    "source": ("source",),
    "field": ("traits", "plan"),
    "related": ("related",),
    "on_gone": ("on_gone",),
}


def _at(data: dict[str, Any], place: tuple[str, ...]) -> dict[str, Any]:
    if place == ("related",):  # a list of entries: check the first
        data["related"] = [{"table": "memberships", "key": "user_id", "cursor": "updated_at"}]
        entry: dict[str, Any] = data["related"][0]
        return entry
    if place == ("on_gone",):
        data["on_gone"] = {"traits": {"deleted": True}}
        on_gone: dict[str, Any] = data["on_gone"]
        return on_gone
    for name in place:
        if not isinstance(data.get(name), dict):
            data[name] = {"column": "plan"}
        data = data[name]
    return data


def _merged(data: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`data` with `change` merged in, mapping by mapping."""
    for name, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            _merged(data[name], value)
        else:
            data[name] = value
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    try:
        parse.parse_mapping(json.dumps(data), path="m.yml")
    except MappingError as exc:
        return list(exc.problems)
    return []


def test_the_schema_is_valid_json_schema() -> None:
    """The generated schema is a valid draft 2020-12 schema with every key set defined."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["$defs"]) == {key_set.name for key_set in KEY_SETS} - {"mapping"}


@pytest.mark.parametrize(("where", "text"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_mappings_pass_both(where: str, text: str) -> None:
    """Every shipped and documented mapping passes the validator and the schema."""
    parse.parse_mapping(text, path=where)
    VALIDATOR.validate(_yaml(text))


@pytest.mark.parametrize("key_set", KEY_SETS, ids=lambda k: k.name)
def test_every_key_of_the_schema_is_accepted_by_the_validator(key_set: KeySet) -> None:
    """Each key the schema lists is not an unknown key to the validator, and a key it does
    not list is refused by both."""
    schema = SCHEMA if key_set.name == "mapping" else SCHEMA["$defs"][key_set.name]
    assert set(schema["properties"]) == set(key_set.names)
    for name in schema["properties"]:
        data = copy.deepcopy(BASE)
        _at(data, PLACES[key_set.name])[name] = "x"
        assert not [p for p in _problems(data) if f"unknown key {name!r}" in p]
    data = copy.deepcopy(BASE)
    _at(data, PLACES[key_set.name])["bogus_key"] = "x"
    assert any("unknown key 'bogus_key'" in p for p in _problems(data))
    assert not VALIDATOR.is_valid(data)


def test_the_validator_checks_keys_only_against_the_schema_key_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every key set the validator checks a mapping against is one the schema is built from."""
    seen: list[KeySet] = []
    real = fields.check_keys

    def spy(data: dict[Any, Any], allowed: KeySet, at: str, problems: fields.Problems) -> None:
        seen.append(allowed)
        real(data, allowed, at, problems)

    monkeypatch.setattr(fields, "check_keys", spy)
    monkeypatch.setattr(parse, "check_keys", spy)
    for where, text in EXAMPLES:
        parse.parse_mapping(text, path=where)
    assert {k.name for k in seen} == {k.name for k in KEY_SETS}
    assert all(key_set in KEY_SETS for key_set in seen)


BAD = {
    "an unknown top key": {"curser": "updated_at"},
    "an unknown source key": {"source": {"table": "users", "filter": "x"}},
    "both table and query": {"source": {"query": "SELECT 1"}},
    "both column and sql": {"traits": {"email": {"column": "email", "sql": "email"}}},
    "a type that does not exist": {"traits": {"email": {"column": "email", "type": "str"}}},
    "encoding without type text": {"traits": {"email": {"column": "email", "encoding": "utf-8"}}},
    "an unknown event type": {"event_type": "user_identity"},
    "a bad lookback": {"lookback": "ten minutes"},
    "a bad stream name": {"stream": "-users"},
    "an empty key list": {"key": []},
}


@pytest.mark.parametrize("change", BAD.values(), ids=list(BAD))
def test_bad_mappings_are_refused_by_both(change: dict[str, Any]) -> None:
    """A mapping the validator refuses for its shape, the schema refuses too."""
    data = _merged(copy.deepcopy(BASE), change)
    assert _problems(data)
    assert not VALIDATOR.is_valid(data)


@pytest.mark.parametrize("missing", ["event_type", "source", "key", "user_id", "traits"])
def test_required_keys_agree(missing: str) -> None:
    """A mapping without a required key is refused by both."""
    data = copy.deepcopy(BASE)
    del data[missing]
    assert any(f"{missing}: is missing" in p for p in _problems(data))
    assert not VALIDATOR.is_valid(data)


def test_required_traits_agree() -> None:
    """A user stream without an email trait is refused by both."""
    data = copy.deepcopy(BASE)
    del data["traits"]["email"]
    assert any("requires email" in p for p in _problems(data))
    assert not VALIDATOR.is_valid(data)


def test_etl_schema_mapping_prints_and_writes_the_schema(tmp_path: Path) -> None:
    """`etl schema mapping` prints the schema; `--output FILE` writes it."""
    printed = run_cli(["schema", "mapping"], {})
    assert printed.exit_code == 0
    assert json.loads(printed.stdout) == SCHEMA
    out = tmp_path / "mapping.schema.json"
    written = run_cli(["schema", "mapping", "--output", str(out)], {})
    assert written.exit_code == 0
    assert json.loads(out.read_text()) == SCHEMA
