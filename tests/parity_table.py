"""The backend x check table printed at the end of a run that includes parity tests.

Parity tests take the ``parity_backend`` fixture; each report is filed under
(check, backend), where the check is the test's name plus its other parameters.
A skipped backend shows its reason once, below the table.
"""
import collections

PARITY_FIXTURE = "parity_backend"

_results = collections.OrderedDict()   # check -> {backend id -> outcome}
_skip_reasons = collections.OrderedDict()  # backend id -> reason
_backend_order = []


def _split(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    if PARITY_FIXTURE not in params:
        return None
    backend_id = params[PARITY_FIXTURE][0]
    others = [str(getattr(v, "__name__", v)) for k, v in params.items() if k != PARITY_FIXTURE]
    check = item.originalname + (f"[{'-'.join(others)}]" if others else "")
    return check, backend_id


def record(item, report):
    """File one test phase's report (called from ``pytest_runtest_makereport``)."""
    key = _split(item)
    if key is None or (report.when != "call" and not report.failed and not report.skipped):
        return
    check, backend_id = key
    if backend_id not in _backend_order:
        _backend_order.append(backend_id)
    if report.skipped:
        outcome = "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skip_reasons.setdefault(backend_id, reason.replace("Skipped: ", ""))
    else:
        outcome = "passed" if report.passed else "FAILED"
    row = _results.setdefault(check, {})
    if row.get(backend_id) != "FAILED":
        row[backend_id] = outcome


def write(terminalreporter):
    """Print the table (nothing when no parity test ran)."""
    if not _results:
        return
    width = max(len(check) for check in _results) + 2
    columns = [max(len(b), 7) + 2 for b in _backend_order]
    write_line = terminalreporter.write_line
    terminalreporter.section("backend parity: each backend against the NumPy float64 reference")
    write_line("check".ljust(width) + "".join(b.ljust(c) for b, c in zip(_backend_order, columns)))
    for check, row in _results.items():
        cells = [row.get(b, "-").ljust(c) for b, c in zip(_backend_order, columns)]
        write_line(check.ljust(width) + "".join(cells))
    totals = collections.Counter(o for row in _results.values() for o in row.values())
    write_line(f"{totals['passed']} passed, {totals['FAILED']} failed, {totals['skipped']} skipped")
    for backend_id, reason in _skip_reasons.items():
        write_line(f"skipped {backend_id}: {reason}")
