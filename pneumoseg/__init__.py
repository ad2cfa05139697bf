"""pneumoseg: multi-task scSE U-Net pneumothorax segmentation and classification (patent CN114743000A)."""

__version__ = "0.1.0"
