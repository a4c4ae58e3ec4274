"""Configuration dataclasses: validated fields with help text, a YAML round trip, and dotted
``--field value`` overrides (what the CLI builds on).

A config is a ``@dataclass`` deriving from :class:`Config` whose fields are declared with
:func:`option`::

    @dataclass
    class PPOConfig(Config):
        clip_low: float = option(0.2, "PPO's epsilon", min=0.0, max=1.0)
        agg: AggMode = option("token-mean", "how token losses become a scalar")

``Config.__post_init__`` checks every field against its annotation (bool, int, float, str,
``Literal`` choices, ``X | None``, lists, dicts, nested configs) and the bounds given to
:func:`option`; errors name the config, the field and what was expected. Subclasses add
cross-field checks in ``validate()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["Config", "ConfigError", "option", "field_docs", "parse_value"]


class ConfigError(ValueError):
    """An invalid config value or an unknown field; the message names both."""


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, min: float | None = None,
           max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False) -> Any:
    """A config field with help text and optional numeric bounds.

    Args:
        default: the default value (use ``default_factory`` for lists / dicts / nested configs).
        help: one line shown by ``--help`` and in the YAML written by :meth:`Config.to_yaml`.
        default_factory: a callable making the default.
        min, max: inclusive bounds for numbers (exclusive with ``min_exclusive`` / ``max_exclusive``).
    """
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    """``X | None`` -> (True, X)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, functools.reduce(operator.or_, args)
    return False, tp


def _is_config(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _type_name(tp) -> str:
    opt, inner = _is_optional(tp)
    if opt:
        return f"{_type_name(inner)} or None"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, tp, value, meta) -> Any:
    """Validate (and lightly normalize: int -> float) ``value`` against annotation ``tp``."""
    opt, inner = _is_optional(tp)
    if value is None:
        if opt:
            return None
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got None")
    tp = inner
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}{hint}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for alt in get_args(tp):
            try:
                return _check_value(where, alt, value, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [(_check_value(f"{where}[{i}]", item, v, {}) if item is not Any else v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {value!r}")
        return value
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, source=where)
        raise ConfigError(f"{where}: must be a {tp.__name__} (a mapping), got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        value = float(value)
        if value != value:
            raise ConfigError(f"{where}: must be a number, got NaN")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
    elif tp is Any:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            raise ConfigError(f"{where}: must be {'>' if meta.get('min_exclusive') else '>='} {lo}, got {value}")
        if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
            raise ConfigError(f"{where}: must be {'<' if meta.get('max_exclusive') else '<='} {hi}, got {value}")
    return value


def parse_value(text: str, tp) -> Any:
    """A command-line string -> a value of annotation ``tp`` (``"none"`` / ``"null"`` is None for
    optional fields; bools take true/false/yes/no/1/0; lists are comma-separated)."""
    opt, inner = _is_optional(tp)
    low = text.strip().lower()
    if opt and low in ("none", "null", ""):
        return None
    tp = inner
    origin = get_origin(tp)
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        return text  # validation names the choices
    if origin in (Union, types.UnionType):
        for alt in get_args(tp):
            try:
                return parse_value(text, alt)
            except ValueError:
                continue
        return text
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (str,)
        return [parse_value(t, item) for t in text.split(",") if t.strip()] if text.strip() else []
    if tp is bool:
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if tp is dict or origin is dict or tp is Any:
        import yaml

        return yaml.safe_load(text)
    return text


@dataclass
class Config:
    """Base of every fastrlhf config: validated on construction, YAML round trip, overrides."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in fields(self):
            where = f"{type(self).__name__}.{f.name}"
            setattr(self, f.name, _check_value(where, hints[f.name], getattr(self, f.name), f.metadata))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass (raise :class:`ConfigError`)."""

    # ---- dicts and YAML
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (nested configs as dicts)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "") -> Config:
        """Build from a (nested) dict; an unknown key is an error naming the closest field.

        Args:
            d: field name -> value.
            source: where ``d`` came from (a file), named in errors.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source or cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source + ': ' if source else ''}{cls.__name__} has no field {unknown[0]!r}{hint}; "
                              f"fields: {', '.join(names)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML, each field preceded by its help as a comment; written to ``path``
        when given."""
        text = "\n".join(_yaml_lines(self, 0)) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> Config:
        """Load a YAML file written by :meth:`to_yaml` (or by hand)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path))

    # ---- overrides
    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted fields replaced (``{"kl.target": "6.0"}``); string values are parsed
        by the field's type. The result is validated again.

        Args:
            overrides: dotted field name -> value (a string from the command line, or a value).
        """
        d = self.to_dict()
        for key, value in overrides.items():
            cls, target, parts = type(self), d, key.split(".")
            for i, part in enumerate(parts):
                names = [f.name for f in fields(cls)]
                if part not in names:
                    close = difflib.get_close_matches(part, names, n=1)
                    hint = f" (did you mean {'.'.join(parts[:i] + [close[0]])!r}?)" if close else ""
                    raise ConfigError(f"{type(self).__name__} has no field {key!r}{hint}")
                tp = _hints(cls)[part]
                if i == len(parts) - 1:
                    if isinstance(value, str):
                        try:
                            value = parse_value(value, tp)
                        except ValueError as e:
                            raise ConfigError(f"{type(self).__name__}.{key}: {e}") from None
                    target[part] = value
                    break
                _, inner = _is_optional(tp)
                if not _is_config(inner):
                    raise ConfigError(f"{type(self).__name__}.{'.'.join(parts[:i + 1])} is not a nested config")
                if target.get(part) is None:  # an optional nested config that is unset: start from its defaults
                    target[part] = inner().to_dict()
                cls, target = inner, target[part]
        return type(self).from_dict(d)

    def replace(self, **changes) -> Config:
        """``dataclasses.replace`` (validated)."""
        return dataclasses.replace(self, **changes)


def field_docs(cls) -> list[tuple[str, str, Any, str]]:
    """``(dotted name, type name, default, help)`` of every field, nested configs flattened:
    what ``--help`` prints."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if _is_config(inner):
            out += [(f"{f.name}.{n}", t, d, h) for n, t, d, h in field_docs(inner)]
        else:
            out.append((f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return out


def _yaml_scalar(v) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _yaml_lines(cfg: Config, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for f in fields(cfg):
        help_text = f.metadata.get("help", "")
        if help_text:
            lines.append(f"{pad}# {help_text}")
        v = getattr(cfg, f.name)
        if isinstance(v, Config):
            lines.append(f"{pad}{f.name}:")
            lines += _yaml_lines(v, indent + 2)
        else:
            lines.append(f"{pad}{f.name}: {_yaml_scalar(v)}")
    return lines
