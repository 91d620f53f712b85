"""Helpers shared by the tests (test-model factory)."""
