"""Splitwise edge agent: runs LLMs on an edge device together with cloud workers."""
