"""Splitwise edge agent: runs LLMs on an edge device together with cloud workers."""

__version__ = "0.1.0"
