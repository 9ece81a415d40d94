"""Compression driven by data: each family (prune, low-rank, quantize) as a pure pass plus the
calibration, reconstruction and error measurement around it, and one recipe per family (``recipes``)."""
