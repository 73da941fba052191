"""Drift: per-cohort drift detection over devices' mergeable feature summaries."""
