from __future__ import annotations

import pytest

from medtl.errors import ConfigError
from medtl.registry import Registry


def test_register_and_get() -> None:
    reg: Registry[int] = Registry("strategy")
    reg.register("biotune")(1)
    reg.register("full")(2)
    assert reg.get("biotune") == 1
    assert reg.names() == ["biotune", "full"]
    assert "full" in reg and len(reg) == 2


def test_unknown_name_suggests_the_closest() -> None:
    reg: Registry[int] = Registry("strategy")
    reg.register("biotune")(1)
    with pytest.raises(ConfigError, match=r"unknown strategy 'biotun'; did you mean 'biotune'\?"):
        reg.get("biotun")


def test_unknown_name_without_close_match_lists_allowed() -> None:
    reg: Registry[int] = Registry("strategy")
    reg.register("full")(1)
    with pytest.raises(ConfigError, match=r"allowed: full") as err:
        reg.get("zzzzzz")
    assert "did you mean" not in str(err.value)


def test_duplicate_registration_is_refused() -> None:
    reg: Registry[int] = Registry("strategy")
    reg.register("full")(1)
    with pytest.raises(ValueError, match="twice"):
        reg.register("full")(2)
