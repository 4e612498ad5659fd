"""Mapping files -> validated `Mapping` objects (SPEC §4).

Each `*.yml` / `*.yaml` file in the mappings directory declares one stream.
Every problem in every file is collected and raised once as a `MappingError`,
each written `file: key: problem — fix`, so one `etl validate` shows them all.

Files are read with `MappingLoader` (etl.mapping.yaml12): PyYAML's safe loader with
YAML 1.2 core scalars (`NO`, `on` and `2024-01-01` stay text, `012` is 12)
that rejects duplicate keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from etl.errors import MappingError
from etl.mapping.fields import (
    REQUIRED,
    Problems,
    check_keys,
    choice,
    describe,
    optional_text,
    suggest,
    valid_field,
    valid_full_every,
    valid_key,
    valid_lookback,
    valid_on_gone,
    valid_related,
    valid_source,
    valid_stream,
    valid_timezone,
    valid_traits,
)
from etl.mapping.keys import MAPPING, TRACK_REQUIRED
from etl.mapping.track import not_track, valid_properties, valid_track
from etl.mapping.yaml12 import DuplicateKey, MappingLoader
from etl.model import (
    EVENT_TYPES,
    PER_ROW_EVENT_TYPE,
    STREAM_KINDS,
    EventType,
    Mapping,
    Related,
    StreamKind,
    Track,
)
from etl.settings import READ

# The public API, with the names that moved to etl.mapping.yaml12 and etl.mapping.fields.


_EVENT_TYPES: dict[str, EventType] = {name: name for name in EVENT_TYPES}
_KINDS: dict[str, StreamKind] = {kind: kind for kind in STREAM_KINDS}


def mapping_fingerprint(mapping: Mapping) -> str:
    """sha256 of the mapping's definition; a change forces a full diff (SPEC §5).

    Built from the validated objects, so whitespace, comments, quoting and
    trait order (nothing sent depends on it) leave it unchanged; `path` is
    left out so that moving the mappings directory is not a change.
    """
    definition = dataclasses.asdict(mapping)
    del definition["path"], definition["fingerprint"]
    # How often full reads run and what a gone record gets change no row's
    # payload; absent related tables leave the definition as it was before
    # related existed (no re-map after an upgrade).
    del definition["full_every_seconds"], definition["on_gone"]
    if not definition["related"]:
        del definition["related"]
    definition["traits"] = sorted(definition["traits"], key=lambda trait: trait["name"])
    if definition["track"] is None:
        # identify streams: the same fingerprint as before track streams existed
        del definition["track"]
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _build(data: dict[Any, Any], problems: Problems) -> Mapping | None:
    """A file's top-level mapping -> Mapping, or None when `problems` got any."""
    kind = choice(data["kind"], _KINDS, "kind", problems) if "kind" in data else "identify"
    # keys of the other kind are known: not_track / valid_track say why they do not apply
    check_keys(data, MAPPING, "", problems)
    required = TRACK_REQUIRED if kind == "track" else REQUIRED
    for name, fix in required.items():
        if name not in data:
            problems.add(name, "is missing", fix)
    if kind == "identify":
        not_track(data, problems)
    stream = valid_stream(data, problems.path, problems)
    event_type: str | None = None
    track: Track | None = None
    if kind == "track":
        track = valid_track(data, problems)
        if track is not None:
            const = track.name.kind == "const"
            event_type = str(track.name.value) if const else PER_ROW_EVENT_TYPE
    elif "event_type" in data:
        event_type = choice(data["event_type"], _EVENT_TYPES, "event_type", problems)
    source = valid_source(data["source"], problems) if "source" in data else None
    key = valid_key(data["key"], problems) if "key" in data else None
    # No cursor (or null): every sync reads all rows and diffs them.
    cursor = optional_text(data, "cursor", "cursor", problems, "a column name")
    lookback = valid_lookback(data.get("lookback", READ.lookback_seconds), problems)
    timezone = valid_timezone(data.get("timezone", "UTC"), problems)
    # user_id/account_id must not be null (valid_field reports it); the others may.
    ids = {
        name: valid_field(data[name], name, name, problems)
        for name in ("user_id", "account_id", "anonymous_id", "url")
        if name in data and (data[name] is not None or name in REQUIRED)
    }
    user_id, account_id = ids.get("user_id"), ids.get("account_id")
    related: tuple[Related, ...] = ()
    full_every: float | None = None  # track streams: never (valid_track refuses the keys)
    on_gone: tuple[tuple[str, Any], ...] = ()
    if kind == "track":
        traits = valid_properties(data.get("properties"), problems)
    else:
        identify_type = _EVENT_TYPES.get(event_type or "")
        traits = valid_traits(data["traits"], identify_type, problems) if "traits" in data else ()
        related = valid_related(data.get("related"), key, lookback or 0.0, problems)
        full_every = valid_full_every(
            data.get("full_every", READ.full_every_seconds), READ.full_every_seconds, problems
        )
        on_gone = valid_on_gone(data.get("on_gone"), identify_type, problems)
    # A None below always came with a problem; the checks narrow the types.
    if (
        problems.items
        or kind is None
        or stream is None
        or event_type is None
        or source is None
        or key is None
        or lookback is None
        or timezone is None
        or user_id is None
        or account_id is None
    ):
        return None
    mapping = Mapping(
        stream=stream,
        path=problems.path,
        event_type=event_type,
        source=source,
        key=key,
        cursor=cursor,
        user_id=user_id,
        account_id=account_id,
        traits=traits,
        anonymous_id=ids.get("anonymous_id"),
        url=ids.get("url"),
        lookback_seconds=lookback,
        timezone=timezone,
        related=related,
        full_every_seconds=full_every,
        on_gone=on_gone,
        track=track,
    )
    return dataclasses.replace(mapping, fingerprint=mapping_fingerprint(mapping))


def _load_yaml(text: str) -> tuple[Any, tuple[DuplicateKey, ...]]:
    """The document in `text` and its duplicate keys (which do not stop loading)."""
    loader = MappingLoader(text)
    loader.reject_duplicates = False
    try:
        return loader.get_single_data(), loader.duplicate_keys
    finally:
        loader.dispose()


def _read_yaml(text: str, problems: Problems) -> dict[Any, Any] | None:
    """The file's top-level mapping, else None; bad syntax and duplicate keys are problems."""
    try:
        data, duplicates = _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = ", ".join(part for part in (exc.context, exc.problem) if part)
        problems.add(
            where,
            problem or "invalid YAML",
            # a tab pasted from an editor is the commonest way to get here
            "indent with spaces: YAML does not allow tabs there"
            if "'\\t'" in problem
            else "fix the YAML there (check indentation; quote values containing ': ' or ' #')",
        )
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problems.add(
            f"line {line}",
            f"character {chr(exc.character)!r} is not allowed in YAML",
            "remove it, or write it as an escape such as \\t inside double quotes",
        )
        return None
    except (yaml.YAMLError, ValueError) as exc:  # e.g. an explicit `!!float abc`
        problems.add("(yaml)", str(exc), "fix the YAML")
        return None
    for dup in duplicates:
        problems.add(
            ".".join((*dup.path, dup.key)),
            f"duplicate key {dup.key!r} on lines {dup.first_line} and {dup.second_line}",
            "keep only one of them",
        )
    if not isinstance(data, dict):
        problem = f"must be a mapping of keys, got {describe(data)}" if data else "is empty"
        problems.add("(top level)", problem, "start from the example in mappings/users.yml")
        return None
    return data


@dataclasses.dataclass(frozen=True)
class _Parsed:
    """One file's outcome: its stream name (best effort, for the checks between
    files) and its Mapping, or the problems that stopped it."""

    path: str
    stream: str
    mapping: Mapping | None
    problems: tuple[str, ...]


def _parse(text: str, path: str) -> _Parsed:
    """One file's text -> its outcome."""
    problems = Problems(path)
    data = _read_yaml(text, problems)
    mapping = _build(data, problems) if data is not None else None
    declared = data.get("stream") if data is not None else None
    stream = declared if isinstance(declared, str) else Path(path).stem
    return _Parsed(path, stream, mapping, tuple(problems.items))


def parse_mapping(text: str, *, path: str) -> Mapping:
    """One mapping file's content -> Mapping; raises MappingError with all its problems.

    `path` says where the text came from: it starts every message and is kept
    as `Mapping.path`.
    """
    parsed = _parse(text, path)
    if parsed.mapping is None:
        raise MappingError(list(parsed.problems))
    return parsed.mapping


# --- The mappings directory -----------------------------------------------------

_DIRECTORY_FIX = "pass --mappings DIR or set ETL_MAPPINGS"


def load_mappings(directory: Path, *, streams: Sequence[str] | None = None) -> list[Mapping]:
    """Every mapping in `directory`: account streams first, then user streams, then
    track streams, each by name.

    `streams` (None or empty: all) keeps only those streams. Raises MappingError
    with every problem of every file, those between files (one stream name in
    two files) and unknown names in `streams`.
    """
    files, problems = _mapping_files(directory)
    parsed = [_parse_file(file, str(directory / file.name)) for file in files]
    problems += [problem for outcome in parsed for problem in outcome.problems]
    problems += _clashes(parsed)
    known = sorted({outcome.stream for outcome in parsed})
    for name in streams or ():
        if files and name not in known:
            fix = suggest(name, known, "known streams")
            problems.append(f"{directory}: --stream: unknown stream {name!r} — {fix}")
    if problems:
        raise MappingError(problems)
    chosen = [o.mapping for o in parsed if o.mapping and (not streams or o.stream in streams)]
    # Accounts first: a user event may name an account the API should already know;
    # track streams last, so the users and accounts they name exist (SPEC §10).
    return sorted(
        chosen,
        key=lambda mapping: (
            mapping.track is not None,
            mapping.event_type != "account_identify",
            mapping.stream,
        ),
    )


def _mapping_files(directory: Path) -> tuple[list[Path], list[str]]:
    """The mapping files in `directory`, sorted by name, or why there are none."""
    fix = f"point at the directory holding one .yml file per stream: {_DIRECTORY_FIX}"
    if not directory.exists():
        return [], [f"{directory}: mappings directory does not exist — {fix}"]
    if not directory.is_dir():
        return [], [f"{directory}: is not a directory — {fix}"]
    try:
        # Hidden files are editor leftovers (`.#users.yml`), not streams.
        files = sorted(
            path
            for path in directory.iterdir()
            if path.suffix in (".yml", ".yaml") and not path.name.startswith(".") and path.is_file()
        )
    except OSError as exc:
        return [], [f"{directory}: cannot list the directory ({exc.strerror}) — {fix}"]
    if not files:
        return [], [f"{directory}: no mapping files (*.yml, *.yaml) — add one, or {_DIRECTORY_FIX}"]
    return files, []


def _parse_file(file: Path, path: str) -> _Parsed:
    """One mapping file -> its outcome; an unreadable file is a problem too."""
    try:
        return _parse(file.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError as exc:
        problem = f"{path}: byte {exc.start}: not UTF-8 text — save the file as UTF-8"
    except OSError as exc:
        problem = f"{path}: cannot read the file ({exc.strerror}) — check its permissions"
    return _Parsed(path, file.stem, None, (problem,))


def _clashes(parsed: list[_Parsed]) -> list[str]:
    """A problem for every file that declares a stream an earlier file declared."""
    first: dict[str, str] = {}
    problems = []
    for outcome in parsed:
        if outcome.stream in first:
            problems.append(
                f"{outcome.path}: stream: {outcome.stream!r} is also declared in "
                f"{first[outcome.stream]} — give each file its own stream name"
            )
        first.setdefault(outcome.stream, outcome.path)
    return problems
