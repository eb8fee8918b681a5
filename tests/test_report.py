"""Reports render tables and images that parse back."""

from __future__ import annotations

import base64
import io
import itertools
import re
from html.parser import HTMLParser

import numpy as np

from robustlab.report import Report, Section, pyplot, save_figure
from robustlab.runs import read_json


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell, self._row = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.tables[-1].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _figure(path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [1, 4, 9])
    return save_figure(fig, path)


def test_report_round_trip(tmp_path):
    png = _figure(tmp_path / "curve.png")
    report = Report("Test report", {"seed": 0})
    sec = Section("advmdp", "Adversarial MDPs", settings={"scale": "quick", "seeds": 3})
    sec.table(
        "Slopes", ["algorithm", "slope", "note"], [["alg1", 0.512345, "a|b <x>"], ["luo21", 0.66, None]]
    )
    sec.figure("Regret vs K", png, caption="log-log")
    sec.results["slope"] = {"alg1": 0.51}
    report.add(sec)
    report.add(Section("fedld", status="not available").text("Not available: not implemented yet."))
    paths = report.write(tmp_path / "out")

    html = paths["html"].read_text()
    parser = _Collect()
    parser.feed(html)
    assert parser.tables == [
        [["algorithm", "slope", "note"], ["alg1", "0.5123", "a|b <x>"], ["luo21", "0.66", "—"]]
    ]
    (img,) = parser.images
    raw = base64.b64decode(img.split(",", 1)[1])
    assert raw == png.read_bytes()
    plt = pyplot()
    arr = plt.imread(io.BytesIO(raw), format="png")
    assert arr.ndim == 3 and arr.shape[0] > 50 and np.isfinite(arr).all()
    assert 'href="#adversarial-mdps"' in html and 'id="adversarial-mdps"' in html
    assert "scale: quick" in html

    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| alg1")]
    assert rows == ["| alg1 | 0.5123 | a\\|b <x> |"]
    (link,) = re.findall(r"!\[Regret vs K\]\((.*?)\)", md)
    assert (tmp_path / "out" / link).read_bytes() == png.read_bytes()

    results = read_json(paths["json"])
    assert results["sections"]["advmdp"]["results"] == {"slope": {"alg1": 0.51}}
    assert results["sections"]["fedld"]["status"] == "not available"
    assert results["sections"]["advmdp"]["tables"][0]["rows"][1] == ["luo21", 0.66, None]


def test_one_seed_shows_no_spread():
    from robustlab.report import mean_pm

    assert mean_pm(0.5051, 0.0, 1) == "0.505"  # not "0.505 ± 0.000", which reads as a measured zero
    assert mean_pm(0.5051, 0.0123, 3) == "0.505 ± 0.012"
    assert mean_pm(None, None, 0) == "—" and mean_pm(float("nan"), 0.1, 3) == "—"
    assert mean_pm(12.34, 1.5, 2, digits=1) == "12.3 ± 1.5"


def _visible_tick_boxes(fig, axis):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [
        (t.label1.get_text(), t.label1.get_window_extent(renderer))
        for t in ticks
        if t.label1.get_visible() and t.label1.get_text()
    ]


def test_log_axis_labels_sit_at_the_grid_and_do_not_overlap():
    from robustlab.report import label_log_axis

    plt = pyplot()
    for grid, labels in (
        ([300, 1000, 3000], ["300", "1k", "3k"]),
        ([1000, 3000, 10000, 30000, 100000], ["1k", "3k", "10k", "30k", "100k"]),
        ([10_000, 30_000, 100_000, 300_000, 1_000_000], ["10k", "30k", "100k", "300k", "1M"]),
    ):
        fig, ax = plt.subplots(figsize=(5.5, 4.2))  # one panel of the report's two-panel regret plot
        ax.plot(grid, [g**0.5 for g in grid], "o-")
        ax.set_xscale("log")
        label_log_axis(ax.xaxis, grid)
        boxes = _visible_tick_boxes(fig, ax.xaxis)
        assert [text for text, _ in boxes] == labels
        for (_, a), (_, b) in itertools.pairwise(boxes):
            assert a.x1 < b.x0, "tick labels overlap"
        plt.close(fig)
    # matplotlib's default on the same short axis overlaps its minor labels: the problem being fixed
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot([300, 1000, 3000], [1, 2, 3])
    ax.set_xscale("log")
    boxes = sorted(_visible_tick_boxes(fig, ax.xaxis), key=lambda tb: tb[1].x0)
    assert any(a.x1 >= b.x0 for (_, a), (_, b) in itertools.pairwise(boxes))
    plt.close(fig)
