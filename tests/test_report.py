"""Reports render tables and images that parse back."""

from __future__ import annotations

import base64
import io
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
