"""Charts of `report.html`: plotly figures embedded as JSON, plotly.js inlined once.

The page must work offline and be byte-identical when rebuilt, so:
- plotly.js is inlined from the installed plotly package (no CDN);
- every chart has a fixed element id and no random parts;
- figure JSON is written by us (`json.dumps`, keys in construction order) with `<`, `>`
  and `&` escaped, so no value from the data can close the `<script>` element.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

# Colour per sleep stage and a fixed palette (colour-blind friendly, Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
SLEEP_COLOURS = {  # also the stacking order, deepest sleep at the bottom
    "Deep": "#332288", "Core": "#0072B2", "Asleep (unspecified)": "#56B4E9", "REM": "#CC79A7",
    "Awake": "#E69F00", "In bed": "#BBBBBB",
}
_CONFIG = {"displaylogo": False, "responsive": True,
           "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}
_BASE_LAYOUT = {
    "template": "none",
    "height": 340,
    "margin": {"l": 56, "r": 12, "t": 28, "b": 50},
    "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 13},
    "hovermode": "x unified",
    "legend": {"orientation": "h", "y": -0.2},
    "xaxis": {"showgrid": False},
    "yaxis": {"gridcolor": "#e5e5e5", "zeroline": False},
}


@dataclass(frozen=True)
class Chart:
    chart_id: str  # fixed DOM id, e.g. "chart-steps"
    title: str
    figure: go.Figure

    def html(self) -> str:
        spec = self.figure.to_plotly_json()
        payload = _script_json([spec["data"], spec["layout"], _CONFIG])
        return (f'<h3 class="chart-title">{html.escape(self.title)}</h3>'
                f'<div class="chart" id="{self.chart_id}" data-chart="{self.chart_id}"></div>\n'
                f'<script>(function(){{var a={payload};Plotly.newPlot("{self.chart_id}",a[0],a[1],a[2]);}})();'
                f'</script>')


def _script_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def plotly_js() -> str:
    """The plotly.js bundle of the installed plotly package, for one inline <script>."""
    return get_plotlyjs()


def _layout(**extra: Any) -> dict[str, Any]:
    # The title is an HTML heading above the chart, not a plotly title: on a phone the
    # plotly toolbar would sit on top of it.
    layout = dict(_BASE_LAYOUT)
    for key, value in extra.items():
        layout[key] = {**layout.get(key, {}), **value} if isinstance(value, dict) else value
    return layout


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def daily_steps(series: Sequence[tuple[str, list[str], list[float], list[float]]]) -> Chart:
    """series: (person label, days, steps, 7-day mean) per person."""
    fig = go.Figure(layout=_layout(yaxis={"title": {"text": "steps"}}, barmode="group"))
    for i, (label, days, steps, mean7) in enumerate(series):
        fig.add_bar(x=days, y=steps, name=f"{label}", marker_color=colour(i), opacity=0.55,
                    hovertemplate="%{y:,.0f} steps<extra>" + _esc(label) + "</extra>")
        fig.add_scatter(x=days, y=mean7, name=f"{label}: 7-day mean", mode="lines",
                        line={"color": colour(i), "width": 2},
                        hovertemplate="%{y:,.0f} (7-day mean)<extra>" + _esc(label) + "</extra>")
    return Chart("chart-steps", "Daily steps (each minute from its highest-priority source)", fig)


def resting_heart_rate(series: Sequence[tuple[str, list[str], list[float]]]) -> Chart:
    fig = go.Figure(layout=_layout(yaxis={"title": {"text": "beats per minute"}}))
    for i, (label, days, bpm) in enumerate(series):
        fig.add_scatter(x=days, y=bpm, name=label, mode="lines+markers", marker={"size": 4},
                        line={"color": colour(i), "width": 1.5},
                        hovertemplate="%{y:.0f} bpm<extra>" + _esc(label) + "</extra>")
    return Chart("chart-resting-hr", "Resting heart rate", fig)


def sleep_by_stage(chart_id: str, label: str, nights: list[str],
                   stages: Sequence[tuple[str, list[float | None]]]) -> Chart:
    """Stacked hours per stage per night; InBed drawn as a line (it overlaps the stages)."""
    fig = go.Figure(layout=_layout(barmode="stack", yaxis={"title": {"text": "hours"}}))
    for stage, hours in stages:
        if stage == "In bed":
            fig.add_scatter(x=nights, y=hours, name="In bed", mode="lines",
                            line={"color": SLEEP_COLOURS["In bed"], "width": 1.5, "dash": "dot"},
                            hovertemplate="%{y:.1f} h in bed<extra></extra>")
        else:
            fig.add_bar(x=nights, y=hours, name=stage, marker_color=SLEEP_COLOURS.get(stage, "#999999"),
                        hovertemplate="%{y:.1f} h " + _esc(stage) + "<extra></extra>")
    return Chart(chart_id, f"Sleep per night by stage: {label}", fig)


def workouts_per_week(chart_id: str, label: str, weeks: list[str],
                      activities: Sequence[tuple[str, list[int]]]) -> Chart:
    fig = go.Figure(layout=_layout(barmode="stack", yaxis={"title": {"text": "workouts"}, "dtick": 1}))
    for i, (activity, counts) in enumerate(activities):
        fig.add_bar(x=weeks, y=counts, name=activity, marker_color=colour(i),
                    hovertemplate="%{y} " + _esc(activity) + "<extra>week of %{x}</extra>")
    return Chart(chart_id, f"Workouts per week: {label}", fig)


def body_mass(unit: str, series: Sequence[tuple[str, list[str], list[float]]]) -> Chart:
    """series: (person label, days, weight in `unit`) per person."""
    fig = go.Figure(layout=_layout(yaxis={"title": {"text": unit}}))
    for i, (label, days, weight) in enumerate(series):
        fig.add_scatter(x=days, y=weight, name=label, mode="lines+markers", marker={"size": 5},
                        line={"color": colour(i), "width": 1.5},
                        hovertemplate="%{y:.1f} " + _esc(unit) + "<extra>" + _esc(label) + "</extra>")
    return Chart("chart-weight", "Weight", fig)


def _esc(text: str) -> str:
    """Plotly hover templates interpret `%{...}` and a few HTML tags; data text must not."""
    return text.replace("{", "(").replace("}", ")").replace("<", "\u2039").replace(">", "\u203a")
