"""The case x outcome table printed at the end of a run that includes fault tests (``-m faults``).

Fault tests carry the ``faults`` marker. Each report is filed under (case,
backend): the case is the test's name plus its parameters other than the
``backend`` fixture, the backend that fixture's id, or ``any`` for a case that
runs once, whatever the backend (a subprocess, a file system, a checkpoint's
bytes). Cells read ``passed``, ``FAILED`` or ``skipped`` (reasons listed below
the table), as in the parity table (:mod:`parity_table`), whose layout this uses.
A passed case is a guarantee that held: no data was lost without a word.
"""
import parity_table

MARKER = "faults"
BACKEND_FIXTURE = "backend"
ANY = "any"
PROPERTY = "xpnn_faults"
TITLE = "faults: each case and its outcome on each backend ('any': runs once)"


class FaultTable(parity_table.ParityTable):
    """:class:`parity_table.ParityTable` filing the ``faults`` cases."""

    property_name = PROPERTY
    title = TITLE
    row_name = "case"


def tag(item, report):
    """Attach (case, backend, sort key) to the report of a fault test; others untouched."""
    if item.get_closest_marker(MARKER) is None:
        return
    callspec = getattr(item, "callspec", None)
    params = getattr(callspec, "params", {})
    backend_id = params[BACKEND_FIXTURE][0] if BACKEND_FIXTURE in params else ANY
    others = [name for name in params if name != BACKEND_FIXTURE]
    labels = [str(getattr(params[name], "__name__", params[name])) for name in others]
    case = item.originalname + (f"[{'-'.join(labels)}]" if labels else "")
    path, line, _ = item.location
    indices = getattr(callspec, "indices", {})
    order = [str(path), int(line or 0)] + [int(indices.get(name, 0)) for name in others]
    report.user_properties.append((PROPERTY, {"check": case, "backend": backend_id,
                                              "order": order}))
