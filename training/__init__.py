"""The learned planner's training side, not in the wheel (devices never get it): scenario files
(`scenario`), their random processes (`processes`), the simulated device (`simulator`), the gymnasium
environment (`env`), the policy network (`policy`), imitation + PPO (`ppo`), the ONNX export
(`export`) and the command line (`cli`: ``python -m training``). docs/simulator.md, docs/policy.md.

It stands on the shipped packages and never the reverse (tests/unit/test_layers.py).
"""
