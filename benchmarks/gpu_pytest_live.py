"""pytest plugin for the GPU run (``-p gpu_pytest_live`` with ``benchmarks`` on ``sys.path``): appends one JSON line
per test to ``$DGQ_TEST_LOG`` as soon as it finishes (outcome, seconds, failure text), so the results and failure
causes survive a step timeout (pytest writes its own summary only at the end)."""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("DGQ_TEST_LOG")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    if report.when == "setup" and report.outcome == "skipped":
        outcome = "skipped"
    elif report.when != "call":
        outcome = "error"
    else:
        outcome = report.outcome
    rec = dict(test=report.nodeid, outcome=outcome, when=report.when, seconds=round(report.duration, 3))
    if report.failed:
        rec["longrepr"] = str(report.longrepr)[-3000:]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
