"""Charts of the executive view and of the renewal forecast, drawn with matplotlib (Agg, no display) as small PNGs.

The PNG goes inline into a markdown artifact as a data URI: the Prefect UI renders markdown images
with a plain <img>, so the chart shows without any server of its own and without Internet.
No Prefect, no network.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certpilot.forecast import ForecastReport
    from certpilot.views import ExecutiveView

__all__ = ["forecast_png", "trend_png"]

_OK, _FAILED, _INCIDENTS, _EXPIRING = "#2e7d32", "#c62828", "#ef6c00", "#1565c0"


def trend_png(view: ExecutiveView, dpi: int = 72) -> bytes:
    """Two panels: renewals (succeeded, failed) and incidents opened per day (or week) of the window;
    certificates expiring in each of the next weeks. About 20 KB."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend, safe in threads

    figure = Figure(figsize=(10, 3.2), dpi=dpi, layout="constrained")
    renewals, ahead = figure.subplots(1, 2, width_ratios=(3, 2))
    x = [d.start for d in view.trend]
    width = view.trend_bin.total_seconds() / 86400 * 0.8
    renewals.bar(x, [d.renewed for d in view.trend], width=width, color=_OK, label="renewed", align="edge")
    renewals.bar(x, [d.failed for d in view.trend], width=width, bottom=[d.renewed for d in view.trend],
                 color=_FAILED, label="renewal failed", align="edge")
    renewals.plot([d.start + view.trend_bin * 0.4 for d in view.trend], [d.incidents for d in view.trend],
                  color=_INCIDENTS, marker="o", markersize=3, linewidth=1, label="incidents opened")
    renewals.set_title(f"Renewals and incidents per {'day' if view.trend_bin.days == 1 else 'week'}", fontsize=10)
    renewals.legend(fontsize=8, loc="upper left", frameon=False)
    renewals.tick_params(labelsize=8)
    renewals.yaxis.get_major_locator().set_params(integer=True)
    locator = AutoDateLocator(maxticks=8)
    renewals.xaxis.set_major_locator(locator)
    renewals.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ahead.bar([str(i + 1) for i in range(len(view.expiring_weeks))], [n for _, n in view.expiring_weeks],
              color=_EXPIRING)
    ahead.set_title("Certificates expiring per week ahead", fontsize=10)
    ahead.set_xlabel("week from now", fontsize=8)
    ahead.tick_params(labelsize=8)
    ahead.yaxis.get_major_locator().set_params(integer=True)
    for axes in (renewals, ahead):
        axes.spines[["top", "right"]].set_visible(False)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi, metadata={"Software": None})
    return out.getvalue()


# The CA/B Forum's maximum validity falls to 100 days on the first date and to 47 on the second (SC-081).
FORECAST_MARKERS = ((dt.date(2027, 3, 15), "100 days"), (dt.date(2029, 3, 15), "47 days"))
FORECAST_LINES = 8  # issuers drawn one line each; the rest summed as one line


def forecast_png(report: ForecastReport, dpi: int = 72) -> bytes:
    """Renewals per week as scheduled, one line per issuer (the busiest FORECAST_LINES; the others summed),
    each issuer's weekly limit as a dashed line of its colour, and vertical markers at the CA/B Forum's
    100-day and 47-day dates; a last week cut short by the end of the forecast is left out. A log scale
    when a limit is far above the renewals. About 50 KB."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.4), dpi=dpi, layout="constrained")
    axes = figure.subplots()
    shown = len(report.weeks)
    if shown and (report.until - report.weeks[-1]).days < 6:
        shown -= 1  # a partial week would look like a fall in renewals
    x = date2num(report.weeks[:shown])
    ranked = sorted(report.issuers, key=lambda f: (-f.scheduled.renewals, f.issuer))
    drawn, rest = ranked[:FORECAST_LINES], ranked[FORECAST_LINES:]
    highest, limits = 1, []
    for i, f in enumerate(drawn):
        series = f.scheduled.weekly[:shown]
        axes.plot(x, series, color=f"C{i}", linewidth=1.2, linestyle="-" if f.managed else ":",
                  label=f.issuer if f.managed else f"{f.issuer} (by hand)")
        highest = max(highest, max(series, default=0))
        if f.weekly_limit is not None:
            limits.append((f.weekly_limit, f"C{i}", f.issuer))
    if rest:
        summed = [sum(values) for values in zip(*(f.scheduled.weekly[:shown] for f in rest))]
        axes.plot(x, summed, color="grey", linewidth=1, label=f"{len(rest)} other issuers")
        highest = max(highest, max(summed, default=0))
    for limit, colour, issuer in limits:
        axes.axhline(limit, color=colour, linestyle="--", linewidth=1, label=f"{issuer}: weekly limit {limit:,}")
    if limits and max(limit for limit, _, _ in limits) > 20 * highest:
        axes.set_yscale("symlog", linthresh=10)
    else:
        axes.set_ylim(0, max([highest, *(limit for limit, _, _ in limits)]) * 1.12)
    for day, text in FORECAST_MARKERS:
        if report.weeks and report.weeks[0] <= day <= report.until:
            axes.axvline(float(date2num(day)), color="black", linestyle=":", linewidth=1)
            axes.annotate(f"{day.isoformat()}: {text}", (float(date2num(day)), 1), xycoords=("data", "axes fraction"),
                          xytext=(3, -10), textcoords="offset points", fontsize=8)
    axes.set_title(f"Renewals per week to {report.until.isoformat()}, as scheduled", fontsize=10)
    axes.set_ylabel("renewals per week", fontsize=8)
    axes.tick_params(labelsize=8)
    locator = AutoDateLocator(maxticks=10)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.spines[["top", "right"]].set_visible(False)
    if axes.get_legend_handles_labels()[0]:
        figure.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi, metadata={"Software": None})
    return out.getvalue()
