"""The one YAML reader for everything loraft reads (configs, --set values, a run folder's config.yaml).

Two YAML 1.1 habits of PyYAML's safe loader bite configs, and this loader drops both:
- a key written twice silently keeps the last value (a run went to the second `output_dir`):
  here it is a ConfigError naming the key and both lines;
- `on`, `off`, `yes`, `no` (any case) become booleans, so a documented word such as
  `data.checks.balance: off` arrived as False: here they stay words. Only true/false are booleans, as
  in YAML 1.2; boolean fields still accept the words (pydantic reads "yes"/"off" as booleans).
"""

from __future__ import annotations

import re

import yaml

from lora_ft.errors import ConfigError


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1's bool resolver (yes/no/on/off/true/false) replaced by YAML 1.2's core one (true/false).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            where = f"{loader.name}:{line}" if loader.name and not loader.name.startswith("<") else f"line {line}"
            raise ConfigError(
                f"{where}: key {key!r} appears twice (lines {seen[key]} and {line}); YAML would silently keep "
                f"the last one: delete one of them"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str, name: str = "<string>"):
    """Parse YAML text (safe: no Python objects); `name` (a path) prefixes error messages."""
    loader = _Loader(text)
    loader.name = str(name)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
