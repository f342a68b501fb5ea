"""Both model families: shapes, token counts, parameter counts, the registry, attention."""

from __future__ import annotations

import pytest
import torch

from fervit.config import ModelConfig, load_preset
from fervit.errors import FervitError
from fervit.models import build_model, count_parameters, create_model, model_names
from fervit.models.layers import Attention


def test_registry_knows_both_families():
    assert {"vit_cnn", "vit_patch"} <= set(model_names())


@pytest.mark.parametrize("preset", ["vit_cnn", "vit_patch", "original"])
def test_presets_build_models_that_map_faces_to_seven_logits(preset):
    model = build_model(load_preset(preset).model).eval()
    assert model(torch.randn(3, 1, 48, 48)).shape == (3, 7)


def test_hybrid_has_the_original_144_tokens_and_layers():
    model = create_model("vit_cnn")
    assert model.num_tokens == 144  # 64 x 12 x 12 after two conv+pool stages
    convs = [m for m in model.stem if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (3, 3)), (32, 64, (3, 3))]
    assert model.stem(torch.randn(2, 1, 48, 48)).shape == (2, 64, 12, 12)
    assert (model.proj.in_features, model.proj.out_features) == (64, 192)
    assert model.encoder.pos_embed.shape == (1, 145, 192)  # [CLS] + 144
    assert len(model.encoder.blocks) == 6 and model.encoder.blocks[0].attn.num_heads == 6
    assert model.encoder.blocks[0].mlp.fc1.out_features == 768
    head = [m for m in model.encoder.head if isinstance(m, torch.nn.Linear)]
    assert [(h.in_features, h.out_features) for h in head] == [(192, 192), (192, 7)]


def test_parameter_counts_are_stable():
    # a change here changes every published number: update RESULTS.md with it
    assert count_parameters(create_model("vit_cnn")) == 2_767_399
    assert count_parameters(create_model("vit_patch", patch_size=4)) == 2_739_271
    assert count_parameters(create_model("vit_patch", patch_size=8)) == 2_727_751


@pytest.mark.parametrize("patch,tokens", [(4, 144), (8, 36)])
def test_patch_vit_token_count_follows_the_patch_size(patch, tokens):
    assert create_model("vit_patch", patch_size=patch).num_tokens == tokens


def test_deeper_stems_and_vits_are_config_knobs():
    model = create_model("vit_cnn", stem_channels=(64, 128, 256), stem_convs=2, depth=8, embed_dim=256,
                         num_heads=8).eval()
    assert model.num_tokens == 36 and len(model.encoder.blocks) == 8
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 7)


def test_attention_matches_the_explicit_softmax_formula():
    torch.manual_seed(0)
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)  # 1/sqrt(head_dim=4)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_bad_model_configs_are_one_line_errors():
    with pytest.raises(FervitError, match="unknown model 'resnet'"):
        build_model(ModelConfig(name="resnet"))
    with pytest.raises(FervitError, match="not divisible by num_heads"):
        create_model("vit_cnn", embed_dim=100, num_heads=6)
    with pytest.raises(FervitError, match="not divisible by patch_size"):
        create_model("vit_patch", patch_size=5)
    with pytest.raises(FervitError, match="model.pool must be cls or mean"):
        create_model("vit_cnn", pool="max")


def test_mean_pooling_reads_every_token_and_cls_pooling_reads_only_cls():
    """pool=mean: the head sees the average of the patch tokens, so the [CLS] slot no longer matters to it."""
    torch.manual_seed(0)
    cls_model = create_model("vit_patch", depth=1, dropout=0.0).eval()
    mean_model = create_model("vit_patch", depth=1, dropout=0.0, pool="mean").eval()
    mean_model.load_state_dict(cls_model.state_dict())  # same parameters: only the readout differs
    x = torch.randn(2, 1, 48, 48)
    enc = mean_model.encoder
    with torch.no_grad():
        tokens = mean_model.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([enc.cls_token.expand(2, -1, -1), tokens], 1) + enc.pos_embed
        for block in enc.blocks:
            h = block(h)
        expected = enc.head(enc.norm(h[:, 1:]).mean(1))
        torch.testing.assert_close(mean_model(x), expected)
        assert not torch.allclose(mean_model(x), cls_model(x))
