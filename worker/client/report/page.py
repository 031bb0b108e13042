"""The run report as one self-contained HTML page (inline CSS and SVG, no script, no network)."""

from __future__ import annotations

import time
from html import escape

from worker.client.report.data import ReportData
from worker.client.report.svg import bar_chart, line_chart
from worker.client.status import format_duration

TOP_LABELS = 20

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 820px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { padding: 0.2em 0.8em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
.empty { color: #777; font-style: italic; }
.note { color: #555; font-size: 0.9em; }
"""


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch)) if epoch else "-"


def _row(*cells: object, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def render_report(data: ReportData) -> str:
    status = data.status
    span = (
        (status.last_record_at - status.first_record_at)
        if status.first_record_at and status.last_record_at
        else 0.0
    )
    summary = [
        _row("total images", f"{status.total:,}"),
        _row("done", f"{status.done:,}"),
        _row("labeled", f"{status.labeled:,}"),
        _row("failed (error records)", f"{status.failed:,}"),
        _row("pending", f"{status.pending:,}"),
        _row("images given up on (kept killing workers)", status.dead_jobs),
        _row("average throughput", f"{status.average_rate():.1f} images/s"),
        _row("first record", _when(status.first_record_at)),
        _row("last record", _when(status.last_record_at)),
        _row("labeling time", format_duration(span) if span else "-"),
    ]
    workers = [_row("worker", "images", "failed", "images/s", "last record", header=True)]
    workers += [
        _row(w.worker, f"{w.images:,}", f"{w.failed:,}", f"{w.rate:.1f}", _when(w.last_at))
        for w in data.workers
    ]
    top = data.top_labels.most_common(TOP_LABELS)
    others = sum(data.top_labels.values()) - sum(count for _, count in top)
    label_items = [(label, float(count)) for label, count in top]
    if others:
        label_items.append((f"({len(data.top_labels) - len(top)} other labels)", float(others)))
    error_items = [(code, float(count)) for code, count in data.errors.most_common()]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>labeler run {escape(status.run)}</title>
<style>{_CSS}</style></head>
<body>
<h1>Run {escape(status.run)}</h1>
<p class="note">Report generated {_when(data.generated_at)}.</p>
<table id="summary">{"".join(summary)}</table>
<h2>Throughput over time</h2>
<section id="throughput">{line_chart(data.throughput, "Images labeled per second", f"{data.bucket_s} s buckets")}</section>
<h2>Workers</h2>
<table id="workers">{"".join(workers)}</table>
<p class="note">Per-worker counts are work done: a job redelivered after a crash counts again.</p>
<h2>Errors by code</h2>
<section id="errors">{bar_chart(error_items, "Images with an error record", color="#e45756")}</section>
<h2>Top labels</h2>
<section id="labels">{bar_chart(label_items, "Images by top-1 label")}</section>
</body></html>
"""
