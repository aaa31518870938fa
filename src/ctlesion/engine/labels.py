"""Slice class labels meet the model: the checks training and evaluation share."""

from __future__ import annotations

import warnings

import torch

from ..data.sample import Sample
from ..errors import DataError

__all__ = ["check_dataset_classes", "slice_labels"]


def check_dataset_classes(dataset, model, what: str = "data") -> None:
    """The dataset's label set must be the model's: same number of classes (an error), and
    the same names in the same order (a warning when names differ, e.g. 'ncp' vs 'covid')."""
    names = getattr(dataset, "slice_class_names", None)
    if names is None:
        return
    if len(names) != model.num_classes:
        raise DataError(f"{what} has {len(names)} classes {list(names)} but the model has {model.num_classes} "
                        f"{list(model.class_names)}; map them with data.class_map or set "
                        "model.classifier.class_names")
    if [n.lower() for n in names] != [n.lower() for n in model.class_names]:
        warnings.warn(f"{what} class names {list(names)} differ from the model's {list(model.class_names)}; "
                      "labels are matched by index", stacklevel=2)


def slice_labels(samples: list[Sample], class_names, what: str = "classification training") -> torch.Tensor:
    """The samples' class labels as a tensor; a missing label or one outside the model's
    classes is an error naming the sample."""
    for s in samples:
        if s.label is None:
            raise DataError(f"{s.source}: {what} needs a class label for {s.sample_id}")
        if not 0 <= s.label < len(class_names):
            raise DataError(f"{s.source}: label {s.label} of {s.sample_id} is outside the model's "
                            f"{len(class_names)} classes {list(class_names)}; map labels with data.class_map")
    return torch.tensor([s.label for s in samples], dtype=torch.int64)
