"""fervit.data.tta: evaluation and the predictor average the same views the same way."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from helpers import tiny_model, tiny_model_config

from fervit.data.images import normalize
from fervit.data.tta import mean_log_probs, tta_views
from fervit.evaluation.evaluate import predict_logits
from fervit.inference.predictor import Predictor
from fervit.models.checkpoint import describe


def test_the_average_is_the_mean_of_each_faces_view_log_probabilities():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0],     # view 1 of faces a, b
                           [0.0, 3.0, 0.0], [1.0, 1.0, 5.0]])     # view 2 of faces a, b
    got = mean_log_probs(logits, faces=2)
    want = (F.log_softmax(logits[:2], -1) + F.log_softmax(logits[2:], -1)) / 2
    torch.testing.assert_close(got, want)
    assert got.shape == (2, 3)


def test_numpy_and_torch_inputs_give_the_same_views_and_averages():
    """The ONNX Runtime predictor runs these on numpy arrays, evaluation on tensors: one body, same numbers."""
    faces = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    x_t, x_n = normalize(faces), normalize(faces.numpy())
    assert isinstance(x_n, np.ndarray) and x_n.dtype == np.float32
    np.testing.assert_array_equal(x_n, x_t.numpy())
    for mode in ("none", "mirror", "ten_crop"):
        v_t, v_n = tta_views(x_t, mode, 40), tta_views(x_n, mode, 40)
        assert isinstance(v_n, np.ndarray)
        np.testing.assert_array_equal(v_n, v_t.numpy())
        logits = torch.randn(len(v_t), 7, dtype=torch.float64)
        np.testing.assert_allclose(mean_log_probs(logits.numpy(), 3), mean_log_probs(logits, 3).numpy(), atol=1e-12)


class _Eager:
    """The predictor's classifier interface over an eager model: numpy in, numpy logits out."""

    backend = "eager"

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def test_evaluation_and_the_predictor_give_the_same_mirror_tta_answer():
    model = tiny_model(seed=3)
    faces = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    evaluated = predict_logits(model, faces, torch.arange(5), tta="mirror")
    with torch.no_grad():
        x = normalize(faces)
        by_hand = (F.log_softmax(model(x), -1) + F.log_softmax(model(x.flip(-1)), -1)) / 2
    torch.testing.assert_close(evaluated, by_hand, rtol=1e-5, atol=1e-5)
    predictor = Predictor(_Eager(model), describe(tiny_model_config()), tta="mirror")
    probs = predictor.classify(faces.numpy())
    np.testing.assert_allclose(probs, evaluated.softmax(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(probs, Predictor(_Eager(model), describe(tiny_model_config())).classify(faces.numpy()))


def test_ten_crop_views_are_view_major_so_the_average_pairs_each_face_with_its_own_views():
    x = torch.arange(2 * 48 * 48, dtype=torch.float32).view(2, 1, 48, 48)
    views = tta_views(x, "ten_crop", crop_size=40)
    assert views.shape == (20, 1, 48, 48)
    torch.testing.assert_close(views[0], x[0])            # view 0 of face 0: the centre, unshifted
    torch.testing.assert_close(views[1], x[1])            # view 0 of face 1
    torch.testing.assert_close(views[10], x[0].flip(-1))  # view 5: face 0's centre, mirrored
