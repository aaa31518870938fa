"""Readers on tiny synthetic files: DICOM series, NIfTI with labels, 8-bit and 16-bit PNG."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from ctlesion.data.readers import (
    DicomReader,
    NiftiReader,
    PillowReader,
    Volume,
    read_volume,
    volume_to_samples,
)

SERIES_UID = generate_uid()


def write_dicom(
    path: Path,
    stored: np.ndarray,
    z: float | None,
    *,
    modality: str = "CT",
    slope: float = 2.0,
    intercept: float = -1024.0,
    instance: int | None = 1,
    iop=(1, 0, 0, 0, 1, 0),
    series_uid: str = SERIES_UID,
    slice_location: float | None = None,
    transfer_syntax=ExplicitVRLittleEndian,
    pixel_bytes: bytes | None = None,
) -> Path:
    """A minimal CT (or other modality) slice, 16-bit unsigned."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "PHANTOM-1"
    ds.PatientSex = "F"
    ds.PatientAge = "042Y"
    ds.SeriesInstanceUID = series_uid
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient = [-10.0, -10.0, z]
        if iop is not None:
            ds.ImageOrientationPatient = list(iop)
    if slice_location is not None:
        ds.SliceLocation = slice_location
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [0.7, 0.8]
    ds.SliceThickness = 2.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if pixel_bytes is not None:
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def slice_values(k: int, shape=(16, 16)) -> np.ndarray:
    """Stored values that identify slice k: constant 100*k + column."""
    return (100 * k + np.arange(shape[1], dtype=np.uint16))[None].repeat(shape[0], 0)


@pytest.fixture
def ct_series(tmp_path) -> Path:
    """3 slices at z = -50 (head), -52, -54, with file names in scrambled order and junk."""
    folder = tmp_path / "series"
    folder.mkdir()
    # file name -> (z, instance); names sort opposite to anatomy
    for name, k, z in [("b_10.dcm", 0, -50.0), ("a_2.dcm", 2, -54.0), ("c_1.dcm", 1, -52.0)]:
        write_dicom(folder / name, slice_values(k), z, instance=k + 1)
    (folder / "notes.txt").write_text("not a dicom")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    return folder


def read_quietly(path, **kw) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_volume(path, **kw)


# --------------------------------------------------------------------------- DICOM


def test_dicom_series_sorted_descending_in_hu(ct_series):
    with pytest.warns(UserWarning, match=r"non-DICOM.*notes\.txt") as record:
        vol = read_volume(ct_series)
    assert not any(".DS_Store" in str(w.message) for w in record)
    assert vol.units == "HU" and vol.array.dtype == np.float32 and vol.array.shape == (3, 16, 16)
    # HU = 2 * stored - 1024, slices in head-first order k = 0, 1, 2
    for k in range(3):
        np.testing.assert_array_equal(vol.array[k], 2.0 * slice_values(k) - 1024.0)
    assert [Path(s).name for s in vol.slice_sources] == ["b_10.dcm", "c_1.dcm", "a_2.dcm"]
    assert vol.meta["slice_positions"] == [-50.0, -52.0, -54.0]
    assert vol.meta["sort_key"] == "ImagePositionPatient.normal"
    assert vol.meta["modality"] == "CT" and vol.meta["patient_id"] == "PHANTOM-1"
    assert vol.meta["patient_sex"] == "F" and vol.meta["patient_age"] == "042Y"
    assert vol.meta["series_uid"] == SERIES_UID
    assert vol.meta["slice_spacing_mm"] == pytest.approx(2.0)
    assert vol.spacing == (0.7, 0.8)
    assert vol.labels is None


def test_dicom_samples_ids_and_window(ct_series):
    vol = read_quietly(ct_series)
    samples = list(volume_to_samples(vol, window="400:40"))
    assert [s.sample_id for s in samples] == ["series#0000", "series#0001", "series#0002"]
    assert [s.slice_index for s in samples] == [0, 1, 2]
    assert samples[0].source.endswith("b_10.dcm") and samples[0].target is None
    assert samples[0].image.shape == (1, 16, 16)
    # slice 0 stored 0..15 -> HU -1024..-994 -> below the 400:40 window -> 0
    assert float(samples[0].image.max()) == 0.0
    assert samples[0].meta["window"] == "W400:L40"
    assert samples[2].meta["slice_position"] == -54.0
    with pytest.raises(ValueError, match="as_stored.*Hounsfield"):
        next(volume_to_samples(vol, window="as_stored"))


def test_dicom_sort_fallbacks(tmp_path):
    # No ImagePositionPatient: SliceLocation descending.
    a = tmp_path / "sl"
    a.mkdir()
    for name, k, loc in [("1.dcm", 2, 5.0), ("2.dcm", 0, 9.0), ("3.dcm", 1, 7.0)]:
        write_dicom(a / name, slice_values(k), None, slice_location=loc, instance=None)
    vol = read_quietly(a)
    assert vol.meta["sort_key"] == "SliceLocation"
    assert [int(vol.array[k, 0, 0]) for k in range(3)] == [2 * 100 * k - 1024 for k in range(3)]
    # Only InstanceNumber: ascending instance number.
    b = tmp_path / "inst"
    b.mkdir()
    for name, k in [("x.dcm", 1), ("y.dcm", 0), ("z.dcm", 2)]:
        write_dicom(b / name, slice_values(k), None, instance=k + 1)
    vol = read_quietly(b)
    assert vol.meta["sort_key"] == "InstanceNumber" and vol.meta["slice_positions"] is None
    assert [Path(s).name for s in vol.slice_sources] == ["y.dcm", "x.dcm", "z.dcm"]


def test_dicom_flipped_orientation_uses_slice_normal(tmp_path):
    """Normal = row x col; with the column direction flipped the normal is -z."""
    folder = tmp_path / "flip"
    folder.mkdir()
    for k, z in enumerate([-54.0, -52.0, -50.0]):
        write_dicom(folder / f"{k}.dcm", slice_values(k), z, iop=(1, 0, 0, 0, -1, 0))
    vol = read_quietly(folder)
    assert vol.meta["slice_positions"] == [54.0, 52.0, 50.0]  # projections on the normal


def test_single_dicom_file(ct_series):
    vol = read_volume(ct_series / "c_1.dcm")
    assert vol.array.shape == (1, 16, 16) and vol.slice_sources == [str(ct_series / "c_1.dcm")]
    (sample,) = volume_to_samples(vol)
    assert sample.sample_id == "c_1" and sample.spacing == (0.7, 0.8)


def test_dicom_without_suffix_detected_by_preamble(tmp_path):
    path = write_dicom(tmp_path / "IM0001", slice_values(1), -1.0)
    assert read_volume(path).units == "HU"


def test_non_ct_rejected_unless_allowed(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    for k in range(2):
        write_dicom(folder / f"{k}.dcm", slice_values(k), -float(k), modality="MR")
    with pytest.raises(ValueError, match=r"0\.dcm.*modality 'MR'.*allow_non_ct"):
        read_volume(folder)
    vol = read_volume(folder, allow_non_ct=True)
    assert vol.meta["modality"] == "MR" and vol.array.shape == (2, 16, 16)


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.warns(UserWarning, match="junk.txt"), pytest.raises(ValueError, match="no DICOM"):
        DicomReader().read(tmp_path)


def test_mixed_slice_sizes_name_the_file(tmp_path):
    write_dicom(tmp_path / "a.dcm", slice_values(0), 0.0)
    write_dicom(tmp_path / "b.dcm", slice_values(1, (16, 20)), -2.0)
    with pytest.raises(ValueError, match=r"b\.dcm.*16x20.*a\.dcm.*16x16"):
        read_volume(tmp_path)


def test_mixed_series_rejected(tmp_path):
    write_dicom(tmp_path / "a.dcm", slice_values(0), 0.0)
    write_dicom(tmp_path / "b.dcm", slice_values(1), -2.0, series_uid=generate_uid())
    with pytest.raises(ValueError, match="mixes 2 series"):
        read_volume(tmp_path)


def test_duplicate_positions_and_gaps_warn(tmp_path):
    for name, z in [("a.dcm", 0.0), ("b.dcm", 0.0), ("c.dcm", -2.0), ("d.dcm", -8.0)]:
        write_dicom(tmp_path / name, slice_values(0), z)
    with pytest.warns(UserWarning) as record:
        vol = read_volume(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "share a position" in messages and "b.dcm" in messages
    assert "uneven slice spacing" in messages
    assert vol.array.shape[0] == 4


def test_undecodable_pixel_data_names_file_and_decoders(tmp_path):
    from pydicom.encaps import encapsulate

    path = write_dicom(
        tmp_path / "jpeg.dcm", slice_values(0), 0.0, transfer_syntax=JPEGLosslessSV1,
        pixel_bytes=encapsulate([b"\xff\xd8 not a jpeg stream \xff\xd9"]),
    )
    with pytest.raises(ValueError, match=r"jpeg\.dcm.*pylibjpeg pylibjpeg-libjpeg"):
        read_volume(path)


def test_truncated_dicom_file_names_file(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", slice_values(0), 0.0)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"t\.dcm"):
        read_volume(path)


# --------------------------------------------------------------------------- NIfTI


def write_nifti(path: Path, xyz: np.ndarray, zooms=(0.8, 0.6, 2.5)) -> Path:
    img = nib.Nifti1Image(xyz, np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def test_nifti_round_trip_with_labels(tmp_path):
    x, y, z = 12, 10, 4
    hu = np.zeros((x, y, z), np.float32)
    hu[3, 7, 2] = 123.0  # voxel (i=3, j=7, k=2) -> slice 2, row 7, col 3
    hu[:, :, 0] = -1000.0
    labels = np.zeros((x, y, z), np.uint8)
    labels[1:12, 0:10, 1] = 3  # a consolidation block on slice 1
    img_path = write_nifti(tmp_path / "ct.nii.gz", hu)
    lab_path = write_nifti(tmp_path / "ct_seg.nii.gz", labels)
    vol = read_volume(img_path, labels=lab_path)
    assert vol.units == "HU" and vol.array.shape == (z, y, x) and vol.array.dtype == np.float32
    assert vol.array[2, 7, 3] == 123.0 and vol.array[0].max() == -1000.0
    assert vol.spacing == pytest.approx((0.6, 0.8))
    assert vol.labels.dtype == np.uint8 and vol.labels.shape == (z, y, x)
    assert vol.meta["axcodes"] == "RAS" and vol.meta["slice_thickness_mm"] == pytest.approx(2.5)
    samples = list(volume_to_samples(vol, mask_type="both", min_area=10))
    assert [s.sample_id for s in samples] == [f"ct#{i:04d}" for i in range(4)]
    assert samples[0].target["labels"].numel() == 0  # labelled volume: negatives are empty, not None
    assert samples[1].target["labels"].tolist() == [2]
    assert samples[1].target["boxes"].tolist() == [[1.0, 0.0, 12.0, 10.0]]
    assert samples[0].meta["window"] == "W1500:L-600"


def test_nifti_scl_slope_applied(tmp_path):
    img = nib.Nifti1Image(np.full((4, 4, 2), 100, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii"))
    vol = read_volume(tmp_path / "s.nii")
    assert np.all(vol.array == -824.0)


def test_nifti_label_shape_mismatch_names_both(tmp_path):
    img_path = write_nifti(tmp_path / "img.nii.gz", np.zeros((8, 8, 3), np.float32))
    lab_path = write_nifti(tmp_path / "lab.nii.gz", np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"lab\.nii\.gz.*img\.nii\.gz"):
        read_volume(img_path, labels=lab_path)


def test_nifti_label_values_checked(tmp_path):
    img_path = write_nifti(tmp_path / "img.nii.gz", np.zeros((8, 8, 2), np.float32))
    labels = np.zeros((8, 8, 2), np.uint8)
    labels[0, 0, 0] = 7
    lab_path = write_nifti(tmp_path / "lab.nii.gz", labels)
    with pytest.raises(ValueError, match=r"lab\.nii\.gz.*img\.nii\.gz.*\[7\]"):
        NiftiReader(labels=lab_path).read(img_path)


def test_nifti_nan_and_missing_label_file(tmp_path):
    data = np.zeros((4, 4, 2), np.float32)
    data[0, 0, 0] = np.nan
    bad = write_nifti(tmp_path / "nan.nii", data)
    with pytest.raises(ValueError, match=r"nan\.nii.*NaN"):
        read_volume(bad)
    good = write_nifti(tmp_path / "ok.nii", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(FileNotFoundError, match="nolabels.nii"):
        read_volume(good, labels=tmp_path / "nolabels.nii")


# --------------------------------------------------------------------------- images


def test_png_8bit_is_stored_units(tmp_path):
    arr = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(arr, mode="L").save(tmp_path / "slice.png")
    vol = read_volume(tmp_path / "slice.png")
    assert vol.units == "stored" and vol.spacing is None and vol.array.dtype == np.uint8
    np.testing.assert_array_equal(vol.array[0], arr)
    (sample,) = volume_to_samples(vol)
    assert sample.sample_id == "slice" and sample.target is None
    np.testing.assert_allclose(sample.image[0].numpy(), arr / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"slice\.png.*already windowed"):
        next(volume_to_samples(vol, window="lung"))


def test_rgb_jpeg_converted_to_grey(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., :] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.jpg", quality=100)
    vol = PillowReader().read(tmp_path / "c.jpg")
    assert vol.array.shape == (1, 8, 8) and abs(int(vol.array.mean()) - 200) <= 2
    assert vol.meta["mode"] == "RGB"


def test_png_16bit_rejected(tmp_path):
    Image.fromarray(np.full((6, 6), 3000, np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
    with pytest.raises(ValueError, match=r"deep\.png.*units are unknown"):
        read_volume(tmp_path / "deep.png")


def test_resize_scales_image_labels_and_spacing(tmp_path):
    hu = np.full((32, 16, 1), -1000.0, np.float32)
    labels = np.zeros((32, 16, 1), np.uint8)
    labels[0:16, :, 0] = 2  # left half (x < 16) is GGO
    img_path = write_nifti(tmp_path / "r.nii", hu, zooms=(0.5, 1.0, 1.0))
    lab_path = write_nifti(tmp_path / "r_lab.nii", labels, zooms=(0.5, 1.0, 1.0))
    vol = read_volume(img_path, labels=lab_path)
    assert vol.array.shape == (1, 16, 32)
    (sample,) = volume_to_samples(vol, size=8, min_area=0)
    assert sample.image.shape == (1, 8, 8)
    assert sample.spacing == pytest.approx((1.0 * 16 / 8, 0.5 * 32 / 8))
    mask = sample.target["masks"][0].numpy()
    assert mask.shape == (8, 8) and mask[:, :4].all() and not mask[:, 4:].any()
    assert set(np.unique(sample.target["masks"].numpy())) <= {0, 1}
    assert sample.sample_id == "r"


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("missing.png", None, FileNotFoundError, "missing.png"),
        ("data.xyz", b"hello", ValueError, r"data\.xyz.*cannot tell the format"),
        ("broken.png", b"not a png", ValueError, r"broken\.png.*not a readable image"),
        ("broken.nii.gz", b"garbage", ValueError, r"broken\.nii\.gz.*not a readable NIfTI"),
    ],
)
def test_read_volume_errors_name_the_file(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        read_volume(path)


def test_reader_options_checked(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"p\.png.*labels.*PillowReader"):
        read_volume(tmp_path / "p.png", labels="x.nii")
    assert PillowReader().can_read("a.PNG") and not PillowReader().can_read("a.nii.gz")
    assert NiftiReader().can_read("a.nii.gz") and NiftiReader().can_read("b.nii")


def test_pydicom_reads_back_what_we_wrote(tmp_path):
    """Guard for the fixture itself: stored values and rescale survive the round trip."""
    path = write_dicom(tmp_path / "g.dcm", slice_values(3), 1.0)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, slice_values(3))
    assert float(ds.RescaleSlope) == 2.0
