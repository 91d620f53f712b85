"""The learned planner's training side, not in the wheel (devices never get it): scenario files
(`scenario`), their random processes (`processes`), and — still to come — the simulator, PPO
training and ONNX export (issue 12; docs/simulator.md).

It stands on the shipped packages and never the reverse (tests/unit/test_layers.py).
"""
