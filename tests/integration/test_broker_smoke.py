"""The broker fixture works: a real mosquitto, a real paho MQTT v5 client, one message each way."""

from __future__ import annotations

import os
import queue
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.broker


def test_publish_and_receive_over_mqtt_v5(mosquitto_broker) -> None:
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    topic = f"splitwise/test/{uuid.uuid4().hex}"

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: received.put(msg)
    client.on_subscribe = lambda _c, _u, _mid, _codes, _props: subscribed.put(True)
    client.connect(mosquitto_broker.host, mosquitto_broker.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.get(timeout=5)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"corr-1"
        client.publish(topic, b"hello broker", qos=1, properties=props).wait_for_publish(timeout=5)
        msg = received.get(timeout=5)
    finally:
        client.loop_stop()
        client.disconnect()

    assert msg.topic == topic
    assert msg.payload == b"hello broker"
    assert msg.properties.CorrelationData == b"corr-1"


def test_fixture_stops_only_its_own_broker(tmp_path) -> None:
    from tests.conftest import MosquittoBroker

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = MosquittoBroker(tmp_path / "a"), MosquittoBroker(tmp_path / "b")
    first.start()
    second.start()
    try:
        second_pid = second.pid
        first.stop()
        assert second_pid is not None
        os.kill(second_pid, 0)  # still alive: raises if the fixture killed the wrong broker
    finally:
        first.stop()
        second.stop()
