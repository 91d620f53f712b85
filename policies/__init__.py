"""Planners: map an observation to a partition plan. Knows nothing of MQTT."""
