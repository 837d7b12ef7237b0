"""Gradient coordination: components, optimizers, isolation, checkpointing, guards, checks."""
