"""Console and file logging for a run, and the writer its numbers go to (TensorBoard and the logger parts)."""
