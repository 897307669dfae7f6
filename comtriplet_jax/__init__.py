"""COM-Triplet deep clustering and BIIGMA-Net for imbalanced skin-lesion detection."""

__version__ = "0.1.0"
