"""Latency-driven choice of compression: candidates from the profile's recipes, per-layer steps priced
by the latency table, every decision checked by measuring the compiled model. Nothing here imports TVM:
it builds through ``backend`` and times through ``measure``."""
