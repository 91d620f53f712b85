"""The learned planner's training side, not in the wheel (devices never get it): scenario files
(`scenario`), their random processes (`processes`), the simulated device (`simulator`), and — still
to come — the gymnasium environment, PPO training and ONNX export (issue 12; docs/simulator.md).

It stands on the shipped packages and never the reverse (tests/unit/test_layers.py).
"""
