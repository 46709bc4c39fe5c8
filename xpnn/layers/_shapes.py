"""Validation of shape-like constructor arguments (strides, kernel and window shapes)."""
import operator


def _is_positive_int(value):
    """True for ints (NumPy integers included) >= 1; bools and floats are refused."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


def positive_ints(owner, name, value):
    """Return ``value`` (an int or a sequence of ints) as a tuple of positive Python ints.

    Raises
    ------
    ValueError
        Naming ``owner`` and ``name`` when an entry is not a positive integer
        or the sequence is empty.
    """
    entries = (value,) if not isinstance(value, (tuple, list)) else tuple(value)
    if not entries or not all(_is_positive_int(entry) for entry in entries):
        raise ValueError(f"{owner}: {name} must be a positive integer or a non-empty sequence "
                         f"of positive integers, got {value!r}")
    return tuple(operator.index(entry) for entry in entries)


def spatial_tuple(owner, name, value, rank):
    """Return ``value`` as ``rank`` positive ints; an int or a 1-sequence applies to every axis.

    Raises
    ------
    ValueError
        When an entry is not a positive integer or the length is neither 1 nor ``rank``.
    """
    entries = positive_ints(owner, name, value)
    if len(entries) == 1:
        return entries * rank
    if len(entries) != rank:
        raise ValueError(f"{owner}: {name} must have 1 or {rank} entries for {rank}-D data, "
                         f"got {value!r}")
    return entries
