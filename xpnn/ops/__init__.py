"""Hot-path array operations, written once against the array API standard.

:class:`Ops` holds the generic implementations; a backend may carry a subclass
that overrides a method with a library-specific fast path, but only where a
benchmark shows it pays, and always with a test that compares it against the
generic method here (the reference).
"""


class Ops:
    """Generic (array API standard) hot paths bound to one backend.

    Parameters
    ----------
    backend : xpnn.backend.Backend
        Supplies ``xp``, ``device`` and the default ``dtype``.
    """

    def __init__(self, backend):
        self.backend = backend
        self.xp = backend.xp
