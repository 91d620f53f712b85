"""The offload protocol (specified in ``docs/protocol.md``): MQTT topic names (:mod:`.topics`) and
the binary segment frames a device and a worker exchange (:mod:`.frames`). It moves bytes and knows
no planning. The app ↔ device JSON messages are the device's own API (``splitwise_device.app_messages``).
"""
