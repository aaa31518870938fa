"""Datasets around datasets: relabelling (``class_map``) and an in-memory cache."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..errors import DataError
from .labels import resolve_class_map
from .sample import Sample

__all__ = ["ClassMappedDataset", "CachedDataset", "DatasetWrapper"]


class ClassMappedDataset(Dataset):
    """Relabels a dataset's slices with ``class_map`` (source index -> model index, -1
    drops the slice), e.g. phantoms for a two-class model: ``[0, -1, 1]`` keeps Normal and
    COVID as classes 0 and 1 and leaves CP slices out."""

    def __init__(self, dataset: Dataset, class_map) -> None:
        source = getattr(dataset, "slice_class_names", None)
        if source is None:
            raise DataError(f"{type(dataset).__name__} has no slice classes to map with class_map")
        self.dataset = dataset
        self.map, self.slice_class_names = resolve_class_map(class_map, source)
        labels = getattr(dataset, "labels", None)
        if labels is None:
            labels = [dataset[i].label for i in range(len(dataset))]
        self.indices = [i for i, lab in enumerate(labels) if lab is not None and self.map[lab] >= 0]
        if not self.indices:
            raise DataError(f"class_map {list(class_map)} leaves no slice")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[self.indices[index]]
        sample.label = self.map[sample.label]
        return sample


class DatasetWrapper(Dataset):
    """A dataset around ``self.dataset`` whose descriptive attributes (class names, labels,
    patient ids) are the wrapped set's."""

    dataset: Dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":        # not set yet (unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self.dataset, name)


class CachedDataset(DatasetWrapper):
    """Remembers each sample after its first read: decoding or drawing happens once per
    run instead of once per epoch. Holds every sample in memory, so use it for small sets.

    A dataset whose ``reads_in_order`` is true (slices of volumes that it decodes a whole
    volume at a time, e.g. :class:`~ctlesion.data.classification.CovidCtMdDataset`) is read
    whole, in index order, at the first miss: a shuffled first epoch would otherwise decode
    a volume again at nearly every read."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._cache: dict[int, Sample] = {}

    def __getitem__(self, index: int) -> Sample:
        if index not in self._cache:
            if getattr(self.dataset, "reads_in_order", False):
                self._read_all()
            else:
                self._cache[index] = self.dataset[index]
        return self._cache[index]

    def _read_all(self) -> None:
        for i in range(len(self.dataset)):
            if i not in self._cache:
                self._cache[i] = self.dataset[i]
