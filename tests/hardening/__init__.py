"""Hardening tests: generated models, numeric edges and injected faults (see docs/guarantees.md)."""
