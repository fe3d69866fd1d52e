"""Training: dataset readers, the training entry point and sample data writers."""
