"""Config files for commands: a YAML (or JSON) mapping of option names to values, read with the line of
every key so that an error can say where it is.

Keys are the option names with `_` or `-` (`batch_tokens` or `batch-tokens`); values are checked by the
caller's `coerce(name, value)`.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Iterable


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and line."""


def read_config_file(path: str | Path, names: Iterable[str], coerce: Callable[[str, object], object]) -> dict:
    """Reads `path` into {option name: value}.

    Args:
        names: the valid option names (underscore form).
        coerce: (name, raw value) -> checked value; raises ValueError with the reason.
    Raises:
        ConfigFileError: unreadable file, not a mapping, duplicate or unknown key, wrong type or bad value
            (`FILE:LINE: ...` naming the valid keys or values).
    """
    import yaml

    path = Path(path)
    valid = list(names)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{path}: cannot read the config file ({exc})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigFileError(f"{where}: not valid YAML/JSON ({getattr(exc, 'problem', None) or exc})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigFileError(f"{path}:{root.start_mark.line + 1}: a config file is a mapping of option names to "
                              f"values (such as `steps: 1000`), got a {root.tag.rsplit(':', 1)[-1]}")
    values: dict = {}
    lines: dict = {}
    constructor = yaml.SafeLoader("")
    for key_node, value_node in root.value:
        line = key_node.start_mark.line + 1
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in valid:
            close = difflib.get_close_matches(name or "", valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigFileError(f"{path}:{line}: unknown key {key!r}; {hint}valid keys: {', '.join(valid)}")
        if name in values:
            raise ConfigFileError(f"{path}:{line}: {key!r} is set twice (first on line {lines[name]})")
        try:
            raw = constructor.construct_object(value_node, deep=True)
        except yaml.YAMLError as exc:
            raise ConfigFileError(f"{path}:{line}: {key}: {exc}") from None
        try:
            values[name] = coerce(name, raw)
        except ValueError as exc:
            raise ConfigFileError(f"{path}:{line}: {key}: {exc}") from None
        lines[name] = line
    return values


def write_config_file(path: str | Path, values: dict, *, header: str) -> None:
    """Writes `values` as YAML (keys in the given order) atomically, with a comment header."""
    import yaml

    from kdengine.durable import write_atomic

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    write_atomic(path, (comment + yaml.safe_dump(values, sort_keys=False, default_flow_style=False)).encode())
