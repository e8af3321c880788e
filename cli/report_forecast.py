"""``certpilot report forecast``: the 47-day readiness forecast (certpilot.forecast) from the command line.

Every renewal of the managed certificates (and, counted apart, of the unmanaged public ones) from now to
``--until`` under the lifetimes in force on each date, per issuer and week, against each issuer's rate
limits, as scheduled and with renewals spread; ``--chart`` writes the chart (certpilot.charts.forecast_png).

Issuer blocks configure no rate limits: an issuer's kind and limits come from ``--limits FILE`` (YAML, see
certpilot.forecast.parse_issuer_settings), else from its ACME directory (Let's Encrypt's published limits),
which is read from its block when a Prefect API is configured and otherwise from the inventory's ACME
account of that issuer. ``register(app)`` adds the command to the report app (cli/report.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from certpilot.database import get_engine, read_session
from certpilot.errors import PermanentError
from cli import prefect_api
from cli.console import JsonOption, cell, line, out, print_json, usage_error, warn

if TYPE_CHECKING:  # imported when the command runs: numpy is not loaded for every other command
    from certpilot import forecast as forecasting

__all__ = ["register", "report_forecast_command"]

DEFAULT_UNTIL = "2029-12-31"  # certpilot.forecast.DEFAULT_UNTIL


def register(app: typer.Typer) -> None:
    """Add ``forecast`` to the report app."""
    app.command("forecast")(report_forecast_command)


def _block_directories(names: list[str]) -> dict[str, str]:
    """The ACME directory of each ACME issuer block among ``names``, read from Prefect (an API is configured)."""
    from blocks.issuers import acme_directory_urls

    return acme_directory_urls(names, lambda problem: warn(
        f"{problem}: its ACME directory comes from the inventory, if it has an account there"))


def _settings(path: Path | None) -> dict[str, forecasting.IssuerSettings]:
    from certpilot import forecast as forecasting

    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PermanentError(f"cannot read the issuer limits file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PermanentError(f"the issuer limits file {path} is not UTF-8 text") from None
    return forecasting.parse_issuer_settings(text, str(path))


def report_forecast_command(
        until: Annotated[str, typer.Option(metavar="DATE", help=(
            "The last day (UTC) to forecast, e.g. 2029-12-31."))] = DEFAULT_UNTIL,
        limits: Annotated[Path | None, typer.Option("--limits", metavar="FILE", help=(
            "YAML: per issuer block, its kind (lets-encrypt, public, private) and rate limits "
            "(new_orders_per_account_per_3h, certificates_per_registered_domain_per_week, "
            "duplicate_certificates_per_week)."))] = None,
        chart: Annotated[Path | None, typer.Option("--chart", metavar="FILE", help=(
            "Also write the chart: renewals per week per issuer, with each issuer's weekly limit."))] = None,
        unmanaged: Annotated[bool, typer.Option("--unmanaged/--no-unmanaged", help=(
            "Count the unmanaged public certificates, renewed by hand, apart (default) or leave them out."))] = True,
        as_json: JsonOption = False) -> None:
    """The renewals to come under the shrinking lifetimes (public CAs: 200, 100, then 47 days; Let's Encrypt:
    64, then 45 days) per issuer and week, the weeks and domains where a rate limit would be exceeded and by
    how much, and what spreading the renewals would do."""
    from certpilot import forecast as forecasting

    try:
        last_day = dt.date.fromisoformat(until)
    except ValueError:
        raise usage_error(f"{until!r} is not a date such as 2029-12-31", "--until") from None
    given = _settings(limits)
    engine = get_engine()
    with read_session(engine) as session:
        names = forecasting.managed_issuers(session)
    directories = _block_directories(names) if prefect_api.configured() else {}
    with read_session(engine) as session:
        report = forecasting.forecast(session, until=last_day, issuers=given, directories=directories,
                                      unmanaged=unmanaged)
    for f in report.issuers:
        if f.managed and f.issuer.startswith("acme-issuer/") and f.issuer not in given and f.issuer not in directories \
                and f.basis.startswith("no ACME directory"):
            why = "its block could not be read" if prefect_api.configured() else "PREFECT_API_URL is not set"
            warn(f"issuer {f.issuer}: no ACME directory known ({why}, and no ACME account in the inventory): assumed "
                 "a public CA without known limits; give its kind and limits with --limits FILE")
    if chart is not None:
        from certpilot.charts import forecast_png

        try:
            chart.write_bytes(forecast_png(report))
        except OSError as exc:
            raise PermanentError(f"cannot write the chart to {chart}: {exc.strerror or exc}") from None
    if as_json:
        print_json(report.as_dict())
        return
    _print(report, chart)


def _years(values: dict[int, int]) -> str:
    return ", ".join(f"{y}: {n:,}" for y, n in values.items())


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "-"


def _print(report: forecasting.ForecastReport, chart: Path | None) -> None:
    out.print(line(("Renewal forecast", "bold"), f" from {_when(report.generated_at)} to {report.until.isoformat()}: ",
                   f"{len(report.exceedances)} rate limit(s) exceeded as scheduled, "
                   f"{sum(len(f.spread.exceedances) for f in report.issuers)} with renewals spread over "
                   f"{report.spread_fraction:.0%} of the lifetime"))
    if not report.issuers:
        out.print(line("  no managed or unmanaged public certificates to renew"))
    for f in report.issuers:
        _print_issuer(f, report.spread_fraction)
    if report.changes:
        out.print(line(("Schedule changes", "bold")))
        for day, text in report.changes:
            out.print(line(f"  {day.isoformat()}: {text}"))
    out.print(line(("note: ", "yellow"), "every renewal counts as a new certificate; Let's Encrypt exempts renewals "
                   "of the same names from the per-domain limit, and ARI renewals from all limits"))
    if chart is not None:
        out.print(line(f"chart written to {chart}"))


def _print_issuer(f: forecasting.IssuerForecast, spread_fraction: float) -> None:
    from certpilot import forecast as forecasting

    s, p = f.scheduled, f.spread
    title = f.issuer if f.managed else f"{f.issuer} (unmanaged, renewed by hand; not compared with limits)"
    out.print(line((title, "bold"), f"  {f.kind}, {f.certificates:,} certificate(s) on {f.registered_domains:,} "
                   "registered domain(s)"))
    weekly = f", weekly limit {f.weekly_limit:,}" if f.weekly_limit is not None else ""
    out.print(line(f"  limits: {forecasting.limits_text(f.limits)}{weekly} ({f.basis})"))
    out.print(line(f"  renewals per year: {_years(s.renewals_per_year)}"))
    out.print(line(f"  validations per year: {_years(s.validations_per_year)}"))
    orders = f.limits.new_orders_per_account_per_3h if f.limits is not None else None
    against = f" (limit {orders:,})" if orders is not None else ""
    out.print(line(f"  peak week {s.peak_week or '-'}: {s.peak_week_renewals:,}{weekly and ' (' + weekly[2:] + ')'}; "
                   f"busiest hour {_when(s.peak_hour)}: {s.peak_hour_renewals:,}; busiest 3 hours from "
                   f"{_when(s.peak_3h)}: {s.peak_3h_renewals:,}{against}"))
    if s.exceedances:
        table = Table(show_edge=False, pad_edge=False)
        for column in ("week", "limit", "subject", "busiest window from", "count", "allowed", "over by"):
            table.add_column(column, no_wrap=column != "subject")
        for e in s.exceedances[:forecasting.LISTED]:
            table.add_row(cell(e.week.isoformat()), cell(e.limit), cell(e.subject), cell(_when(e.window_start)),
                          cell(f"{e.count:,}"), cell(f"{e.allowed:,}"), cell(f"{e.over:,}", "red"))
        out.print(table)
        if len(s.exceedances) > forecasting.LISTED:
            out.print(line(f"  ... and {len(s.exceedances) - forecasting.LISTED} more (--json lists them all)"))
    elif f.managed and f.limits is not None:
        out.print(line("  exceeded: none"))
    change = p.renewals - s.renewals
    cost = f"{change:+,} renewals ({change / s.renewals:+.0%})" if s.renewals else f"{change:+,} renewals"
    out.print(line(f"  spread over {spread_fraction:.0%} of the lifetime: peak week {p.peak_week or '-'}: "
                   f"{p.peak_week_renewals:,} (as scheduled {s.peak_week_renewals:,}); busiest 3 hours "
                   f"{p.peak_3h_renewals:,} (as scheduled {s.peak_3h_renewals:,}); {len(p.exceedances)} exceedance(s) "
                   f"(as scheduled {len(s.exceedances)}); {cost}"))
    for note in f.notes:
        out.print(line(("  note: ", "yellow"), note))
