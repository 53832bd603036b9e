"""Entry points: the stage runner, decoding and data/asset preparation (``python -m stages``)."""
