"""Claims at a glance: the rows come from the systems' results by stated rules, the report opens with
them, and the README's table is the generator's output."""

from __future__ import annotations

import json
import re
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from robustlab import claims as cl
from robustlab import reproduce as rp
from robustlab.report import Section
from robustlab.runs import read_json

README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_verdict_must_be_one_of_three():
    with pytest.raises(ValueError, match="verdict"):
        cl.Claim("x", "c", "p", "o", "s", "partly")


def _install(monkeypatch, name, reproduce, claims):
    pkg = types.ModuleType(f"robustlab.{name}")
    pkg.__path__ = []
    mod = types.ModuleType(f"robustlab.{name}.reproduce")
    mod.reproduce, mod.__spec__ = reproduce, types.SimpleNamespace(name=mod.__name__)
    if claims is not None:
        mod.claims = claims
    monkeypatch.setitem(sys.modules, pkg.__name__, pkg)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(rp.SYSTEMS, name, f"{name} title")


class _Headings(HTMLParser):
    def __init__(self):
        super().__init__()
        self.h2, self.links, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        self._in = tag == "h2"
        if tag == "a":
            self.links.append(dict(attrs)["href"])

    def handle_data(self, data):
        if self._in:
            self.h2.append(data)
            self._in = False


def test_report_opens_with_the_claims_linked_to_their_sections(tmp_path, monkeypatch):
    seen = {}

    def reproduce(scale, out, seed):
        return Section("x", "A paper", results={"number": 0.42}).text("numbers")

    def claims(run):
        seen["run"] = run
        n = run["number"] if run else None
        verdict = cl.REPRODUCED if n and n > 0.4 else cl.NOT_REPRODUCED
        return [cl.Claim("claimsys", "it works", "0.5", f"{n}", "tiny", verdict, "n > 0.4", "this run")]

    _install(monkeypatch, "claimsys", reproduce, claims)
    _install(monkeypatch, "noclaims", reproduce, None)
    html, _ = rp.run_reproduce("quick", ["claimsys", "noclaims"], tmp_path / "rep", echo=lambda *_: None)
    assert seen["run"] == {"number": 0.42}  # the claims see this run's numbers
    parser = _Headings()
    parser.feed(html.read_text())
    assert parser.h2[:2] == ["Claims at a glance", "Contents"]
    assert "#a-paper" in parser.links  # the claim links to its section
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.index("## Claims at a glance") < md.index("## Contents")
    assert "| claimsys | [it works](#a-paper) | 0.5 | 0.42 (tiny) | reproduced |" in md
    results = read_json(tmp_path / "rep" / "results.json")
    assert results["claims"][0]["verdict"] == "reproduced"
    assert results["claim_problems"] == {"noclaims": "registers no claims"}


def _regret_cells(
    folder: Path, losses: str, exponents: dict[str, float], Ks=(1000, 3000, 10000, 30000, 100000)
):
    rng = np.random.default_rng(1)
    (folder / "cells").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"instance: standard\nlosses: {losses}\n")
    for alg, p in exponents.items():
        for K in Ks:
            regret = (2.0 * K**p * (1 + 0.01 * rng.standard_normal(10))).tolist()
            cell = {"algorithm": alg, "K": K, "regret": regret}
            (folder / "cells" / f"algorithm={alg}__K={K}.json").write_text(json.dumps(cell))


def test_advmdp_verdicts_follow_the_slopes_of_known_power_laws(tmp_path, monkeypatch):
    from robustlab.advmdp.reproduce import claims

    monkeypatch.setattr(cl, "results_dir", lambda system: tmp_path / system)
    for ln in ("stochastic", "switching"):
        exponents = {"alg1": 0.9, "alg2": 0.5, "luo21": 2 / 3}
        _regret_cells(tmp_path / "advmdp" / "sweep" / f"standard-{ln}", ln, exponents)
    rows = {c.claim.split(" (")[0]: c for c in claims()}
    assert rows["Alg 2"].verdict == cl.REPRODUCED and "slope 0.50" in rows["Alg 2"].ours
    assert rows["Alg 1"].verdict == cl.NOT_REPRODUCED and "slope 0.90" in rows["Alg 1"].ours
    assert rows["Regret grows more slowly than Luo et al. 2021's"].verdict == cl.REPRODUCED
    assert "100k" in rows["Alg 2"].scale and "10 seeds" in rows["Alg 2"].scale
    assert "over K 10k–100k 0.49" in rows["Alg 2"].ours  # the last decade
    assert rows["Alg 2"].source.startswith("results/advmdp/sweep/standard-stochastic/cells")


def test_advmdp_a_falling_regret_is_not_read_as_a_rate(tmp_path, monkeypatch):
    """Under switching losses a tuned learner can track the switches, so its regret against the best fixed
    policy falls at large K; a log-log fit then gives a slope near 0 that must not count as √K."""
    from robustlab.advmdp.reproduce import claims

    monkeypatch.setattr(cl, "results_dir", lambda system: tmp_path / system)
    _regret_cells(
        tmp_path / "advmdp" / "sweep" / "standard-stochastic",
        "stochastic",
        {"alg1": 0.9, "alg2": 0.5, "luo21": 2 / 3},
    )
    switching = tmp_path / "advmdp" / "sweep" / "standard-switching"
    _regret_cells(switching, "switching", {"alg1": 0.9, "alg2": 0.5, "luo21": 2 / 3})
    cell = switching / "cells" / "algorithm=alg2__K=100000.json"
    data = json.loads(cell.read_text())
    data["regret"] = [r / 10 for r in data["regret"]]  # falls below its value at K = 3e4
    cell.write_text(json.dumps(data))
    rows = {c.claim.split(" (")[0]: c for c in claims()}
    assert rows["Alg 2"].verdict == cl.REPRODUCED  # from the stochastic grid alone
    assert "switching: alg2's regret does not grow with K" in rows["Alg 2"].ours
    assert "stochastic: slope 0.50" in rows["Alg 2"].ours
    luo = rows["Regret grows more slowly than Luo et al. 2021's"]
    assert luo.verdict == cl.REPRODUCED and "switching: alg2's regret does not grow" in luo.ours

    for name in ("stochastic", "switching"):  # regret grows nowhere: no rate to judge
        for f in (tmp_path / "advmdp" / "sweep" / f"standard-{name}" / "cells").glob("algorithm=alg2__*"):
            d = json.loads(f.read_text())
            d["regret"] = [1e6 / d["K"]] * len(d["regret"])
            f.write_text(json.dumps(d))
    rows = {c.claim.split(" (")[0]: c for c in claims()}
    assert rows["Alg 2"].verdict == cl.NOT_TESTABLE


def test_every_registered_claim_is_well_formed():
    claims, problems = cl.collect(rp.SYSTEMS)
    assert not problems, problems
    assert {c.system for c in claims} == set(rp.SYSTEMS)
    for c in claims:
        assert c.verdict in cl.VERDICTS and c.claim and c.paper and c.ours and c.rule and c.source


def test_readme_table_is_the_generators_output(tmp_path):
    """The README's opening table is written by ``python -m robustlab.claims --readme README.md``: its rows
    are the registered claims (numbers move with the committed results; rerun the command after a sweep)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(cl.START) : text.index(cl.END)]
    rows = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    claims, _ = cl.collect(rp.SYSTEMS)
    assert [re.search(r"\[(.*?)\]\(#", r).group(1) for r in rows] == [c.claim for c in claims]
    assert all(r.rstrip(" |").rsplit("| ", 1)[1] in cl.VERDICTS for r in rows)
    assert text.index(cl.START) < text.index("## The two commands")  # the opening section
    copy = tmp_path / "README.md"
    copy.write_text(text)
    cl.update_readme(copy)
    assert not cl.update_readme(copy)  # idempotent
    anchors = {"#" + cl.slug(h) for h in re.findall(r"^## (.+)$", text, re.M)}
    assert set(re.findall(r"\]\((#[^)]+)\)", block)) <= anchors  # every link lands on a heading


def test_mean_ci_uses_students_t_past_the_small_table() -> None:
    """16 values (15 degrees of freedom): t = 2.131 from printed tables, not the normal's 1.96."""
    import statistics

    vals = [0.0, 1.0] * 8
    m, lo, hi = cl.mean_ci(vals)
    assert m == 0.5
    assert (hi - lo) / 2 == pytest.approx(2.131 * statistics.stdev(vals) / 4, rel=1e-3)
