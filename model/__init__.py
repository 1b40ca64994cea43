"""Models, losses and metrics a config names by ``arch``, ``loss`` and ``metrics`` (``MODELS``, ``LOSSES``, ``METRICS``)."""
