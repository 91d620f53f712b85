"""One MQTT v5 connection (paho-mqtt 2.x) with what both services need, and a request/response
client after paho's own RPC example: a private reply topic, CorrelationData per request.

Reconnection is paho's built-in (``reconnect_delay_set`` + ``loop_start``); subscriptions are
restored in ``on_connect`` because a broker restarted without persistence has forgotten them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_offload.protocol.topics import validate_topic_name
from splitwise_core.errors import InvalidArgumentError, SplitwiseError

log = logging.getLogger(__name__)

MessageHandler = Callable[[mqtt.MQTTMessage], None]

REPORT_FIRST_S = 1.0
"""While the broker stays unreachable, the first failure is logged with its reason, then a reminder
after REPORT_FIRST_S, twice that, and so on up to REPORT_MAX_S between reminders."""
REPORT_MAX_S = 60.0


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


class Publication:
    """What :meth:`MqttConnection.publish` returns: paho's ``MQTTMessageInfo`` (``rc``, ``mid``),
    except that waiting never raises. While disconnected paho keeps a QoS>0 message (rc
    ``MQTT_ERR_NO_CONN``) and sends it after reconnecting; a shutdown during a broker outage must
    not fail over the status message it could not send."""

    __slots__ = ("info",)

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self.info = info

    @property
    def rc(self) -> MQTTErrorCode:
        return self.info.rc

    @property
    def mid(self) -> int:
        return self.info.mid

    def is_published(self) -> bool:
        """True once the broker acknowledged the message (QoS 1) or it was written (QoS 0)."""
        try:
            return self.info.is_published()
        except (RuntimeError, ValueError):
            return False

    def wait_for_publish(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` s; True if the message was published. Returns False at once when it
        could not be sent now (not connected, paho's queue full, any other failure)."""
        if self.info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            return False
        try:
            self.info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return self.is_published()


class MqttConnection:
    """A paho client whose network loop runs in paho's thread.

    Connection state is logged once per change: the first failure to connect with its reason (a
    socket error, or the broker's refusal such as a bad password), then reminders with a growing
    gap (1 s, 2 s, 4 s … at most 60 s) while it lasts, and the connection once it succeeds.
    `last_error` holds the latest reason (None once connected).
    """

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
        self.last_error: str | None = None
        self._stopping = False
        self._failures = 0
        self._failing_since = 0.0
        self._next_report = 0.0
        self._report_gap = REPORT_FIRST_S
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
        client.on_connect_fail = self._on_connect_fail
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
            reason = f": {self.last_error}" if self.last_error else ""
            raise BrokerUnavailableError(
                f"no connection to the broker at {self.settings.host}:{self.settings.port} within {timeout:g}s{reason}"
            )

    def stop(self) -> None:
        """Disconnects and ends paho's thread; never raises, connected or not."""
        self._stopping = True
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
    ) -> Publication:
        """Queues one message (paho keeps QoS>0 messages while disconnected and sends them after
        reconnecting). Raises InvalidArgumentError (a ValueError) for a topic that is not a valid
        topic name (protocol.validate_topic_name): the broker would drop the connection over it."""
        validate_topic_name(topic)
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
        return Publication(self.client.publish(topic, payload, qos=qos, retain=retain, properties=props))

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            self._connect_failed(f"the broker refused the connection: {reason}")
            return
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic, (qos, _handler) in subscriptions:
            client.subscribe(topic, qos=qos)
        self.connected.set()
        if self._failures:
            log.info(
                "connected to %s:%d as %s after %d failed attempts over %.0f s",
                self.settings.host,
                self.settings.port,
                self.client_id,
                self._failures,
                time.monotonic() - self._failing_since,
            )
        else:
            log.info("connected to %s:%d as %s", self.settings.host, self.settings.port, self.client_id)
        self.last_error = None
        self._failures = 0
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("on-connect hook failed")

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this from inside its `except OSError` around the connection attempt.
        err = sys.exc_info()[1]
        self._connect_failed(_os_reason(err) if err is not None else "connection failed")

    def _connect_failed(self, reason: str) -> None:
        """One failed attempt: the first is logged with its reason, later ones as spaced reminders."""
        now = time.monotonic()
        self.last_error = reason
        where = f"{self.settings.host}:{self.settings.port}"
        if self._failures == 0:
            self._failing_since = now
            self._report_gap = REPORT_FIRST_S
            self._next_report = now + self._report_gap
            log.warning("cannot connect to the broker at %s: %s; retrying in the background", where, reason)
        elif now >= self._next_report:
            self._report_gap = min(2 * self._report_gap, REPORT_MAX_S)
            self._next_report = now + self._report_gap
            log.warning(
                "still no connection to the broker at %s after %d attempts over %.0f s: %s",
                where,
                self._failures + 1,
                now - self._failing_since,
                reason,
            )
        self._failures += 1

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected and not self._stopping:
            log.warning("lost the connection to the broker (%s); reconnecting", reason)

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


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


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
    """From a validated `splitwise_core.config.BrokerConfig` (reads the password file now)."""
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


def mqtt_payload(msg: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON for an MQTT payload (status, profiles, app replies)."""
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
