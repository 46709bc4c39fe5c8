"""Validation of shape-like constructor arguments (strides, kernel and window shapes)."""
import operator


def _is_positive_int(value):
    """True for ints (NumPy integers, 0-D integer arrays included) >= 1; bools and floats are refused."""
    # A boolean array scalar (PyTorch's) passes operator.index as 0 or 1: refused by its dtype.
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return False
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


def _entries(value):
    """The entries of a tuple, list or 1-D array (NumPy's or another library's); else ``(value,)``.

    Anything else stays one entry, for :func:`_is_positive_int` to judge: an int
    or a 0-D integer array is accepted as an int, as ``operator.index`` takes
    it; a string, a 2-D array or any other object is refused there.
    """
    if isinstance(value, (tuple, list)):
        return tuple(value)
    if getattr(value, "ndim", None) == 1:
        return tuple(value)  # (its entries are the library's integer scalars or 0-D arrays)
    return (value,)


def positive_ints(owner, name, value):
    """Return ``value`` (an int, a sequence or a 1-D array of ints) as a tuple of positive Python ints.

    Raises
    ------
    ValueError
        Naming ``owner`` and ``name`` when an entry is not a positive integer
        or the sequence is empty.
    """
    entries = _entries(value)
    if not entries or not all(_is_positive_int(entry) for entry in entries):
        raise ValueError(f"{owner}: {name} must be a positive integer or a non-empty sequence "
                         f"or 1-D array of positive integers, got {value!r}")
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
        allowed = "1 entry" if rank == 1 else f"1 or {rank} entries"
        raise ValueError(f"{owner}: {name} must have {allowed} for {rank}-D data, "
                         f"got {value!r} ({len(entries)} entries)")
    return entries
