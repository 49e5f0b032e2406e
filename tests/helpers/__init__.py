"""Shared test helpers: small models, the independent GradNorm reference, recorded runs."""
