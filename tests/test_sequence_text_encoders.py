"""The sequence Transformer and the text encoder: shapes, padding invariance, local weights."""

from __future__ import annotations

import pytest
import torch

import mmbalance.models  # noqa: F401  (registers the encoders)
from mmbalance.data.benchmarks.tokenizer import MAX_VOCAB, Tokenizer
from mmbalance.errors import ConfigError
from mmbalance.models import build_encoder, build_model
from mmbalance.models.text import VOCAB_SIZE, TextEncoder
from mmbalance.config import build_config


def test_transformer_shapes_and_padding_invariance():
    torch.manual_seed(0)
    encoder = build_encoder("transformer", (7, 5), feature_dim=8, hidden_dim=16, dropout=0.0).eval()
    x = torch.randn(3, 7, 5)
    out = encoder(x)
    assert out.shape == (3, 8)
    padded_right = torch.cat([x, torch.zeros(3, 4, 5)], dim=1)
    padded_left = torch.cat([torch.zeros(3, 4, 5), x], dim=1)
    with torch.no_grad():
        assert torch.allclose(encoder(padded_right), out, atol=1e-5)
        assert torch.allclose(encoder(padded_left), out, atol=1e-5)
        assert torch.isfinite(encoder(torch.zeros(2, 7, 5))).all()  # all padding stays defined
    with pytest.raises(ConfigError, match=r"^transformer needs feature sequences \(T, D\), got shape \(3, 4, 4\)$"):
        build_encoder("transformer", (3, 4, 4), 8, 16, 0.0)


@pytest.mark.parametrize("layers", [2, 0])
def test_text_encoder_shapes_and_padding(layers):
    torch.manual_seed(0)
    encoder = TextEncoder((6,), feature_dim=8, hidden_dim=16, layers=layers).eval()
    ids = torch.tensor([[5, 9, 2, 0, 0, 0], [3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        out = encoder(ids)
        assert out.shape == (2, 8)
        longer = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
        assert torch.allclose(encoder(longer), out, atol=1e-5)
        unknown = encoder(torch.tensor([[VOCAB_SIZE + 5, 0, 0, 0, 0, 0]]))
        assert torch.allclose(unknown, encoder(torch.tensor([[1, 0, 0, 0, 0, 0]])))


def test_text_encoder_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    source = TextEncoder((6,), feature_dim=8, hidden_dim=16)
    path = tmp_path / "text.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = TextEncoder((6,), feature_dim=8, hidden_dim=16, weights=str(path))
    assert torch.equal(loaded.embed.weight, source.embed.weight)
    with pytest.raises(ConfigError, match=r"^text encoder weights not found: .*missing.pt$"):
        TextEncoder((6,), weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"^text encoder weights in .*text.pt do not fit: "):
        TextEncoder((6,), feature_dim=8, hidden_dim=32, weights=path)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"^cannot load text encoder weights from .*bad.pt: "):
        TextEncoder((6,), weights=tmp_path / "bad.pt")


def test_dataset_defaults_choose_the_encoders():
    config = build_config(dataset="mosi")
    model = build_model(config.model, ["audio", "vision", "text"], {"audio": (5, 4), "vision": (5, 3), "text": (5, 2)}, 2)
    assert {type(e).__name__ for e in model.encoders.values()} == {"SequenceTransformerEncoder"}


def test_tokenizer_vocabulary_from_train_only():
    tokenizer = Tokenizer.build(["Good food, good FOOD!", "bad food"], max_length=5, min_count=2)
    assert tokenizer.vocabulary == ["<pad>", "<unk>", "food", "good"]
    assert tokenizer.encode("Good pizza").tolist() == [3, 1, 0, 0, 0]
    assert tokenizer.encode("food " * 9).tolist() == [2] * 5
    assert MAX_VOCAB == VOCAB_SIZE
