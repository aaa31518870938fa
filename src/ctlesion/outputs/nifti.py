"""Label volumes as NIfTI on the input's voxel grid (opens over the scan in Slicer, ITK-SNAP)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..engine.io import atomic_write
from .geometry import VolumeGeometry

__all__ = ["write_label_nifti", "write_label_nifti_slices", "read_label_nifti"]


def write_label_nifti(path: str | Path, volume: np.ndarray, geometry: VolumeGeometry,
                      description: str = "") -> Path:
    """Write ``volume`` ``[S, H, W]`` (integer labels) as ``(col, row, slice)`` NIfTI with
    ``geometry.affine`` as both qform and sform (code 1, scanner), atomically."""
    volume = np.asarray(volume)
    if tuple(volume.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: label volume {volume.shape} is not on the input grid {geometry.shape}")
    return write_label_nifti_slices(path, (volume[s] for s in range(volume.shape[0])), geometry,
                                    volume.dtype, description)


def write_label_nifti_slices(path: str | Path, slices: Iterable[np.ndarray], geometry: VolumeGeometry,
                             dtype, description: str = "") -> Path:
    """:func:`write_label_nifti` from the slices ``[H, W]`` in volume order, one at a time:
    the header, then each slice's bytes (NIfTI's ``(col, row)`` order is a C-order slice),
    through nibabel's opener (gzip for ``.nii.gz``). Atomic; fewer or more slices than the
    grid has is an error (and nothing is left in place)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    num_slices, height, width = geometry.shape
    header = nib.Nifti1Header()
    header.set_data_shape((width, height, num_slices))
    header.set_data_dtype(np.dtype(dtype))
    header.set_qform(geometry.affine, code=1)
    header.set_sform(geometry.affine, code=1)
    header["descrip"] = description[:79].encode("ascii", "replace")
    header["vox_offset"] = 352  # the 348-byte header and the 4-byte "no extension" flag
    on_disk = header.get_data_dtype()
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"

    def save(tmp: str) -> None:  # the opener picks compression from the name: keep the suffix
        count = 0
        with ImageOpener(tmp + suffix, "wb") as fh:
            header.write_to(fh)
            for image in slices:
                image = np.asarray(image)
                if image.shape != (height, width) or count >= num_slices:
                    raise ValueError(f"{path}: slice {count} {image.shape} does not fit the grid {geometry.shape}")
                fh.write(np.ascontiguousarray(image, dtype=on_disk).tobytes())
                count += 1
        if count != num_slices:
            raise ValueError(f"{path}: {count} slices written for a grid of {num_slices}")
        os.replace(tmp + suffix, tmp)

    atomic_write(path, save)
    return path


def read_label_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A label NIfTI back as ``([S, H, W] array, affine)``."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), image.affine
