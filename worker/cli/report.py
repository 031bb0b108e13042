"""`labeler report RUN --out report.html`: one self-contained page to read or mail after a run."""

from __future__ import annotations

from pathlib import Path

import click

from worker.cli.common import load_settings, open_run, setting_option


@click.command("report")
@click.argument("run")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="report.html",
    show_default=True,
    help="HTML file to write.",
)
@setting_option("broker_url")
def report_command(run: str, out_path: Path, broker_url: str | None) -> None:
    """Write RUN's throughput over time, error breakdown and top labels as charts in one HTML page."""
    import redis

    from worker.client.report import collect_report, render_report

    settings = load_settings(broker_url=broker_url)
    store = open_run(settings, run)
    try:
        data = collect_report(store, run, settings.queue)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    out_path.write_text(render_report(data), encoding="utf-8")
    click.echo(
        f"report of run {run} ({data.status.done:,} of {data.status.total:,} images) in {out_path}", err=True
    )


COMMANDS = [report_command]
