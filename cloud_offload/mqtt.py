"""One MQTT v5 connection (paho-mqtt 2.x) with what both services need, and a request/response
client after paho's own RPC example: a private reply topic, CorrelationData per request.

Reconnection is paho's built-in (``reconnect_delay_set`` + ``loop_start``); subscriptions are
restored in ``on_connect`` because a broker restarted without persistence has forgotten them.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from splitwise_device.errors import InvalidArgumentError, SplitwiseError

log = logging.getLogger(__name__)

MessageHandler = Callable[[mqtt.MQTTMessage], None]


class BrokerUnavailableError(SplitwiseError, ConnectionError):
    """The broker could not be reached (yet) or refused the connection."""


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, default port 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise InvalidArgumentError(f"broker URL must look like mqtt://host:port or mqtts://host:port, got {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise InvalidArgumentError(f"broker URL has a bad port: {url!r}") from None
        fields: dict[str, Any] = {"host": parts.hostname, "port": port, "tls": tls}
        if parts.username:
            fields["username"] = unquote(parts.username)
        if parts.password:
            fields["password"] = unquote(parts.password)
        fields.update(overrides)
        return cls(**fields)


class MqttConnection:
    """A paho client whose network loop runs in paho's thread."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        *,
        will: tuple[str, bytes, bool] | None = None,
        will_delay_s: int = 0,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.connected = threading.Event()
        self._subscriptions: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._pending_subacks: dict[int, threading.Event] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(
                ca_certs=settings.ca_file,
                certfile=settings.cert_file,
                keyfile=settings.key_file,
                cert_reqs=ssl.CERT_NONE if settings.tls_insecure else ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(settings.tls_insecure)
        if will is not None:
            topic, payload, retain = will
            props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            if will_delay_s:
                props.WillDelayInterval = will_delay_s
            client.will_set(topic, payload, qos=1, retain=retain, properties=props)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client

    def add_on_connect(self, hook: Callable[[], None]) -> None:
        """Runs after every (re)connect, once subscriptions are restored (e.g. republish status)."""
        self._on_connect_hooks.append(hook)

    def start(self, timeout: float | None = 10.0) -> None:
        """Starts connecting in the background; waits up to `timeout` s for the first CONNACK
        (None: do not wait). paho keeps retrying afterwards either way."""
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = 0
        self.client.connect_async(
            self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s, properties=connect_props
        )
        self.client.loop_start()
        if timeout is not None and not self.connected.wait(timeout):
            raise BrokerUnavailableError(
                f"no connection to the broker at {self.settings.host}:{self.settings.port} within {timeout:g}s"
            )

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1, *, wait_s: float | None = None) -> None:
        """Subscribes now if connected (and on every reconnect). With `wait_s`, waits that long for
        the broker's SUBACK, so that a message published right after is sure to be delivered."""
        with self._lock:
            self._subscriptions[topic] = (qos, handler)
        if not self.connected.is_set():
            if wait_s is not None:
                raise BrokerUnavailableError(f"cannot wait for a SUBACK on {topic!r}: not connected")
            return
        acked = threading.Event()
        with self._lock:
            result, mid = self.client.subscribe(topic, qos=qos)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks[mid] = acked
        if wait_s is not None and not acked.wait(wait_s):
            raise BrokerUnavailableError(f"no SUBACK for {topic!r} within {wait_s:g}s")

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, _codes: Any, _props: Any) -> None:
        with self._lock:
            acked = self._pending_subacks.pop(mid, None)
        if acked is not None:
            acked.set()

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
        self.client.unsubscribe(topic)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: float | None = None,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> mqtt.MQTTMessageInfo:
        props = None
        if response_topic or correlation_data is not None or expiry_s is not None or user_properties:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry_s is not None:
                props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
            if user_properties:
                props.UserProperty = user_properties
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic, (qos, _handler) in subscriptions:
            client.subscribe(topic, qos=qos)
        self.connected.set()
        log.info("connected to %s:%d as %s", self.settings.host, self.settings.port, self.client_id)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("on-connect hook failed")

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self.connected.clear()
        log.info("disconnected from the broker (%s); paho reconnects", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [
                h
                for topic, (_q, h) in self._subscriptions.items()
                if mqtt.topic_matches_sub(shared_topic_filter(topic), msg.topic)
            ]
        for handler in handlers:
            try:
                handler(msg)
            except Exception:
                # One bad message must never take the connection's thread down.
                log.exception("handler for %s failed", msg.topic)


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Segments are small request/response messages: with Nagle's algorithm on, each one waits for
    the peer's delayed ACK (~40 ms per direction on Linux; bench/transport.py measured 88 ms per
    round trip instead of 0.85 ms). The broker needs `set_tcp_nodelay true` for the same reason."""
    if hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def shared_topic_filter(topic: str) -> str:
    """`$share/...` subscriptions arrive on the plain topic, so match handlers on that part."""
    if topic.startswith("$share/"):
        return topic.split("/", 2)[2]
    return topic


class RpcClient:
    """Request/response over MQTT v5: every request carries ResponseTopic = our private reply
    topic and a unique CorrelationData; the reply resolves the matching future."""

    def __init__(self, connection: MqttConnection, reply_topic: str) -> None:
        self.connection = connection
        self.reply_topic = reply_topic
        self._pending: dict[bytes, Future[mqtt.MQTTMessage]] = {}
        self._lock = threading.Lock()
        connection.subscribe(reply_topic, self._on_reply)

    def request(
        self, topic: str, payload: bytes, *, expiry_s: float | None = None, qos: int = 1
    ) -> tuple[bytes, Future[mqtt.MQTTMessage]]:
        correlation = uuid.uuid4().bytes
        future: Future[mqtt.MQTTMessage] = Future()
        with self._lock:
            self._pending[correlation] = future
        info = self.connection.publish(
            topic, payload, qos=qos, response_topic=self.reply_topic, correlation_data=correlation, expiry_s=expiry_s
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN: paho queues QoS>0 messages and sends them after reconnecting.
            self.cancel(correlation)
            future.set_exception(BrokerUnavailableError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}"))
        return correlation, future

    def cancel(self, correlation: bytes) -> None:
        with self._lock:
            self._pending.pop(correlation, None)

    def _on_reply(self, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if correlation is None:
            log.warning("reply without CorrelationData on %s dropped", msg.topic)
            return
        with self._lock:
            future = self._pending.pop(bytes(correlation), None)
        if future is None:
            log.debug("late or duplicate reply dropped")
            return
        future.set_result(msg)


def user_property(msg: mqtt.MQTTMessage, name: str) -> str | None:
    for key, value in getattr(msg.properties, "UserProperty", None) or []:
        if key == name:
            return str(value)
    return None


def new_client_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def settings_from_config(broker: Any) -> BrokerSettings:
    """From a validated `splitwise_device.config.BrokerConfig` (reads the password file now)."""
    tls = broker.tls
    return BrokerSettings(
        host=broker.host,
        port=broker.port,
        tls=broker.use_tls,
        username=broker.username,
        password=broker.read_password(),
        ca_file=str(tls.ca_file) if tls and tls.ca_file else None,
        cert_file=str(tls.cert_file) if tls and tls.cert_file else None,
        key_file=str(tls.key_file) if tls and tls.key_file else None,
        tls_insecure=bool(tls and tls.insecure),
        keepalive_s=broker.keepalive_s,
        reconnect_min_s=max(1, int(broker.reconnect_min_s)),
        reconnect_max_s=max(1, int(broker.reconnect_max_s)),
    )
