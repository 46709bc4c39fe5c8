"""Validation helpers shared by constructors (hyper-parameters stay Python numbers)."""
import math


def finite_float(owner, name, value, positive=False, at_most=None):
    """Return ``value`` as a Python float, or raise ValueError naming ``owner`` and ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}")
    if at_most is not None and number > at_most:
        raise ValueError(f"{owner}: {name} must be <= {at_most}, got {value!r}")
    return number


def positive_int(owner, name, value):
    """Return ``value`` as a positive int, or raise ValueError naming ``owner`` and ``name``."""
    try:
        valid = not isinstance(value, bool) and int(value) == value and int(value) >= 1
    except (TypeError, ValueError):  # None, "abc", ...: same message as any bad value
        valid = False
    if not valid:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)
