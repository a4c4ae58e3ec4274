"""Run reports: PNG charts of a run directory's metrics and its ``report.md``.

``plot_run`` needs matplotlib (``pip install 'fastrlhf[report]'``); ``write_report`` writes the
report without charts when it is missing.
"""

from fastrlhf.report.plots import plot_run
from fastrlhf.report.report import summarize_rounds, write_report

__all__ = ["plot_run", "summarize_rounds", "write_report"]
