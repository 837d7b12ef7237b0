"""Byte corpora and synthetic tasks."""
