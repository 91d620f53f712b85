"""The MQTT layer against a real broker: request/response with CorrelationData, subscriptions
restored after a broker restart, and a clear error when no broker is there."""

from __future__ import annotations

import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from cloud_offload.mqtt import BrokerSettings, BrokerUnavailableError, MqttConnection, RpcClient
from splitwise_core.errors import InvalidArgumentError

pytestmark = pytest.mark.broker


def subscriptions_settled(conn: MqttConnection, wait_s: float = 5.0) -> None:
    """Returns once the broker has handled every SUBSCRIBE `conn` sent so far (e.g. an RpcClient's
    reply topic, or those restored on reconnect): it answers one client's packets in order, so the
    SUBACK of a fresh subscription comes after theirs."""
    conn.subscribe(f"test/settled/{uuid.uuid4().hex}", lambda _msg: None, wait_s=wait_s)


def echo_server(broker, topic: str) -> MqttConnection:  # type: ignore[no-untyped-def]
    server = MqttConnection(BrokerSettings(broker.host, broker.port, reconnect_max_s=2), f"echo-{uuid.uuid4().hex[:6]}")

    def answer(msg: mqtt.MQTTMessage) -> None:
        server.publish(
            msg.properties.ResponseTopic, b"echo:" + msg.payload, correlation_data=msg.properties.CorrelationData
        )

    server.subscribe(topic, answer)
    server.start()
    return server


def test_request_response_matches_replies_by_correlation(mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    server = echo_server(mosquitto_broker, "test/echo")
    client = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port), "rpc-client")
    client.start()
    try:
        rpc = RpcClient(client, f"test/reply/{uuid.uuid4().hex}")
        subscriptions_settled(client)
        subscriptions_settled(server)
        futures = [rpc.request("test/echo", f"m{i}".encode())[1] for i in range(20)]
        replies = [f.result(timeout=5).payload for f in futures]
        assert replies == [f"echo:m{i}".encode() for i in range(20)]
    finally:
        client.stop()
        server.stop()


def test_subscriptions_survive_a_broker_restart(mosquitto_broker) -> None:  # type: ignore[no-untyped-def]
    server = echo_server(mosquitto_broker, "test/echo")
    client = MqttConnection(BrokerSettings(mosquitto_broker.host, mosquitto_broker.port, reconnect_max_s=2), "rpc-2")
    client.start()
    try:
        rpc = RpcClient(client, "test/reply/restart")
        subscriptions_settled(client)
        subscriptions_settled(server)
        assert rpc.request("test/echo", b"before")[1].result(timeout=5).payload == b"echo:before"
        mosquitto_broker.stop()
        deadline = time.monotonic() + 10
        while (client.connected.is_set() or server.connected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not client.connected.is_set() and not server.connected.is_set()
        mosquitto_broker.start()
        assert client.connected.wait(15) and server.connected.wait(15)
        # Nothing subscribes again here: only the subscriptions the connections restored themselves.
        subscriptions_settled(client)
        subscriptions_settled(server)
        after = rpc.request("test/echo", b"after")[1]
        try:
            reply = after.result(timeout=10)
        except TimeoutError:
            pytest.fail("no echo after the broker restart: a subscription was not restored on reconnect")
        assert reply.payload == b"echo:after"
    finally:
        client.stop()
        server.stop()


def test_no_broker_is_a_clear_error() -> None:
    conn = MqttConnection(BrokerSettings("127.0.0.1", 1), "nobody")
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        conn.start(timeout=1.0)
    conn.stop()


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://host:notaport"])
def test_bad_broker_urls(url: str) -> None:
    with pytest.raises(InvalidArgumentError):
        BrokerSettings.from_url(url)


def test_broker_url_parts() -> None:
    s = BrokerSettings.from_url("mqtts://ann:p%40ss@broker.local")
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.local", 8883, True, "ann", "p@ss")
