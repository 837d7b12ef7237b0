"""Transformer² adaptation of a trained run: SVF experts, two-pass inference (CEM mixture,
classifier expert) and test-time learning of the memory and the SVF vectors together.
See docs/adaptation.md."""
