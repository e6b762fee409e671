"""GLUE tasks: official metrics against hand-computed values, the local TSV loader and the data-source order."""

import math

import numpy as np
import pytest

from peftbench.errors import DataError
from peftbench.host import Host


@pytest.fixture(scope="module")
def tasks():
    return Host().tasks


def test_eight_glue_tasks_are_registered(tasks):
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"} <= set(tasks)
    assert tasks["mnli"].obj.dev_splits == ("dev_matched", "dev_mismatched")
    assert tasks["stsb"].obj.is_regression


def test_accuracy_and_f1_hand_computed(tasks):
    m = tasks["mrpc"].obj.compute_metrics(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.8)  # tp=2 fp=1 fn=0: P=2/3, R=1
    assert tasks["rte"].obj.compute_metrics(np.array([0, 0, 1]), np.array([0, 1, 1]))["accuracy"] == pytest.approx(2 / 3)


def test_matthews_hand_computed(tasks):
    m = tasks["cola"].obj.compute_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert m["matthews"] == pytest.approx(2 / math.sqrt(12))  # TP=1 FP=1 TN=2 FN=0


def test_pearson_spearman_hand_computed(tasks):
    m = tasks["stsb"].obj.compute_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert m["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert m["spearman"] == pytest.approx(1.0)
    assert m["corr"] == pytest.approx((9 / math.sqrt(84) + 1) / 2)
    constant = tasks["stsb"].obj.compute_metrics(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 4.0]))
    assert constant["pearson"] == 0.0  # no NaN from a constant prediction


def test_reads_real_glue_tsv(tasks, glue):
    rte = tasks["rte"].obj.load("train", str(glue))
    assert len(rte) == 2490 and len(rte.texts) == 2 and set(rte.labels) == {0.0, 1.0}
    stsb = tasks["stsb"].obj.load("dev", str(glue))
    assert len(stsb) == 1500 and 0 <= min(stsb.labels) and max(stsb.labels) <= 5
    sst2 = tasks["sst2"].obj.load("dev", str(glue))
    assert len(sst2) == 872 and len(sst2.texts) == 1


def test_missing_task_names_both_places(tasks, tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("peftbench.modeling._hub_unreachable", lambda: False)  # a hub that answers
    with pytest.raises(DataError) as err:
        tasks["qqp"].obj.load("train", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "QQP" / "train.tsv") in message
    assert 'load_dataset("nyu-mll/glue", "qqp")' in message and "PEFTBENCH_GLUE_DIR" in message


def test_malformed_row_and_bad_label_name_file_and_line(tasks, tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tonly three\t0\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected 4 tab-separated fields, got 3"):
        tasks["rte"].obj.load("train", str(tmp_path))
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tc\td\t2\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: label '2' outside the task's labels 0\.\.1"):
        tasks["rte"].obj.load("train", str(tmp_path))
    (folder / "train.tsv").write_text('index\tsentence1\tsentence2\tlabel\n0\t"quoted\tb\t0\n')
    assert tasks["rte"].obj.load("train", str(tmp_path)).texts[0] == ['"quoted']  # no quoting: " is text
