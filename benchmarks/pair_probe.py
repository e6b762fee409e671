"""What the frozen MiniLM already knows about a sentence-pair task: linear probes on its features.

Not a speed benchmark: it explains why RTE and MRPC stay at chance in the CPU quickstart. Logistic
regression (scikit-learn) is fitted on frozen all-MiniLM-L6-v2 features of the training pairs and scored on
the dev pairs, for two ways of encoding a pair:

* **cross** (what peftbench fine-tunes, as the papers do): both sentences in one input,
  ``[CLS] a [SEP] b [SEP]``; features = the [CLS] vector, or the mean over tokens;
* **bi** (how all-MiniLM-L6-v2 was trained, as a sentence-embedding model): each sentence encoded alone and
  mean-pooled to ``u``, ``v``; features = ``[u, v, |u − v|, u ⊙ v]`` (normalised), or their cosine alone.

A probe near the majority rate means the feature carries no linearly readable signal for the task: a
fine-tuning run has to build it, which takes the papers' many epochs.

    python -m benchmarks.pair_probe --task rte                  # full RTE train (2,490 pairs), ~3 min on 2 cores
    python -m benchmarks.pair_probe --task mrpc --max-train 1500
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from benchmarks.common import glue_dir, machine
from peftbench.host import Host
from peftbench.modeling import resolve_name


@torch.no_grad()
def encode(model, tokenizer, first: list[str], second: list[str] | None, batch_size: int = 64,
           max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] vectors and token means (padding excluded) of the last layer."""
    cls, mean = [], []
    for i in range(0, len(first), batch_size):
        batch = tokenizer(first[i:i + batch_size], second[i:i + batch_size] if second else None,
                          truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        cls.append(hidden[:, 0])
        mean.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(cls).numpy(), torch.cat(mean).numpy()


def features(model, tokenizer, split) -> dict[str, np.ndarray]:
    first, second = split.texts
    cross_cls, cross_mean = encode(model, tokenizer, first, second)
    u = encode(model, tokenizer, first, None)[1]
    v = encode(model, tokenizer, second, None)[1]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return {"cross [CLS]": cross_cls, "cross mean": cross_mean,
            "bi [u, v, |u-v|, u*v]": np.hstack([u, v, np.abs(u - v), u * v]),
            "bi cosine": (u * v).sum(1, keepdims=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rte", help="a sentence-pair GLUE task with local data (rte, mrpc)")
    parser.add_argument("--max-train", type=int, default=None, help="first N training pairs (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    data_dir = glue_dir()
    if data_dir is None:
        raise SystemExit("no local GLUE data: set PEFTBENCH_GLUE_DIR or put shared/glue beside the repository")
    task = Host().task(args.task)
    if len(task.text_fields) != 2:
        raise SystemExit(f"{args.task} is a single-sentence task; the probe compares ways of encoding a pair")
    train, dev = task.load("train", str(data_dir)), task.load("dev", str(data_dir))
    if args.max_train:
        train.texts = [column[:args.max_train] for column in train.texts]
        train.labels = train.labels[:args.max_train]
    name = resolve_name("minilm")
    tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    start = time.perf_counter()
    train_x, dev_x = features(model, tokenizer, train), features(model, tokenizer, dev)
    y_train, y_dev = np.asarray(train.labels, dtype=int), np.asarray(dev.labels, dtype=int)
    majority = max(y_dev.mean(), 1 - y_dev.mean())
    print(f"{machine()}\n{args.task}: {len(y_train)} train, {len(y_dev)} dev pairs; features in "
          f"{time.perf_counter() - start:.0f}s; dev majority class {majority:.3f}")
    for feature in train_x:
        scores = [LogisticRegression(C=c, max_iter=3000).fit(train_x[feature], y_train).score(dev_x[feature], y_dev)
                  for c in (0.1, 1.0, 10.0)]
        print(f"  {feature:<24} dev accuracy (C = 0.1 / 1 / 10): " + " / ".join(f"{s:.3f}" for s in scores))


if __name__ == "__main__":
    main()
