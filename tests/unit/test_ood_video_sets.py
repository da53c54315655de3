"""The clip OOD sets of Table 7 (bench/eval_ood_video.py): MovingFashion's held-out motions, the
clip shifts, and the feature baselines on clip feature maps."""

import numpy as np
import pytest

from explainserve.data import MOTIONS, OOD_MOTIONS, FashionScenes, MovingFashion
from explainserve.data.backgrounds import IN_DISTRIBUTION_PHOTOS


def _centroids(masks: np.ndarray) -> np.ndarray:
    return np.array([np.argwhere(m).mean(0) for m in masks])


@pytest.fixture(scope="module")
def held_out():
    return MovingFashion("ood_motions", seed=0, size=12)


def test_held_out_motions_are_deterministic_unlabelled_and_both_drawn(held_out):
    batch = held_out.batch()
    assert batch.clips.shape == (12, 16, 64, 64, 3) and batch.masks.shape == (12, 16, 64, 64)
    assert (batch.labels == -1).all()
    motions = [sample["motion"] for sample in held_out]
    assert set(motions) == set(OOD_MOTIONS) and not set(OOD_MOTIONS) & set(MOTIONS)
    again = MovingFashion("ood_motions", seed=0, size=12).batch()
    assert again.clips.tobytes() == batch.clips.tobytes() and again.masks.tobytes() == batch.masks.tobytes()
    # Its own random stream: not the test split's clips, though it shows test items on the same photographs.
    assert held_out.source.part == "test" and held_out.source.photos == IN_DISTRIBUTION_PHOTOS
    test = MovingFashion("test", seed=0, size=12).batch()
    assert not any(np.array_equal(a, b) for a in batch.clips for b in test.clips)
    assert MovingFashion("ood_motions", seed=1, size=12).batch().clips.tobytes() != batch.clips.tobytes()


def test_held_out_motions_are_motions_no_training_clip_makes(held_out):
    training = MovingFashion("train", seed=0, size=40)
    for sample in training:  # every trained motion changes the item's mask from first to last frame
        assert (sample["mask"][0] != sample["mask"][-1]).sum() > 20, MOTIONS[sample["label"]]
        shift = np.abs(_centroids(sample["mask"])[-1] - _centroids(sample["mask"])[0])
        assert shift.min() < 4  # a trained slide moves along one axis only
    for sample in held_out:
        masks = sample["mask"]
        if sample["motion"] == "still":
            assert all(np.array_equal(m, masks[0]) for m in masks) and masks[0].sum() > 50
        else:
            shift = np.abs(_centroids(masks)[-1] - _centroids(masks)[0])
            assert (shift > 10).all(), shift  # along both axes at once
        # The background stays static, as in the trained clips.
        never = ~masks.any(axis=0)
        assert (sample["clip"][:, never] == sample["clip"][0, never]).all()


def test_only_moving_fashion_has_held_out_motions():
    with pytest.raises(ValueError, match="^split:"):
        FashionScenes("ood_motions")
    with pytest.raises(ValueError, match="ood_motions"):
        MovingFashion("ood_classes")


def test_clip_shifts_keep_shape_and_shift_every_clip_frame_by_frame():
    from bench.eval_ood import blur
    from bench.eval_ood_video import CLIP_SHIFTS, frame_shuffle

    clips = MovingFashion("test", seed=0, size=3).batch().clips
    for name, shift in CLIP_SHIFTS.items():
        shifted = shift(clips)
        assert shifted.shape == clips.shape and shifted.dtype == np.uint8, name
        assert np.array_equal(shift(clips), shifted), name  # deterministic
        assert all((a != b).mean() > 0.03 for a, b in zip(shifted, clips)), name  # a shuffle moves only the item
    # Blur acts on each frame alone, exactly as on an image: no mixing across time.
    blurred = blur(clips)
    for clip, frames in zip(clips, blurred):
        for frame, expected in zip(clip, frames):
            assert np.array_equal(blur(frame[None])[0], expected)
    # A shuffle keeps every frame and only changes their order.
    shuffled = frame_shuffle(clips)
    for clip, frames in zip(clips, shuffled):
        matches = [[t for t in range(16) if np.array_equal(frame, clip[t])] for frame in frames]
        order = [m[0] for m in matches]
        assert all(matches) and sorted(order) == list(range(16)) and order != list(range(16))


def test_feature_baselines_on_clip_maps_match_a_plain_ash_s():
    """ASH-S on (B, K, t, h, w) clip maps, against a plain torch ASH-S over every activation of
    the sample; on image maps the scores stay pytorch-ood's own."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_ood")
    from pytorch_ood.detector import ASH

    from bench.ood_baselines import ASH_PERCENTILE, FeatureBaselines
    from explainserve.models.architectures import FashionVGG, MotionC3D

    torch.manual_seed(0)
    with torch.no_grad():  # the reference below is plain arithmetic on the maps
        model = MotionC3D().eval()
        maps = model.features(torch.randn(60, 3, 8, 32, 32))
        assert maps.dim() == 5
        baselines = FeatureBaselines(model.classifier, maps.flatten(2).mean(dim=2).numpy(), np.arange(60) % 8, maps)
        scores = baselines.scores(maps)
        flat = maps.flatten(1).double()
        kept = flat.shape[1] - round(flat.shape[1] * ASH_PERCENTILE)
        values, where = flat.topk(kept, dim=1)
        pruned = torch.zeros_like(flat).scatter(1, where, values)
        pruned = pruned * torch.exp(flat.sum(1) / pruned.sum(1))[:, None]
        logits = pruned.reshape(maps.shape).flatten(2).mean(2) @ model.classifier.weight.double().T + model.classifier.bias.double()
        np.testing.assert_allclose(scores["ASH-S"], -torch.logsumexp(logits, dim=1).numpy(), rtol=1e-4)
        assert all(np.isfinite(value).all() and value.shape == (60,) for value in scores.values())

        image_model = FashionVGG().eval()
        image_maps = image_model.features(torch.randn(60, 3, 32, 32))
        image = FeatureBaselines(image_model.classifier, image_maps.flatten(2).mean(dim=2).numpy(), np.arange(60) % 8, image_maps)
        own = ASH(lambda x: x, lambda x: image_model.classifier(x.flatten(2).mean(2)), variant="ash-s", percentile=ASH_PERCENTILE)
        np.testing.assert_allclose(image.scores(image_maps)["ASH-S"], own.predict_feature_maps(image_maps.clone()).double().numpy(),
                                   rtol=1e-5)


def test_clip_section_goes_right_after_the_image_table():
    from bench.eval_ood import HEADING as IMAGE
    from bench.eval_ood_video import HEADING, place

    report = f"# r\n\n{IMAGE}\n\nimage rows\n### Reading\n\nnotes\n\n## Table 8\nrows\n"
    placed = place(report, [HEADING, "", "clip rows"])
    assert placed == f"# r\n\n{IMAGE}\n\nimage rows\n### Reading\n\nnotes\n\n{HEADING}\n\nclip rows\n## Table 8\nrows\n"
    assert place(placed, [HEADING, "", "new"]) == placed.replace("clip rows", "new")
