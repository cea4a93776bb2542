"""YAML as loratune reads it: safe types only, and a bounded size.

A recipe (or a ``--set`` / ``--template-var`` value) is YAML a user may have been handed. PyYAML's
safe loader constructs no Python objects, but its aliases (``&a`` / ``*a``) let a few lines stand for
billions of values (the "billion laughs"): the loader shares them, and whatever walks the result
afterwards (validation, an error message's repr, the recipe written back) expands them. So the
document's node graph is measured before it is constructed, and refused past a bound.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

YAML_MAX_NODES = 100_000
"""The most values a recipe (or a ``--set`` value) may expand to, aliases counted as often as they are used:
a real recipe has a few hundred; a YAML alias bomb ("billion laughs") has billions and would exhaust
memory in anything that walks it, an error message included."""


def safe_yaml(text: str, what: str) -> Any:
    """``text`` read as YAML with safe types only, refused (ConfigError naming ``what``) where its
    aliases expand past :data:`YAML_MAX_NODES` values; YAMLError/ValueError/RecursionError pass through."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > YAML_MAX_NODES:
            raise ConfigError(f"{what} expands to more than {YAML_MAX_NODES:,} values through its YAML aliases "
                              "(&name / *name): a recipe that large is not a recipe; write its values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias expanded; each distinct node counted once
    (``seen``), so a bomb is measured without being expanded. Stops counting past the limit."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = YAML_MAX_NODES + 1  # a node that contains itself (a recursive alias) counts as too many
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, seen)
            if size > YAML_MAX_NODES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            size += _expanded_size(key, seen) + _expanded_size(child, seen)
            if size > YAML_MAX_NODES:
                break
    seen[id(node)] = size
    return size


def yaml_value(text: str) -> Any:
    """``text`` as YAML reads a value (``false`` -> False, ``8`` -> 8), or the text itself where it is no YAML."""
    try:
        return safe_yaml(text, f"the value {text[:40]!r}") if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # YAML's constructors raise ValueError (2001-13-45)
        return text
