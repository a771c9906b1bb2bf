"""Training data: record formats, tokenisation with image-aware truncation, loaders and mixtures."""
