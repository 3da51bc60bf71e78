"""The errors a user can cause: each message names the bad value and what would work; and the value checks behind
them (a config's bool is not a number)."""

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work (a key, its value and the rule it breaks)."""


def is_whole_number(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, a string or None)."""
    return (is_whole_number(value) or isinstance(value, float)) and math.isfinite(value)
