"""Display helpers shared by the CLI's tables and `graftq run`'s progress (torch-free, rich loaded lazily)."""

from __future__ import annotations

import sys
from typing import Any


def console() -> Any:
    from rich.console import Console

    # Not a terminal: do not wrap tables at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 250, soft_wrap=False, highlight=False)


def duration(seconds: float | None) -> str:
    """`m:ss` or `h:mm:ss`; `-` when unknown."""
    if seconds is None or seconds < 0:
        return "-"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def job_eta(step: int | None, total: int | None, running_seconds: float) -> float | None:
    """Seconds left for a job at `step` of `total` after `running_seconds`, or None if unknown."""
    if not step or not total or step <= 0:
        return None
    return running_seconds / step * max(0, total - step)
