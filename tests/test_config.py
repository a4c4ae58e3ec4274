"""fastrlhf.config: validation from annotations and bounds, the YAML round trip, dotted overrides,
and errors that name the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from fastrlhf.config import Config, ConfigError, field_docs, option


@dataclass
class Inner(Config):
    coef: float = option(0.05, "a coefficient", min=0.0)
    target: float | None = option(None, "an optional target", min=0.0, min_exclusive=True)


@dataclass
class Outer(Config):
    lr: float = option(1e-5, "learning rate", min=0.0, min_exclusive=True)
    agg: Literal["token-mean", "seq-mean-token-mean"] = option("token-mean", "aggregation")
    steps: int = option(10, "steps", min=1)
    inner: Inner = option(default_factory=Inner, help="nested settings")
    maybe: Inner | None = option(None, "an optional nested config")
    tags: list[str] = option(default_factory=list, help="tags")
    flag: bool = option(True, "a switch")
    name: str = option("run", "a name")

    def validate(self):
        if self.steps > 1000 and self.flag:
            raise ConfigError("Outer: steps > 1000 needs flag=false")


def test_defaults_validate_and_int_becomes_float():
    c = Outer(lr=1)
    assert isinstance(c.lr, float) and c.lr == 1.0


@pytest.mark.parametrize("kw,match", [
    (dict(lr=0.0), r"Outer.lr: must be > 0.0, got 0.0"),
    (dict(agg="tokenmean"), r"Outer.agg: must be one of .* \(did you mean 'token-mean'\?\)"),
    (dict(steps=2.5), r"Outer.steps: must be an integer"),
    (dict(steps=True), r"Outer.steps: must be an integer"),
    (dict(flag=1), r"Outer.flag: must be true or false"),
    (dict(name=3), r"Outer.name: must be a string"),
    (dict(tags="a"), r"Outer.tags: must be a list"),
    (dict(inner={"coef": -1.0}), r"Inner.coef: must be >= 0.0, got -1.0"),
    (dict(steps=2000), r"steps > 1000 needs flag=false"),
    (dict(lr=float("nan")), r"Outer.lr: must be a number, got NaN"),
])
def test_invalid_values_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        Outer(**kw)


def test_yaml_round_trip_with_help_comments(tmp_path):
    c = Outer(lr=3e-4, agg="seq-mean-token-mean", inner=Inner(coef=0.2, target=6.0), tags=["a", "b"], flag=False,
              maybe=Inner(coef=1.0))
    text = c.to_yaml(tmp_path / "c.yaml")
    assert "# learning rate\nlr: 0.0003" in text and "  # a coefficient\n  coef: 0.2" in text
    assert Outer.from_yaml(tmp_path / "c.yaml") == c
    assert Outer.from_yaml(tmp_path / "c.yaml").to_yaml() == text


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        Outer.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: Outer has no field 'lrr' \(did you mean 'lr'\?\)"):
        Outer.from_yaml(tmp_path / "typo.yaml")


def test_dotted_overrides_parse_strings_by_type():
    c = Outer().with_overrides({"inner.target": "6", "agg": "seq-mean-token-mean", "steps": "3", "tags": "x,y",
                                "flag": "no", "lr": "1e-3", "maybe.coef": "0.5", "name": "a,b"})
    assert c.inner.target == 6.0 and c.agg == "seq-mean-token-mean" and c.steps == 3 and c.tags == ["x", "y"]
    assert c.flag is False and c.lr == 1e-3 and c.maybe == Inner(coef=0.5) and c.name == "a,b"
    assert Outer().with_overrides({"inner.target": "none"}).inner.target is None


@pytest.mark.parametrize("key,value,match", [
    ("lrr", "1", r"Outer has no field 'lrr' \(did you mean 'lr'\?\)"),
    ("inner.coeff", "1", r"no field 'inner.coeff' \(did you mean 'inner.coef'\?\)"),
    ("steps.x", "1", r"Outer.steps is not a nested config"),
    ("steps", "many", r"Outer.steps: expected an integer, got 'many'"),
    ("flag", "maybe", r"Outer.flag: expected true or false"),
    ("inner.coef", "-2", r"Inner.coef: must be >= 0.0"),
])
def test_bad_overrides_are_clear(key, value, match):
    with pytest.raises(ConfigError, match=match):
        Outer().with_overrides({key: value})


def test_field_docs_flatten_nested_configs():
    docs = {name: (tp, default, help) for name, tp, default, help in field_docs(Outer)}
    assert docs["inner.coef"] == ("float", 0.05, "a coefficient")
    assert docs["agg"][0] == "one of 'token-mean', 'seq-mean-token-mean'"
    assert docs["maybe.target"][0] == "float or None"
