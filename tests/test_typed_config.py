"""flamingo.typed_config: one loader builds every config dataclass from a mapping, and every error names the source
and the dotted field path."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flamingo.typed_config import FieldError, apply_override, build, field_default, to_plain


@dataclass
class Inner:
    depth: int = 6
    rate: float = 0.5


@dataclass
class Entry:
    name: str
    path: str | list[str]
    weight: float = 1.0

    def __post_init__(self):
        if self.weight < 0:
            raise FieldError("weight", f"must be >= 0, got {self.weight}.", owner=f"Entry {self.name!r}")


@dataclass
class Outer:
    entries: list[Entry]
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None
    folder: Path | None = None
    weights: dict[str, float] = field(default_factory=dict)
    flag: bool = False


def make(**values):
    return build(Outer, {"entries": [{"name": "a", "path": "a.jsonl"}], **values}, where="x.yaml")


def error(**values) -> str:
    with pytest.raises(ValueError) as info:
        make(**values)
    return str(info.value)


def test_values_are_built_into_nested_dataclasses_with_the_few_documented_conversions():
    config = make(inner={"rate": 1, "depth": 2}, extra={"rate": "1e-4"}, folder="runs/x", weights={"moe": 2})
    assert config.inner == Inner(depth=2, rate=1.0) and isinstance(config.inner.rate, float)
    assert config.extra.rate == 1e-4  # YAML 1.1 reads 1e-4 (no dot) as a string
    assert config.folder == Path("runs/x") and config.weights == {"moe": 2.0}
    assert make(entries=[{"name": "b", "path": ["x", "y"]}]).entries[0].path == ["x", "y"]
    assert make(inner=None).inner == Inner()  # an empty YAML section: its defaults


@pytest.mark.parametrize(
    "values, message",
    [
        ({"inner": {"depth": "2"}}, "x.yaml: inner.depth: expected int, got '2' (str)"),
        ({"inner": {"depth": True}}, "x.yaml: inner.depth: expected int, got True (bool)"),
        ({"inner": {"depth": 2.0}}, "x.yaml: inner.depth: expected int, got 2.0 (float)"),
        ({"inner": {"rate": "abc"}}, "x.yaml: inner.rate: expected float, got 'abc' (str)"),
        ({"flag": 1}, "x.yaml: flag: expected bool, got 1 (int)"),
        ({"inner": [1]}, "x.yaml: inner: expected a mapping of Inner fields, got [1] (list)"),
        ({"extra": 3}, "x.yaml: extra: expected Inner or None, got 3 (int)"),
        ({"entries": [{"name": "a", "path": ["x", 2]}]}, "x.yaml: entries[0].path[1]: expected str, got 2 (int)"),
        ({"weights": {"moe": "lots"}}, "x.yaml: weights.moe: expected float, got 'lots' (str)"),
        ({"entries": [{"name": "a"}]}, "x.yaml: entries[0]: missing required field path"),
        ({"entries": [{"name": "a", "path": "p", "weight": -1}]}, "x.yaml: entries[0].weight: must be >= 0, got -1.0."),
        ({"inner": {"dpeth": 2}}, "x.yaml: inner.dpeth: unknown field; did you mean depth? Known fields: depth, rate."),
        ({"zzz": 1}, "x.yaml: zzz: unknown field. Known fields: entries, extra, flag, folder, inner, weights."),
    ],
)
def test_each_error_names_the_source_and_the_field_path(values, message):
    assert error(**values) == message


def test_a_config_built_directly_names_itself_in_its_value_errors():
    with pytest.raises(ValueError, match=re.escape("Entry 'a': weight: must be >= 0, got -1.")):
        Entry(name="a", path="p", weight=-1)


def test_overrides_address_sections_list_items_by_index_or_name_and_keep_non_yaml_as_text():
    raw = {"entries": [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}], "inner": None}
    for override in ("entries.1.weight=0.5", "entries.a.path=*.jsonl", "inner.depth=3", "extra.rate=2"):
        apply_override(raw, override, where="x.yaml")
    config = build(Outer, raw, where="x.yaml")
    assert (config.entries[1].weight, config.entries[0].path) == (0.5, "*.jsonl")  # '*' would be a YAML alias
    assert (config.inner.depth, config.extra.rate) == (3, 2.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("entries.c.weight=1", "x.yaml: override 'entries.c.weight=1': no entries entry 'c'; give an index below 1"),
        ("entries.0=1", "names a whole entries entry; name one of its fields"),
        ("flag.x=1", "x.yaml: override 'flag.x=1': flag is not a section"),
        ("inner.depth", "must look like section.field=value"),
    ],
)
def test_a_bad_override_is_an_error_naming_it(override, message):
    raw = {"entries": [{"name": "a", "path": "a.jsonl"}], "flag": True}
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_override(raw, override, where="x.yaml")


def test_defaults_are_read_from_the_dataclass_and_configs_turn_into_plain_values():
    assert field_default(Outer, "inner") == Inner() and field_default(Inner, "rate") == 0.5
    with pytest.raises(ValueError, match="Outer.entries has no default"):
        field_default(Outer, "entries")
    plain = to_plain(make(folder="runs/x"))
    assert plain["folder"] == "runs/x" and plain["entries"] == [{"name": "a", "path": "a.jsonl", "weight": 1.0}]
