"""Bad task data: malformed TSV rows, labels outside the task's label set, broken task plugins.

Each is a DataError (exit status 2) that names the file and line (GLUE TSVs) or the task, split and example
(any task), raised before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from peftbench.cli import main
from peftbench.errors import DataError
from peftbench.hookspecs import hookimpl
from peftbench.host import Host, PluginInfo
from peftbench.sweep import check_data
from peftbench.task import Split
from peftbench.testing import ToyTask, tiny_config, tiny_model_config

RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\tlabel\n"
GOOD_ROW = "0\ta premise\ta hypothesis\t1\n"


@pytest.fixture(scope="module")
def glue_tasks():
    host = Host()
    return {name: reg.obj for name, reg in host.tasks.items()}


def _write(tmp_path, folder: str, content: str | bytes, split: str = "train"):
    path = tmp_path / folder / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("content,expected", [
    (RTE_HEADER + GOOD_ROW + "1\tonly two fields\n", r"train\.tsv:3: expected 4 tab-separated fields, got 2"),
    (RTE_HEADER + GOOD_ROW + "1\ta\tb\tc\t1\n", r"train\.tsv:3: expected 4 tab-separated fields, got 5"),
    (RTE_HEADER + GOOD_ROW + "\n\n" + "1\ta\tb\n", r"train\.tsv:5: expected 4"),  # blank lines still count
    (RTE_HEADER + GOOD_ROW + "1\ta\tb\tentailment\n", r"train\.tsv:3: label 'entailment' is not a number"),
    (RTE_HEADER + GOOD_ROW + "1\ta\tb\t2\n", r"train\.tsv:3: label '2' outside the task's labels 0\.\.1 "
                                              r"\(entailment, not_entailment\)"),
    (RTE_HEADER + "1\ta\tb\t-1\n", r"train\.tsv:2: label '-1' outside"),
    (RTE_HEADER + "1\ta\tb\t0.5\n", r"train\.tsv:2: label '0\.5' outside"),
    (RTE_HEADER + "1\ta\tb\tnan\n", r"train\.tsv:2: label 'nan' outside"),
    ("index\tsentence1\tlabel\n0\ta\t1\n", r"train\.tsv:1: header lacks column\(s\) \['sentence2'\]"),
    ("", r"train\.tsv: empty file \(expected a header row\)"),
    (RTE_HEADER, r"train\.tsv: no data rows"),
    ((RTE_HEADER + GOOD_ROW * 3000).encode() + b"1\ta\xff\xfeb\tc\t0\n" + GOOD_ROW.encode(),
     r"train\.tsv:3002: not UTF-8 text"),
], ids=["too-few-fields", "too-many-fields", "after-blank-lines", "label-not-number", "label-2", "label-negative",
        "label-fraction", "label-nan", "header", "empty", "header-only", "not-utf8"])
def test_malformed_rte_tsv_names_file_and_line(glue_tasks, tmp_path, content, expected):
    _write(tmp_path, "RTE", content)
    with pytest.raises(DataError, match=expected):
        glue_tasks["rte"].load("train", str(tmp_path))


@pytest.mark.parametrize("score,expected", [
    ("5.5", r"train\.tsv:2: similarity score 5\.5 outside \[0, 5\]"),
    ("-0.1", r"similarity score -0\.1 outside"),
    ("nan", r"similarity score nan outside"),
    ("high", r"label 'high' is not a number"),
])
def test_regression_scores_outside_range(glue_tasks, tmp_path, score, expected):
    _write(tmp_path, "STS-B", STSB_HEADER + f"0\tg\tf\t2012\t0\ts\ts\ta\tb\t{score}\t{score}\n")
    with pytest.raises(DataError, match=expected):
        glue_tasks["stsb"].load("train", str(tmp_path))


def test_tolerated_variants_read_the_same(glue_tasks, tmp_path):
    plain = RTE_HEADER + GOOD_ROW + "1\tanother\tpair\t0\n"
    expected = glue_tasks["rte"].read_tsv(_write(tmp_path / "a", "RTE", plain))
    for variant in (b"\xef\xbb\xbf" + plain.encode(),  # byte-order mark
                    plain.replace("\n", "\r\n").encode(),  # Windows line ends
                    (plain + "\n\n").encode()):  # trailing blank lines
        split = glue_tasks["rte"].read_tsv(_write(tmp_path / "b", "RTE", variant))
        assert (split.texts, split.labels) == (expected.texts, expected.labels)
    assert expected.labels == [1.0, 0.0] and expected.texts[0] == ["a premise", "another"]


# -- any task plugin: generic checks before training ---------------------------------------------------------


@dataclass
class BrokenToy(ToyTask):
    """A toy task whose data has one deliberate flaw."""

    flaw: str = ""

    def load(self, split, data_dir):
        data = super().load(split, data_dir)
        if self.flaw == "label":
            data.labels[7] = 2.0
        elif self.flaw == "columns":
            data.texts.append(list(data.texts[0]))
        elif self.flaw == "lengths":
            data.texts[0].pop()
        elif self.flaw == "empty":
            return Split([[]], [], data.source)
        elif self.flaw == "raises" and split == "dev":
            raise ValueError("planted: cannot parse the dev file")
        return data


def _host_with(task) -> Host:
    plugin = type("BrokenPlugin", (), {"PEFTBENCH_API_VERSION": 1,
                                       "peftbench_add_tasks": staticmethod(hookimpl(lambda: [task]))})
    host = Host()
    host.add_plugin(plugin, PluginInfo("broken", "object"))
    return host


@pytest.mark.parametrize("flaw,expected", [
    ("label", r"task 'broken', train split \(toy:broken:train\): example 7: label 2\.0 is outside the task's "
              r"labels 0\.\.1 \(1 such label\(s\)\)"),
    ("columns", r"task 'broken', train split .*: 2 text column\(s\), the task has 1 \(sentence\)"),
    ("lengths", r"task 'broken', train split .*: text columns and labels differ in length"),
    ("empty", r"task 'broken', train split .*: no examples"),
    ("raises", r"task 'broken': loading the 'dev' split failed: ValueError: planted: cannot parse the dev file "
               r"\(raised at .*test_data_errors\.py:\d+ in load\)"),
])
def test_task_data_is_checked_before_training(tmp_path, flaw, expected):
    task = BrokenToy("broken", ("sentence",), 2, "accuracy", flaw=flaw)
    config = tiny_config(tmp_path, tasks=["broken"], plugins=[])
    with pytest.raises(DataError, match=expected):
        check_data(config, _host_with(task), ["broken"])


def test_cli_run_with_corrupt_data_exits_2_before_training(tmp_path, capsys):
    glue = tmp_path / "glue"
    _write(glue, "RTE", RTE_HEADER + GOOD_ROW * 40 + "41\tthe label is\tmissing\n")
    _write(glue, "RTE", RTE_HEADER + GOOD_ROW * 8, split="dev")
    config = {"name": "bad-data", "model": tiny_model_config(), "tasks": ["rte"], "methods": ["lora"],
              "budget": {"lora_rank": 4}, "data_dir": str(glue), "train": {"epochs": 1, "num_threads": 1},
              "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert f"peftbench: error: {glue / 'RTE' / 'train.tsv'}:42: expected 4 tab-separated fields, got 3" in captured.err
    # the sweep's resolve step reads every split before the store is made: nothing was claimed or trained
    assert not (tmp_path / "r.sqlite").exists() and "run(s) finished" not in captured.out
