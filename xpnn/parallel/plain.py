"""Pickling an object that stands in for another as that other (a saved model loads
as plain xpnn classes, without MPI)."""


def pickled_as(plain):
    """A ``__reduce_ex__`` result that unpickles as ``plain``: its class and its state.

    Returned by the ``__reduce_ex__`` of xpnn.parallel's layers and optimizer (with their
    plain counterpart): the pickle then names only that class and ``object.__new__``.
    (Returning ``plain.__reduce_ex__()`` instead is refused by pickle: its class is not
    the pickled object's.)
    """
    return object.__new__, (type(plain),), plain.__getstate__()
