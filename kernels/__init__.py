"""Triton kernels of the project; each file holds its math, torch reference, kernel and launcher."""
from kernels.contrast_softmax import contrast_softmax  # noqa: F401
