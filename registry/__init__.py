"""MLflow registration of gated models: versions, tags, aliases (``challenger``, ``champion``)."""
