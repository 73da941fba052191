"""Rollouts: the staged delivery of a model version to a fleet, its state machines, health gate and controller."""
