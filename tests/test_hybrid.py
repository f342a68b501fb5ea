"""The residual hybrid (`vit_resnet`), training on random crops and ten-crop test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fervit.config import AugmentConfig, ModelConfig, load_preset
from fervit.data.augment import augment_batch
from fervit.data.tta import tta_views
from fervit.errors import FervitError
from fervit.evaluation.evaluate import predict_logits
from fervit.models import build_model, count_parameters, create_model
from fervit.models.checkpoint import describe
from fervit.models.layers import Attention, Block, center_crop

TINY = dict(stem_channels=(8, 16, 32), stem_blocks=1, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
            head_hidden=32, dropout=0.0)
NO_AUG = AugmentConfig(hflip=0.0, rotation=0.0, translate=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0,
                       contrast=0.0, erase_p=0.0)


def tiny_hybrid(**kw) -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_resnet", **{**TINY, **kw}).eval()


def test_three_stages_give_a_12x12_token_grid_and_four_a_6x6_one():
    assert tiny_hybrid().num_tokens == 144
    assert tiny_hybrid(stem_channels=(8, 16, 32, 64)).num_tokens == 36
    assert tiny_hybrid(crop_size=40).num_tokens == 100
    assert tiny_hybrid()(torch.randn(2, 1, 48, 48)).shape == (2, 7)


def test_the_presets_are_5_to_15_million_parameters_and_the_stem_preset_is_the_same_stem_alone():
    hybrid, stem = (build_model(load_preset(p).model) for p in ("hybrid", "hybrid_cnn"))
    assert 5e6 <= count_parameters(hybrid) <= 15e6
    assert load_preset("hybrid_cnn").model.depth == 0 and load_preset("hybrid_cnn").model.pool == "mean"
    stem_names = {k for k in stem.state_dict() if k.startswith("stem.")}
    assert stem_names and stem_names <= set(hybrid.state_dict())


def test_depth_0_with_mean_pooling_is_a_plain_cnn():
    model = tiny_hybrid(depth=0, pool="mean")
    assert not any(isinstance(m, (Attention, Block)) for m in model.modules())  # the encoder's own layers
    assert model(torch.randn(3, 1, 48, 48)).shape == (3, 7)


def test_each_residual_block_starts_as_its_shortcut():
    model = tiny_hybrid()
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert blocks and all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)


def test_a_cropping_model_takes_the_centre_of_a_whole_face():
    model = tiny_hybrid(crop_size=40)
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[..., 4:44, 4:44]))


def test_the_encoders_tokens_and_positions_take_no_weight_decay():
    from fervit.models.registry import no_weight_decay_names

    assert no_weight_decay_names(tiny_hybrid()) == {"encoder.cls_token", "encoder.pos_embed"}


@pytest.mark.parametrize("crop", [0, 49, -1])
def test_a_crop_size_outside_the_face_is_refused(crop):
    if crop == 0:
        assert tiny_hybrid(crop_size=0).num_tokens == 144  # 0 means no crop
        return
    with pytest.raises(FervitError, match="crop_size"):
        create_model("vit_resnet", **TINY, crop_size=crop)


def test_random_crops_are_exact_windows_of_the_face_at_varied_places():
    faces = torch.randint(0, 256, (64, 48, 48), dtype=torch.uint8)
    out = augment_batch(faces, NO_AUG, torch.Generator().manual_seed(0), crop_size=40)
    assert out.shape == (64, 1, 40, 40)
    full = (faces.float() / 255 - 0.5) / 0.5
    starts = set()
    for i in range(64):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.allclose(out[i, 0], full[i, dy:dy + 40, dx:dx + 40], atol=1e-5)]
        assert len(hits) == 1, f"sample {i} is not a whole-pixel 40x40 window of its face"
        starts.add(hits[0])
    assert len(starts) > 20  # positions are drawn per sample, over the whole 9x9 range of offsets


def test_crops_keep_the_rest_of_the_augmentation_and_erase_inside_the_crop():
    cfg = AugmentConfig(erase_p=1.0)
    out = augment_batch(torch.full((16, 48, 48), 200, dtype=torch.uint8), cfg, torch.Generator().manual_seed(1),
                        crop_size=40)
    assert out.shape == (16, 1, 40, 40)
    assert (out == 0).flatten(1).any(1).all()  # every sample has its erased rectangle


def test_without_augmentation_a_crop_model_trains_on_the_whole_face():
    faces = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    out = augment_batch(faces, AugmentConfig(enabled=False), torch.Generator(), crop_size=40)
    assert out.shape == (4, 1, 48, 48)  # the model then takes its centre, as at evaluation


def test_ten_crop_views_are_the_four_corners_and_the_centre_and_their_mirrors():
    x = torch.randn(3, 1, 48, 48)
    seen = center_crop(tta_views(x, "ten_crop", 40), 40).view(10, 3, 1, 40, 40)
    windows = [x[..., 4:44, 4:44], x[..., :40, :40], x[..., :40, 8:], x[..., 8:, :40], x[..., 8:, 8:]]
    for i, w in enumerate(windows):
        assert torch.equal(seen[i], w) and torch.equal(seen[5 + i], w.flip(-1))


def test_ten_crop_evaluation_averages_the_log_probabilities_of_the_ten_views():
    model = tiny_hybrid(crop_size=40)
    images = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    got = predict_logits(model, images, torch.arange(5), batch_size=2, tta="ten_crop")
    x = (images.unsqueeze(1).float() / 255 - 0.5) / 0.5
    crops = [x[..., 4:44, 4:44], x[..., :40, :40], x[..., :40, 8:], x[..., 8:, :40], x[..., 8:, 8:]]
    with torch.no_grad():
        expected = torch.stack([F.log_softmax(model(c), -1) for c in crops + [c.flip(-1) for c in crops]]).mean(0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mirror_tta_is_unchanged_and_ten_crop_needs_a_cropping_model():
    model = tiny_hybrid()
    images = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    x = (images.unsqueeze(1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = (F.log_softmax(model(x), -1) + F.log_softmax(model(x.flip(-1)), -1)) / 2
    torch.testing.assert_close(predict_logits(model, images, torch.arange(4), tta=True), expected)
    with pytest.raises(ValueError, match="crop"):
        predict_logits(model, images, torch.arange(4), tta="ten_crop")


def test_predictor_ten_crop_gives_the_evaluations_probabilities():
    from fervit.inference.predictor import Predictor
    from fervit.inference.torch_classifier import TorchClassifier

    model = tiny_hybrid(crop_size=40)
    meta = describe(ModelConfig(name="vit_resnet", **TINY, crop_size=40))
    faces = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    predictor = Predictor(TorchClassifier(model, torch.device("cpu")), meta, tta="ten_crop")
    expected = F.softmax(predict_logits(model, torch.from_numpy(faces), torch.arange(3), tta="ten_crop"), -1)
    np.testing.assert_allclose(predictor.classify(faces), expected.numpy(), atol=1e-5)
    whole = describe(ModelConfig(name="vit_resnet", **TINY))
    with pytest.raises(FervitError, match="ten-crop"):
        Predictor(TorchClassifier(model, torch.device("cpu")), whole, tta="ten_crop")


def test_a_crop_model_trains_with_mixup_and_cutmix_and_its_run_is_evaluated_with_ten_crops(tiny_layout, tmp_path):
    import json

    from fervit.config import RunConfig, apply_overrides
    from fervit.training.trainer import train

    cfg = apply_overrides(RunConfig(), [
        "model.name=vit_resnet", "model.stem_channels=8,16,32", "model.stem_blocks=1", "model.embed_dim=32",
        "model.depth=1", "model.num_heads=2", "model.mlp_dim=64", "model.head_hidden=32", "model.crop_size=40",
        f"data.root={tiny_layout}", "data.protocol=fer2013", "train.epochs=2", "train.batch_size=16",
        "train.device=cpu", "train.tta=ten_crop", f"train.output={tmp_path}", "train.threads=1",
        "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "augment.mix_p=1.0"])  # mixing on 40px crops too
    run = train(cfg, quiet=True)
    results = json.loads((run / "results.json").read_text())
    assert results["tta"] == "ten_crop" and results["test"]["num_samples"] == 28
    # the one-view scores are kept beside the TTA ones: what `fervit evaluate --tta none` measures of the same model
    from fervit.evaluation.rerun import evaluate_checkpoint
    for split in ("val", "test"):
        evaluate_checkpoint(str(run), split=split, data_root=str(tiny_layout), device="cpu", output=str(tmp_path / split))
        one_view = json.loads((tmp_path / split / "results.json").read_text())[split]
        assert one_view["tta"] == "none" and results["single_view"][split] == pytest.approx(one_view["accuracy"])


@pytest.mark.parametrize("crop", [0, 48], ids=["no_crop", "crop_of_the_whole_face"])
def test_ten_crop_for_a_whole_face_model_is_refused_before_training(tiny_layout, tmp_path, crop):
    from fervit.config import RunConfig, apply_overrides
    from fervit.training.trainer import train

    out = tmp_path / "runs"
    cfg = apply_overrides(RunConfig(), [f"data.root={tiny_layout}", "train.tta=ten_crop", "train.device=cpu",
                                        f"model.crop_size={crop}", f"train.output={out}"])
    with pytest.raises(FervitError, match="model.crop_size"):
        train(cfg, quiet=True)
    assert not out.exists()  # no half-made run folder


@pytest.mark.slow
def test_a_cropping_model_exports_to_onnx_with_a_48px_input_and_ten_crop_works_there(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    from fervit.inference.onnx import export_onnx, load_onnx
    from fervit.inference.predictor import Predictor
    from fervit.inference.torch_classifier import TorchClassifier

    model = tiny_hybrid(crop_size=40)
    meta = describe(ModelConfig(name="vit_resnet", **TINY, crop_size=40))
    onnx_model, _ = load_onnx(export_onnx(model, meta, tmp_path / "m.onnx"))
    faces = np.random.default_rng(1).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    torch_probs = Predictor(TorchClassifier(model, torch.device("cpu")), meta, tta="ten_crop").classify(faces)
    np.testing.assert_allclose(Predictor(onnx_model, meta, tta="ten_crop").classify(faces), torch_probs, atol=1e-5)


@pytest.mark.slow
def test_log_test_adds_a_test_column_and_changes_no_choice(tiny_layout, tmp_path):
    import csv
    import json

    from fervit.config import RunConfig, apply_overrides
    from fervit.training.trainer import train

    def run(log_test: bool):
        cfg = apply_overrides(RunConfig(), [
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64", "model.head_hidden=32",
            "model.stem_channels=8,16", f"data.root={tiny_layout}", "data.protocol=fer2013", "train.epochs=3",
            "train.batch_size=16", "train.device=cpu", "train.threads=1", f"train.log_test={log_test}",
            f"train.output={tmp_path / str(log_test)}"])
        run_dir = train(cfg, quiet=True)
        rows = list(csv.DictReader(open(run_dir / "training_metrics.csv")))
        return rows, json.loads((run_dir / "results.json").read_text())

    (plain, plain_res), (logged, logged_res) = run(False), run(True)
    assert "test_acc" not in plain[0] and all(0 <= float(r["test_acc"]) <= 1 for r in logged)
    assert [r["val_acc"] for r in plain] == [r["val_acc"] for r in logged]
    assert plain_res["best_epoch"] == logged_res["best_epoch"]
    assert plain_res["test"]["accuracy"] == logged_res["test"]["accuracy"]


@pytest.mark.slow
def test_evaluate_with_tta_labels_each_split_and_the_runs_table_says_so(tiny_layout, tmp_path):
    import json

    from fervit.config import RunConfig, apply_overrides
    from fervit.evaluation.rerun import evaluate_checkpoint
    from fervit.runs import collect_runs, format_runs_table
    from fervit.training.trainer import train

    cfg = apply_overrides(RunConfig(), [
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.mlp_dim=64", "model.head_hidden=32",
        "model.stem_channels=8,16", f"data.root={tiny_layout}", "data.protocol=fer2013", "train.epochs=1",
        "train.batch_size=16", "train.device=cpu", "train.threads=1", f"train.output={tmp_path}"])
    run = train(cfg, quiet=True)
    assert "(mirror)" not in format_runs_table(collect_runs(tmp_path))
    evaluate_checkpoint(str(run), data_root=str(tiny_layout), device="cpu", tta="mirror")
    results = json.loads((run / "results.json").read_text())
    assert "tta" not in results and results["test"]["tta"] == "mirror" and results["val"]["tta"] == "none"
    assert "(mirror)" in format_runs_table(collect_runs(tmp_path))


def test_ten_crop_in_an_ensemble_names_the_member_that_takes_whole_faces(tiny_layout, tmp_path):
    from helpers import save_tiny_checkpoint

    from fervit.evaluation.rerun import evaluate_checkpoint

    cropping = save_tiny_checkpoint(tmp_path / "crop", "vit_cnn", 0, crop_size=40)
    whole = save_tiny_checkpoint(tmp_path / "whole")
    with pytest.raises(FervitError, match=f"^{whole}: ten-crop TTA needs a model trained on crops"):
        evaluate_checkpoint([str(cropping), str(whole)], data_root=str(tiny_layout), device="cpu", tta="ten_crop",
                            output=str(tmp_path / "ens"))
