"""The YAML loader for mapping files: PyYAML's safe loader with YAML 1.2 core
scalars, rejecting duplicate keys.

`MappingLoader` resolves plain scalars by the YAML 1.2 core schema, not PyYAML's
YAML 1.1 one: `NO`, `on` and `2024-01-01` stay text and `012` is 12, while `<<`
merges still work. It raises `DuplicateKeyError` listing every repeated key,
or, with `reject_duplicates = False`, lists them in `duplicate_keys` so that
`etl.mapping.parse` can report them beside a file's other problems.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from yaml.constructor import ConstructorError

_TAG = "tag:yaml.org,2002:"
# (tag, pattern, first characters): the YAML 1.2 core schema (spec §10.3.2).
# PyYAML implements YAML 1.1, where `no`/`on` are booleans, `012` is octal and
# `2024-01-01` a date: all surprises in a file of column names and values.
# Order matters: a plain `12` must meet the int pattern before the float one.
_CORE_RESOLVERS = (
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
    # Not core, but `<<: *base` to share field specs is too useful to drop.
    ("merge", r"^<<$", ["<"]),
)


@dataclasses.dataclass(frozen=True)
class DuplicateKey:
    """A key given twice in one YAML mapping; `path` leads to that mapping."""

    path: tuple[str, ...]
    key: str
    first_line: int
    second_line: int


class DuplicateKeyError(yaml.YAMLError):
    """A document repeats keys; `duplicates` lists every repeat in it."""

    def __init__(self, duplicates: Sequence[DuplicateKey]) -> None:
        self.duplicates = tuple(duplicates)
        super().__init__(
            "; ".join(
                f"duplicate key {d.key!r} on lines {d.first_line} and {d.second_line}"
                for d in duplicates
            )
        )


class MappingLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 core scalars that rejects duplicate keys.

    `yaml.load(text, Loader=MappingLoader)` raises `DuplicateKeyError` listing
    every duplicate. `parse_mapping` sets `reject_duplicates = False` and reads
    `duplicate_keys` instead, so it can report the file's other problems too.
    """

    reject_duplicates: bool = True
    duplicate_keys: tuple[DuplicateKey, ...] = ()

    def construct_document(self, node: yaml.Node) -> Any:
        """Find every duplicate key in the tree, then build it as usual."""
        self.duplicate_keys = tuple(self._duplicates(node, (), set()))
        if self.duplicate_keys and self.reject_duplicates:
            raise DuplicateKeyError(self.duplicate_keys)
        return super().construct_document(node)

    def _duplicates(
        self, node: yaml.Node, path: tuple[str, ...], seen: set[int]
    ) -> Iterator[DuplicateKey]:
        # Aliases share nodes and may even be recursive: visit each node once.
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                yield from self._duplicates(item, (*path, str(index)), seen)
        if not isinstance(node, yaml.MappingNode):
            return
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == f"{_TAG}merge":
                continue  # keys beside a `<<` merge override the merged ones by design
            key = self.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key in first_lines:
                yield DuplicateKey(path, str(key), first_lines[key], line)
            elif key is not None:
                first_lines[key] = line
            yield from self._duplicates(value_node, (*path, str(key)), seen)


def _construct_int(loader: MappingLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.2 ints: decimal (`012` is 12), `0o` octal, `0x` hex."""
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text if base == 10 else text[2:], base)
    except ValueError:  # only an explicit `!!int` tag can get here
        raise ConstructorError(None, None, f"not an integer: {text!r}", node.start_mark) from None


# Start from no resolvers at all, not from SafeLoader's YAML 1.1 ones.
MappingLoader.yaml_implicit_resolvers = {}
for _name, _pattern, _first in _CORE_RESOLVERS:
    MappingLoader.add_implicit_resolver(f"{_TAG}{_name}", re.compile(_pattern), _first)
MappingLoader.add_constructor(f"{_TAG}int", _construct_int)
