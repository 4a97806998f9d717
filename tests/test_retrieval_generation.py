"""Retrieval-augmented generation (model.retrieval): leave-group-out neighbours in training, the index saved with
the model and loaded for generation, similar cases in the output, batching that changes nothing."""

import json

import pytest
import torch

from medvlm.errors import ConfigError
from medvlm.generation import generate_ids
from medvlm.inference import Predictor
from medvlm.model.retrieval import RetrievalIndex
from medvlm.train import train
from tiny_medvlm import TRUNK_SHAPE, tiny_config, write_cached_split

RAG = {"retrieval": {"enabled": True, "k": 2, "report_words": 5}}


def test_search_never_returns_the_query_group():
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.7, 0.7]])
    index = RetrievalIndex(emb, ["a", "b", "c", "d"], ["g1", "g1", "g2", "g3"], ["r a", "r b", "r c", "r d"])
    free = index.search(emb[:1], k=2)[0]
    assert [n.study_id for n in free] == ["a", "b"] and free[0].similarity == pytest.approx(1.0)
    out = index.search(emb[:1], k=2, exclude_groups=["g1"])[0]
    assert [n.study_id for n in out] == ["d", "c"]  # a and b share the query's group
    text = index.context(out, report_words=1)
    assert text.startswith("Similar cases: (1, 0.71) r ...") and "(2, 0.00) r ..." in text


def test_training_neighbours_leave_the_group_out_and_the_index_travels_with_the_model(tmp_path):
    cfg = tiny_config(tmp_path, model=RAG)
    write_cached_split(cfg)
    # two studies share a group (as two slices of one paper would): neither may be the other's similar case
    path = tmp_path / "split" / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["group"] = rows[0]["group"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"group_by": "source"})})
    captured = {}
    import medvlm.train as train_module
    from medvlm.model.retrieval import embed

    original = train_module.attach_retrieval

    def spy(model, data, c):
        original(model, data, c)
        captured["groups"], captured["contexts"] = data.groups, data.contexts
        captured["hits"] = model.retrieval_index.search(
            embed(model.retrieval_tail, data.features), c.model.retrieval.k, data.groups)

    train_module.attach_retrieval = spy
    try:
        train(cfg, "freeze")
    finally:
        train_module.attach_retrieval = original
    groups = captured["groups"]
    assert groups[0] == groups[1]
    for i, hits in enumerate(captured["hits"]):
        assert len(hits) == 2 and all(groups[h.index] != groups[i] for h in hits)
    assert all(c.startswith("Similar cases: ") for c in captured["contexts"])
    model_dir = tmp_path / "models" / "freeze"
    assert (model_dir / "retrieval_index.json").is_file() and (model_dir / "retrieval_index.safetensors").is_file()

    loaded = Predictor.load(model_dir)
    assert loaded.model.retrieval_index.study_ids == [r["study_id"] for r in rows]
    feats = torch.randn(3, *TRUNK_SHAPE).abs()
    out = loaded.predict_features(feats)
    assert all(len(r["similar_cases"]) == 2 for r in out)
    assert {c["study_id"] for r in out for c in r["similar_cases"]} <= set(loaded.model.retrieval_index.study_ids)
    # each row decodes as it would alone, although the neighbour texts give prompts of different lengths
    together, _ = generate_ids(loaded.model, feats, loaded.cfg.generate)
    alone = [generate_ids(loaded.model, feats[i : i + 1], loaded.cfg.generate)[0][0] for i in range(3)]
    assert together == alone


def test_the_neighbours_change_what_the_model_is_given(tmp_path):
    cfg = tiny_config(tmp_path, model=RAG)
    write_cached_split(cfg)
    train(cfg, "freeze")
    model = Predictor.load(tmp_path / "models" / "freeze").model
    feats = torch.randn(2, *TRUNK_SHAPE).abs()
    contexts, _ = model.retrieval_contexts(feats)
    _, logits = model.visual_queries(feats)
    with_cases = model.post_ids([0, 0], logits, contexts=contexts)
    without = model.post_ids([0, 0], logits)
    assert all(len(a) > len(b) for a, b in zip(with_cases, without))


def test_retrieval_refuses_concatenated_views(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="multi_view"):
        tiny_config(tmp_path, model=RAG, features={"multi_view": "concat"})
