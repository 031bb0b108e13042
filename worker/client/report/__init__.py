"""`labeler report RUN --out report.html`: a run's throughput, errors and labels on one page."""

from worker.client.report.data import ReportData, collect_report
from worker.client.report.page import render_report

__all__ = ["ReportData", "collect_report", "render_report"]
