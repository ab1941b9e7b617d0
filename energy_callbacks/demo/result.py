"""One finished demo run, whichever framework trained it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core import EnergyReport


@dataclass(frozen=True)
class RunResult:
    """Final test accuracy, the callback's report, wall time and the CSV log it wrote."""

    framework: str
    rule: str
    accuracy: float
    report: EnergyReport
    seconds: float
    log: Path
