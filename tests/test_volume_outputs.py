"""Volume outputs of predict: affine, label/instance NIfTI, 3-D lesions, burden, lung mask,
DICOM-SEG, summary.json and the HTML report (tiny synthetic series and volumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _helpers import write_ct_series

from ctlesion.data.readers import read_volume
from ctlesion.outputs.burden import instance_volume, lesion_burden
from ctlesion.outputs.geometry import volume_geometry
from ctlesion.outputs.lung import lung_mask
from ctlesion.outputs.nifti import read_label_nifti, write_label_nifti

SIZE = 32


def _rotation(ax: float, az: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _oblique_series(folder: Path, n: int = 4, marker=(2, 5, 7)) -> tuple[Path, np.ndarray]:
    """A series tilted and rotated in space, files written in shuffled order, pixel spacing
    0.7 (rows) x 0.9 (columns), slice step 2.5 mm; one 1000 HU marker voxel in file
    ``marker[0]`` at row ``marker[1]``, column ``marker[2]``."""
    import pydicom

    slices = [np.full((SIZE, SIZE + 8), -800, dtype=np.int16) for _ in range(n)]
    k, r, c = marker
    slices[k][r, c] = 1000
    write_ct_series(folder, slices)
    rot = _rotation(0.3, 0.5)
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-20.0, 35.0, 100.0])
    for i in range(n):
        path = folder / f"s{i}.dcm"
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [0.7, 0.9]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in origin + normal * 2.5 * ((i * 3) % n)]  # shuffled
        ds.save_as(path)
    return folder, rot


def test_dicom_affine_is_the_hand_derived_lps_to_ras_of_every_slice(tmp_path):
    import pydicom

    folder, rot = _oblique_series(tmp_path / "series")
    volume = read_volume(folder)
    geo = volume_geometry(volume)
    assert geo.kind == "dicom" and geo.shape == (4, SIZE, SIZE + 8)
    for s, f in enumerate(volume.slice_sources):
        ds = pydicom.dcmread(f)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        flip = np.array([-1.0, -1.0, 1.0])  # LPS -> RAS
        # voxel (column 0, row 0, slice s) is the slice's ImagePositionPatient
        assert geo.affine @ [0, 0, s, 1] == pytest.approx(np.r_[flip * ipp, 1], abs=1e-6)
        # one column to the right moves along the row direction by the column spacing (0.9)
        step_col = geo.affine @ [1, 0, s, 1] - geo.affine @ [0, 0, s, 1]
        assert step_col[:3] == pytest.approx(flip * iop[:3] * 0.9, abs=1e-6)
        step_row = geo.affine @ [0, 1, s, 1] - geo.affine @ [0, 0, s, 1]
        assert step_row[:3] == pytest.approx(flip * iop[3:] * 0.7, abs=1e-6)
    assert geo.spacing_mm == pytest.approx((0.7, 0.9, 2.5))
    assert geo.voxel_ml == pytest.approx(0.7 * 0.9 * 2.5 / 1000)


def test_label_nifti_overlays_the_series_as_simpleitk_reads_it(tmp_path):
    """Independent check: SimpleITK reads the series and our label NIfTI; the labelled
    voxel's physical point falls on the marker voxel of the DICOM pixels."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (dev extra) is not installed")
    folder, _ = _oblique_series(tmp_path / "series")
    volume = read_volume(folder)
    s, r, c = (int(v[0]) for v in np.nonzero(volume.array > 500))
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[s, r, c] = 2
    out = write_label_nifti(tmp_path / "lesions.nii.gz", labels, volume_geometry(volume))

    back, affine = read_label_nifti(out)
    assert back.shape == labels.shape and (back == labels).all()
    assert affine == pytest.approx(volume_geometry(volume).affine, abs=1e-5)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    dicom = reader.Execute()
    label_img = sitk.ReadImage(str(out))
    assert label_img.GetSize() == dicom.GetSize()
    z, y, x = (int(v[0]) for v in np.nonzero(sitk.GetArrayFromImage(label_img)))
    point = label_img.TransformIndexToPhysicalPoint((x, y, z))
    index = dicom.TransformPhysicalPointToIndex(point)
    assert dicom[index] == 1000  # the marker, in SimpleITK's own reading of the series
    corners = lambda img: sorted(  # noqa: E731
        np.round(img.TransformIndexToPhysicalPoint((i, j, k)), 3).tolist()
        for i in (0, img.GetSize()[0] - 1) for j in (0, img.GetSize()[1] - 1) for k in (0, img.GetSize()[2] - 1))
    assert corners(label_img) == corners(dicom)


def test_nifti_input_keeps_its_affine(tmp_path):
    import nibabel as nib

    affine = np.array([[-0.7, 0, 0, 50], [0, 0.6, 0.1, -20], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.full((SIZE, 24, 3), -700, np.int16), affine), tmp_path / "v.nii.gz")
    volume = read_volume(tmp_path / "v.nii.gz")
    geo = volume_geometry(volume)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[1, 3, 4] = 1  # slice 1, row (j) 3, column (i) 4
    path = write_label_nifti(tmp_path / "l.nii.gz", labels, geo)
    image = nib.load(str(path))
    assert image.shape == (SIZE, 24, 3) and np.allclose(image.affine, affine)
    assert np.asarray(image.dataobj)[4, 3, 1] == 1 and np.asarray(image.dataobj).sum() == 1


def test_instance_volume_joins_overlapping_neighbours_and_keeps_classes_apart():
    labels = np.zeros((5, 20, 20), np.uint8)
    labels[1:4, 2:6, 2:6] = 1        # one GGO over three slices
    labels[3, 5:8, 5:8] = 1          # overlaps it diagonally on slice 3: same lesion
    labels[0, 15:18, 15:18] = 1      # a second GGO
    labels[2, 10:14, 10:14] = 2      # a consolidation
    labels[3, 10:12, 14:16] = 1      # touches the consolidation but is GGO: its own lesion
    ids, table = instance_volume(labels, ("GGO", "C"))
    assert [r["class"] for r in table] == ["GGO", "GGO", "GGO", "C"]
    assert len(np.unique(ids)) - 1 == 4
    big = table[0]
    assert big["voxels"] == 3 * 16 + 9 - 1 and big["slices"] == [1, 3]
    for row in table:
        assert (ids == row["id"]).sum() == row["voxels"]
        assert (labels[ids == row["id"]] == row["class_id"]).all()


def test_lesion_burden_counts_millilitres_and_share_of_lung():
    labels = np.zeros((4, 12, 10), np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels GGO, inside the lung
    labels[1, 5:7, 0:2] = 1    # 4 voxels GGO just outside, touching it: joins the lung
    labels[3, 8:11, 5:8] = 2   # 9 voxels C, far from the lung: a false positive
    lung = np.zeros(labels.shape, bool)
    lung[:, :5, :] = True      # 200 voxels
    ids, table = instance_volume(labels, ("GGO", "C"))
    burden = lesion_burden(labels, ids, table, ("GGO", "C"), voxel_ml=0.5, lung=lung, lung_method="test")
    assert burden["classes"]["GGO"] == {"voxels": 12, "volume_ml": 6.0, "lesions": 2, "largest_ml": 4.0}
    assert burden["classes"]["C"]["volume_ml"] == 4.5  # counted in its class...
    assert burden["all_lesions"]["outside_lung_ml"] == 4.5  # ...but not in the lung share
    assert burden["lung"]["voxels"] == 200 + 4 and burden["lung"]["mask_ml"] == 100.0
    assert burden["percent_lung_affected"] == pytest.approx(100 * 12 / 204, abs=1e-3)
    empty = lesion_burden(np.zeros_like(labels), np.zeros(labels.shape, np.uint16), [], ("GGO",), 1.0,
                          np.zeros(labels.shape, bool), "t")
    assert empty["percent_lung_affected"] is None and empty["classes"]["GGO"]["lesions"] == 0


def _chest_phantom(shape=(6, 64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue body holding two lungs, each with a vessel inside."""
    s, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    hu = np.full(shape, -1000.0, np.float32)
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    lungs = np.zeros((h, w), bool)
    for cx in (0.3 * w, 0.7 * w):
        lungs |= ((yy - h / 2) / (0.28 * h)) ** 2 + ((xx - cx) / (0.14 * w)) ** 2 < 1
    truth = np.zeros(shape, bool)
    for k in range(1, s - 1):
        hu[k][body] = 40
        hu[k][lungs] = -850
        hu[k][int(h / 2), int(0.3 * w)] = 60  # a vessel, enclosed: a hole to fill
        truth[k] = lungs
    hu[0][body] = hu[-1][body] = 40
    return hu, truth


def test_lung_mask_finds_both_lungs_fills_vessels_and_drops_outside_air():
    hu, truth = _chest_phantom()
    mask = lung_mask(hu)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.99
    assert not mask[:, 0, 0].any()  # outside air touches the border: not lung
    assert lung_mask(np.full((2, 8, 8), 40.0)).sum() == 0
    with pytest.raises(ValueError, match="S, H, W"):
        lung_mask(np.zeros((4, 4)))


def test_dicom_seg_is_read_back_by_highdicom_and_references_the_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom

    from ctlesion.outputs.dicom_seg import write_dicom_seg

    folder = write_ct_series(tmp_path / "series", [np.full((SIZE, SIZE), -800, np.int16)] * 3)
    for f in folder.glob("*.dcm"):  # anonymised like COVID-CT-MD: Type 2 patient attributes absent
        ds = pydicom.dcmread(f)
        del ds.PatientName, ds.PatientBirthDate
        ds.save_as(f)
    volume = read_volume(folder)
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[1, 4:9, 4:9] = 1
    labels[2, 10:12, 3:20] = 2
    path = write_dicom_seg(tmp_path / "seg.dcm", labels, volume.slice_sources, ("GGO", "C"),
                           model_name="tiny", version="0")
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == 2
    assert [seg.get_segment_description(i).SegmentLabel for i in (1, 2)] == ["GGO", "C"]
    source = pydicom.dcmread(volume.slice_sources[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.slice_sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2],
                                               ignore_spatial_locations=True)
    assert pixels.shape == (3, SIZE, SIZE, 2)
    assert (pixels[..., 0] == (labels == 1)).all() and (pixels[..., 1] == (labels == 2)).all()


def test_paint_detections_resizes_masks_back_and_lets_the_higher_score_win():
    import torch

    from ctlesion.outputs.assemble import paint_detections

    masks = torch.zeros((3, 16, 16), dtype=torch.bool)
    masks[0, 0:8, 0:8] = True    # GGO, score 0.9
    masks[1, 4:12, 4:12] = True  # C, score 0.6: under the GGO where they overlap
    masks[2, :, :] = True        # lung: painted first, under every lesion
    pred = {"masks": masks, "labels": torch.tensor([2, 3, 1]), "scores": torch.tensor([0.9, 0.6, 0.99])}
    out = paint_detections(pred, ("lung", "GGO", "C"), (32, 32))  # the model ran on half-size slices
    assert out.shape == (32, 32)
    assert (out[0:16, 0:16] == 2).all()                      # GGO, scaled x2
    assert (out[16:24, 16:24] == 3).all() and out[8, 20] == 3  # C where the GGO is not
    assert out[30, 30] == 1 and out[0, 30] == 1               # lung elsewhere
    assert paint_detections(None, ("GGO",), (4, 4)).sum() == 0
