"""Causal-LM tasks: GSM8K (trained on GSM8K or MetaMathQA) and a user's own instruction data.

``gsm8k`` follows HF PEFT's method comparison: train on GSM8K *train* (``train_source: gsm8k``) or on
MetaMathQA (``train_source: metamathqa``); validate on a fixed random sample of GSM8K train (``val_size``
questions, seed ``val_seed``; removed from the training data when that is GSM8K train); test on the whole
GSM8K test set once, at the end of each run (``final_splits``). A generation is right when the last number in
it equals the gold answer (``#### N``), commas and a trailing ``.0`` normalised; ``formatted`` is the share of
generations that stop and end in the answer format (``#### N`` or ``The answer is: N``), ``past_cap`` the share
that ran into a length cap. ``response: final`` trains on the final-answer line alone (``#### 72``).

Data: GSM8K from ``data_dir`` (``train.jsonl``/``test.jsonl`` with ``question``/``answer``, e.g.
``/work/shared/gsm8k``), else the hub (``openai/gsm8k``, config ``main``); MetaMathQA from
``task_options.gsm8k.train_file`` (JSON or JSONL with ``query``/``response``), else the hub
(``meta-math/MetaMathQA``). ``instruct``: JSONL files of the user's with a prompt and a response field, scored
by exact match of the whole response (whitespace normalised). Options go under ``task_options.<task>``.

HF PEFT's MetaMathQA protocol differs from peftbench's in switches of :class:`~peftbench.task.GenerationOptions`
(``max_chars``, ``val_sample``, ...) and in ``scoring: hf_peft`` here (:func:`hf_peft_answer`);
``protocol: hf_peft_metamathqa`` sets them all (docs/causal_lm.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from decimal import Decimal, DivisionByZero, InvalidOperation
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from peftbench import hub
from peftbench.errors import ConfigError, DataError
from peftbench.generation import Capped
from peftbench.hookspecs import hookimpl
from peftbench.task import GenerationOptions, GenerationTask, Split

PEFTBENCH_API_VERSION = 2
__version__ = "1.0"

#: HF PEFT's method-comparison prompt
GSM8K_PROMPT = "Question: {query} Think step by step.\nAnswer:"

# -- answers ----------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """``"1,200"`` → ``"1200"``, ``"18.0"`` → ``"18"``, ``"0.50"`` → ``"0.5"``."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def last_number(text: str | None) -> str | None:
    """The last number in a generation (normalised), or ``None`` if it has none."""
    found = _NUMBER.findall(text or "")
    return normalize_number(found[-1]) if found else None


#: what comes before the final answer: GSM8K's solutions, then MetaMathQA's
ANSWER_MARKERS = ("####", "The answer is:")
# a marker, a number, nothing after; spaces inside the marker and case are free (word-piece tokenizers of
# small test models decode ``####`` as ``# # # #``, and uncased ones lower-case)
_FORMATTED = re.compile("(?:" + "|".join(r"\s*".join(map(re.escape, m.replace(" ", ""))) for m in ANSWER_MARKERS)
                        + r")\s*\$?\s*" + _NUMBER.pattern + r"\s*\.?\s*$", re.IGNORECASE)


# -- scoring as lm-evaluation-harness does (lm_eval/tasks/gsm8k/gsm8k.yaml) -------------------------------

#: lm-eval's ``strict-match`` filter: the number right after the *first* ``#### ``
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
#: lm-eval's ``flexible-extract`` filter: the *last* number-like run of the generation (``$`` and commas in it)
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
#: what lm-eval's ``exact_match`` removes from the extracted answer and the reference before comparing them
#: (case ignored): commas, dollar signs, everything up to the last ``#### ``, one trailing period
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")


def strict_pattern(marker: str = "####") -> re.Pattern:
    """lm-eval's strict-match regex for a response format's marker (``####``: lm-eval's own pattern)."""
    return re.compile(re.escape(marker) + STRICT_PATTERN[len("####"):])


def extract(generation: str | None, pattern: re.Pattern, last: bool) -> str | None:
    """lm-eval's ``regex`` filter: the first (or ``last``) match, its first non-empty group, stripped; ``None``
    where lm-eval writes ``[invalid]``."""
    found = pattern.findall(generation or "")
    if not found:
        return None
    match = found[-1 if last else 0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
    return match.strip() if match else None


def lm_eval_normal(text: str) -> str:
    for ignored in IGNORED:
        text = re.sub(ignored, "", text)
    return text.lower()


def lm_eval_match(extracted: str | None, reference: str) -> bool:
    """lm-eval's ``exact_match`` of an extracted answer against the whole reference solution."""
    return extracted is not None and lm_eval_normal(extracted) == lm_eval_normal(reference)


def gold_number(answer: str) -> str | None:
    """The gold answer of a GSM8K solution (after ``####``) or a MetaMathQA one (after ``The answer is:``)."""
    for marker in ANSWER_MARKERS:
        if marker in answer:
            return last_number(answer.rsplit(marker, 1)[1])
    return last_number(answer)


def final_line(answer: str) -> str:
    """The final-answer line of a solution (``#### 72``; ``The answer is: 72``), or the whole text without one."""
    for marker in ANSWER_MARKERS:
        if marker in answer:
            return marker + answer.rsplit(marker, 1)[1].rstrip()
    return answer


def is_formatted(generation: str | None) -> bool:
    """Whether a generation stopped (no cap reached) and ends in the answer format: a marker, then a number."""
    return generation is not None and _FORMATTED.search(generation) is not None


# -- reading ----------------------------------------------------------------------------------------------


def read_rows(path: Path, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """``(field0, field1)`` of every row of a JSONL file (or a JSON list); a row without them names its line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: "
                        f"{exc.reason}); save the file as UTF-8") from None
    if text.lstrip().startswith("["):  # MetaMathQA ships one JSON list
        try:
            records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((line_no, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: not a JSON object ({exc.msg})") from None
    rows = []
    for line_no, record in records:
        wrong = {f: type(record[f]).__name__ for f in fields if isinstance(record, dict) and f in record
                 and not isinstance(record[f], str)}
        if wrong:
            raise DataError(f"{path}:{line_no}: field(s) {', '.join(f'{f!r} is {t}' for f, t in wrong.items())}, "
                            "not text")
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{line_no}: row lacks the text field(s) {missing}; found {found}")
        rows.append((record[fields[0]], record[fields[1]]))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def hub_rows(name: str, config: str | None, split: str, fields: tuple[str, str]) -> list[tuple[str, str]]:
    import datasets

    from peftbench.modeling import _hub_unreachable

    if _hub_unreachable():  # fail at once, not after a minute of retries
        raise OSError("the Hugging Face hub is unreachable from this machine")
    ds = datasets.load_dataset(name, config, split=split)
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"hub:{name}/{split}: no column(s) {missing}; found {ds.column_names}")
    return list(zip(ds[fields[0]], ds[fields[1]]))


def validation_sample(n: int, size: int, seed: int, key: str = "val_size", how: str = "peftbench") -> np.ndarray:
    """Indices of the fixed validation sample of ``n`` training rows; ``key``: the option, for errors.
    ``peftbench``: sorted, from ``default_rng(seed)``; ``hf_peft``: HF PEFT's MetaMathQA draw, in its order
    (``np.random.seed(seed)``, then ``np.random.shuffle(np.arange(n))``: the legacy global generator is a
    ``RandomState``, so a seeded one of our own gives the same indices without touching global state)."""
    if size >= n:
        raise DataError(f"{key} {size:,} leaves no training data from {n:,} rows; set it below {n:,}")
    if how == "hf_peft":
        indices = np.arange(n)
        np.random.RandomState(seed).shuffle(indices)
        return indices[:size]
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def short_rows(rows: list[tuple[str, str]], max_chars: int | None) -> list[tuple[str, str]]:
    """The rows whose ``f"{query} {response}"`` has at most ``max_chars`` characters (all without a limit): HF PEFT's
    MetaMathQA filter (1,300 keeps about 94 % of it), by characters so that it is the same for every tokenizer."""
    return rows if max_chars is None else [(q, r) for q, r in rows if len(f"{q} {r}") <= max_chars]


# -- HF PEFT's answer extraction (method_comparison/MetaMathQA/utils.py), for `scoring: hf_peft` -------------

#: where the final answer follows, tried in this order: the first one found anywhere is taken at its last use
HF_PEFT_DELIMITERS = ("The answer is: ", "The answer is ", "The final answer is: ", "The final answer is ", "#### ")


def hf_peft_answer(text: str | None) -> str | None:
    """The final answer as HF PEFT's MetaMathQA comparison parses it, or ``None`` without a delimiter."""
    if text is None:
        return None
    text = text.strip().rstrip(".!?")
    delimiter = next((d for d in HF_PEFT_DELIMITERS if d in text), None)
    if delimiter is None:
        return None
    # its first line, without surrounding punctuation; "%" too: GSM8K writes 50% as 50
    return text.rpartition(delimiter)[2].strip().split("\n", 1)[0].strip(" .!?$%")


def hf_peft_value(answer: str | None) -> float | str | None:
    """An extracted answer as HF PEFT compares it: a number (``"20/14"``: a fraction) as a float, else the text."""
    if answer is None:
        return None
    try:
        if "/" in answer:
            parts = answer.strip().split("/")
            if len(parts) != 2:
                return answer
            return float(Decimal(parts[0].strip()) / Decimal(parts[1].strip()))
        return float(Decimal(answer.strip()))
    except (InvalidOperation, DivisionByZero, ValueError):  # 0/0 is an InvalidOperation
        return answer


def hf_peft_correct(generation: str | None, reference: str) -> bool:
    """HF PEFT's rule: both answers parsed (numbers compared as floats, other text as text); an unparsed
    generation is wrong. A reference without a delimiter is a :class:`DataError`, as it is an error there."""
    gold = hf_peft_answer(reference)
    if gold is None:
        raise DataError(f"reference without a final answer HF PEFT's parser finds: {reference[-80:]!r}")
    predicted = hf_peft_answer(generation)
    return predicted is not None and hf_peft_value(predicted) == hf_peft_value(gold)


# -- tasks ------------------------------------------------------------------------------------------------


@dataclass
class Gsm8kOptions(GenerationOptions):
    prompt_template: str = GSM8K_PROMPT
    train_source: Literal["gsm8k", "metamathqa"] = "gsm8k"
    train_file: str | None = None  #: local MetaMathQA (JSON/JSONL with ``query``/``response``); else the hub
    #: what the model is trained to answer: the whole ``solution`` (the reference protocol), or its ``final``
    #: line alone (``#### 72``: short answers, for smoke tests and direct-answer baselines)
    response: Literal["solution", "final"] = "solution"
    #: ``lm_eval``: ``strict_match``/``flexible_extract`` alone; ``hf_peft`` adds ``hf_peft_accuracy``, HF PEFT's
    #: MetaMathQA answer extraction (:func:`hf_peft_answer`), which parses generations that ran into a cap too
    scoring: Literal["lm_eval", "hf_peft"] = "lm_eval"


@dataclass
class Gsm8kTask(GenerationTask):
    Options = Gsm8kOptions
    #: lm-eval's strict and flexible answers (before: the last number, under the name ``accuracy``); a tie on
    #: the strict match (often all 0 on a few validation questions) goes to the flexible one, then to the
    #: share of answers in the ``#### N`` format, then to the gold solutions' log-probability (before: to the
    #: earliest evaluation; then without ``gold_logprob``)
    scoring: ClassVar[str] = "lm_eval_strict_flexible;ties:flexible_extract,formatted,gold_logprob"
    tie_break: ClassVar[tuple[str, ...]] = ("flexible_extract", "formatted", "gold_logprob")

    def load(self, split: str, data_dir: str | None) -> Split:
        if split == "train" and self.options.train_source == "metamathqa":
            rows, source = self._metamath()
        else:
            rows, source = self._gsm8k("test" if split == "test" else "train", data_dir)
            if split != "test":
                held = validation_sample(len(rows), self.options.val_size, self.options.val_seed,
                                         f"task_options.{self.name}.val_size ({source})", self.options.val_sample)
                keep = held if split == "valid" else np.setdiff1d(np.arange(len(rows)), held)
                rows, source = [rows[i] for i in keep], f"{source}[{split}]"
        if split == "train":
            rows = short_rows(rows, self.options.max_chars)
        if split == "train" and self.options.response == "final":
            rows = [(q, final_line(a)) for q, a in rows]
        return Split([[self.prompt(q) for q, _ in rows], [a for _, a in rows]], [0.0] * len(rows), source)

    def trained_form(self, split: Split) -> Split:
        """``response: final``: the validation and test solutions cut to their final line, as training has them."""
        if self.options.response != "final":
            return split
        return replace(split, texts=[split.texts[0], [final_line(a) for a in split.texts[1]]])

    def _gsm8k(self, split: str, data_dir: str | None) -> tuple[list[tuple[str, str]], str]:
        path = Path(data_dir or "") / f"{split}.jsonl"
        if data_dir and path.exists():
            return read_rows(path, ("question", "answer")), str(path)
        try:
            return hub_rows(hub.GSM8K, hub.GSM8K_CONFIG, split, ("question", "answer")), f"hub:{hub.GSM8K}/{split}"
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"task 'gsm8k': no {split!r} data: {path if data_dir else 'no data_dir set'}; "
                            f'datasets.load_dataset("{hub.GSM8K}", "{hub.GSM8K_CONFIG}") failed '
                            f"({type(exc).__name__}). Set `data_dir` to a GSM8K folder (train.jsonl, test.jsonl)"
                            ) from None

    def _metamath(self) -> tuple[list[tuple[str, str]], str]:
        fields = ("query", "response")
        if self.options.train_file:
            path = Path(self.options.train_file)
            if not path.exists():
                raise ConfigError(f"task_options.{self.name}.train_file: {path} does not exist")
            return read_rows(path, fields), str(path)
        try:
            return hub_rows(hub.METAMATHQA, None, "train", fields), f"hub:{hub.METAMATHQA}/train"
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f'task {self.name!r}: datasets.load_dataset("{hub.METAMATHQA}") failed '
                            f"({type(exc).__name__}); set task_options.{self.name}.train_file to a local copy"
                            ) from None

    def score(self, generations: list[str | None], references: list[str]) -> dict[str, float]:
        """lm-eval's two GSM8K scores: ``strict_match`` (the main metric: the number right after the first
        answer marker of the trained format, ``#### `` or MetaMathQA's ``The answer is: ``) and
        ``flexible_extract`` (the last number of the generation), each compared as lm-eval's ``exact_match``
        does. A generation that ran into a length cap (``None``, or a :class:`Capped` text) is wrong in both: it
        never finished its answer. ``scoring: hf_peft`` adds ``hf_peft_accuracy``, which parses capped ones too."""
        strict = strict_pattern("The answer is:" if self.options.train_source == "metamathqa" else "####")
        capped = [g is None or isinstance(g, Capped) for g in generations]
        finished = [None if c else g for g, c in zip(generations, capped)]

        def accuracy(pattern: re.Pattern, last: bool) -> float:
            return float(np.mean([g is not None and lm_eval_match(extract(g, pattern, last), r)
                                  for g, r in zip(finished, references)]))

        metrics = {"strict_match": accuracy(strict, last=False), "flexible_extract": accuracy(FLEXIBLE, last=True),
                   "formatted": float(np.mean([is_formatted(g) for g in finished])),
                   "past_cap": float(np.mean(capped))}
        if self.options.scoring == "hf_peft":
            metrics["hf_peft_accuracy"] = float(np.mean([hf_peft_correct(g, r)
                                                         for g, r in zip(generations, references)]))
        return metrics

    @property
    def scores_unfinished(self) -> bool:
        """Whether generations that ran into a cap reach :meth:`score` as their text (a :class:`Capped`)."""
        return self.options.scoring == "hf_peft"


@dataclass
class InstructOptions(GenerationOptions):
    train_file: str | None = None  #: JSONL with ``prompt_field`` and ``response_field`` (required)
    dev_file: str | None = None  #: validation JSONL; default: ``val_size`` rows sampled from ``train_file``
    test_file: str | None = None  #: evaluated once, at the end of each run
    prompt_field: str = "prompt"
    response_field: str = "response"


@dataclass
class InstructTask(GenerationTask):
    """A user's instruction data; the prompt template defaults to the prompt as it is."""

    Options = InstructOptions
    #: an exact match of whole responses ties often (at 0 early on); the gold responses' log-probability
    #: breaks it (before: the earliest evaluation)
    scoring: ClassVar[str] = "exact_match;ties:gold_logprob"
    tie_break: ClassVar[tuple[str, ...]] = ("gold_logprob",)

    def load(self, split: str, data_dir: str | None) -> Split:
        o = self.options
        file = {"train": o.train_file, "valid": o.dev_file or o.train_file, "test": o.test_file}[split]
        key = {"train": "train_file", "valid": "dev_file", "test": "test_file"}[split]
        if file is None:
            raise ConfigError(f"task_options.{self.name}.{key}: required (a JSONL file with "
                              f"{o.prompt_field!r} and {o.response_field!r} fields)")
        path = Path(file)
        if not path.exists():
            raise ConfigError(f"task_options.{self.name}.{key}: {path} does not exist")
        rows = read_rows(path, (o.prompt_field, o.response_field))
        if split != "test" and not o.dev_file:
            held = validation_sample(len(rows), o.val_size, o.val_seed, f"task_options.{self.name}.val_size ({path})",
                                     o.val_sample)
            keep = held if split == "valid" else np.setdiff1d(np.arange(len(rows)), held)
            rows = [rows[i] for i in keep]
        if split == "train":
            rows = short_rows(rows, o.max_chars)
        return Split([[self.prompt(q) for q, _ in rows], [a for _, a in rows]], [0.0] * len(rows), str(path))

    def with_options(self, options, where: str = "") -> InstructTask:
        task = super().with_options(options, where)
        return replace(task, final_splits=("test",) if task.options.test_file else ())

    def score(self, generations: list[str | None], references: list[str]) -> dict[str, float]:
        def norm(text: str) -> str:
            return " ".join(text.split())

        right = [g is not None and norm(g) == norm(r) for g, r in zip(generations, references)]
        return {"exact_match": float(np.mean(right)),
                "past_cap": float(np.mean([g is None for g in generations]))}


CAUSAL_LM_TASKS = [
    Gsm8kTask("gsm8k", ("prompt", "response"), 0, "strict_match", dev_splits=("valid",), final_splits=("test",)),
    InstructTask("instruct", ("prompt", "response"), 0, "exact_match", dev_splits=("valid",)),
]


@hookimpl
def peftbench_add_tasks():
    return CAUSAL_LM_TASKS
