"""Figures of the fault-injection scenarios (tests/test_faults.py), in one uniform line each.

    figure("sigkill_mid_training", lost=0, duplicated=0, recovery_seconds=4.2)

prints `FIGURE sigkill_mid_training: lost=0 duplicated=0 recovery_seconds=4.2`, appends the
same line to the file named by GRAFTQ_FAULT_REPORT (when set), and collects it for the
summary this plugin adds at the end of the pytest run (loaded by tests/conftest.py).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

FIGURES: list[str] = []


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def figure(name: str, **values: Any) -> str:
    """Report one scenario's figure; returns the line."""
    line = f"FIGURE {name}: " + " ".join(f"{key}={_shown(value)}" for key, value in values.items())
    print(line, flush=True)
    FIGURES.append(line)
    path = os.environ.get("GRAFTQ_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(line + "\n")
    return line


def pytest_sessionfinish(session: Any) -> None:
    # Under pytest-xdist the figures are collected in the test processes: hand them to the main one.
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["graftq_figures"] = list(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    FIGURES.extend(getattr(node, "workeroutput", {}).get("graftq_figures", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
