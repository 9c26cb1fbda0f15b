"""llm_core.evaluation.evaluate on a tiny trained model: per-document scores that add up to the split's, computed
token by token the plain way; the evaluation.max_val_tokens sample (whole documents, fixed, nested).
Tasks: test_tasks.py. Generation: test_generate.py."""

import math

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from llm_core.evaluation import evaluate as ev
from llm_core.layout import DATASET_DIR


def test_metrics_are_the_sums_of_the_per_document_scores(trained):
    cfg, _, model = trained
    r = ev.evaluate(cfg, model, cfg.data_path / "tokenizer")
    docs = r.per_document
    nats, tokens, num_bytes = (pc.sum(docs.column(c)).as_py() for c in ("nats", "tokens", "bytes"))
    assert r.num_val_documents == len(docs) and r.num_val_tokens == tokens
    assert r.val_loss == pytest.approx(nats / tokens, rel=1e-9)
    assert r.val_bpb == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-9)
    assert r.perplexity == pytest.approx(math.exp(r.val_loss))
    assert r.val_tokens_per_second > 0
    assert [s["prompt"] for s in r.samples] == ["ROMEO:", ""]  # an empty prompt starts from <|endoftext|>


def test_each_document_gets_the_loss_of_its_own_tokens(trained):
    """The batched scores against one plain forward per window, token by token, for every document."""
    cfg, _, model = trained
    dataset_dir = cfg.data_path / DATASET_DIR
    table, _ = ev.document_scores(model, dataset_dir, 10**9)
    docs, stream = ev.validation_documents(dataset_dir, 10**9)
    block = model.args.block_size
    per_token = np.zeros(len(stream))
    with torch.no_grad():
        for s in range(0, len(stream) - 1, block):
            window = torch.from_numpy(stream[s:s + block + 1])
            logits, _ = model(window[None, :-1])
            per_token[s + 1:s + len(window)] = F.cross_entropy(logits[0], window[1:], reduction="none").numpy()
    ends = np.cumsum(docs.column("length").to_numpy())
    expected = [per_token[a:b].sum() for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    assert table.column("nats").to_numpy() == pytest.approx(expected, rel=1e-4)
    assert table.column("id").to_pylist() == docs.column("id").to_pylist()
    assert pc.sum(table.column("tokens")).as_py() == len(stream) - 1  # every token but the first, once


def test_max_val_tokens_takes_a_fixed_nested_sample_of_whole_documents(trained):
    cfg = trained[0]
    dataset_dir = cfg.data_path / DATASET_DIR
    everything, stream = ev.validation_documents(dataset_dir, 10**9)
    lengths = dict(zip(everything.column("id").to_pylist(), everything.column("length").to_pylist()))
    assert len(stream) == sum(lengths.values())
    half, quarter = (ev.validation_documents(dataset_dir, len(stream) // k)[0] for k in (2, 4))
    for sample, k in ((half, 2), (quarter, 4)):
        ids = sample.column("id").to_pylist()
        assert 0 < sum(lengths[i] for i in ids) <= len(stream) // k < len(stream)  # whole documents, within budget
        assert sample.column("length").to_pylist() == [lengths[i] for i in ids]
    assert set(quarter.column("id").to_pylist()) <= set(half.column("id").to_pylist())  # a larger budget adds
    assert ev.validation_documents(dataset_dir, len(stream) // 2)[0].equals(half)  # the same for every model
