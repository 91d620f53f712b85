"""The evaluation harness: the loopback testbed, the TCP link emulation proxy, network-namespace
link shaping and the child-process helpers.

Used by tests/ and bench/ (they import it; it never imports them), never by the shipped packages
(splitwise_core, policies, cloud_offload, splitwise_device), which it may import. Not in the wheel:
run it from a source checkout with the repository root on sys.path.
"""
