import numpy as np
import pytest
import torch
from torch import nn

from explainserve.evaluation import filter_removal_auc, filter_removal_correct, filter_removal_curve, normalised_accuracy
from bench.filter_rankings import RANKINGS, filter_scores, layer_signals
from support.evaluation_models import ChannelVoteModel

K = 32


def vote_model():
    # 16 strong voters (w = 1) then 16 weak ones (w = 0.01); all-ones inputs vote 16.16 - 8 > 0.
    weights = torch.cat([torch.ones(16), torch.full((16,), 0.01)])
    return ChannelVoteModel(weights, bias=8.0)


def test_true_importance_ranking_gives_the_analytic_auc():
    model = vote_model()
    inputs = torch.ones(3, K, 1, 1)
    labels = torch.zeros(3, dtype=torch.long)
    fractions, accuracy = filter_removal_curve(model, model.features, inputs, labels, model.weights.expand(3, K))
    assert fractions.tolist() == [0.0, 0.5, 1.0]
    assert accuracy.tolist() == [1.0, 0.0, 0.0]
    assert filter_removal_auc(fractions, accuracy) == pytest.approx(0.25)
    _, backwards = filter_removal_curve(model, model.features, inputs, labels, -model.weights.expand(3, K))
    assert filter_removal_auc(fractions, backwards) == pytest.approx(0.75)


def test_grad_amap_finds_the_voters_and_taylor_variants_are_absolute():
    model = vote_model()
    inputs = torch.ones(2, K, 1, 1)
    signals = layer_signals(model, model.features, inputs, torch.zeros(2, dtype=torch.long))
    grad_amap = filter_scores(signals, "grad_amap")
    assert torch.allclose(grad_amap, model.weights.expand(2, K))
    assert torch.allclose(filter_scores(signals, "taylor_class"), grad_amap.abs())
    assert torch.allclose(filter_scores(signals, "l1_norm"), torch.ones(2, K))
    # Cross-entropy gradient for a 2-class vote: dL/dA = -(1 - p0) * w.
    p0 = torch.softmax(model(inputs), dim=1)[:, :1]
    assert torch.allclose(filter_scores(signals, "taylor"), ((1 - p0) * model.weights).abs(), atol=1e-6)
    fractions, accuracy = filter_removal_curve(model, model.features, inputs, torch.zeros(2), grad_amap)
    assert filter_removal_auc(fractions, accuracy) == pytest.approx(0.25)


def test_every_ranking_scores_a_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 20, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 4)).eval()
    inputs = torch.randn(5, 3, 12, 12)
    signals = layer_signals(model, model[3], inputs, model(inputs).argmax(1))
    for ranking in RANKINGS:
        scores = filter_scores(signals, ranking)
        assert scores.shape == (5, 20) and torch.isfinite(scores).all(), ranking
    # XGrad-CAM's weights: sum(G * A) / sum(A) per channel.
    A, G = signals.activations, signals.class_gradients
    expected = (G * A).sum((2, 3)) / (A.sum((2, 3)) + 1e-7)
    assert torch.allclose(filter_scores(signals, "xgrad_cam"), expected, atol=1e-5)
    fractions, accuracy = filter_removal_curve(model, model[3], inputs, model(inputs).argmax(1),
                                               filter_scores(signals, "random"), batch_size=2)
    assert len(fractions) == 3 and fractions[-1] == 1.0 and accuracy[0] == 1.0


def test_bad_input_is_refused():
    model = vote_model()
    inputs = torch.ones(2, K, 1, 1)
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"scores must have shape \(B=2, K\)"):
        filter_removal_curve(model, model.features, inputs, labels, torch.ones(3, K))
    with pytest.raises(ValueError, match="NaN"):
        filter_removal_curve(model, model.features, inputs, labels, torch.full((2, K), np.nan))
    with pytest.raises(ValueError, match="none of the inputs"):
        filter_removal_curve(model, model.features, inputs, torch.ones(2, dtype=torch.long), torch.ones(2, K))
    with pytest.raises(ValueError, match="step"):
        filter_removal_curve(model, model.features, inputs, labels, torch.ones(2, K), step=0)
    with pytest.raises(ValueError, match="empty"):
        filter_removal_curve(model, model.features, inputs[:0], labels[:0], torch.ones(0, K))
    with pytest.raises(ValueError, match="ranking must be one of"):
        filter_scores(layer_signals(model, model.features, inputs, labels), "saliency")


def test_per_sample_outcomes_give_the_curve_and_can_be_resampled():
    # Sample 0 loses its 16 strong voters first (wrong after step 1), sample 1 its weak ones first
    # (still 16 - 8 > 0 after step 1, wrong once all are gone); sample 2 is labelled 1, right only
    # once the strong voters are gone.
    model = vote_model()
    inputs = torch.ones(3, K, 1, 1)
    labels = torch.tensor([0, 0, 1])
    scores = torch.stack([model.weights, -model.weights, model.weights])
    fractions, correct = filter_removal_correct(model, model.features, inputs, labels, scores)
    assert fractions.tolist() == [0.0, 0.5, 1.0]
    assert correct.dtype == torch.bool
    assert correct.tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    assert normalised_accuracy(correct).tolist() == [1.0, 1.0, 0.5]
    assert torch.equal(normalised_accuracy(correct), filter_removal_curve(model, model.features, inputs, labels, scores)[1])
    # a resample of the rows (sample 0 twice) is the curve of that resample
    assert normalised_accuracy(correct[[0, 0, 2]]).tolist() == [1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="classifies none"):
        normalised_accuracy(correct[[2]])
