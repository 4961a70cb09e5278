"""`flex`: FlexAttention (arXiv 2407.20228), training-free: attention-guided high-resolution re-injection."""
