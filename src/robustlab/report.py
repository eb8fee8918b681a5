"""Reports: tables and figures into ``report.md``, a self-contained ``report.html`` and ``results.json``.

A :class:`Report` holds one :class:`Section` per system. Each section states its settings (scale, seeds,
data used) and carries tables, figures (PNG files, embedded into the HTML as base64) and free text.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlab.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, to_jsonable


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Link:
    """A table cell that links elsewhere (``href`` an anchor such as ``#fedld`` or a URL)."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Figure:
    title: str
    path: Path
    caption: str = ""


@dataclass
class Section:
    """One system's part of a report. ``status`` is ``ok``, ``not available`` or ``failed``."""

    name: str
    title: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    blocks: list[Table | Figure | str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def text(self, markdown: str) -> Section:
        self.blocks.append(markdown)
        return self

    def table(self, title: str, columns: list[str], rows: list[list[Any]], note: str = "") -> Section:
        if any(len(r) != len(columns) for r in rows):
            raise ValueError(f"table {title!r}: every row needs {len(columns)} cells")
        self.blocks.append(Table(title, list(columns), [list(r) for r in rows], note))
        return self

    def figure(self, title: str, path: str | Path, caption: str = "") -> Section:
        path = Path(path)
        if not path.is_file() or path.suffix.lower() != ".png":
            raise ValueError(f"figure {title!r}: {path} is not a PNG file")
        self.blocks.append(Figure(title, path, caption))
        return self


def fmt(value: Any, digits: int = 4) -> str:
    """Cell formatting: floats to ``digits`` significant digits, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def mean_pm(mean: float | None, spread: float | None, n: int | None, digits: int = 3) -> str:
    """``mean ± spread`` for a table cell. With fewer than two seeds there is no spread to show (a
    "± 0.000" would read as a measured zero), so the cell is the mean alone; say "1 seed" nearby."""
    if mean is None or mean != mean:
        return "—"
    if n is None or n < 2 or spread is None or spread != spread:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def short_number(x: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale and (x / scale) == int(x / scale):
            return f"{int(x / scale)}{suffix}"
    return f"{x:g}"


def label_log_axis(axis: Any, values: Any) -> None:
    """Ticks of a log-scaled axis exactly at ``values`` (e.g. the K grid), labelled 300, 1k, 30k, 1M,
    without matplotlib's minor-tick labels, which overlap when the axis spans about a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_major_locator(FixedLocator(sorted(float(v) for v in values)))
    axis.set_major_formatter(FuncFormatter(lambda x, _pos: short_number(x)))
    axis.set_minor_formatter(NullFormatter())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        text = fmt(v).replace("|", "\\|").replace("\n", " ")
        return f"[{text}]({v.href})" if isinstance(v, Link) else text

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_cell(value: Any) -> str:
    if isinstance(value, Link):
        return f'<td><a href="{html.escape(value.href)}">{html.escape(value.text)}</a></td>'
    return f"<td>{html.escape(fmt(value))}</td>"


class Report:
    def __init__(self, title: str, settings: dict[str, Any] | None = None) -> None:
        self.title = title
        self.settings = dict(settings or {})
        self.sections: list[Section] = []
        self.claims: list[Any] = []  # robustlab.claims.Claim rows: the report's first section
        self.claim_problems: dict[str, str] = {}

    CLAIMS_TITLE = "Claims at a glance"

    def _claim_rows(self) -> list[list[Any]]:
        from robustlab.claims import rows

        anchors = {s.name: "#" + _slug(s.title or s.name) for s in self.sections}
        return rows(self.claims, anchors.get)

    def _claim_notes(self) -> list[str]:
        from robustlab.claims import rule_notes

        notes = [
            "Ours: each system's committed results (results/<system>/) where it has them, else this run; "
            "the scale is given with every number. Each verdict follows from the numbers by a stated rule:"
        ]
        notes += rule_notes(self.claims)
        notes += [f"{s}: claims unavailable ({why})" for s, why in self.claim_problems.items()]
        return notes

    def add(self, section: Section) -> Section:
        self.sections.append(section)
        return section

    # -- rendering
    def to_markdown(self, figure_dir: str = "figures") -> str:
        out = [f"# {self.title}", ""]
        out += [f"- **{k}**: {fmt(v)}" for k, v in self.settings.items()]
        if self.claims or self.claim_problems:
            from robustlab.claims import COLUMNS

            out += ["", f"## {self.CLAIMS_TITLE}", "", markdown_table(COLUMNS, self._claim_rows()), ""]
            out += [self._claim_notes()[0], ""] + [f"- {n}" for n in self._claim_notes()[1:]]
        out += ["", "## Contents", ""]
        for s in self.sections:
            out.append(f"- [{s.title or s.name}](#{_slug(s.title or s.name)}) — {s.status}")
            out += [f"  - [{b.title}](#{_slug(b.title)})" for b in s.blocks if isinstance(b, Table | Figure)]
        for s in self.sections:
            out += ["", f"## {s.title or s.name}", "", f"Status: **{s.status}**", ""]
            if s.settings:
                out += ["Settings:", ""] + [f"- {k}: {fmt(v)}" for k, v in s.settings.items()] + [""]
            for b in s.blocks:
                if isinstance(b, Table):
                    out += [f"### {b.title}", "", markdown_table(b.columns, b.rows), ""]
                    if b.note:
                        out += [b.note, ""]
                elif isinstance(b, Figure):
                    out += [f"### {b.title}", "", f"![{b.title}]({figure_dir}/{b.path.name})", ""]
                    if b.caption:
                        out += [b.caption, ""]
                else:
                    out += [b, ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
            "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
            ".status{font-weight:bold}pre{white-space:pre-wrap}table.claims td,table.claims th{text-align:left}"
            ".verdict{font-weight:bold;white-space:nowrap}.reproduced{background:#d9f2d9}"
            ".not-reproduced{background:#f8d7d7}.not-testable-at-this-scale{background:#eee}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]
        if self.settings:
            parts.append(
                "<ul>"
                + "".join(f"<li><b>{e(k)}</b>: {e(fmt(v))}</li>" for k, v in self.settings.items())
                + "</ul>"
            )
        if self.claims or self.claim_problems:
            from robustlab.claims import COLUMNS

            parts.append(
                f'<h2 id="{_slug(self.CLAIMS_TITLE)}">{e(self.CLAIMS_TITLE)}</h2><table class="claims">'
            )
            parts.append(
                "<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in COLUMNS) + "</tr></thead><tbody>"
            )
            for r in self._claim_rows():
                cells = [_html_cell(v) for v in r[:-1]]
                cells.append(f'<td class="verdict {_slug(r[-1])}">{e(r[-1])}</td>')
                parts.append("<tr>" + "".join(cells) + "</tr>")
            notes = self._claim_notes()
            parts.append(f"</tbody></table><p>{e(notes[0])}</p><ul>")
            parts += [f"<li>{e(n)}</li>" for n in notes[1:]]
            parts.append("</ul>")
        parts.append('<h2 id="contents">Contents</h2><ul>')
        for s in self.sections:
            name = s.title or s.name
            sub = "".join(
                f'<li><a href="#{_slug(b.title)}">{e(b.title)}</a></li>'
                for b in s.blocks
                if isinstance(b, Table | Figure)
            )
            parts.append(
                f'<li><a href="#{_slug(name)}">{e(name)}</a> — {e(s.status)}'
                + (f"<ul>{sub}</ul>" if sub else "")
                + "</li>"
            )
        parts.append("</ul>")
        for s in self.sections:
            name = s.title or s.name
            parts.append(f'<h2 id="{_slug(name)}">{e(name)}</h2>')
            parts.append(f'<p class="status">Status: {e(s.status)}</p>')
            if s.settings:
                parts.append(
                    "<p>Settings:</p><ul>"
                    + "".join(f"<li>{e(str(k))}: {e(fmt(v))}</li>" for k, v in s.settings.items())
                    + "</ul>"
                )
            for b in s.blocks:
                if isinstance(b, Table):
                    parts.append(
                        f'<h3 id="{_slug(b.title)}">{e(b.title)}</h3><table><thead><tr>'
                        + "".join(f"<th>{e(fmt(c))}</th>" for c in b.columns)
                        + "</tr></thead><tbody>"
                    )
                    parts += ["<tr>" + "".join(_html_cell(v) for v in r) + "</tr>" for r in b.rows]
                    parts.append("</tbody></table>")
                    if b.note:
                        parts.append(f"<p>{e(b.note)}</p>")
                elif isinstance(b, Figure):
                    data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                    parts.append(
                        f'<h3 id="{_slug(b.title)}">{e(b.title)}</h3>'
                        f'<img alt="{e(b.title)}" src="data:image/png;base64,{data}">'
                    )
                    if b.caption:
                        parts.append(f"<p>{e(b.caption)}</p>")
                else:
                    parts.append(f"<pre>{e(b)}</pre>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def results(self) -> dict[str, Any]:
        from robustlab.claims import as_dicts

        return {
            "title": self.title,
            "settings": to_jsonable(self.settings),
            "claims": as_dicts(self.claims),
            "claim_problems": dict(self.claim_problems),
            "sections": {
                s.name: {
                    "status": s.status,
                    "settings": to_jsonable(s.settings),
                    "results": to_jsonable(s.results),
                    "tables": [
                        to_jsonable({"title": b.title, "columns": b.columns, "rows": b.rows})
                        for b in s.blocks
                        if isinstance(b, Table)
                    ],
                }
                for s in self.sections
            },
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.md`` (with ``figures/``), ``report.html`` (self-contained) and ``results.json``."""
        out = Path(out_dir)
        fig_dir = out / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        seen: dict[str, Path] = {}
        for s in self.sections:
            for b in s.blocks:
                if isinstance(b, Figure):
                    name = b.path.name
                    if name in seen and seen[name] != b.path.resolve():
                        name = f"{s.name}-{name}"
                    target = fig_dir / name
                    if b.path.resolve() != target.resolve():
                        shutil.copyfile(b.path, target)
                    seen[name] = b.path.resolve()
                    b.path = target
        return {
            "md": atomic_write_text(out / "report.md", self.to_markdown()),
            "html": atomic_write_text(out / "report.html", self.to_html()),
            "json": atomic_write_json(out / "results.json", self.results()),
        }


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())
