"""Label volumes as NIfTI on the input's voxel grid (opens over the scan in Slicer, ITK-SNAP)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..engine.io import atomic_write
from .geometry import VolumeGeometry

__all__ = ["write_label_nifti", "read_label_nifti"]


def write_label_nifti(path: str | Path, volume: np.ndarray, geometry: VolumeGeometry,
                      description: str = "") -> Path:
    """Write ``volume`` ``[S, H, W]`` (integer labels) as ``(col, row, slice)`` NIfTI with
    ``geometry.affine`` as both qform and sform (code 1, scanner), atomically."""
    import nibabel as nib

    volume = np.asarray(volume)
    if tuple(volume.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: label volume {volume.shape} is not on the input grid {geometry.shape}")
    data = np.ascontiguousarray(volume.transpose(2, 1, 0))
    image = nib.Nifti1Image(data, geometry.affine)
    image.set_qform(geometry.affine, code=1)
    image.set_sform(geometry.affine, code=1)
    image.header.set_data_dtype(data.dtype)
    image.header["descrip"] = description[:79].encode("ascii", "replace")
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"

    def save(tmp: str) -> None:  # nibabel picks compression from the name: keep the suffix
        nib.save(image, tmp + suffix)
        os.replace(tmp + suffix, tmp)

    atomic_write(path, save)
    return path


def read_label_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A label NIfTI back as ``([S, H, W] array, affine)``."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), image.affine
