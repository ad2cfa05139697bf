"""Data I/O for chest images: DICOM radiographs and CT series, NIfTI, PNG, SIIM-ACR RLE masks,
manifests and synthetic phantoms. See ``docs/data.md``."""
