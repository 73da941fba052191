"""Packaging: export, quantization, per-tier conversion and budgets, the microcontroller arena and AOT build."""
