"""Option values are checked against the config dataclass's field types before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sae_unlearn.errors import UserError
from sae_unlearn.features.selection import make_strategy
from sae_unlearn.methods import method_config
from sae_unlearn.options import coerce_options


@dataclass
class _Config:
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    name: str = "x"
    layers: list[int] | None = None
    alpha: int | None = None
    targets: list[str] = field(default_factory=list)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"lr": "0.5"}, {"lr": 0.5}),
        ({"lr": 2}, {"lr": 2.0}),
        ({"steps": "12"}, {"steps": 12}),
        ({"steps": 12.0}, {"steps": 12}),
        ({"flag": "true"}, {"flag": True}),
        ({"name": 123}, {"name": "123"}),
        ({"layers": "3,6"}, {"layers": [3, 6]}),
        ({"layers": [3, "6"]}, {"layers": [3, 6]}),
        ({"layers": "none"}, {"layers": None}),
        ({"alpha": None}, {"alpha": None}),
        ({"targets": "q_proj"}, {"targets": ["q_proj"]}),
    ],
)
def test_values_become_the_field_type(options: dict, expected: dict) -> None:
    assert coerce_options(_Config, options, owner="test") == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "abc"}, "lr must be a number"),
        ({"lr": True}, "lr must be a number"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"flag": "maybe"}, "flag must be true or false"),
        ({"layers": "a,b"}, "layers must be a list of integers or none"),
        ({"nope": 1}, "test has no option nope"),
    ],
)
def test_wrong_values_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        coerce_options(_Config, options, owner="test")


def test_method_config_checks_types() -> None:
    with pytest.raises(UserError, match="lr must be a number"):
        method_config("crisp", {"lr": "abc"})
    assert method_config("crisp", {"lr": "1e-4", "steps": "7"}).steps == 7
    with pytest.raises(UserError, match="does not apply to method clamp"):
        method_config("clamp", {"scale": 2})


def test_make_strategy_checks_types() -> None:
    assert make_strategy("crisp", k="5", min_ratio="2").k == 5
    with pytest.raises(UserError, match="min_ratio must be a number"):
        make_strategy("crisp", min_ratio="high")
