"""The soak campaigns' summary: each campaign's line of counts, printed at the end of the run whatever -s says."""
from __future__ import annotations

from tests.soak.soak_util import REPORTS


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORTS:
        terminalreporter.section("soak campaigns")
        for line in REPORTS:
            terminalreporter.write_line(line)
