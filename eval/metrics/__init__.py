"""Benchmark metrics: CIDEr-D, VQA accuracy, ROC-AUC."""
