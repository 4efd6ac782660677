"""``--config FILE`` for ``train`` and ``bench``: the command's flags read from a file.

TOML (``.toml``, read with ``tomllib``) or YAML (``.yaml`` / ``.yml``, when PyYAML is importable). Keys are the
command's long flags, with dashes or underscores (``seq-len = 128`` or ``seq_len = 128``); ``opt`` takes a table of
method options (``[opt]`` then ``projector = "coordinates"``) or a list of ``KEY=VALUE`` strings; a list for any
other flag is joined with commas (``methods = ["full", "galore"]``). Precedence: the command's defaults, then the
file, then the flags given on the command line (and with ``--resume``: the resumed run's config, then the file,
then the command line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import RankwiseError

COMMANDS = ("train", "bench")


def read(path: str) -> dict[str, Any]:
    """The mapping in a TOML or YAML file."""
    p = Path(path)
    if not p.is_file():
        raise RankwiseError(f"--config {path!r} does not exist; pass a .toml, .yaml or .yml file")
    text = p.read_bytes()
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RankwiseError(f"--config {path!r} is not valid TOML ({e})") from None
    elif p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RankwiseError(f"--config {path!r} is YAML, which needs PyYAML (pip install pyyaml); or write "
                                "it as TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise RankwiseError(f"--config {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        raise RankwiseError(f"--config {path!r}: unknown format {p.suffix or '(no suffix)'}; use .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise RankwiseError(f"--config {path!r} must hold a mapping of flag = value")
    return data


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"--config {path!r}: {key}"
    if action.dest == "opt":
        if isinstance(value, dict):
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise RankwiseError(f"{where} takes a table of method options or a list of KEY=VALUE strings")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise RankwiseError(f"{where} is a switch: true or false, got {value!r}")
        return value
    if isinstance(value, list):
        value = ",".join(map(str, value))
    if action.type in (int, float):
        kind = "an integer" if action.type is int else "a number"
        if isinstance(value, str):
            try:
                value = action.type(value)
            except ValueError:
                raise RankwiseError(f"{where} must be {kind}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                action.type is int and not float(value).is_integer()):
            raise RankwiseError(f"{where} must be {kind}, got {value!r}")
        value = action.type(value)
    elif action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise RankwiseError(f"{where}: invalid value {value!r}") from None
    elif action.type is None and not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise RankwiseError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def apply(parser: argparse.ArgumentParser, values: dict[str, Any], path: str) -> None:
    """Make ``values`` the defaults of ``parser`` (so flags given on the command line still win)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise RankwiseError(f"--config {path!r}: unknown key {key!r}; valid keys: {', '.join(sorted(actions))}")
        defaults[dest] = _convert(actions[dest], str(key), value, path)
    parser.set_defaults(**defaults)
