"""The data pipeline: tokenization cache, vectorised subsets, dynamic padding and length-grouped batches."""

import numpy as np
import pytest
import torch

from peftbench.config import parse_config
from peftbench.data import Collator, Encoded, LengthGroupedBatchSampler, encode, make_loader, subsample
from peftbench.task import Split


def _encoded(lengths, with_types=True, seed=0) -> Encoded:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(5, 1000, offsets[-1]).astype(np.int32)
    types = rng.integers(0, 2, offsets[-1]).astype(np.int8) if with_types else None
    return Encoded(ids, types, offsets, rng.integers(0, 2, len(lengths)).astype(np.float32))


def _row(e: Encoded, i: int) -> np.ndarray:
    return e.ids[e.offsets[i]:e.offsets[i + 1]]


class CountingTokenizer:
    """A stand-in tokenizer (word ids by hashing) that counts its calls."""

    name_or_path = "counting"

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 1000

    def __call__(self, *columns, truncation, max_length):
        self.calls += 1
        ids = []
        for row in zip(*columns):
            tokens = [101] + [hash(w) % 900 + 100 for text in row for w in text.split()] + [102]
            ids.append(tokens[:max_length])
        return {"input_ids": ids, "token_type_ids": [[0] * len(x) for x in ids]}


def test_collator_pads_each_batch_to_its_longest_example():
    e = _encoded([3, 7, 5])
    batch = Collator(e, pad_id=0, regression=False)([0, 2])
    assert batch["input_ids"].shape == (2, 5)  # the longest of this batch, not of the dataset
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    np.testing.assert_array_equal(batch["input_ids"][0, :3].numpy(), _row(e, 0))
    np.testing.assert_array_equal(batch["input_ids"][1].numpy(), _row(e, 2))
    assert batch["input_ids"][0, 3:].tolist() == [0, 0]
    assert batch["token_type_ids"][0, 3:].tolist() == [0, 0]
    assert batch["labels"].dtype == torch.int64
    assert Collator(e, pad_id=0, regression=True)([0])["labels"].dtype == torch.float32


def test_collator_pad_to_gives_fixed_width_and_never_truncates():
    e = _encoded([3, 7, 5])
    assert Collator(e, pad_id=9, regression=False, pad_to=8)([0, 2])["input_ids"].shape == (2, 8)
    wide = Collator(e, pad_id=9, regression=False, pad_to=4)([0, 1])  # an example longer than pad_to
    np.testing.assert_array_equal(wide["input_ids"][1].numpy(), _row(e, 1))
    assert wide["input_ids"][0, 3:].tolist() == [9] * 4


def test_subset_matches_a_per_example_copy():
    rng = np.random.default_rng(1)
    e = _encoded(rng.integers(1, 40, 500))
    indices = np.sort(rng.permutation(500)[:123])
    sub = e.subset(indices)
    assert len(sub) == 123
    for j, i in enumerate(indices):
        np.testing.assert_array_equal(_row(sub, j), _row(e, i))
        np.testing.assert_array_equal(sub.type_ids[sub.offsets[j]:sub.offsets[j + 1]],
                                      e.type_ids[e.offsets[i]:e.offsets[i + 1]])
    np.testing.assert_array_equal(sub.labels, e.labels[indices])
    empty = e.subset(np.zeros(0, dtype=np.int64))
    assert len(empty) == 0 and empty.ids.size == 0 and empty.offsets.tolist() == [0]


def test_subsample_is_fixed_and_keeps_everything_when_large_enough():
    e = _encoded(np.arange(1, 101))
    a, b = subsample(e, 30, seed=0), subsample(e, 30, seed=0)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert len(a) == 30 and not np.array_equal(a.ids, subsample(e, 30, seed=1).ids)
    assert subsample(e, 100) is e and subsample(e, None) is e


def test_sampler_visits_every_example_once_per_epoch_reproducibly():
    lengths = np.random.default_rng(2).integers(1, 100, 1000)
    sampler = LengthGroupedBatchSampler(lengths, 32, shuffle=True, group_by_length=True, seed=0, mega=4)
    first = list(sampler)
    assert len(first) == len(sampler) == 32
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert sorted(len(b) for b in first) == [1000 % 32] + [32] * 31  # the short batch is shuffled in
    second = list(sampler)  # the next epoch: another order
    assert first != second
    again = LengthGroupedBatchSampler(lengths, 32, shuffle=True, group_by_length=True, seed=0, mega=4)
    assert list(again) == first  # same seed and epoch: same batches
    again.set_epoch(1)
    assert list(again) == second  # resuming at an epoch reproduces it


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(3).lognormal(3.5, 0.7, 4000).astype(int).clip(4, 320)

    def padded_tokens(group):
        sampler = LengthGroupedBatchSampler(lengths, 32, shuffle=True, group_by_length=group, seed=0)
        return sum(len(b) * lengths[b].max() for b in sampler)

    real = lengths.sum()
    assert padded_tokens(False) > 1.8 * real  # random batches: about half of every batch is padding here
    assert padded_tokens(True) < 1.15 * real  # sorted mega-batches: little (the long tail's last batches)
    # evaluation: one global sort, longest first
    order = [i for b in LengthGroupedBatchSampler(lengths, 64, False, True, 0) for i in b]
    assert (np.diff(lengths[order]) <= 0).all()


def test_make_loader_pad_to_max_length():
    e = _encoded([3, 9, 5, 2])
    widths = {b["input_ids"].shape[1] for b in make_loader(e, 2, True, True, 0, 0, False, pad_to=16)}
    assert widths == {16}
    dynamic = [b["input_ids"].shape[1] for b in make_loader(e, 2, False, True, 0, 0, False)]
    assert sorted(dynamic) == [3, 9]


def test_pad_to_max_length_is_a_train_setting():
    config = parse_config({"tasks": ["toy"], "methods": ["lora"], "train": {"pad_to_max_length": True}})
    assert config.train.pad_to_max_length is True
    assert parse_config({"tasks": ["toy"], "methods": ["lora"]}).train.pad_to_max_length is False


def test_encode_caches_by_content_and_max_length(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    split = Split([["a b c", "d e", "f g h i j"], ["x", "y z", "w"]], [0, 1, 0], "in-memory")
    tok = CountingTokenizer()
    first = encode(split, tok, max_length=7)
    assert tok.calls == 1 and first.lengths.tolist() == [6, 6, 7]
    cached = encode(split, tok, max_length=7)
    assert tok.calls == 1  # read back from the cache
    np.testing.assert_array_equal(cached.ids, first.ids)
    np.testing.assert_array_equal(cached.type_ids, first.type_ids)
    assert encode(split, tok, max_length=9).lengths.tolist() == [6, 6, 8]
    assert tok.calls == 2  # another max_length is another cache entry
    changed = Split([["a b c", "d e", "f g"], ["x", "y z", "w"]], [0, 1, 0], "in-memory")
    encode(changed, tok, max_length=7)
    assert tok.calls == 3  # in-memory data is keyed by its content


@pytest.mark.parametrize("use_cache", [True, False])
def test_encode_flattens_ids_in_order(tmp_path, monkeypatch, use_cache):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    split = Split([["a b", "c"]], [1, 0], "in-memory")
    e = encode(split, CountingTokenizer(), max_length=10, use_cache=use_cache)
    assert e.ids.dtype == np.int32 and e.offsets.tolist() == [0, 4, 7]
    assert e.ids[[0, 3, 4, 6]].tolist() == [101, 102, 101, 102]
