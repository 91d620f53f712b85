"""Offload protocol (topics, frames), the edge-side client and the cloud worker service."""
