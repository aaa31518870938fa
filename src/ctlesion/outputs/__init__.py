"""What a user takes home from ``ctlesion predict`` on a CT volume.

* :mod:`.geometry`: the voxel grid of a DICOM series or NIfTI volume as a NIfTI (RAS) affine.
* :mod:`.assemble`: slice detections gathered back into one label volume per input.
* :mod:`.lung`: a classical lung mask (HU threshold, connected components, hole filling).
* :mod:`.burden`: 3-D lesions (connected components) and the lesion burden in mL and % of lung.
* :mod:`.nifti`, :mod:`.dicom_seg`: label / instance NIfTI and DICOM-SEG (highdicom) writers.
* :mod:`.report`: a self-contained HTML report.
* :mod:`.writer`: the per-volume folder (``DIR/<volume>/``) and ``DIR/report.html``.
"""
