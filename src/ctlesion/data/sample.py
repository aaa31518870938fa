"""The one sample type every reader and dataset yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Sample", "empty_target", "collate_samples"]


@dataclass
class Sample:
    """One CT slice ready for a detector.

    Attributes:
        image: float32 tensor ``[1, H, W]`` in the model's input range ``[0, 1]`` (the
            window has already been applied). The detector replicates grey to 3 channels.
        target: instance targets in torchvision's format: ``boxes`` float32 ``[N, 4]``
            (x1, y1, x2, y2 in pixels), ``labels`` int64 ``[N]``, ``masks`` uint8
            ``[N, H, W]``. ``N == 0`` is a valid negative slice. ``None`` when the source
            has no labels (prediction inputs).
        sample_id: a stable, human-readable id (file stem, or ``<stem>#<slice>`` in a volume).
        source: the file (or series folder) the slice came from.
        spacing: pixel spacing ``(row_mm, col_mm)`` when the source states it, else ``None``.
        slice_index: index of the slice inside its volume (0 for single images).
        label: optional slice-level class index (classification data, phantoms).
    """

    image: torch.Tensor
    target: dict[str, torch.Tensor] | None
    sample_id: str
    source: str
    spacing: tuple[float, float] | None = None
    slice_index: int = 0
    label: int | None = None
    meta: dict = field(default_factory=dict)


def empty_target(height: int, width: int) -> dict[str, torch.Tensor]:
    """A negative (lesion-free) target of the given size."""
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, height, width), dtype=torch.uint8),
    }


def collate_samples(batch: list[Sample]) -> list[Sample]:
    """DataLoader collate: detectors take lists, so keep the list."""
    return list(batch)
