"""nnxai: lesion-by-lesion explanations for nnU-Net v2 segmentation models."""

__version__ = "0.1.0"
