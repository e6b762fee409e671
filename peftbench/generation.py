"""Generation-based evaluation of a causal-LM task: batched greedy decoding, scored by the task.

Prompts come left-padded and sorted by length (:func:`peftbench.lm_data.make_lm_loader`), so each batch
generates with the KV cache from one common end column. A batch stops at ``max_new_tokens`` new tokens or
at ``max_total_length`` tokens, prompt included; a generation that reaches a cap without its EOS scores as
wrong (``None`` for the task's :meth:`~peftbench.task.GenerationTask.score`).
"""

from __future__ import annotations

import torch

from .lm_data import IGNORE_INDEX, eos_id, pad_id


class Capped(str):
    """The text of a generation that ran into a length cap, for a task that scores those too
    (:attr:`peftbench.task.GenerationTask.scores_unfinished`, e.g. GSM8K's ``scoring: hf_peft``); others get
    ``None`` for it."""


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, max_new_tokens: int,
           max_total_length: int) -> list[tuple[list[int], bool]]:
    """Greedy continuations of a left-padded batch: each row's new token ids up to its EOS (excluded), and whether
    it reached that EOS before a cap."""
    from transformers import GenerationConfig

    eos, new = eos_id(tokenizer), min(max_new_tokens, max_total_length - input_ids.shape[1])
    if new < 1:  # the prompt alone fills the total length
        return [([], False)] * len(input_ids)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad_id(tokenizer))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    rows = out[:, input_ids.shape[1]:].tolist()
    return [(row[:row.index(eos)], True) if eos in row else (row, False) for row in rows]


def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, max_new_tokens: int,
                 max_total_length: int, keep_unfinished: bool = False) -> list[list[int] | None]:
    """:func:`greedy`'s token ids, ``None`` for a row that reached a cap without its EOS (its tokens with
    ``keep_unfinished``)."""
    return [ids if done or keep_unfinished else None
            for ids, done in greedy(model, input_ids, attention_mask, tokenizer, max_new_tokens, max_total_length)]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, max_new_tokens: int,
             max_total_length: int, keep_unfinished: bool = False) -> list[str | None]:
    """:func:`greedy`, decoded; a row past a cap is ``None``, or with ``keep_unfinished`` its text as a
    :class:`Capped`."""
    texts = []
    for ids, done in greedy(model, input_ids, attention_mask, tokenizer, max_new_tokens, max_total_length):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        texts.append(text if done else Capped(text) if keep_unfinished else None)
    return texts


@torch.no_grad()
def generate_and_score(model, loader, task, accelerator, tokenizer,
                       references: list[str]) -> tuple[dict[str, float], dict[int, str | None]]:
    """The task's metrics of greedy generations for every prompt of ``loader`` (labels: indices into
    ``references``), and the generations by index. Each process generates its share; the texts are gathered as
    objects."""
    from accelerate.utils import gather_object

    raw = accelerator.unwrap_model(model)
    raw.eval()
    options, texts = task.options, {}
    for batch in loader:
        with accelerator.autocast():
            generated = generate(raw, batch["input_ids"], batch["attention_mask"], tokenizer, options.max_new_tokens,
                                 options.max_total_length, task.scores_unfinished)
        for index, text in zip(batch["labels"].tolist(), generated):
            texts[index] = text
    if accelerator.num_processes > 1:
        merged = {}
        for part in gather_object([texts]):
            merged.update(part)
        texts = merged
    texts = dict(sorted(texts.items()))
    return task.score(list(texts.values()), [references[i] for i in texts]), texts


def gold_logprob(model, loader, accelerator) -> float:
    """The mean log-probability per token of the gold responses of ``loader``'s batches given their prompts,
    teacher-forced (:func:`peftbench.lm_data.make_gold_loader`: labels -100 wherever there is no loss): minus
    the token-weighted mean cross-entropy that training minimises, one forward per batch and no generation. A
    low-noise score of a model that a coarse accuracy ties at 0 (a small model's GSM8K strict match)."""
    sums, tokens = gold_logprobs(model, loader, accelerator)
    return pooled_logprob(sums, tokens)


def pooled_logprob(sums, tokens) -> float:
    """``gold_logprob`` from each example's summed log-probability and token count: token-weighted, as the
    training loss is (NaN without tokens)."""
    count = sum(tokens)
    return float(sum(sums) / count) if count else float("nan")


@torch.no_grad()
def gold_logprobs(model, loader, accelerator) -> tuple[list[float], list[int]]:
    """Each example's summed log-probability of its gold response and its number of response tokens, in the
    loader's order (what :func:`gold_logprob` pools; kept per example for the paired tests of
    :mod:`peftbench.stats`). Each process sums its share per example; ``gather_for_metrics`` drops the examples
    accelerate repeats to even out the last batch."""
    import torch.nn.functional as F

    model.eval()
    sums, tokens = [], []
    for batch in loader:
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits
        labels = labels[:, -logits.shape[1]:][:, 1:]  # the logit at position t predicts token t + 1
        logprobs = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="none",
                                    ignore_index=IGNORE_INDEX).view(labels.shape)
        batch_sums, batch_tokens = accelerator.gather_for_metrics(
            (logprobs.double().sum(1), (labels != IGNORE_INDEX).sum(1)))
        sums += batch_sums.cpu().tolist()
        tokens += batch_tokens.cpu().tolist()
    return sums, tokens
