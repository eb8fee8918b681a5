"""results/fedld/make_tables.py against the committed regime cells: every (beta, method) of the grid is a
row, a cell that is not there reads "missing" (never a number), the count of the grid's cells equals the
files on disk, and the means, standard deviations and seed-paired gaps equal those computed here from the
cells' own histories. A second seed is made by copying a committed cell (in a temporary folder) with one
accuracy changed, so the std and the pairing are exercised."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "results" / "fedld"
GROUP = "regime_retinamnist_lite0_64"


@pytest.fixture(scope="module")
def make_tables():
    spec = importlib.util.spec_from_file_location("fedld_make_tables", RESULTS / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def results(tmp_path):
    """A copy of the committed regime folders, pilot and benchmarks (not the CNN sweep: it is large)."""
    folders = sorted(f for f in RESULTS.glob(f"{GROUP}_beta*") if f.is_dir())  # not the sweep's logs
    if not any((f / "cells").glob("*.json") for f in folders):
        pytest.skip("no committed regime cells")
    for f in [*folders, *RESULTS.glob("regime_pilot_lr*"), RESULTS / "bench"]:
        shutil.copytree(f, tmp_path / f.name, ignore=shutil.ignore_patterns("checkpoints", "client_state"))
    shutil.copy(RESULTS / "regime.json", tmp_path / "regime.json")
    return tmp_path


def _rows(block: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"[0-9.]+", cells[0]):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def _final(cell: Path) -> float:
    return json.loads(cell.read_text())["history"][-1]["test"]["accuracy"]


def test_regime_table_rows_counts_and_numbers(make_tables, results):
    from robustlab.fedld.experiment import LABELS

    cells = sorted(results.glob(f"{GROUP}_beta*/cells/*.json"))
    # one more seed of FedLD beside a committed one (in a folder with a free seed; else an existing seed
    # rewritten), with a different final accuracy
    first = next(c for c in cells if c.name == "method=fedld__seed=0.json")
    for c in cells:
        if c.name == "method=fedld__seed=0.json":
            free = [s for s in (0, 1, 2) if not c.with_name(f"method=fedld__seed={s}.json").is_file()]
            if free:
                first = c
                break
    seed = free[0] if free else 1
    cell = json.loads(first.read_text())
    cell["seed"] = seed
    cell["history"][-1]["test"]["accuracy"] -= 0.1
    first.with_name(f"method=fedld__seed={seed}.json").write_text(json.dumps(cell))
    # and one committed cell taken away: its row must say missing
    gone = next(c for c in cells if c.name == "method=fedavg__seed=0.json")
    gone.unlink()
    cells = sorted(results.glob(f"{GROUP}_beta*/cells/*.json"))

    block = make_tables.build_blocks(results, echo=lambda _m: None)["regime-vs-cnn"][0]
    assert f"**{len(cells)} of 54 cells**" in block
    rows = _rows(block)
    assert len(rows) == 18  # 3 betas x 6 methods, whatever has run
    for beta in ("100", "1", "0.5"):
        folder = results / f"{GROUP}_beta{beta}" / "cells"
        for method in make_tables.CORE:
            row = rows[(beta, LABELS[method])]
            files = sorted(folder.glob(f"method={method}__seed=*.json"))
            if not files:
                assert row[0] == "missing (0 of 3)" and row[1:] == ["—", "—", "—"], row
                continue
            assert row[0].startswith(f"{len(files)} of 3 ("), row
            finals = [_final(f) for f in files]
            want = f"{statistics.fmean(finals):.3f}"
            if len(finals) > 1:
                want += f" ± {statistics.stdev(finals):.3f}"
            assert row[2] == want, (beta, method, row)
            assert bool(row[3]) == (method in ("fedld", "fedld-pg")), row  # ratio / cosine only there

    # the paired gaps: FedLD minus the control over the seeds both have, from the cells themselves
    beta = first.parents[1].name.rsplit("_beta", 1)[1]
    folder = first.parent
    both = [
        s
        for s in (0, 1, 2)
        if (folder / f"method=fedld__seed={s}.json").is_file()
        and (folder / f"method=fedavg-slr__seed={s}.json").is_file()
    ]
    assert both, "the committed grid has the control beside FedLD at this beta"
    gaps = [
        _final(folder / f"method=fedld__seed={s}.json") - _final(folder / f"method=fedavg-slr__seed={s}.json")
        for s in both
    ]
    want = f"{statistics.fmean(gaps):+.3f}"
    if len(gaps) > 1:
        want += f" ± {statistics.stdev(gaps):.3f}"
    n = f"{len(gaps)} seed{'s' if len(gaps) > 1 else ''}"
    line = next(x for x in block.splitlines() if x.startswith(f"- β {beta},"))
    assert re.search(
        rf"FedLD − FedAvg with FedLD's server step [-+0-9.± ]+ val-chosen, {re.escape(want)} final \({n}\)",
        line,
    ), (want, line)


def test_missing_note_replaces_an_old_note_and_is_idempotent(make_tables):
    start, end = "<!-- fedld-results:retinamnist:start -->", "<!-- fedld-results:retinamnist:end -->"
    old = f"x\n{start}\n\n> **Not backed by committed cells**: an older wording.\n\n\n| a |\n{end}\ny"
    once = make_tables.mark_missing(old, "retinamnist")
    assert once == make_tables.mark_missing(once, "retinamnist")
    assert "older wording" not in once
    assert once == f"x\n{start}\n\n{make_tables.missing_note('retinamnist')}\n\n| a |\n{end}\ny"
    empty = make_tables.mark_missing(f"{start}\n{end}", "retinamnist")
    assert make_tables.NONE_YET in empty and make_tables.MISSING not in empty


def test_every_round_benchmark_json_has_a_block_in_both_docs(make_tables):
    for path in sorted((RESULTS / "bench").glob("fedld_round_*.json")):
        group = f"round-benchmark-{path.stem.removeprefix('fedld_round_')}"
        r = json.loads(path.read_text())
        block = make_tables.bench_block(path)
        assert f"| {r['ratio_fedld_over_fedavg']['whole_round']:.2f} |" in block.splitlines()[2]
        for doc in make_tables.TARGETS:
            text = doc.read_text(encoding="utf-8")
            assert (
                f"<!-- fedld-results:{group}:start -->\n\n{block}\n<!-- fedld-results:{group}:end -->" in text
            )
