"""Splitwise's ground floor: what every service builds on and that knows nothing of them.

The Rust extension (:mod:`splitwise_core._core`), the errors, codecs, Lyapunov queues, the engine,
tokenizer and shards, systemd notification, the config machinery, the profiler and the profile
file format. Nothing here imports ``policies``, ``cloud_offload`` or ``splitwise_device``
(tests/unit/test_layers.py holds it).
"""

__version__ = "0.1.0"
