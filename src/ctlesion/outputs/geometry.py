"""The voxel grid of a volume as a NIfTI affine (voxel index -> RAS millimetres).

Label volumes are written on exactly the input's grid, with NIfTI voxel axes
``(i, j, k) = (column, row, slice)`` of the ctlesion volume ``[S, H, W]`` (the axes
:class:`~ctlesion.data.readers.NiftiReader` reads, transposed back).

* NIfTI input: the input's own affine, unchanged.
* DICOM input: from the tags, in DICOM's patient frame LPS (x to the patient's left,
  y posterior, z superior), then flipped to the RAS frame nibabel and NIfTI use
  (``RAS = diag(-1, -1, 1) @ LPS``)::

      column i step: ImageOrientationPatient[0:3] * PixelSpacing[1]
      row    j step: ImageOrientationPatient[3:6] * PixelSpacing[0]
      slice  k step: (IPP[last] - IPP[first]) / (S - 1)   (IPP of the slices in volume order)
      origin:        ImagePositionPatient of slice 0

  This is the affine dicom2nifti / ITK write for the same slices in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.readers import LazyVolume, Volume, is_nifti
from ..errors import DataError

__all__ = ["VolumeGeometry", "GeometryError", "LPS_TO_RAS", "dicom_affine", "volume_geometry"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryError(DataError):
    """The volume's position in space cannot be known (tags missing or inconsistent)."""


@dataclass(frozen=True)
class VolumeGeometry:
    """Grid of a ``[S, H, W]`` volume: ``affine`` maps NIfTI voxel ``(col, row, slice)`` to RAS mm."""

    kind: str  # "dicom" or "nifti"
    shape: tuple[int, int, int]  # (S, H, W)
    affine: np.ndarray  # 4x4 float64
    spacing_mm: tuple[float, float, float]  # (row, col, slice)

    @property
    def voxel_ml(self) -> float:
        row, col, sl = self.spacing_mm
        return row * col * sl / 1000.0


def dicom_affine(orientation, positions, pixel_spacing, slice_thickness: float | None = None) -> np.ndarray:
    """RAS affine of a DICOM series from its tags (see the module docstring).

    Args:
        orientation: ``ImageOrientationPatient`` (6 numbers: row direction, column direction).
        positions: ``ImagePositionPatient`` of every slice, in volume order (``[S, 3]``).
        pixel_spacing: ``PixelSpacing`` ``(between rows, between columns)`` in mm.
        slice_thickness: used as the slice step along the normal for a single slice.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    row_mm, col_mm = (float(v) for v in pixel_spacing)
    x_dir, y_dir = iop[:3], iop[3:6]
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = np.cross(x_dir, y_dir) * float(slice_thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = x_dir * col_mm
    lps[:3, 1] = y_dir * row_mm
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    return LPS_TO_RAS @ lps


def volume_geometry(volume: Volume | LazyVolume) -> VolumeGeometry:
    """The grid of a DICOM or NIfTI :class:`Volume`.

    Raises:
        GeometryError: a PNG/JPG input, or DICOM without orientation/position/spacing tags.
    """
    shape = tuple(int(n) for n in volume.shape)
    if is_nifti(volume.source):
        affine = np.asarray(volume.meta.get("affine"), dtype=np.float64)
        if affine.shape != (4, 4):
            raise GeometryError(f"{volume.source}: the NIfTI affine is not known")
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # (i, j, k) = (col, row, slice)
        return VolumeGeometry("nifti", shape, affine, (float(zooms[1]), float(zooms[0]), float(zooms[2])))
    orientation = volume.meta.get("image_orientation")
    positions = volume.meta.get("image_positions")
    if volume.units != "HU" or volume.spacing is None or orientation is None or positions is None:
        raise GeometryError(
            f"{volume.source}: no voxel geometry (needs a DICOM series with ImageOrientationPatient, "
            "ImagePositionPatient and PixelSpacing, or a NIfTI volume)"
        )
    if len(positions) != shape[0]:
        raise GeometryError(f"{volume.source}: {len(positions)} slice positions for {shape[0]} slices")
    thickness = volume.meta.get("slice_thickness_mm")
    affine = dicom_affine(orientation, positions, volume.spacing, thickness)
    slice_mm = float(np.linalg.norm(affine[:3, 2]))
    if slice_mm < 1e-6:
        raise GeometryError(f"{volume.source}: first and last slice share one position")
    return VolumeGeometry("dicom", shape, affine, (float(volume.spacing[0]), float(volume.spacing[1]), slice_mm))
