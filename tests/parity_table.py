"""The backend x check table printed at the end of a run that includes parity tests.

Parity tests take the ``parity_backend`` fixture. Each test report is filed
under (check, backend), where the check is the test's name plus its other
parameters. Cells read ``passed``, ``FAILED`` (a failure or error in any phase
of the test) or ``skipped``; each skip reason is listed once below the table.

How it is wired (conftest.py): ``pytest_runtest_makereport`` tags the report
of a parity test with its check and backend (in ``report.user_properties``,
which pytest-xdist sends from its workers to the controller), and
``pytest_runtest_logreport`` files tagged reports. Rows follow the test's
file, line and parameter order, columns the order of the backends given to
:class:`ParityTable`, so the table reads the same whatever order the tests ran in.
"""
import collections

PARITY_FIXTURE = "parity_backend"
PROPERTY = "xpnn_parity"
TITLE = "backend parity: each backend against the NumPy float64 reference"


def tag(item, report):
    """Attach (check, backend, sort key) to the report of a parity test; others untouched."""
    callspec = getattr(item, "callspec", None)
    params = getattr(callspec, "params", {})
    if PARITY_FIXTURE not in params:
        return
    backend_id = params[PARITY_FIXTURE][0]    # (id, name, device, dtype) in PARITY_PARAMS
    others = [name for name in params if name != PARITY_FIXTURE]
    labels = [str(getattr(params[name], "__name__", params[name])) for name in others]
    check = item.originalname + (f"[{'-'.join(labels)}]" if labels else "")
    path, line, _ = item.location
    order = [str(path), int(line or 0)] + [int(callspec.indices.get(name, 0)) for name in others]
    report.user_properties.append((PROPERTY, {"check": check, "backend": backend_id,
                                              "order": order}))


def _tag_of(report, property_name=PROPERTY):
    for name, value in getattr(report, "user_properties", ()):
        if name == property_name:
            return value
    return None


def _skip_reason(report):
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.replace("Skipped: ", "", 1)


class ParityTable:
    """Outcomes of parity tests by check and backend, and how to print them.

    Parameters
    ----------
    backend_order : sequence of str
        Backend ids in the order their columns appear; backends not listed
        follow in the order first seen.

    Attributes
    ----------
    property_name, title : str
        The ``user_properties`` entry it files, and its section's title (the
        faults table, ``fault_table.py``, files another).
    """

    property_name = PROPERTY
    title = TITLE
    row_name = "check"

    def __init__(self, backend_order=()):
        self.backend_order = list(backend_order)
        self.results = {}            # check -> {backend id -> outcome}
        self.order = {}              # check -> sort key
        self.skip_reasons = collections.OrderedDict()  # (backend id, reason) -> count
        self.seen_backends = []

    def record(self, report):
        """File one phase's report of a tagged parity test; ignore everything else."""
        tagged = _tag_of(report, self.property_name)
        if tagged is None or (report.when != "call" and not report.failed and not report.skipped):
            return
        check, backend_id = tagged["check"], tagged["backend"]
        self.order.setdefault(check, tuple(tagged["order"]))
        if backend_id not in self.seen_backends:
            self.seen_backends.append(backend_id)
        if report.failed:
            outcome = "FAILED"
        elif report.skipped:
            outcome = "skipped"
            key = (backend_id, _skip_reason(report))
            self.skip_reasons[key] = self.skip_reasons.get(key, 0) + 1
        else:
            outcome = "passed"
        row = self.results.setdefault(check, {})
        if row.get(backend_id) != "FAILED":     # a teardown error must not hide a failure
            row[backend_id] = outcome

    def columns(self):
        """Backend ids that have results, in column order."""
        listed = [b for b in self.backend_order if b in self.seen_backends]
        return listed + [b for b in self.seen_backends if b not in listed]

    def rows(self):
        """Checks in file, line and parameter order."""
        return sorted(self.results, key=lambda check: (self.order[check], check))

    def lines(self):
        """The table as text lines (empty when no parity test ran)."""
        if not self.results:
            return []
        backends, checks = self.columns(), self.rows()
        check_width = max(len(self.row_name), *(len(check) for check in checks)) + 2
        widths = [max(len(b), len("skipped")) + 2 for b in backends]
        lines = [self.row_name.ljust(check_width)
                 + "".join(b.ljust(w) for b, w in zip(backends, widths)).rstrip()]
        for check in checks:
            row = self.results[check]
            cells = "".join(row.get(b, "-").ljust(w) for b, w in zip(backends, widths))
            lines.append((check.ljust(check_width) + cells).rstrip())
        totals = collections.Counter(o for row in self.results.values() for o in row.values())
        lines.append(f"{totals['passed']} passed, {totals['FAILED']} failed, "
                     f"{totals['skipped']} skipped ({len(checks)} {self.row_name}s x "
                     f"{len(backends)} backends; '-' = not run)")
        for (backend_id, reason), count in self.skip_reasons.items():
            lines.append(f"skipped {backend_id} ({count}x): {reason}")
        return lines

    def write(self, terminalreporter):
        """Print the table as a section of pytest's terminal summary."""
        lines = self.lines()
        if not lines:
            return
        terminalreporter.section(self.title)
        for line in lines:
            terminalreporter.write_line(line)
