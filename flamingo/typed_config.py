"""Typed configs from plain mappings: the one loader behind every config dataclass (model, training, data, evaluation).

A config is a dataclass and its annotations are the schema. :func:`build` checks each value of a mapping (parsed YAML
or JSON) against its field's type and builds the dataclass, nested sections included; :func:`apply_override` edits
such a mapping with one ``section.field=value`` before it is built. Every error is a ValueError that names the source
and the dotted path of the field, so a typo in a YAML key or a hand-edited config.json fails at load time, in one
line::

    runs/x.yaml: optim.lr: expected float, got 'abc' (str)
    config.json: perceiver.num_latnets: unknown field; did you mean num_latents? Known fields: depth, dim_head, ...

Types understood: ``bool``, ``int``, ``float``, ``str``, ``Path``, ``Any``, nested dataclasses, ``X | None`` and other
unions (``str | list[str]``), ``list[X]``, ``dict[str, X]``, bare ``list`` and ``dict``. Conversions are few and on
purpose: an int where a float is expected becomes a float, and so does a string that reads as one (YAML 1.1 reads
``1e-4``, which has no dot, as a string); a string becomes a Path. Nothing else is coerced: JSON ``"2"`` is not an
int, and ``true`` is not 1 although Python counts bools as ints.

Value checks that types cannot express stay in each config's ``__post_init__``; one that raises :class:`FieldError`
gets the field's full path in the message (``runs/x.yaml: data[0].batch_size: must be >= 1, got 0``).

Standard library only (yaml is imported where an override's value is parsed), so that a command line which loads a
config answers before torch is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["FieldError", "apply_override", "build", "check_fields", "field_default", "to_plain", "type_name"]


class FieldError(ValueError):
    """A value that its field's type allows but its meaning does not, raised by a config's ``__post_init__``.

    ``owner`` says which config, for a config built directly (``DataConfig 'coco': batch_size: must be >= 1, got 0``);
    :func:`build` replaces it with the source and the field's full path (``x.yaml: data[0].batch_size: ...``).
    """

    def __init__(self, field: str, message: str, *, owner: str | None = None):
        self.field, self.message = field, message
        super().__init__(_join_message(owner, field, message))


def build(cls: type[T], data: Any, *, where: str, path: str = "") -> T:
    """The dataclass ``cls`` built from the mapping ``data``, every field checked against its annotation.

    ``where`` names the source (a file, or a config's name) and ``path`` the dotted place of ``data`` in it; both lead
    every error message. A field left out takes its default; a required one left out is an error, as is a key that
    is no field. A nested section given as null (an empty YAML section) takes its defaults. An instance of ``cls`` is
    returned as it is.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _error(where, path, f"expected a mapping of {cls.__name__} fields, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_fields(cls, data, where=where, path=path)
    missing = [name for name, f in fields.items() if name not in data and _required(f)]
    if missing:
        raise _error(where, path, f"missing required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    hints = _hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if value is None and dataclasses.is_dataclass(hint) and not _required(fields[name]):
            continue  # `optim:` with nothing under it: the section's defaults
        values[name] = convert(value, hint, where=where, path=_join(path, name))
    try:
        return cls(**values)
    except FieldError as error:
        raise ValueError(_join_message(where, _join(path, error.field), error.message)) from None
    except ValueError as error:  # a __post_init__ check that names no field: at least the source and the section
        raise ValueError(_join_message(where, path, str(error))) from None


def check_fields(cls: type, data: Mapping, *, where: str, path: str = "") -> None:
    """Every key of ``data`` is a field of the dataclass ``cls``; else a ValueError with the closest field name."""
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f"; did you mean {close[0]}?" if close else "."
            raise _error(where, _join(path, str(key)),
                         f"unknown field{suggestion} Known fields: {', '.join(sorted(known))}.")


def convert(value: Any, hint: Any, *, where: str, path: str) -> Any:
    """``value`` as the type ``hint`` (see the module docstring for what is converted), or a ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            if _fits(value, option):  # the option of value's own shape; its errors name the item that is wrong
                return convert(value, option, where=where, path=path)
        raise _error(where, path, f"expected {type_name(hint)}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where=where, path=path)
    if hint is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise _error(where, path, f"expected {type_name(hint)}, got {_show(value)}")
        (item,) = args or (Any,)
        return [convert(v, item, where=where, path=f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _error(where, path, f"expected {type_name(hint)}, got {_show(value)}")
        key_hint, value_hint = args or (Any, Any)
        out = {}
        for key, item in value.items():
            if not _fits(key, key_hint):
                raise _error(where, path, f"keys must be {type_name(key_hint)}, got {_show(key)}")
            out[key] = convert(item, value_hint, where=where, path=_join(path, str(key)))
        return out
    converted = _scalar(value, hint)
    if converted is _MISMATCH:
        raise _error(where, path, f"expected {type_name(hint)}, got {_show(value)}")
    return converted


def apply_override(raw: dict, override: str, *, where: str = "config") -> None:
    """Edit ``raw`` (a parsed config, not yet built) in place with ``section.field=value``; the value is parsed as
    YAML, or kept as the plain string where it is not YAML (a glob such as ``*.jsonl``). An item of a list of
    sections is addressed by its index or by its ``name``: ``data.0.batch_size=4``, ``data.coco.loss_weight=2``.
    Types are checked when the config is built, so an error there names the overridden field."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(f"{where}: override {override!r} must look like section.field=value.")
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, parent=parts[depth - 1] if depth else "list", override=override, where=where)
        else:
            if node.get(part) is None:  # an absent or empty section
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ValueError(f"{where}: override {override!r}: {'.'.join(parts[: depth + 1])} is not a section.")
    if isinstance(node, list):
        parent = parts[-2] if len(parts) > 1 else "list"
        raise ValueError(f"{where}: override {override!r} names a whole {parent} entry; name one of its fields.")
    import yaml  # here, not at the top: loading a config file needs no YAML parser

    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:  # not YAML, e.g. a glob that starts with '*' (an alias in YAML): the plain string
        node[parts[-1]] = text


def field_default(cls: type, name: str) -> Any:
    """The default value of field ``name`` of the dataclass ``cls`` (a fresh one where it comes from a factory), so
    that a command line or a second config reads a default from its one source."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default.")
    raise ValueError(f"{cls.__name__} has no field {name!r}.")


def to_plain(config: Any) -> Any:
    """A config dataclass as JSON/YAML-ready values: nested dicts and lists, with paths as strings."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {key: to_plain(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(value) for value in config]
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    return config


def type_name(hint: Any) -> str:
    """``int``, ``list[int]``, ``str or None``: a type as an error message shows it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any value"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return hint.__name__ if isinstance(hint, type) else str(hint)


# ---------------------------------------------------------------------------------------------------- helpers
_MISMATCH = object()


def _scalar(value: Any, hint: Any) -> Any:
    """``value`` as the scalar type ``hint``, or _MISMATCH."""
    if hint is type(None):
        return None if value is None else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(value, bool):  # Python counts True as an int; a config never means 1 by it
        return _MISMATCH
    if hint is int:
        return value if isinstance(value, int) else _MISMATCH
    if hint is float:
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an int beyond float's range
                return _MISMATCH
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string
                return float(value)
            except ValueError:
                return _MISMATCH
        return _MISMATCH
    if hint is Path:
        return Path(value) if isinstance(value, (str, os.PathLike)) else _MISMATCH
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _MISMATCH
    raise TypeError(f"typed_config cannot check values of type {hint!r}; give the field a type it knows.")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the outer shape of ``hint`` (the items of a list are checked when it is converted)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (Mapping, hint))
    if hint is list or origin is list:
        return isinstance(value, (list, tuple))
    if hint is dict or origin is dict:
        return isinstance(value, Mapping)
    return _scalar(value, hint) is not _MISMATCH


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _list_item(items: list, part: str, *, parent: str, override: str, where: str) -> Any:
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ValueError(f"{where}: override {override!r}: no {parent} entry {part!r}; give an index below {len(items)} "
                     f"or one of {names}.")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _join_message(*parts: str | None) -> str:
    return ": ".join(part for part in parts if part)


def _error(where: str, path: str, message: str) -> ValueError:
    return ValueError(_join_message(where, path, message))


def _show(value: Any) -> str:
    """A value as an error message shows it: short, with its type where the repr does not make it plain."""
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"
