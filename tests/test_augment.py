"""Training-time augmentation (data.augment): image, boxes and masks move together, draws
are a pure function of (seed, epoch, index), scoring data is never augmented, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import ListDataset, small_detector_overrides

from ctlesion.config import AugmentConfig
from ctlesion.data.augment import AugmentedDataset, augment_seed
from ctlesion.data.sample import Sample, empty_target
from ctlesion.engine.checkpoint import load_checkpoint
from ctlesion.engine.train import train
from ctlesion.errors import ConfigError
from ctlesion.experiment import load_experiment

GEOMETRY_ONLY = AugmentConfig(affine_p=0.0, contrast=0.0, gamma=[1.0, 1.0], noise_std=0.0)


def _sample(i: int = 0, height: int = 40, width: int = 56) -> Sample:
    """A dark slice with two bright rectangular lesions of classes 1 and 2 (boxes exclusive)."""
    image = torch.full((1, height, width), 0.1)
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 4:12, 6:20] = 1
    masks[1, 20:34, 30:50] = 1
    image[:, masks.bool().any(0)] = 0.9
    target = {"boxes": torch.tensor([[6, 4, 20, 12], [30, 20, 50, 34]], dtype=torch.float32),
              "labels": torch.tensor([1, 2]), "masks": masks}
    return Sample(image=image, target=target, sample_id=f"s{i}", source="synthetic")


def _dataset(cfg: AugmentConfig = AugmentConfig(), n: int = 4, min_area: int = 0) -> AugmentedDataset:
    return AugmentedDataset(ListDataset([_sample(i) for i in range(n)]), cfg, seed=7, min_area=min_area)


def test_a_draw_is_a_pure_function_of_seed_epoch_and_index_and_leaves_the_global_rng_alone():
    data = _dataset()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = data.draw(2, 5)
    assert torch.equal(torch.get_rng_state(), before)
    again = _dataset().draw(2, 5)
    assert torch.equal(first.image, again.image) and torch.equal(first.target["masks"], again.target["masks"])
    data.set_epoch(5)
    assert torch.equal(data[2].image, first.image)
    others = [data.draw(2, e).image for e in range(6)] + [data.draw(1, 5).image]
    assert sum(torch.equal(o, first.image) for o in others) == 1     # only (epoch 5, index 2) itself
    assert augment_seed(7, 5, 2) != augment_seed(7, 2, 5)


def test_geometry_moves_image_masks_and_boxes_together():
    data = _dataset(GEOMETRY_ONLY, n=1)
    shapes = set()
    for epoch in range(24):
        out = data.draw(0, epoch)
        image, target = out.image[0], out.target
        shapes.add(tuple(image.shape))
        assert target["labels"].tolist() == [1, 2]
        assert torch.equal(image > 0.5, target["masks"].bool().any(0))       # lesions are where the bright pixels went
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        assert sorted(m.sum().item() for m in target["masks"]) == [8 * 14, 14 * 20]   # exact: flips and 90° turns
    assert shapes == {(40, 56), (56, 40)}                                  # 90° turns keep the whole slice


def test_small_rotations_and_scaling_keep_boxes_tight_around_the_moved_masks():
    data = _dataset(AugmentConfig(affine_p=1.0, degrees=20.0, scale=[0.7, 1.3], contrast=0.0, gamma=[1, 1],
                                  noise_std=0.0), n=1)
    for epoch in range(8):
        target = data.draw(0, epoch).target
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_instances_shrunk_to_min_area_or_below_are_dropped_with_their_box_and_label():
    big_enough = 8 * 14   # the small lesion's area: kept at min_area = area - 1, dropped at min_area = area
    kept = _dataset(GEOMETRY_ONLY, n=1, min_area=big_enough - 1).draw(0, 0).target
    dropped = _dataset(GEOMETRY_ONLY, n=1, min_area=big_enough).draw(0, 0).target
    assert kept["labels"].tolist() == [1, 2]
    assert dropped["labels"].tolist() == [2] and dropped["boxes"].shape == (1, 4) and len(dropped["masks"]) == 1
    none = _dataset(GEOMETRY_ONLY, n=1, min_area=10_000).draw(0, 0).target
    assert none["boxes"].shape == (0, 4) and none["masks"].shape[0] == 0 and none["labels"].numel() == 0


def test_intensity_jitter_stays_in_the_input_range_and_changes_only_intensities():
    cfg = AugmentConfig(flip=False, rot90=False, affine_p=0.0, contrast=0.5, gamma=[0.5, 2.0], noise_std=0.2)
    data = _dataset(cfg, n=1)
    original = _sample(0)
    for epoch in range(6):
        out = data.draw(0, epoch)
        assert 0.0 <= out.image.min() and out.image.max() <= 1.0
        assert not torch.equal(out.image, original.image)
        assert torch.equal(out.target["masks"], original.target["masks"])


def test_the_wrapped_samples_are_not_changed_and_unlabelled_samples_work():
    source = _sample(0)
    copy = source.image.clone()
    AugmentedDataset(ListDataset([source]), AugmentConfig(), seed=0).draw(0, 3)
    assert torch.equal(source.image, copy)
    negative = Sample(image=torch.rand(1, 32, 32), target=empty_target(32, 32), sample_id="neg", source="x")
    unlabelled = Sample(image=torch.rand(1, 32, 32), target=None, sample_id="u", source="x", label=2)
    data = AugmentedDataset(ListDataset([negative, unlabelled]), AugmentConfig(), seed=0)
    assert data.draw(0, 1).target["boxes"].shape == (0, 4)
    out = data.draw(1, 1)
    assert out.target is None and out.label == 2 and out.image.shape[0] == 1


@pytest.mark.parametrize("override, message", [
    ("data.augment.scale=[1.2,0.8]", "data.augment.scale"),
    ("data.augment.affine_p=1.5", "data.augment.affine_p"),
    ("data.augment.gamma=[0,1]", "data.augment.gamma"),
    ("data.augment.noise_std=-0.1", "data.augment.noise_std"),
    ("val_data.augment.flip=true", "validation data is never augmented"),
])
def test_bad_settings_fail_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, ["val_data.format=phantom", override])


def test_augmentation_is_off_by_default_and_on_from_one_key():
    assert load_experiment(None).data.augment is None
    assert load_experiment(None, ["data.augment.flip=false"]).data.augment == AugmentConfig(flip=False)


def _cfg(*extra):
    return load_experiment(None, [
        *small_detector_overrides(64), "data.format=phantom", "data.num_samples=4", "data.phantom_size=64",
        "data.min_area=4", "data.augment.degrees=5", "train.save_every=1", *extra])


def _losses(folder):
    lines = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "event" not in x]


def test_training_with_augmentation_resumes_exactly_and_differs_from_training_without(tmp_path):
    straight = train(_cfg("train.epochs=2"), tmp_path / "a", progress=False)
    train(_cfg("train.epochs=1"), tmp_path / "b", progress=False)
    train(_cfg("train.epochs=2"), tmp_path / "b", progress=False, resume=True)
    assert straight.steps == 4
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    wa, wb = (load_checkpoint(tmp_path / x / "checkpoint")[0].state_dict() for x in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(_cfg("train.epochs=1", "data.augment=null"), tmp_path / "plain", progress=False)
    assert _losses(tmp_path / "plain")[:2] != _losses(tmp_path / "a")[:2]
