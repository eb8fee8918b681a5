"""``robustlab reproduce``: registered systems run, absent ones are listed as not available, failures are
reported without hiding the other systems' results."""

from __future__ import annotations

import sys
import types

import pytest

from robustlab import reproduce as rp
from robustlab.errors import UserError
from robustlab.report import Section
from robustlab.runs import read_json


def _install(monkeypatch, name, fn):
    pkg = types.ModuleType(f"robustlab.{name}")
    pkg.__path__ = []
    mod = types.ModuleType(f"robustlab.{name}.reproduce")
    mod.reproduce = fn
    mod.__spec__ = types.SimpleNamespace(name=mod.__name__)
    monkeypatch.setitem(sys.modules, pkg.__name__, pkg)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(rp.SYSTEMS, name, f"{name} title")


def test_absent_system_is_not_available(tmp_path, monkeypatch):
    monkeypatch.setitem(rp.SYSTEMS, "ghostsys", "A system that is not there")
    html, outcomes = rp.run_reproduce("quick", ["ghostsys"], tmp_path / "rep", echo=lambda *_: None)
    assert [(o.system, o.status) for o in outcomes] == [("ghostsys", "not available")]
    results = read_json(tmp_path / "rep" / "results.json")
    assert results["sections"]["ghostsys"]["status"] == "not available"
    assert "not available" in html.read_text()


def test_registered_system_runs_and_failure_is_isolated(tmp_path, monkeypatch):
    seen = {}

    def good(scale, out, seed):
        seen.update(scale=scale, out=out, seed=seed)
        return Section("x", settings={"scale": scale}).table("T", ["a"], [[1]])

    def bad(scale, out, seed):
        raise RuntimeError("boom")

    _install(monkeypatch, "goodsys", good)
    _install(monkeypatch, "badsys", bad)
    _html, outcomes = rp.run_reproduce(
        "quick", ["badsys", "goodsys"], tmp_path / "rep", seed=5, echo=lambda *_: None
    )
    assert {o.system: o.status for o in outcomes} == {"badsys": "failed", "goodsys": "ok"}
    assert seen == {"scale": "quick", "out": tmp_path / "rep" / "goodsys", "seed": 5}
    assert "RuntimeError: boom" in (tmp_path / "rep" / "badsys" / "error.txt").read_text()
    results = read_json(tmp_path / "rep" / "results.json")
    assert results["sections"]["goodsys"]["tables"][0]["rows"] == [[1]]


def test_only_validates_names():
    assert rp.parse_only("advmdp, fedld") == ["advmdp", "fedld"]
    with pytest.raises(UserError, match="unknown system"):
        rp.parse_only("advmdp,nope")
