"""Charts of the executive view, drawn with matplotlib (Agg, no display) as a small PNG.

The PNG goes inline into a markdown artifact as a data URI: the Prefect UI renders markdown images
with a plain <img>, so the chart shows without any server of its own and without Internet.
No Prefect, no network.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certpilot.views import ExecutiveView

__all__ = ["trend_png"]

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
