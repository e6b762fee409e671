"""Tokenization (cached on disk), dynamic padding and length-grouped batching."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .atomic import atomic_write

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .runs import RunSpec
    from .task import Split, Task

#: bump when the cached format changes
_CACHE_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("PEFTBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peftbench")
    return Path(root) / "tokens"


@dataclass
class Encoded:
    """A tokenized split: ragged token ids stored flat with offsets (cheap to cache and to index)."""

    ids: np.ndarray  #: all token ids, concatenated (int32)
    type_ids: np.ndarray | None  #: token type ids aligned with ``ids`` (None if the model has none)
    offsets: np.ndarray  #: example i is ``ids[offsets[i]:offsets[i + 1]]``
    labels: np.ndarray
    #: causal-LM training data: the prompt's token count of each example (its loss is on the tokens after it)
    prompt_lengths: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Encoded:
        lengths = self.lengths[indices]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # token t of the subset comes from old position t + (start of its example - its new start): one
        # vectorised gather instead of a Python loop over examples (SST-2 has 67k)
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(self.offsets[indices] - offsets[:-1], lengths)
        type_ids = self.type_ids[gather] if self.type_ids is not None else None
        prompt_lengths = self.prompt_lengths[indices] if self.prompt_lengths is not None else None
        return Encoded(self.ids[gather], type_ids, offsets, self.labels[indices], prompt_lengths)


def _fingerprint(split: Split, tokenizer, max_length: int) -> str:
    h = hashlib.sha256()
    source = Path(split.source)
    stamp = (source.stat().st_size, source.stat().st_mtime_ns) if source.exists() else None
    key = [_CACHE_VERSION, split.source, stamp, len(split), type(tokenizer).__name__,
           getattr(tokenizer, "name_or_path", ""), len(tokenizer), max_length]
    h.update(json.dumps(key, default=str).encode())
    if stamp is None:  # hub data or in-memory: hash the content
        for column in split.texts:
            h.update("\x1f".join(column).encode())
        h.update(np.asarray(split.labels).tobytes())
    return h.hexdigest()[:24]


def content_fingerprint(split: Split) -> str:
    """A digest of a split's content (texts and labels, not its path): runs on changed data are new runs."""
    h = hashlib.sha256()
    for column in split.texts:
        for text in column:
            h.update(text.encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    h.update(np.asarray(split.labels, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


_warned: set[Path] = set()


def _read_cache(path: Path) -> Encoded | None:
    """The cached encoding at ``path``, or ``None`` when it is missing or unreadable (a truncated or corrupt
    file is a cache miss: it is rebuilt, with one warning naming it)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            type_ids = z["type_ids"] if z["type_ids"].size else None
            prompt_lengths = z["prompt_lengths"] if "prompt_lengths" in z.files else None
            return Encoded(z["ids"], type_ids, z["offsets"], z["labels"], prompt_lengths)
    except Exception as exc:  # EOFError, BadZipFile, KeyError, ValueError, OSError: all mean "rebuild it"
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"token cache {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it",
                          stacklevel=3)
        return None


def _write_cache(path: Path, encoded: Encoded) -> None:
    type_ids = encoded.type_ids if encoded.type_ids is not None else np.zeros(0, np.int8)
    extra = {"prompt_lengths": encoded.prompt_lengths} if encoded.prompt_lengths is not None else {}
    with atomic_write(path) as f:  # concurrent runs never read a half-written cache
        np.savez(f, ids=encoded.ids, type_ids=type_ids, offsets=encoded.offsets, labels=encoded.labels, **extra)


def encode(split: Split, tokenizer, max_length: int, use_cache: bool = True) -> Encoded:
    """Tokenize ``split`` (truncating pairs to ``max_length``), reusing a disk cache keyed by content."""
    path = cache_dir() / f"{_fingerprint(split, tokenizer, max_length)}.npz"
    cached = _read_cache(path) if use_cache else None
    if cached is not None:
        return cached
    out = tokenizer(*split.texts, truncation=True, max_length=max_length)
    ids = out["input_ids"]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    type_ids = None
    if "token_type_ids" in out:
        type_ids = np.fromiter(itertools.chain.from_iterable(out["token_type_ids"]), dtype=np.int8,
                               count=int(offsets[-1]))
    encoded = Encoded(flat, type_ids, offsets, np.asarray(split.labels, dtype=np.float32))
    if use_cache:
        _write_cache(path, encoded)
    return encoded


def subsample(encoded: Encoded, n: int | None, seed: int = 0) -> Encoded:
    """A fixed random subset of ``n`` examples (same for every method and seed: a fair comparison)."""
    if n is None or n >= len(encoded):
        return encoded
    indices = np.sort(np.random.default_rng(seed).permutation(len(encoded))[:n])
    return encoded.subset(indices)


def holdout_split(encoded: Encoded, fraction: float, seed: int, stratify: bool,
                  key: str = "tune.holdout") -> tuple[Encoded, Encoded]:
    """``encoded`` split into (train part, held-out part) with ``fraction`` of the examples held out (a number of
    them if >= 1), seeded, stratified by label for classification (each class keeps its share in both parts);
    ``key``: the config key named by an error."""
    from sklearn.model_selection import train_test_split

    from .errors import DataError

    indices = np.arange(len(encoded))
    try:
        train, held_out = train_test_split(indices, test_size=fraction if fraction < 1 else int(fraction),
                                           random_state=seed, shuffle=True,
                                           stratify=encoded.labels if stratify else None)
    except ValueError as exc:  # too few examples, or a class too rare to be in both parts
        raise DataError(f"{key}: cannot hold out {fraction:g} of {len(encoded)} training examples"
                        f"{' stratified by label' if stratify else ''}: {exc}") from None
    return encoded.subset(np.sort(train)), encoded.subset(np.sort(held_out))


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, encoded: Encoded):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> int:
        return i  # the collator gathers rows itself: one vectorised copy per batch instead of per example


class Collator:
    """Pads a batch of example indices to the longest example in the batch (dynamic padding), or to at
    least ``pad_to`` tokens (``train.pad_to_max_length``: fixed shapes, the costly baseline of the benchmarks)."""

    def __init__(self, encoded: Encoded, pad_id: int, regression: bool, pad_to: int | None = None):
        self.encoded, self.pad_id, self.regression, self.pad_to = encoded, pad_id, regression, pad_to

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        e = self.encoded
        idx = np.asarray(indices)
        starts, lengths = e.offsets[idx], e.lengths[idx]
        width = max(self.pad_to or 0, int(lengths.max()))
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        gather = np.where(mask, starts[:, None] + positions[None, :], 0)
        batch = {
            "input_ids": torch.from_numpy(np.where(mask, e.ids[gather], self.pad_id).astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }
        if e.type_ids is not None:
            batch["token_type_ids"] = torch.from_numpy(np.where(mask, e.type_ids[gather], 0).astype(np.int64))
        labels = e.labels[idx]
        batch["labels"] = torch.from_numpy(labels.astype(np.float32) if self.regression else labels.astype(np.int64))
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar-length examples (HF's ``group_by_length``): random mega-batches of
    ``50 × batch_size`` examples are sorted by length and cut into batches, then the batches are shuffled.
    With ``group_by_length=False`` it is a plain shuffled (or sequential) batch sampler."""

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, group_by_length: bool, seed: int,
                 mega: int = 50):
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.group_by_length, self.seed, self.mega, self.epoch = group_by_length, seed, mega, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            if self.shuffle:
                size = self.mega * self.batch_size
                chunks = [order[i:i + size] for i in range(0, n, size)]
                order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
            else:  # evaluation: sort globally, padding is wasted compute and the order does not matter
                order = np.argsort(-self.lengths, kind="stable")
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        batches = self.batches()
        self.epoch += 1
        return (b.tolist() for b in batches)

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


def make_loader(encoded: Encoded, batch_size: int, shuffle: bool, group_by_length: bool, seed: int,
                pad_id: int, regression: bool, pad_to: int | None = None) -> torch.utils.data.DataLoader:
    sampler = LengthGroupedBatchSampler(encoded.lengths, batch_size, shuffle, group_by_length, seed)
    return torch.utils.data.DataLoader(EncodedDataset(encoded), batch_sampler=sampler,
                                       collate_fn=Collator(encoded, pad_id, regression, pad_to))


def load_task_data(task: Task, split: str, data_dir: str | None, tokenizer, max_length: int,
                   max_samples: int | None) -> Encoded:
    return subsample(encode(task.load(split, data_dir), tokenizer, max_length), max_samples)


def task_loaders(spec: RunSpec, task: Task, tokenizer):
    """The shuffled train loader, one dev loader per dev split (a tuning run: one loader of the held-out
    part of the training set instead, and the dev splits are never read), and the selection split's loader
    (:func:`selection_split`)."""
    cfg = spec.train
    train_data = load_task_data(task, "train", spec.data_dir, tokenizer, cfg.max_length, cfg.max_train_samples)
    if spec.tuning:
        train_data, held_out = holdout_split(train_data, spec.tuning["holdout"], spec.tuning["split_seed"],
                                             stratify=not task.is_regression)
        dev_data = {"holdout": held_out}
    else:
        dev_data = {split: load_task_data(task, split, spec.data_dir, tokenizer, cfg.max_length,
                                          cfg.max_eval_samples) for split in task.dev_splits}
    train_data, select_data = selection_split(spec, train_data, stratify=not task.is_regression)
    pad_id = tokenizer.pad_token_id or 0
    train_loader = make_loader(train_data, cfg.batch_size, True, cfg.group_by_length, spec.seed, pad_id,
                               task.is_regression, pad_to=cfg.max_length if cfg.pad_to_max_length else None)

    def loaders(splits):
        return {split: make_loader(data, cfg.eval_batch_size, False, True, 0, pad_id, task.is_regression)
                for split, data in splits.items()}

    return train_loader, loaders(dev_data), loaders(select_data)


#: seed of the selection split (``train.select: validation``): one split for every method and seed
VALIDATION_SEED = 0


def selection_split(spec: RunSpec, train_data: Encoded, stratify: bool) -> tuple[Encoded, dict[str, Encoded]]:
    """The training data less the selection split of ``train.select: validation`` (``train.validation_size`` of
    it, seeded alike for every method and seed, stratified by label for classification), and ``{"validation":
    that split}`` (``{}`` for the other rules). A tuning run's comes out of its own training part."""
    cfg = spec.train
    if cfg.select != "validation":
        return train_data, {}
    train_data, held_out = holdout_split(train_data, cfg.validation_size, VALIDATION_SEED, stratify,
                                         "train.validation_size")
    return train_data, {"validation": held_out}
