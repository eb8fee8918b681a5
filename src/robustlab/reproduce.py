"""``robustlab reproduce``: run each system's registered reproduction experiment into one report.

A system registers its experiment by providing ``robustlab/<system>/reproduce.py`` with::

    def reproduce(scale: str, out: pathlib.Path, seed: int) -> robustlab.report.Section

``scale`` is ``"quick"`` (laptop scale, minutes) or ``"full"``; ``out`` is that system's own folder inside
the report folder (its run folders and PNG figures go there, so a rerun with the same ``--out`` resumes).
A system whose module is absent is listed as not available; nothing stands in for it. The module may also
define ``claims(run)`` (see :mod:`robustlab.claims`): the report then opens with the papers' headline
claims, ours and a verdict for each.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from robustlab import __version__
from robustlab.claims import collect
from robustlab.errors import UserError
from robustlab.paths import check_output_dir
from robustlab.report import Report, Section
from robustlab.runs import environment_info, git_commit

SYSTEMS: dict[str, str] = {
    "advmdp": "Refined regret for adversarial linear MDPs (Dai, Luo, Wei, Zimmert, ICML 2023)",
    "fedld": "FedLD: federated learning under heterogeneity via loss decomposition (Zeng et al., MICCAI 2024)",
    "antidote": "Antidote: post-fine-tuning safety re-alignment by pruning (Huang et al., ICML 2025)",
}
SCALES = ("quick", "full")


@dataclass
class Outcome:
    system: str
    status: str  # ok | not available | failed
    seconds: float
    detail: str = ""


def parse_only(only: str | None) -> list[str]:
    if not only:
        return list(SYSTEMS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise UserError(
            f"unknown system in --only: {', '.join(unknown) or repr(only)}",
            f"choose from {', '.join(SYSTEMS)} (comma-separated)",
        )
    return names


def _entry_point(system: str):
    """The system's ``reproduce`` function, or a reason why it is not available."""
    module_name = f"robustlab.{system}.reproduce"
    try:
        if importlib.util.find_spec(module_name) is None:
            return None, "not implemented yet"
    except ModuleNotFoundError:
        return None, "not implemented yet"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional dependency is missing
        return None, f"missing dependency ({exc}); install with: pip install 'robustlab[{system}]'"
    return module.reproduce, ""


def run_reproduce(
    scale: str = "quick",
    systems: Iterable[str] | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    echo=print,
) -> tuple[Path, list[Outcome]]:
    """Run the selected systems' experiments and write ``report.md``, ``report.html``, ``results.json``."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}", "use --quick or --full")
    systems = list(systems) if systems is not None else list(SYSTEMS)
    out_dir = check_output_dir(out if out else Path("runs") / "reproduce" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)

    env = environment_info(seed)
    report = Report(
        f"robustlab reproduction ({scale})",
        {
            "robustlab": __version__,
            "scale": scale,
            "seed": seed,
            "git commit": git_commit() or "none",
            "python": env["python"],
            "cpus": env["cpu_count"],
            "started": env["time_utc"],
        },
    )
    outcomes = []
    for system in systems:
        fn, why = _entry_point(system)
        start = time.perf_counter()
        if fn is None:
            section = Section(system, SYSTEMS[system], status="not available").text(f"Not available: {why}.")
            outcomes.append(Outcome(system, "not available", 0.0, why))
            echo(f"{system}: not available ({why})")
        else:
            echo(f"{system}: running {scale} reproduction ...")
            try:
                section = fn(scale, out_dir / system, seed)
                section.name, section.title = system, section.title or SYSTEMS[system]
                status, detail = section.status, ""
            except UserError as exc:
                status, detail = "failed", exc.one_line()
            except Exception as exc:  # keep the other systems' results; the trace goes into the report
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
                detail_trace = traceback.format_exc()
                (out_dir / system).mkdir(parents=True, exist_ok=True)
                (out_dir / system / "error.txt").write_text(detail_trace)
            if status == "failed":
                section = Section(system, SYSTEMS[system], status="failed").text(f"Failed: {detail}")
            seconds = time.perf_counter() - start
            section.settings.setdefault("wall time (s)", round(seconds, 1))
            outcomes.append(Outcome(system, status, seconds, detail))
            echo(f"{system}: {status} in {seconds:.1f} s" + (f" — {detail}" if detail else ""))
        report.add(section)
    runs = {s.name: s.results for s in report.sections if s.status == "ok"}
    report.claims, report.claim_problems = collect(systems, runs)
    paths = report.write(out_dir)
    return paths["html"], outcomes
