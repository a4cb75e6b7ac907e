"""report.html in a real headless Chromium: loads offline without JS errors, every chart
draws, and a screenshot is taken. Skipped where /usr/bin/chromium is absent (CI installs it)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("duckdb")
pytest.importorskip("plotly")

from test_warehouse import make_three_runs  # noqa: E402

from healthdelta import report, warehouse  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package chromium)"),
    pytest.mark.slow,
]

# Injected into a copy of the page (the report itself is not changed): collect uncaught
# errors and console.error calls, then, once the page settled, write what every chart
# drew into an attribute that --dump-dom prints.
PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e)); });
window.addEventListener("unhandledrejection", function (e) { window.__errors.push(String(e.reason)); });
(function () { var orig = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " ")); orig.apply(console, arguments); }; })();
</script>"""
PROBE_TAIL = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var charts = Array.prototype.map.call(document.querySelectorAll("div.chart"), function (c) {
    var svg = c.querySelector("svg.main-svg");
    return {id: c.id, svg: c.querySelectorAll("svg.main-svg").length,
            width: svg ? svg.getBoundingClientRect().width : 0,
            marks: c.querySelectorAll("g.trace path, g.trace .point, path.js-line").length};
  });
  document.body.setAttribute("data-probe", JSON.stringify({errors: window.__errors, charts: charts,
    plotly: typeof Plotly !== "undefined"}));
}, 1000); });
</script>"""


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={user_data}",
         "--virtual-time-budget=20000", *args],
        capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    runs = make_three_runs(tmp_path_factory)
    root = tmp_path_factory.mktemp("browser")
    db = root / "warehouse.duckdb"
    for i in range(3):
        warehouse.load_run(db, runs.ndjson(i), runs.entry(i))
    return report.build_report(db, root / "report", mode="share").out_dir / "report.html"


def test_report_renders_in_chromium_without_errors(report_html, tmp_path):
    page = report_html.read_text(encoding="utf-8")
    probed = page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1)
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(probed, encoding="utf-8")
    proc = chromium("--window-size=1280,1000", "--dump-dom", probe_page.as_uri(), user_data=tmp_path / "ud1")
    match = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert match, f"page did not finish loading: {proc.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["plotly"] is True
    assert result["errors"] == []
    ids = [c["id"] for c in result["charts"]]
    assert ids == re.findall(r'<div class="chart" id="([^"]+)"', page)
    assert {"chart-steps", "chart-resting-hr", "chart-sleep-1", "chart-workouts-1", "chart-weight"} <= set(ids)
    for chart in result["charts"]:
        assert chart["svg"] >= 1 and chart["width"] > 300 and chart["marks"] > 0, chart


LAYOUT_PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var vw = document.documentElement.clientWidth, wide = [], covered = [];
  Array.prototype.forEach.call(document.body.querySelectorAll("*"), function (el) {
    var r = el.getBoundingClientRect();
    // plotly parks a measuring svg far off screen on purpose: only what is partly on screen counts
    var onScreen = r.right > 0 && r.left < vw;
    if (r.width > 0 && onScreen && (r.right > vw + 0.5 || r.left < -0.5)) {
      wide.push(el.tagName + "." + (el.getAttribute("class") || "") + " " + Math.round(r.left) + ".." +
                Math.round(r.right));
    }
  });
  var titles = document.querySelectorAll("h1, h2, h3");
  Array.prototype.forEach.call(document.querySelectorAll(".modebar"), function (bar) {
    var b = bar.getBoundingClientRect();
    Array.prototype.forEach.call(titles, function (t) {
      var r = t.getBoundingClientRect();
      if (b.left < r.right && r.left < b.right && b.top < r.bottom && r.top < b.bottom) {
        covered.push(t.textContent);
      }
    });
  });
  parent.postMessage(JSON.stringify({viewport: vw, wide: wide.slice(0, 20),
    scroll: document.documentElement.scrollWidth, covered: covered,
    charts: document.querySelectorAll("div.chart svg.main-svg").length}), "*");
}, 1000); });
</script>"""
# Headless Chromium's window is at least 500 px wide, so the page is shown in an iframe
# of the width under test (its viewport is exactly that wide).
FRAME = """<!DOCTYPE html><html><body style="margin:0"><iframe src="{src}" width="{width}" height="{height}"
style="border:0;display:block"></iframe><script>
window.addEventListener("message", function (e) {{ document.body.setAttribute("data-layout", e.data); }});
</script></body></html>"""


@pytest.mark.parametrize("width", [390, 1280])
def test_report_layout_fits_the_screen(report_html, tmp_path, width):
    """Phone and desktop width: nothing wider than the viewport, no toolbar over a title;
    a screenshot of each is kept beside the test's files."""
    page = report_html.read_text(encoding="utf-8").replace("</body>", LAYOUT_PROBE + "</body>", 1)
    probe_page = tmp_path / "layout.html"
    probe_page.write_text(page, encoding="utf-8")
    frame = tmp_path / "frame.html"
    frame.write_text(FRAME.format(src=probe_page.as_uri(), width=width, height=900), encoding="utf-8")
    window = max(width, 500)
    proc = chromium(f"--window-size={window},900", "--dump-dom", frame.as_uri(), user_data=tmp_path / "ud")
    match = re.search(r'data-layout="([^"]*)"', proc.stdout)
    assert match, f"page did not finish loading: {proc.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["viewport"] == width
    assert result["charts"] >= 5
    assert result["wide"] == [] and result["scroll"] <= width, result
    assert result["covered"] == []
    shot_frame = tmp_path / "shot.html"
    shot_frame.write_text(FRAME.format(src=report_html.as_uri(), width=width, height=4800), encoding="utf-8")
    shot = tmp_path / f"report-{width}.png"
    proc = chromium(f"--window-size={window},4800", f"--screenshot={shot}", shot_frame.as_uri(),
                    user_data=tmp_path / "ud2")
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (window, 4800)
    assert len(data) > 50_000  # charts and tables, not a blank page
