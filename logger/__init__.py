"""Console and file logging for a run, and the TensorBoard writer."""
