"""timm backbones: built for 1-channel faces, fine-tuned from a local weights file, saved and reloaded as fervit models.

Most tests need timm, which imports torchvision; scripts/test.sh provides both beside the CPU torch (see
scripts/test_extras/sitecustomize.py). They skip where timm is absent or cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fervit.errors import FervitError
from fervit.models import build_model, create_model
from fervit.config import ModelConfig


def test_without_timm_the_error_is_one_line_saying_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError, as where it is not installed
    with pytest.raises(FervitError, match=r"pip install 'fervit\[timm\]'"):
        build_model(ModelConfig(name="timm", backbone="resnet18"))


needs_timm = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import timm"], capture_output=True).returncode != 0,
    reason="timm (with a torchvision it can import) is not importable here; scripts/test.sh provides it")


@pytest.fixture(scope="module")
def timm():
    import timm
    return timm


def save_donor(timm, path, name, **kwargs):
    """Write a timm model's own weights as a hub-style model.safetensors: 3-channel stem, 1000-class head."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = timm.create_model(name, **kwargs)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    return donor.state_dict()


@needs_timm
@pytest.mark.parametrize("backbone,size,params", [("resnet18", 0, 11_173_831), ("convnext_atto", 64, 3_375_487),
                                                  ("vit_tiny_patch16_224", 96, 5_396_743)])
def test_backbones_take_48px_grey_faces_and_give_7_logits(timm, backbone, size, params):
    model = create_model("timm", backbone=backbone, input_size=size).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        assert model(torch.randn(3, 1, 48, 48)).shape == (3, 7)


@needs_timm
def test_unknown_backbones_and_tags_are_one_line_errors(timm):
    with pytest.raises(FervitError, match="timm has no model 'resnet9000'.*similar: resnet"):
        create_model("timm", backbone="resnet9000")
    with pytest.raises(FervitError, match="Invalid pretrained tag"):
        create_model("timm", backbone="resnet18.no_such_tag")
    with pytest.raises(FervitError, match="set model.backbone"):
        create_model("timm")


@needs_timm
def test_pretrained_resnet_stem_is_folded_to_grey_and_head_is_new(timm, tmp_path):
    from fervit.models.pretrained import load_pretrained

    file = tmp_path / "model.safetensors"
    donor = save_donor(timm, file, "resnet18")
    model = create_model("timm", backbone="resnet18")
    logs = []
    load_pretrained(model, str(file), log=logs.append)
    own = model.backbone.state_dict()
    assert own["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(own["conv1.weight"], donor["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(own["layer3.1.conv2.weight"], donor["layer3.1.conv2.weight"])
    assert own["fc.weight"].shape == (7, 512)  # ImageNet's 1000-way head is dropped, not truncated
    assert not torch.allclose(own["fc.weight"], donor["fc.weight"][:7])
    assert "loaded timm weights for resnet18" in logs[0]


@needs_timm
def test_pretrained_vit_positions_are_resampled_to_the_new_grid(timm, tmp_path):
    from fervit.models.pretrained import load_pretrained

    file = tmp_path / "vit.safetensors"
    donor = save_donor(timm, file, "vit_tiny_patch16_224")  # 14x14 grid + [CLS]
    model = create_model("timm", backbone="vit_tiny_patch16_224", input_size=64)  # 4x4 grid
    load_pretrained(model, str(file), log=lambda *_: None)
    own = model.backbone.state_dict()
    assert donor["pos_embed"].shape == (1, 197, 192) and own["pos_embed"].shape == (1, 17, 192)
    torch.testing.assert_close(own["pos_embed"][:, 0], donor["pos_embed"][:, 0])  # [CLS] position kept
    torch.testing.assert_close(own["blocks.11.mlp.fc2.weight"], donor["blocks.11.mlp.fc2.weight"])


@needs_timm
def test_weights_of_another_architecture_are_a_one_line_error(timm, tmp_path):
    from fervit.models.pretrained import load_pretrained

    file = tmp_path / "resnet.safetensors"
    save_donor(timm, file, "resnet18")
    with pytest.raises(FervitError, match=r"do not fit timm model 'convnext_atto'") as e:
        load_pretrained(create_model("timm", backbone="convnext_atto"), str(file))
    assert "\n" not in str(e.value)
    pickled = tmp_path / "resnet.pth"
    pickled.write_bytes(b"not really")
    with pytest.raises(FervitError, match="never loads pickled"):
        load_pretrained(create_model("timm", backbone="resnet18"), str(pickled))


@pytest.mark.slow
@pytest.mark.e2e
@needs_timm
def test_fine_tune_from_the_cli_then_predict_and_export_from_the_run(timm, tiny_layout, real_data, tmp_path):
    file = tmp_path / "model.safetensors"
    save_donor(timm, file, "resnet18")
    out = tmp_path / "runs"  # input_size 64: the model resizes the 48px faces itself
    cmd = [sys.executable, "-m", "fervit", "train", "--preset", "tiny", "--data", str(tiny_layout), "--protocol",
           "fer2013", "--epochs", "1", "--device", "cpu", "--output", str(out), "--quiet",
           "--set", "model.name=timm", "--set", "model.backbone=resnet18", "--set", f"model.pretrained={file}",
           "--set", "model.input_size=64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = out.iterdir()
    assert "_timm_resnet18_in64_" in run.name
    meta = json.loads((run / "best_model.json").read_text())
    assert meta["model"]["name"] == "timm" and meta["model"]["backbone"] == "resnet18"
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "timm:resnet18"

    from fervit.data.dataset import load_fer
    from fervit.data.splits import make_splits
    from fervit.evaluation.evaluate import evaluate
    from fervit.models.checkpoint import load_model

    model, _ = load_model(run)  # rebuilt from the JSON description; the weights file is not needed again
    assert model.backbone.conv1.weight.shape == (64, 1, 7, 7)
    data = load_fer(tiny_layout, progress=False)
    test = make_splits(data, "fer2013").test
    assert results["test"]["num_samples"] == len(test) == 28  # PrivateTest: 4 faces per class
    assert evaluate(model, data.images, data.labels, test)["acc"] == pytest.approx(results["test"]["accuracy"])
    face = next((tiny_layout / "test" / "happy").iterdir())
    done = subprocess.run([sys.executable, "-m", "fervit", "predict", str(face), "--model", str(run), "--json", "--no-detect"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)
    # the resize lives inside the model, so the ONNX file still takes 48x48 faces; parity on 64 real test faces
    done = subprocess.run([sys.executable, "-m", "fervit", "export", str(run), "--data", str(real_data),
                           "--check-images", "64"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "best_model.onnx").stat().st_size > 1_000_000


def test_timm_only_keys_on_another_model_are_an_error_not_ignored():
    with pytest.raises(FervitError, match="apply to model.name=timm only, not to vit_cnn"):
        create_model("vit_cnn", input_size=96)
