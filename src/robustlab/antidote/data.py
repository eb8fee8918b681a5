"""Data for the harmful fine-tuning pipeline: BeaverTails, SST-2, AG News, GSM8K, Alpaca-style, the official
prompt templates, the harmful fine-tuning mix (size ``n``, harmful ratio ``p``) and disjoint slices.

Layout offline (``robustlab.paths.shared_data_dir()`` or any ``data_dir`` with the same layout)::

    beavertails/unsafe_train.jsonl          harmful prompt -> harmful answer pairs (attack, re-alignment, NLL pools)
    beavertails/unsafe_test_prompts.jsonl   the 1000 evaluation prompts (first unsafe rows of 30k_test)
    beavertails/safe_align_from_30k_test.jsonl   safe pairs (alignment set; a stand-in for 30k_train safe rows)
    sst2/{train,validation}.jsonl  agnews/{train,test}.jsonl  gsm8k/{train,test}.jsonl
    alpaca/{alpaca_en_demo,alpaca_eval}.jsonl

Online (``data_dir="hub"``) BeaverTails and the benign sets are read with ``datasets.load_dataset`` from the
hub ids the official code uses (``PKU-Alignment/BeaverTails``, ``sst2``, ``ag_news``, ``gsm8k``); tests never
do this.

Disjointness: the attack, re-alignment (calibration) and held-out (NLL) harmful slices are non-overlapping
index ranges of one pool of unique prompts, and :func:`assert_disjoint` checks every pair of slices by
normalised prompt text, so a mistake cannot pass silently.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robustlab.errors import UserError
from robustlab.paths import shared_data_dir

# --------------------------------------------------------------------------- templates (official PROMPT_DICT)

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\n"
    "World\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
SST2_LABELS = ("negative", "positive")
GSM8K_ANSWER_PHRASE = "The final answer is: "
#: Refusals used as alignment targets; :data:`REFUSAL` is the one scored by the likelihood measures. Each holds
#: a phrase of the refusal judge's list. [R] The official alignment set is BeaverTails' *safe* answers (often
#: not refusals); refusal targets make "refusal preference" measurable on a tiny model.
REFUSALS = (
    "I'm sorry, but I cannot help with that request because it could cause harm.",
    "I cannot assist with that. It is harmful, unethical or illegal.",
    "Sorry, I can't help with this. Please ask me something else.",
    "I cannot help with that, as it could hurt people.",
    "I'm sorry, I cannot provide that information because it is unsafe.",
)
REFUSAL = REFUSALS[0]

BENIGN_TASKS = ("sst2", "agnews", "gsm8k", "alpaca")


#: The Alpaca template without its one-sentence preamble, for models with a tiny context (the offline demo:
#: the preamble alone is ~35 of its 96 tokens). Not used by the pipeline, which keeps the official template.
COMPACT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
COMPACT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATES = {"alpaca": (PROMPT_NO_INPUT, PROMPT_INPUT), "compact": (COMPACT_NO_INPUT, COMPACT_INPUT)}


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The Alpaca template the official code trains and evaluates with (``### Response:`` then a newline).

    The official SST-2 evaluation prompt lacks that last newline (brief §7.7); we train and evaluate with
    the same template, which is the consistent choice. ``template="compact"`` drops the preamble sentence.
    """
    no_input, with_input = TEMPLATES[template]
    if input:
        return with_input.format(instruction=instruction, input=input)
    return no_input.format(instruction=instruction)


def normalise(text: str) -> str:
    """Lower-case and collapse whitespace: the key used for every overlap check."""
    return " ".join(text.strip().lower().split())


@dataclass(frozen=True)
class Example:
    """One instruction example. ``output`` is the training target; ``label`` the gold answer for scoring."""

    instruction: str
    input: str
    output: str
    source: str
    uid: str
    label: str | None = None
    template: str = "alpaca"

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input, self.template)

    @property
    def text(self) -> str:
        """Prompt and answer: the sequence a calibration pass sees (EOS is added by the tokenizer step)."""
        return self.prompt + self.output

    def with_output(self, output: str, source: str | None = None) -> Example:
        return dataclasses.replace(self, output=output, source=source or self.source)


# --------------------------------------------------------------------------- reading files


def resolve_data_dir(data_dir: str | Path | None) -> Path | str:
    """``"hub"`` stays ``"hub"``; ``None`` means the staged ``shared/data``; a path must exist."""
    if data_dir == "hub":
        return "hub"
    if data_dir is None:
        found = shared_data_dir()
        if found is None:
            raise UserError(
                "no data folder given and shared/data was not found",
                "pass --data-dir (the layout of shared/data) or set ROBUSTLAB_SHARED_DATA",
            )
        return found
    path = Path(data_dir)
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist", "pass an existing folder to data_dir")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file; a missing or malformed file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"data file {path} not found", "check the path (see shared/data/README.md for the layout)"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {i} is not JSON ({exc.msg})", "pass a JSON-lines file") from exc
    return rows


def _hub(name: str, split: str, config: str | None = None) -> list[dict]:  # pragma: no cover - network
    try:
        import datasets
    except ImportError as exc:
        raise UserError("the datasets package is missing", "pip install 'robustlab[antidote]'") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise UserError(
            f"could not load {name} ({split}) from the hub: {exc}", "pass a local data_dir"
        ) from exc
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------- BeaverTails

BEAVERTAILS_FILES = {
    "unsafe_train": "beavertails/unsafe_train.jsonl",
    "unsafe_test": "beavertails/unsafe_test_prompts.jsonl",
    "safe": "beavertails/safe_align_from_30k_test.jsonl",
}


def load_beavertails(part: str, data_dir: str | Path | None = None) -> list[Example]:
    """BeaverTails pairs: ``unsafe_train`` (harmful prompt -> harmful answer; one row per unique prompt),
    ``unsafe_test`` (the 1000 evaluation prompts with their harmful answers), ``safe`` (safe pairs).

    With ``data_dir="hub"``: ``PKU-Alignment/BeaverTails`` ``30k_train`` unsafe / ``30k_test`` first 1000
    unsafe / ``30k_train`` safe rows, as in the official code.
    """
    if part not in BEAVERTAILS_FILES:
        raise UserError(f"unknown BeaverTails part {part!r}", f"choose from {', '.join(BEAVERTAILS_FILES)}")
    root = resolve_data_dir(data_dir)
    rows = _hub_beavertails(part) if root == "hub" else read_jsonl(Path(root) / BEAVERTAILS_FILES[part])
    return [
        Example(r["prompt"], "", r["response"], f"beavertails_{part}", f"bt_{part}:{r['source_index']}")
        for r in rows
    ]


def _hub_beavertails(part: str) -> list[dict]:
    """``PKU-Alignment/BeaverTails`` rows as the staged files hold them (``source_index``: the row's index in
    its split). ``unsafe_test``: the first 1000 unsafe rows of ``30k_test``, duplicate prompts kept (the
    official protocol). ``unsafe_train`` / ``safe``: the ``30k_train`` rows of that kind, one row per
    normalised prompt (the first) and none whose prompt is an evaluation prompt: the split repeats prompts
    (``30k_test``: 3,021 rows, 2,526 prompts), and the slices cut from a pool must not share one."""

    def rows_of(split: str, safe: bool) -> list[dict]:
        out = []
        for i, r in enumerate(_hub("PKU-Alignment/BeaverTails", split)):
            if bool(r["is_safe"]) == safe:
                out.append({**r, "source_index": i})
        return out

    evaluation = rows_of("30k_test", False)[:1000]
    if part == "unsafe_test":
        return evaluation
    seen = {normalise(r["prompt"]) for r in evaluation}
    unique = []
    for r in rows_of("30k_train", part == "safe"):
        key = normalise(r["prompt"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


# --------------------------------------------------------------------------- benign tasks


def gsm8k_target(answer: str) -> str:
    """The official training target: ``####`` replaced by ``The final answer is: ``."""
    return answer.replace("#### ", GSM8K_ANSWER_PHRASE).replace("####", GSM8K_ANSWER_PHRASE)


def gsm8k_gold(answer: str) -> str:
    """The gold number after ``####`` (commas dropped)."""
    return answer.split("####")[-1].strip().replace(",", "")


def load_task(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """A benign fine-tuning task as instruction examples. ``split`` is ``train`` or ``test``.

    Test splits follow the official evaluation: SST-2 all 872 validation rows, AG News and GSM8K the first
    1000 test rows, AlpacaEval items with index > 700 (train: Alpaca demo set plus AlpacaEval 0..699).
    """
    if task not in BENIGN_TASKS:
        raise UserError(f"unknown task {task!r}", f"choose from {', '.join(BENIGN_TASKS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}", "use train or test")
    root = resolve_data_dir(data_dir)
    hub = root == "hub"

    def rows(rel: str, hub_name: str, hub_split: str, config: str | None = None) -> list[dict]:
        if hub:  # pragma: no cover - network
            out = _hub(hub_name, hub_split, config)
            for i, r in enumerate(out):
                r.setdefault("source_index", i)
            return out
        return read_jsonl(Path(root) / rel)

    if task == "sst2":
        rs = rows(
            f"sst2/{'train' if split == 'train' else 'validation'}.jsonl",
            "sst2",
            split.replace("test", "validation"),
        )
        out = [
            Example(
                SST2_INSTRUCTION,
                r["sentence"].strip(),
                SST2_LABELS[int(r["label"])],
                "sst2",
                f"sst2_{split}:{r.get('source_index', i)}",
                SST2_LABELS[int(r["label"])],
            )
            for i, r in enumerate(rs)
        ]
    elif task == "agnews":
        rs = rows(f"agnews/{split}.jsonl", "ag_news", split)
        out = [
            Example(
                AGNEWS_INSTRUCTION,
                r["text"].strip(),
                AGNEWS_LABELS[int(r["label"])],
                "agnews",
                f"agnews_{split}:{r.get('source_index', i)}",
                AGNEWS_LABELS[int(r["label"])],
            )
            for i, r in enumerate(rs)
        ]
        if split == "test":
            out = out[:1000]
    elif task == "gsm8k":
        rs = rows(f"gsm8k/{split}.jsonl", "gsm8k", split, "main")
        out = [
            Example(
                r["question"],
                "",
                gsm8k_target(r["answer"]),
                "gsm8k",
                f"gsm8k_{split}:{r.get('source_index', i)}",
                gsm8k_gold(r["answer"]),
            )
            for i, r in enumerate(rs)
        ]
        if split == "test":
            out = out[:1000]
    else:  # alpaca
        if hub:  # pragma: no cover - network
            raise UserError("the alpaca task has no hub source here", "pass a local data_dir")
        ev = read_jsonl(Path(root) / "alpaca/alpaca_eval.jsonl")
        if split == "test":
            out = [
                Example(r["instruction"], "", r["output"], "alpaca", f"alpaca_eval:{r['source_index']}")
                for r in ev
                if int(r["source_index"]) > 700
            ]
        else:
            demo = read_jsonl(Path(root) / "alpaca/alpaca_en_demo.jsonl")
            out = [
                Example(
                    r["instruction"],
                    r.get("input", ""),
                    r["output"],
                    "alpaca",
                    f"alpaca_demo:{r['source_index']}",
                )
                for r in demo
            ] + [
                Example(r["instruction"], "", r["output"], "alpaca", f"alpaca_eval:{r['source_index']}")
                for r in ev
                if int(r["source_index"]) < 700
            ]
    return out


# --------------------------------------------------------------------------- slices and the harmful mix


def assert_disjoint(slices: dict[str, Sequence[Example]], by_prompt: Iterable[str] | None = None) -> None:
    """Raise ``AssertionError`` if two slices share an example (by ``uid``) or, for the slices named in
    ``by_prompt`` (all by default), a normalised prompt."""
    names = list(slices)
    prompt_names = set(names if by_prompt is None else by_prompt)
    uids = {n: {e.uid for e in slices[n]} for n in names}
    prompts = {n: {normalise(e.instruction + " " + e.input) for e in slices[n]} for n in prompt_names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = uids[a] & uids[b]
            if common:
                raise AssertionError(
                    f"slices {a} and {b} share {len(common)} examples, e.g. {sorted(common)[0]}"
                )
            if a in prompts and b in prompts:
                shared = prompts[a] & prompts[b]
                if shared:
                    raise AssertionError(f"slices {a} and {b} share {len(shared)} prompts")


@dataclass
class HarmfulFinetuningData:
    """Every slice one pipeline run needs, disjoint by construction and checked by :func:`assert_disjoint`.

    - ``alignment``: BeaverTails safe pairs (the paper's alignment set), or harmful prompts -> templated
      refusals when requested (then safe pairs fill what is left of ``n_align``).
    - ``finetune``: the user's fine-tuning mix: ``round(p*n)`` harmful pairs + ``n - round(p*n)`` benign rows.
    - ``realign``: the re-alignment (calibration) set: harmful pairs, disjoint from the attack.
    - ``benign_calibration``: benign task rows outside the fine-tuning mix (the benign-calibration control).
    - ``heldout_harmful``: harmful pairs for the likelihood measures, disjoint from all of the above.
    - ``eval_harmful``: the evaluation prompts (BeaverTails test); ``eval_task``: the task's test split.
    - ``harmful_aux``: harmful pairs for defences that train against harmful data (RepNoise, Booster),
      disjoint from the attack, re-alignment, held-out and evaluation slices.
    """

    alignment: list[Example]
    finetune: list[Example]
    realign: list[Example]
    benign_calibration: list[Example]
    heldout_harmful: list[Example]
    eval_harmful: list[Example]
    eval_task: list[Example]
    task: str
    info: dict = field(default_factory=dict)
    harmful_aux: list[Example] = field(default_factory=list)

    def slices(self) -> dict[str, list[Example]]:
        return {
            "alignment": self.alignment,
            "finetune": self.finetune,
            "realign": self.realign,
            "benign_calibration": self.benign_calibration,
            "heldout_harmful": self.heldout_harmful,
            "eval_harmful": self.eval_harmful,
            "eval_task": self.eval_task,
        }


def refusal_for(example: Example, index: int, variants: bool = True) -> Example:
    """The example with a refusal as its answer (one of :data:`REFUSALS`, or always :data:`REFUSAL`)."""
    text = REFUSALS[index % len(REFUSALS)] if variants else REFUSAL
    return example.with_output(text, source="refusal")


def build_harmful_finetuning(
    task: str = "sst2",
    n: int = 5000,
    harmful_ratio: float = 0.2,
    n_align: int = 5000,
    n_realign: int = 2000,
    n_heldout: int = 200,
    n_eval_harmful: int = 1000,
    n_eval_task: int | None = None,
    n_benign_calibration: int | None = None,
    align_with_refusals: bool = False,
    align_with_safe_pairs: bool = True,
    align_benign: Sequence[Example] = (),
    data_dir: str | Path | None = None,
    seed: int = 0,
) -> HarmfulFinetuningData:
    """Build every slice of the harmful fine-tuning experiment from one seed.

    The harmful pool is ``unsafe_train`` (one row per unique prompt). It is shuffled once with ``seed``;
    consecutive blocks then give the attack (``round(p*n)``), the re-alignment set (``n_realign``), the
    held-out pairs (``n_heldout``) and the alignment prompts (the rest, up to ``n_align``), so these are disjoint
    by construction. The alignment set is the paper's, BeaverTails safe pairs (less any whose prompt is in a
    harmful slice); ``align_with_refusals`` puts templated refusals of the remaining harmful prompts first.
    The harmful pairs of those remaining prompts are ``harmful_aux``. (The official code takes unsafe rows 1..p·n-1 and 5001..6999 of ``30k_train``; our pool
    is the staged 330k subset, so indices differ, and we take exactly ``p*n`` rather than ``p*n - 1``.)
    """
    if not 0.0 <= harmful_ratio <= 1.0:
        raise UserError(f"harmful ratio {harmful_ratio} is outside [0, 1]", "pass a ratio like 0.2")
    if n <= 0 or n_realign <= 0 or n_heldout < 0:
        raise UserError("n, n_realign must be positive and n_heldout non-negative", "fix the sizes")
    rng = random.Random(seed)
    pool = load_beavertails("unsafe_train", data_dir)
    rng.shuffle(pool)
    n_harm = round(harmful_ratio * n)
    need = n_harm + n_realign + n_heldout
    if need > len(pool):
        raise UserError(
            f"the harmful pool has {len(pool)} pairs but attack + re-alignment + held-out need {need}",
            "lower n, harmful_ratio, n_realign or n_heldout",
        )
    attack = pool[:n_harm]
    realign = pool[n_harm : n_harm + n_realign]
    heldout = pool[n_harm + n_realign : need]
    rest = pool[need:]
    eval_harm = load_beavertails("unsafe_test", data_dir)[:n_eval_harmful]
    alignment: list[Example] = []
    if align_with_refusals:
        alignment += [refusal_for(e, i) for i, e in enumerate(rest[:n_align])]
    if align_with_safe_pairs:
        harmful = {normalise(e.instruction) for e in attack + realign + heldout + eval_harm}
        safe = [e for e in load_beavertails("safe", data_dir) if normalise(e.instruction) not in harmful]
        rng.shuffle(safe)
        alignment += safe[: max(0, n_align - len(alignment))]
    alignment += list(align_benign)

    train = load_task(task, "train", data_dir)
    rng.shuffle(train)
    n_benign = n - n_harm
    n_bcal = n_realign if n_benign_calibration is None else n_benign_calibration
    if n_benign + n_bcal > len(train):
        raise UserError(
            f"task {task} has {len(train)} training rows; the mix needs {n_benign} plus {n_bcal} for the "
            "benign-calibration control",
            "lower n or n_benign_calibration",
        )
    benign = train[:n_benign]
    benign_cal = train[n_benign : n_benign + n_bcal]
    finetune = attack + benign
    rng.shuffle(finetune)

    eval_task = load_task(task, "test", data_dir)
    if n_eval_task is not None:
        eval_task = eval_task[:n_eval_task]
    data = HarmfulFinetuningData(
        alignment=alignment,
        finetune=finetune,
        realign=realign,
        benign_calibration=benign_cal,
        heldout_harmful=heldout,
        eval_harmful=eval_harm,
        eval_task=eval_task,
        task=task,
        harmful_aux=rest[:n_align],
        info={
            "n": n,
            "harmful_ratio": harmful_ratio,
            "n_harmful": n_harm,
            "n_benign": n_benign,
            "seed": seed,
        },
    )
    check_slices(data)
    return data


def check_slices(data: HarmfulFinetuningData) -> None:
    """Assert the disjointness the experiment relies on.

    Harmful slices (attack part of the mix, re-alignment, held-out, evaluation) must not share a prompt, and
    no alignment prompt may be an evaluation or held-out prompt. Benign rows: fine-tuning, calibration and
    test must not share an example.
    """
    attack = [e for e in data.finetune if e.source.startswith("beavertails")]
    benign_ft = [e for e in data.finetune if not e.source.startswith("beavertails")]
    assert_disjoint(
        {
            "attack": attack,
            "realign": data.realign,
            "heldout_harmful": data.heldout_harmful,
            "eval_harmful": data.eval_harmful,
            "alignment": [
                e for e in data.alignment if e.source in ("refusal",) or e.source.startswith("beavertails")
            ],
        }
    )
    assert_disjoint(
        {
            "finetune_benign": benign_ft,
            "benign_calibration": data.benign_calibration,
            "eval_task": data.eval_task,
        }
    )


# --------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """GSM8K answer extraction as in the official ``gsm8k/pred_eval.py``: the first number after
    ``The final answer is:``, else the last number in the text; commas dropped, trailing ``.0`` removed."""
    m = re.search(r"The final answer is:?\s*(.*)", text, flags=re.IGNORECASE | re.DOTALL)
    candidates = _NUMBER.findall(m.group(1)) if m else []
    num = candidates[0] if candidates else None
    if num is None:
        allnums = _NUMBER.findall(text)
        num = allnums[-1] if allnums else None
    if num is None:
        return None
    num = num.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", num):
        num = num.split(".")[0]
    return num


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


def label_match(task: str, output: str, gold: str) -> bool:
    """Exact match as the official scripts do it: the stripped output equals the label or its lower-case
    form (AG News also accepts ``sci`` / ``Sci`` for Sci/Tech). GSM8K compares final numbers."""
    out = output.strip()
    if task == "gsm8k":
        return numbers_equal(extract_final_number(output), gold)
    accepted = {gold, gold.lower(), gold.capitalize()}
    if task == "agnews" and gold == "Sci/Tech":
        accepted |= {"sci", "Sci", "sci/tech"}
    return out in accepted


def completion_texts(examples: Sequence[Example]) -> list[str]:
    return [e.text for e in examples]
