"""Causal-LM data: prompt + response token ids with the loss on the response only, left-padded prompts for
generation.

A training example is ``[bos] prompt response [eos]``; its labels are the ids themselves (the model shifts
them) with every prompt and padding position set to -100, so the loss is the response's alone and the model
learns to stop. An evaluation example is ``[bos] prompt``; its label is the example's index in the split, by
which the generated text is matched with its reference (batches are sorted by length, so their order is not
the split's). HF PEFT's MetaMathQA protocol (docs/causal_lm.md) encodes, labels and orders otherwise: task options
``answer_prefix_joined``, ``loss_on_prompt`` and ``order: bucket``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data import (
    Encoded,
    LengthGroupedBatchSampler,
    _fingerprint,
    _read_cache,
    _write_cache,
    cache_dir,
    holdout_split,
    selection_split,
    subsample,
)
from .errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .runs import RunSpec
    from .task import GenerationTask, Split

IGNORE_INDEX = -100  #: label of a position without loss (PyTorch's cross-entropy default)


def eos_id(tokenizer) -> int:
    """The id that ends a response: the tokenizer's EOS, else its SEP (BERT-style tokenizers of tiny test
    models have no EOS)."""
    for token_id in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if token_id is not None:
            return int(token_id)
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither an EOS nor a SEP token: "
                    "a causal-LM task needs one to end responses")


def bos_id(tokenizer) -> int | None:
    """The id that starts a sequence: the tokenizer's BOS, else its CLS (BERT-style), else none."""
    for token_id in (tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return None


def pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's, else EOS (Llama-family tokenizers have none); masked out either way."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def encode_lm(split: Split, tokenizer, max_length: int, with_response: bool, use_cache: bool = True,
              joined: bool = False) -> Encoded:
    """Token ids of every example (``with_response``: training, else the prompt alone), cached on disk.

    A prompt that leaves no room for a response token within ``max_length`` is a :class:`DataError` naming the
    example; a response that does not fit is cut (the example then teaches no EOS). ``joined``: HF PEFT's
    encoding (task option ``answer_prefix_joined``): ``tokenizer(prompt + response)`` as one string with the
    tokenizer's own special tokens, cut to ``max_length``, no EOS appended (:class:`LMCollator` trains the EOS of
    the first padding position); a prompt alone is ``tokenizer(prompt)``, cut alike."""
    role = ("train" if with_response else "prompt") + ("-joined" if joined else "")
    path = cache_dir() / f"lm-{role}-{_fingerprint(split, tokenizer, max_length)}.npz"
    cached = _read_cache(path) if use_cache else None
    if cached is not None:
        return cached
    if joined:
        encoded = _encode_joined(split, tokenizer, max_length, with_response)
        if use_cache:
            _write_cache(path, encoded)
        return encoded
    bos = [bos_id(tokenizer)] if bos_id(tokenizer) is not None else []
    prompts = tokenizer(split.texts[0], add_special_tokens=False)["input_ids"]
    responses = tokenizer([" " + r for r in split.texts[1]], add_special_tokens=False)["input_ids"] \
        if with_response else itertools.repeat([])
    rows, prompt_lengths = [], []
    room = max_length - 1 if with_response else max_length  # training keeps at least one response token
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt = bos + prompt
        if len(prompt) > room:
            raise DataError(f"{split.source}: example {i} (prompt {split.texts[0][i][:60]!r}...): the prompt is "
                            f"{len(prompt)} tokens, longer than train.max_length {max_length} allows"
                            f"{' with a response' if with_response else ''}; raise train.max_length or shorten "
                            "task_options.<task>.prompt_template")
        tail = (response + [eos_id(tokenizer)])[:max_length - len(prompt)] if with_response else []
        rows.append(prompt + tail)
        prompt_lengths.append(len(prompt))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    encoded = Encoded(flat, None, offsets, np.arange(len(rows), dtype=np.float32),
                      np.asarray(prompt_lengths, dtype=np.int64))
    if use_cache:
        _write_cache(path, encoded)
    return encoded


def _encode_joined(split: Split, tokenizer, max_length: int, with_response: bool) -> Encoded:
    prompts = tokenizer(split.texts[0])["input_ids"]
    rows = tokenizer([p + r for p, r in zip(*split.texts)])["input_ids"] if with_response else prompts
    rows = [row[:max_length] for row in rows]
    # the loss (without loss_on_prompt) starts where the joint tokens stop being the prompt's alone
    prompt_lengths = [next((i for i, (a, b) in enumerate(zip(p, row)) if a != b), min(len(p), len(row)))
                      for p, row in zip(prompts, rows)]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return Encoded(flat, None, offsets, np.arange(len(rows), dtype=np.float32), np.asarray(prompt_lengths, np.int64))


def _gather(e: Encoded, idx: np.ndarray, width: int, left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, mask, positions)`` of examples ``idx`` padded to ``width`` (on the left for generation: every
    prompt then ends at the last column, where the new tokens follow)."""
    starts, lengths = e.offsets[idx], e.lengths[idx]
    columns = np.arange(width)
    positions = columns[None, :] - (width - lengths[:, None] if left else 0)  # token position in its example
    mask = (positions >= 0) & (positions < lengths[:, None])
    ids = e.ids[np.where(mask, starts[:, None] + positions, 0)]
    return ids, mask, positions


class LMCollator:
    """Training batches: right-padded ``prompt + response`` with labels on the response; evaluation batches
    (``generation=True``): left-padded prompts, labels are the examples' indices in their split.

    ``trim_logits``: a training batch also says how many trailing positions need logits (``logits_to_keep``,
    from the position before the batch's earliest response token), with its labels cut to those columns. The
    LM head then skips every position that only predicts prompt tokens: the loss is the same, and the
    ``tokens × vocabulary`` logits (a large share of an LLM step's memory at Llama-3's 128k vocabulary) shrink
    to the response part.

    ``loss_on_prompt``: labels on every token, and the loss a sum over tokens divided by the batch's real tokens
    (``num_items_in_batch``: HF PEFT's normalisation). ``eos``: a row shorter than its batch gets this id at its
    first padding position, with the loss on it (HF PEFT pads with EOS and trains the first one; task option
    ``answer_prefix_joined``, whose examples end without EOS)."""

    def __init__(self, encoded: Encoded, pad: int, generation: bool, pad_to: int | None = None,
                 trim_logits: bool = False, loss_on_prompt: bool = False, eos: int | None = None):
        self.encoded, self.pad, self.generation, self.pad_to = encoded, pad, generation, pad_to
        self.trim_logits = trim_logits and not generation
        self.loss_on_prompt, self.eos = loss_on_prompt, eos

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        e, idx = self.encoded, np.asarray(indices)
        width = max(self.pad_to or 0, int(e.lengths[idx].max()))
        ids, mask, positions = _gather(e, idx, width, left=self.generation)
        ids = np.where(mask, ids, self.pad)
        batch = {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.generation:
            batch["labels"] = torch.from_numpy(e.labels[idx].astype(np.int64))
        else:
            answer = mask & (positions >= (0 if self.loss_on_prompt else e.prompt_lengths[idx][:, None]))
            if self.eos is not None:  # the EOS after each row, where the batch has room for it
                first_pad = positions == e.lengths[idx][:, None]
                ids, answer = np.where(first_pad, self.eos, ids), answer | first_pad
            labels = np.where(answer, ids, IGNORE_INDEX).astype(np.int64)
            if self.loss_on_prompt:
                batch["num_items_in_batch"] = int(mask.sum())
            if self.trim_logits:
                first = int(np.argmax(answer.any(0))) if answer.any() else width - 1
                keep = width - max(first - 1, 0)  # the logit at position t predicts token t + 1
                labels, batch["logits_to_keep"] = labels[:, width - keep:], keep
            batch["labels"] = torch.from_numpy(np.ascontiguousarray(labels))
        batch["input_ids"] = torch.from_numpy(ids.astype(np.int64))
        return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """HF PEFT's ``BucketIterator`` (method_comparison/MetaMathQA): the examples in their order, in buckets of
    ``factor × batch_size``; each bucket sorted by length, longest first (``torch.argsort(descending=True)``, so
    ties fall as they fall there), then cut into batches. Its quirk is kept: when the last bucket is partial, its
    batches come twice. The same order every epoch (the reference makes one pass)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, factor: int = 20):
        self.lengths, self.batch_size, self.factor = np.asarray(lengths), batch_size, factor

    def set_epoch(self, epoch: int) -> None:  # the order does not depend on it
        pass

    def batches(self) -> list[np.ndarray]:
        n, size = len(self.lengths), self.batch_size * self.factor
        buckets = [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
        if n % size:
            buckets.append(np.arange(n - n % size, n))
        batches = []
        for bucket in buckets:
            order = bucket[torch.argsort(torch.tensor(self.lengths[bucket]), descending=True).numpy()]
            batches += [order[j:j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        return batches

    def __iter__(self):
        return (b.tolist() for b in self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def make_lm_loader(encoded: Encoded, batch_size: int, generation: bool, group_by_length: bool, seed: int,
                   pad: int, pad_to: int | None = None, trim_logits: bool = False, order: str = "shuffle",
                   loss_on_prompt: bool = False, eos: int | None = None) -> torch.utils.data.DataLoader:
    """Training: shuffled (length-grouped) batches, or ``order: bucket`` (:class:`BucketBatchSampler`);
    generation: every prompt sorted by length, longest first (least padding, and an out-of-memory batch shows at
    once). ``loss_on_prompt``, ``eos``: :class:`LMCollator`."""
    from .data import EncodedDataset

    sampler = BucketBatchSampler(encoded.lengths, batch_size) if order == "bucket" and not generation else \
        LengthGroupedBatchSampler(encoded.lengths, batch_size, shuffle=not generation,
                                  group_by_length=group_by_length or generation, seed=seed)
    collator = LMCollator(encoded, pad, generation, pad_to, trim_logits, loss_on_prompt, eos)
    return torch.utils.data.DataLoader(EncodedDataset(encoded), batch_sampler=sampler, collate_fn=collator)


def lm_loaders(spec: RunSpec, task: GenerationTask, tokenizer, trim_logits: bool = False):
    """A causal-LM task's loaders: training on prompt + response, generation from the prompts of every
    evaluation split, the final-only ones apart; each evaluation split's references (its responses); the
    selection split's loader (:func:`peftbench.data.selection_split`, from the training prompts); and each
    evaluation split's prompt + response batches, for its ``gold_logprob`` (:func:`make_gold_loader`).
    ``trim_logits``: training and gold batches ask for logits of the response part only (:class:`LMCollator`)."""
    cfg, pad, options = spec.train, pad_id(tokenizer), task.options
    joined = options.answer_prefix_joined
    eos = eos_id(tokenizer) if joined else None
    gold: dict[str, Encoded] = {}  # every evaluation split's prompt + response, encoded as training encodes them

    def encoded(split: str, with_response: bool, limit: int | None):
        data = task.load(split, spec.data_dir)
        if not with_response:  # an evaluation split
            gold[split] = subsample(encode_lm(task.trained_form(data), tokenizer, cfg.max_length, True,
                                              joined=joined), limit)
        return subsample(encode_lm(data, tokenizer, cfg.max_length, with_response, joined=joined), limit), \
            data.texts[1]

    def prompts_only(split: str, data: Encoded) -> Encoded:
        """A held-out part of the training data generates from its prompts; its gold is the whole example."""
        gold[split] = dataclasses.replace(data)
        data.ids, data.offsets = _prompts_only(data)
        return data

    train_data, train_refs = encoded("train", True, cfg.max_train_samples)
    if spec.tuning:  # hold out part of the training set and generate from its prompts
        train_data, held_out = holdout_split(train_data, spec.tuning["holdout"], spec.tuning["split_seed"], False)
        dev = {"holdout": (prompts_only("holdout", held_out), train_refs)}
    else:
        dev = {split: encoded(split, False, cfg.max_eval_samples) for split in task.dev_splits}
    train_data, select = selection_split(spec, train_data, stratify=False)  # generates from its prompts
    select = {split: (prompts_only(split, data), train_refs) for split, data in select.items()}
    # a tuning run reads neither dev nor test
    final = {} if spec.tuning else {split: encoded(split, False, cfg.max_eval_samples) for split in task.final_splits}
    train_loader = make_lm_loader(train_data, cfg.batch_size, False, cfg.group_by_length, spec.seed, pad,
                                  pad_to=cfg.max_length if cfg.pad_to_max_length else None, trim_logits=trim_logits,
                                  order=options.order, loss_on_prompt=options.loss_on_prompt, eos=eos)

    def loaders(splits):
        return {split: make_lm_loader(data, cfg.eval_batch_size, True, True, 0, pad)
                for split, (data, _) in splits.items()}

    references = {split: refs for split, (_, refs) in {**dev, **final, **select}.items()}
    gold_loaders = {split: make_gold_loader(data, cfg.eval_batch_size, pad, trim_logits, eos)
                    for split, data in gold.items()}
    return train_loader, loaders(dev), loaders(final), references, loaders(select), gold_loaders


def make_gold_loader(encoded: Encoded, batch_size: int, pad: int, trim_logits: bool = False,
                     eos: int | None = None) -> torch.utils.data.DataLoader:
    """An evaluation split's prompt + response batches in the split's order, labelled as training labels them
    (:class:`LMCollator`), the prompt masked even with ``loss_on_prompt``: what ``gold_logprob`` is the mean
    log-probability of (:func:`peftbench.generation.gold_logprob`)."""
    from .data import EncodedDataset

    sampler = LengthGroupedBatchSampler(encoded.lengths, batch_size, shuffle=False, group_by_length=False, seed=0)
    collator = LMCollator(encoded, pad, False, trim_logits=trim_logits, eos=eos)
    return torch.utils.data.DataLoader(EncodedDataset(encoded), batch_sampler=sampler, collate_fn=collator)


def _prompts_only(encoded):
    """``(ids, offsets)`` of training examples cut to their prompts (a held-out part generates from them)."""
    keep = np.concatenate([np.arange(s, s + p) for s, p in zip(encoded.offsets[:-1], encoded.prompt_lengths)])
    offsets = np.concatenate([[0], np.cumsum(encoded.prompt_lengths)]).astype(np.int64)
    return encoded.ids[keep], offsets
