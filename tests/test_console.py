"""What a person sees: upstream warnings hidden by default (also in worker processes), shown with
--verbose; one line per finished stage when the output is piped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

from robustlab.console import Stages, watch_run

_PROBE = textwrap.dedent("""
    import logging, subprocess, sys, warnings
    from robustlab.console import quiet_upstream
    quiet_upstream(verbose=sys.argv[1] == "verbose")
    warnings.warn("upstream api will change", FutureWarning)
    warnings.warn("upstream api is deprecated", DeprecationWarning)
    warnings.warn("a real problem", UserWarning)
    flwr = logging.getLogger("flwr")
    flwr.addHandler(logging.StreamHandler())
    flwr.warning("DEPRECATED FEATURE: run_simulation")
    flwr.warning("a real flower warning")
    # a worker process, as Ray and the spawned seed workers start them
    child = (
        "import logging, warnings; import robustlab; warnings.warn('child deprecation', DeprecationWarning); "
        "f = logging.getLogger('flwr'); f.addHandler(logging.StreamHandler()); "
        "f.warning('Manually terminating ClientAppActor'); f.warning('child real warning')"
    )
    subprocess.run([sys.executable, "-c", child], check=True)
""")


def _probe(mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return proc.stderr


def test_upstream_warnings_are_hidden_by_default_in_this_process_and_its_workers():
    err = _probe("quiet")
    assert "a real problem" in err and "a real flower warning" in err and "child real warning" in err
    for hidden in ("will change", "is deprecated", "DEPRECATED FEATURE", "child deprecation", "Manually"):
        assert hidden not in err, hidden


def test_verbose_shows_them():
    err = _probe("verbose")
    for shown in ("will change", "is deprecated", "DEPRECATED FEATURE", "child deprecation", "Manually"):
        assert shown in err, shown


def test_piped_stages_print_one_line_each():
    out = io.StringIO()  # not a terminal
    with Stages("fedld", total=3, stream=out) as st:
        st.stage("fedavg seed 0 done")
        st.advance()  # counted, no line
        st.stage("fedld seed 0 done")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("fedld: fedavg seed 0 done (1/3, ") and lines[0].endswith(" elapsed)")
    assert lines[1].startswith("fedld: fedld seed 0 done (3/3, ")


def test_watch_run_reports_rows_other_writers_append(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"stage": "old", "point": False}) + "\n")  # a resumed run: counted, no line
    out = io.StringIO()

    def writer():
        with open(log, "a") as f:
            for i in range(4):
                f.write(json.dumps({"stage": f"s{i}", "point": i % 2 == 1}) + "\n")
                f.flush()
                time.sleep(0.05)
            f.write('{"stage": "tor')  # a line still being written is not read

    def describe(row):
        return (None, 1) if row["point"] else (f"{row['stage']} done", 1)

    with (
        Stages("antidote", total=5, stream=out, unit="points") as st,
        watch_run(tmp_path, st, describe, interval=0.02),
    ):
        t = threading.Thread(target=writer)
        t.start()
        t.join()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["antidote: s0 done", "antidote: s2 done"]
    assert lines[0].split(" (")[1].startswith("2/5 points, ")
    assert st.done == 5


def test_on_a_terminal_stage_lines_print_above_the_bar():
    out = io.StringIO()
    with Stages("fedld", total=2, stream=out, live=True, unit="rounds") as st:
        st.stage("fedavg seed 0 done")
        st.advance()
    text = out.getvalue()
    assert text.count("fedld: fedavg seed 0 done (1/2 rounds, ") == 1


def test_the_cli_is_quiet_by_default_and_verbose_on_request(monkeypatch, capsys):
    from robustlab.cli import main

    monkeypatch.setenv("ROBUSTLAB_QUIET", "")  # restored after the test, like PYTHONWARNINGS below
    monkeypatch.setenv("PYTHONWARNINGS", "")
    monkeypatch.delenv("PYTHONWARNINGS")
    assert main(["reproduce", "--only", "bogus"]) == 2
    assert os.environ["ROBUSTLAB_QUIET"] == "1" and "ignore::FutureWarning" in os.environ["PYTHONWARNINGS"]
    assert main(["--verbose", "reproduce", "--only", "bogus"]) == 2
    assert "ROBUSTLAB_QUIET" not in os.environ and "PYTHONWARNINGS" not in os.environ
    capsys.readouterr()
