"""Layered configuration over nested dataclasses.

Precedence, lowest first: built-in defaults < config file (TOML, with
`[env.<name>]` overlays) < environment (`SWARMD_<SECTION>_<KEY>`, and
`SWARMD_<KEY>` for the `node` section) < command-line flags. Every value is
checked against the field's type; an unknown key or a wrong type fails
start-up with a message naming the key and the source it came from.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swarmd.errors import ConfigError
from swarmd.node.address import parse_hostport

ENV_PREFIX = "SWARMD_"
# Environment variables that select files or layers rather than set keys.
RESERVED_ENV = frozenset({"SWARMD_CONFIG", "SWARMD_ENV"})
ENV_NAMES = ("production", "development", "staging", "test")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections(settings_cls: type) -> dict[str, type]:
    return {name: tp for name, tp in _hints(settings_cls).items() if dataclasses.is_dataclass(tp)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, *, key: str, source: str, from_text: bool) -> Any:
    """Check (and, for text sources such as env vars, parse) one value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        if from_text and value == "" and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key=key, source=source, from_text=from_text)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key} from {source}: value {value!r} is not allowed")

    def bad(expected: str) -> ConfigError:
        return ConfigError(
            f"{key} from {source} must be {expected}, got {type(value).__name__} {value!r:.80}"
        )

    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise bad("a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise bad("a path string")
    if tp is bytes:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            try:
                return bytes.fromhex(value)
            except ValueError:
                pass
        raise bad("a hex string")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad(f"a table of {tp.__name__} keys")
        hints = _hints(tp)
        kwargs = {}
        for k, v in value.items():
            if k not in hints:
                raise ConfigError(f"unknown key '{key}.{k}' in {source}; known keys: {', '.join(sorted(hints))}")
            kwargs[k] = coerce(v, hints[k], key=f"{key}.{k}", source=source, from_text=from_text)
        return tp(**kwargs)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if args == (str, int) and from_text and isinstance(value, str):  # an address: HOST:PORT, [IPV6]:PORT
            return parse_hostport(value, what=f"{key} from {source}")
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.rsplit(":", len(args) - 1)] if len(args) > 1 else [value]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})")
        return tuple(
            coerce(v, a, key=f"{key}[{i}]", source=source, from_text=from_text)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (list, tuple):
        item_tp = args[0] if args else Any
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {_type_name(item_tp)}")
        items = [
            coerce(v, item_tp, key=f"{key}[{i}]", source=source, from_text=from_text)
            for i, v in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad("a table")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{key} from {source} must be one of {', '.join(map(repr, args))}, got {value!r:.80}"
        )
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


class Layered:
    """Accumulates per-section overrides from each layer, then builds Settings."""

    def __init__(self, settings_cls: type) -> None:
        self.settings_cls = settings_cls
        self.sections = _sections(settings_cls)
        self.values: dict[str, dict[str, Any]] = {name: {} for name in self.sections}
        self.origin: dict[str, str] = {}

    def _field_type(self, section: str, key: str, source: str) -> Any:
        if section not in self.sections:
            raise ConfigError(
                f"unknown section [{section}] in {source}; known sections: {', '.join(sorted(self.sections))}"
            )
        hints = _hints(self.sections[section])
        if key not in hints:
            raise ConfigError(
                f"unknown key '{section}.{key}' in {source}; known keys of [{section}]: {', '.join(sorted(hints))}"
            )
        return hints[key]

    def set(self, section: str, key: str, value: Any, source: str, *, from_text: bool = False) -> None:
        tp = self._field_type(section, key, source)
        self.values[section][key] = coerce(
            value, tp, key=f"{section}.{key}", source=source, from_text=from_text
        )
        self.origin[f"{section}.{key}"] = source

    def apply_table(self, table: Mapping[str, Any], source: str) -> None:
        for section, body in table.items():
            if section == "env":
                continue
            if not isinstance(body, dict):
                raise ConfigError(
                    f"'{section}' in {source} must be a table like [{section}], got {type(body).__name__}"
                )
            for key, value in body.items():
                self.set(section, key, value, source)

    def apply_file(self, path: Path, env_name: str | None) -> None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        self.apply_table(doc, f"config file {path}")
        envs = doc.get("env", {})
        if not isinstance(envs, dict):
            raise ConfigError(f"'env' in config file {path} must hold tables like [env.production.node]")
        for name in envs:
            if name not in ENV_NAMES:
                raise ConfigError(
                    f"unknown environment [env.{name}] in config file {path}; known: {', '.join(ENV_NAMES)}"
                )
        if env_name is not None and env_name in envs:
            overlay = envs[env_name]
            if not isinstance(overlay, dict):
                raise ConfigError(f"[env.{env_name}] in config file {path} must be a table")
            self.apply_table(overlay, f"config file {path} [env.{env_name}]")

    def apply_environ(self, environ: Mapping[str, str]) -> None:
        for var, text in sorted(environ.items()):
            if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
                continue
            rest = var[len(ENV_PREFIX) :].lower()
            source = f"environment variable {var}"
            if "node" in self.sections and rest in _hints(self.sections["node"]):
                # node keys win: SWARMD_DHT_PORT is node.dht_port, the flag --dht-port
                self.set("node", rest, text, source, from_text=True)
                continue
            for section in sorted(self.sections, key=len, reverse=True):
                if rest.startswith(section + "_"):
                    key = rest[len(section) + 1 :]
                    if key in _hints(self.sections[section]):
                        self.set(section, key, text, source, from_text=True)
                        break
            else:
                raise ConfigError(
                    f"unknown {source}: expected SWARMD_<SECTION>_<KEY> for a known key "
                    f"(sections: {', '.join(sorted(self.sections))})"
                )

    def apply_flags(self, flags: Mapping[str, Mapping[str, Any]]) -> None:
        for section, body in flags.items():
            for key, value in body.items():
                self.set(section, key, value, f"command-line flag --{key.replace('_', '-')}")

    def build(self) -> Any:
        kwargs = {}
        for name, cls in self.sections.items():
            try:
                kwargs[name] = cls(**self.values[name])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"[{name}]: {e}") from None
        settings = self.settings_cls(**kwargs)
        validate = getattr(settings, "validate", None)
        if callable(validate):
            validate()
        return settings


def load_settings(
    settings_cls: type,
    *,
    config_file: Path | None = None,
    env_name: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """Build settings from all four layers (see the module docstring)."""
    if env_name is not None and env_name not in ENV_NAMES:
        raise ConfigError(f"unknown environment {env_name!r}; expected one of {', '.join(ENV_NAMES)}")
    layered = Layered(settings_cls)
    if config_file is not None:
        layered.apply_file(Path(config_file), env_name)
    layered.apply_environ(environ or {})
    layered.apply_flags(flags or {})
    settings = layered.build()
    settings.__dict__["_origin"] = dict(layered.origin)
    return settings
