"""The configuration machinery every service's config file is built from, and the sections they share.

Every section is a strict pydantic v2 model (:class:`StrictSection`): unknown keys are rejected
(``extra="forbid"``), TOML types are not coerced (``threads = "4"`` is an error, not 4), and every
problem in a file is reported at once, one line each, with the file name and the exact dotted path
of the key::

    device.toml: broker.tls.ca_fil: unknown key 'ca_fil' (did you mean 'ca_file'?)
    device.toml: agent.queue_size: must be >= 1 (got 0)

Here: the value types (sizes, identifiers, paths relative to the config file, seconds), the
``[broker]`` (with ``[broker.tls]``) and ``[logging]`` sections, the file checks they share,
:func:`load_toml_model` (TOML → model, every problem in one :class:`ConfigError`) and
:func:`check_config_command` (what ``check-config`` prints). The device's and the worker's files
are defined in ``splitwise_device.config`` and ``cloud_offload.config``.

Relative paths in a config file are taken relative to the directory of that file.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails

from splitwise_core.errors import ConfigError

__all__ = [
    "BrokerConfig",
    "ByteSize",
    "Checkable",
    "ConfigError",
    "ConfigPath",
    "Identifier",
    "LoggingConfig",
    "Seconds",
    "StrictSection",
    "TlsConfig",
    "broker_file_problems",
    "broker_summary",
    "check_config_command",
    "config_path",
    "format_size",
    "load_toml_model",
    "model_problems",
    "one_of",
    "parse_size",
    "readable_file_problems",
    "show_value",
]


# --------------------------------------------------------------------------------------------
# Value types shared by the device and the cloud config
# --------------------------------------------------------------------------------------------

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an integer or a size string: ``"256MB"`` (10^6), ``"1GiB"`` (2^30), ``"12 kB"``.

    Units (case-insensitive): B, kB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
    1024). A bare ``K``/``M``/``G``/``T`` is refused as ambiguous. Fractions are allowed when they
    give a whole number of bytes (``"1.5KiB"`` = 1536). Raises :class:`ValueError` otherwise.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes or a string such as '256MB' or '1GiB' (got {show_value(value)})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size in bytes or a string such as '256MB' or '1GiB' (got {show_value(value)})")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"not a size: expected a number and a unit such as '256MB' or '1GiB' (got {value!r})")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        if unit.lower() in ("k", "m", "g", "t"):
            raise ValueError(
                f"ambiguous size unit {unit!r}: write '{unit.upper()}B' (powers of 1000) "
                f"or '{unit.upper()}iB' (powers of 1024) (got {value!r})"
            )
        raise ValueError(f"unknown size unit {unit!r}: use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB (got {value!r})")
    try:
        amount = Decimal(number) * multiplier
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ValueError(f"not a size (got {value!r})") from None
    if amount != amount.to_integral_value():
        raise ValueError(f"not a whole number of bytes (got {value!r})")
    return int(amount)


def format_size(n: int) -> str:
    """``1073741824`` → ``"1 GiB"``; ``1500000`` → ``"1.43 MiB"``. For summaries, not for parsing."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; TOML may give an integer or a string like ``"256MB"``, ``"1GiB"``, ``"12 kB"``."""

_IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _identifier(value: str) -> str:
    if not _IDENTIFIER_RE.match(value):
        raise ValueError(f"must be 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-' (got {value!r})")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
"""A name that goes into MQTT topics: 1-64 characters of ``[A-Za-z0-9_-]``."""


def config_path(value: object, info: ValidationInfo) -> Path:
    if isinstance(value, os.PathLike) and not isinstance(value, str):
        value = os.fspath(value)  # a Path given from Python code; TOML only gives strings
    if not isinstance(value, str):
        raise ValueError(f"expected a path string (got {show_value(value)})")
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    path = Path(value)
    base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
    if not path.is_absolute() and isinstance(base, Path):
        path = base / path
    return path


ConfigPath = Annotated[Path, BeforeValidator(config_path)]
"""A file system path; a relative path is relative to the directory of the config file."""

Seconds = Annotated[float, Field(gt=0)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class StrictSection(BaseModel):
    """Base of every config section: unknown keys rejected, no type coercion, immutable."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        hide_input_in_errors=True,  # str(ValidationError) must not echo a password; .errors() keeps inputs
    )

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        """Problems visible from which keys are present (e.g. mutually exclusive keys).

        Unlike an ``after`` model validator, these are reported together with the errors of the
        section's fields, so one run of check-config lists everything.
        """
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _with_key_problems(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        extra = []
        if isinstance(data, Mapping):
            extra = [
                InitErrorDetails(type="value_error", loc=(), input=data, ctx={"error": ValueError(problem)})
                for problem in cls._key_problems(data)
            ]
        try:
            result = handler(data)
        except ValidationError as err:
            if not extra:
                raise
            details = [
                InitErrorDetails(type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {}))
                for e in err.errors()
            ]
            raise ValidationError.from_exception_data(err.title, [*details, *extra]) from None
        if extra:
            raise ValidationError.from_exception_data(cls.__name__, extra)
        return result


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class TlsConfig(StrictSection):
    """``[broker.tls]``: TLS settings for an ``mqtts://`` broker."""

    ca_file: ConfigPath | None = None
    """PEM file of the CA(s) that signed the broker's certificate. Default: the system trust store."""
    cert_file: ConfigPath | None = None
    """Client certificate (PEM) for mutual TLS; needs ``key_file``."""
    key_file: ConfigPath | None = None
    """Private key (PEM, unencrypted) of ``cert_file``."""
    insecure: bool = False
    """Skip the check that the certificate matches the broker's host name. For tests only."""

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        if ("cert_file" in data) != ("key_file" in data):
            return ["cert_file and key_file must be given together"]
        return []


_MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def _broker_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"not a broker URL ({err}) (got {value!r})") from None
    if parts.scheme not in _MQTT_DEFAULT_PORTS:
        raise ValueError(f"must start with mqtt:// or mqtts:// (got {value!r})")
    if not parts.hostname:
        raise ValueError(f"has no host name (got {value!r})")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain credentials; use broker.username and broker.password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be just scheme://host[:port] (got {value!r})")
    if port == 0:
        raise ValueError(f"port must be 1-65535 (got {value!r})")
    return value


class BrokerConfig(StrictSection):
    """``[broker]``: the MQTT v5 broker (shared by the device and the cloud config)."""

    url: Annotated[str, AfterValidator(_broker_url)] = "mqtt://localhost:1883"
    """``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (TLS, default port 8883)."""
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    """MQTT client id. Default: ``splitwise-device-{device.id}`` / ``splitwise-cloud-{worker.id}``."""
    username: str | None = Field(default=None, min_length=1)
    """User name for the broker. Default: connect anonymously."""
    password: SecretStr | None = None
    """Password (needs ``username``). Prefer ``password_file``, which keeps the secret out of this file."""
    password_file: ConfigPath | None = None
    """File whose first line is the password (e.g. a systemd credential). Excludes ``password``."""
    keepalive_s: int = Field(default=30, ge=5, le=65535)
    """MQTT keep-alive interval in whole seconds (5-65535)."""
    reconnect_min_s: Seconds = 1.0
    """First delay before reconnecting after the connection is lost; it doubles on each failure..."""
    reconnect_max_s: Seconds = 60.0
    """...up to this delay."""
    tls: TlsConfig | None = None
    """``[broker.tls]``; only with ``mqtts://``. An ``mqtts://`` URL without it uses the system trust store."""

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None  # checked by the validator
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or _MQTT_DEFAULT_PORTS[parts.scheme]

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    def read_password(self) -> str | None:
        """The password, from ``password`` or the first line of ``password_file`` (read now)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"broker.password_file: cannot read {self.password_file}: {_os_reason(err)}") from err
            return lines[0] if lines else ""
        return None

    @classmethod
    def _key_problems(cls, data: Mapping[str, Any]) -> list[str]:
        problems = []
        if "password" in data and "password_file" in data:
            problems.append("password and password_file are mutually exclusive; give one")
        if ("password" in data or "password_file" in data) and "username" not in data:
            problems.append("a password needs a username")
        url = data.get("url", cls.model_fields["url"].default)
        if "tls" in data and isinstance(url, str) and url.startswith("mqtt://"):
            problems.append("[broker.tls] is given but url uses mqtt:// (plain TCP); use mqtts://")
        return problems

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s:g}) must be >= reconnect_min_s ({self.reconnect_min_s:g})"
            )
        return self


class LoggingConfig(StrictSection):
    """``[logging]``."""

    level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (any case). Logs go to stderr (the journal under systemd)."""


# --------------------------------------------------------------------------------------------
# File checks
# --------------------------------------------------------------------------------------------


def _os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower() if err.strerror[:1].isupper() and err.strerror[1:2].islower() else err.strerror
    return str(err)


_CREDENTIALS_ROOT = Path("/run/credentials")


def _is_unavailable_credential(path: Path) -> bool:
    """A systemd credential path (``LoadCredential=``) checked outside the service, where it does
    not exist; it is checked again when ``check-config`` runs inside the unit (ExecStartPre)."""
    return path.is_relative_to(_CREDENTIALS_ROOT) and "CREDENTIALS_DIRECTORY" not in os.environ and not path.exists()


def readable_file_problems(path: Path) -> list[str]:
    if _is_unavailable_credential(path):
        return []
    if not path.exists():
        return [f"{path} does not exist"]
    if not path.is_file():
        return [f"{path} is not a regular file"]
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        return [f"cannot read {path}: {_os_reason(err)}"]
    return []


def model_problems(path: Path) -> list[str]:
    if not path.exists():
        return [f"{path} does not exist"]
    if path.is_dir():
        if not any(p.suffix == ".gguf" and p.is_file() for p in path.iterdir()):
            return [f"{path} is a directory without .gguf shards"]
        return []
    problems = readable_file_problems(path)
    if problems:
        return problems
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return [f"{path} is not a GGUF file (it does not start with 'GGUF')"]
    return []


def broker_file_problems(broker: BrokerConfig) -> list[str]:
    problems = []
    if broker.password_file is not None:
        problems += [f"broker.password_file: {p}" for p in readable_file_problems(broker.password_file)]
    if broker.tls is not None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(broker.tls, key)
            if path is not None:
                problems += [f"broker.tls.{key}: {p}" for p in readable_file_problems(path)]
    return problems


def broker_summary(broker: BrokerConfig, client_id: str) -> str:
    auth = "anonymous"
    if broker.username is not None:
        secret = "password" if broker.password is not None else f"password_file={broker.password_file}"
        auth = f"user={broker.username}" + (f" ({secret})" if broker.password or broker.password_file else "")
    tls = ""
    if broker.use_tls:
        t = broker.tls or TlsConfig()
        extras = (" client-cert" if t.cert_file else "") + (" INSECURE" if t.insecure else "")
        tls = f" tls(ca={t.ca_file or 'system'}{extras})"
    return f"{broker.url} client_id={client_id} {auth}{tls} keepalive={broker.keepalive_s}s"


# --------------------------------------------------------------------------------------------
# Loading and error messages
# --------------------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", bound=BaseModel)

_TOML_POSITION_RE = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot read: {_os_reason(err)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{label}: line {line}: not valid UTF-8 (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _TOML_POSITION_RE.match(message)
        if match is None:
            raise ConfigError(f"{label}: invalid TOML: {message}") from None
        line, col = int(match["line"]), int(match["col"])
        lines = text.splitlines()
        excerpt = ""
        if 1 <= line <= len(lines):
            excerpt = f"\n    {line} | {lines[line - 1]}\n    {' ' * len(str(line))} | {' ' * (col - 1)}^"
        first = f"{label}: line {line}, column {col}: invalid TOML: {match['msg']}"
        raise ConfigError(first + excerpt, [first]) from None


def load_toml_model(path: str | os.PathLike[str], model: type[ModelT]) -> ModelT:
    """Reads the TOML file at ``path`` and validates it as ``model``; raises :class:`ConfigError`.

    Relative paths inside the file are resolved against the file's directory.
    """
    file = Path(path)
    label = os.fspath(path)
    data = _read_toml(file, label)
    base_dir = file.absolute().parent
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        problems = [f"{label}: {line}" for line in format_validation_errors(err, model)]
        raise ConfigError("\n".join(problems), problems) from None


def one_of(names: tuple[str, ...]) -> str:
    """``'a', 'b' or 'c'``, the way pydantic lists the values of a Literal."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def show_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "...'"
    if isinstance(value, SecretStr):
        return "'**********'"
    return repr(value)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close and len(key) >= 3:
        close = [name for name in known if name.startswith(key)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain_number(value: object) -> object:
    """``1.0`` → ``1`` for messages about bounds (the bound of a float key is stored as a float)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _field_type(model: type[BaseModel], loc: tuple[int | str, ...]) -> object:
    """The annotation of the field at ``loc``, walking nested models; None when unknown."""
    current: object = model
    for part in loc:
        cls = _model_class(current)
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        current = cls.model_fields[part].annotation
    return current


def _model_class(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_BOUND_MESSAGES: dict[str, tuple[str, str]] = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}
_TYPE_MESSAGES: dict[str, str] = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "finite_number": "must be a finite number",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
}


def format_validation_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One ``"dotted.path: message"`` line per problem in ``err`` (without the file name)."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        ctx = e.get("ctx") or {}
        value = e.get("input")
        secret = bool(loc) and loc[-1] == "password"
        got = "" if secret else f" (got {show_value(value)})"
        path = _dotted(loc)
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = _model_class(_field_type(model, loc[:-1]))
            hint = ""
            if parent is not None:
                hint = _did_you_mean(key, list(parent.model_fields))
            message = f"unknown key '{key}'{hint}"
        elif kind == "missing":
            is_table = _model_class(_field_type(model, loc)) is not None
            message = f"missing required table [{path}]" if is_table else "missing required key"
        elif kind in _BOUND_MESSAGES:
            op, name = _BOUND_MESSAGES[kind]
            message = f"must be {op} {show_value(_plain_number(ctx.get(name)))}{got}"
        elif kind in _TYPE_MESSAGES:
            message = _TYPE_MESSAGES[kind] + got
        elif kind == "literal_error":
            message = f"must be one of {ctx.get('expected')}{got}"
        elif kind == "string_too_short":
            message = "must not be empty" if ctx.get("min_length") == 1 else f"too short{got}"
        elif kind == "string_too_long":
            message = f"must be at most {ctx.get('max_length')} characters{got}"
        elif kind in ("value_error", "assertion_error") and "error" in ctx:
            message = str(ctx["error"])
        else:
            message = e["msg"] + got
        lines.append(f"{path}: {message}")
    return lines


# --------------------------------------------------------------------------------------------
# check-config
# --------------------------------------------------------------------------------------------


class Checkable(Protocol):
    """What ``check-config`` needs of a loaded config."""

    def check_files(self) -> list[str]: ...

    def summary(self) -> list[str]: ...


def check_config_command(
    path: str | os.PathLike[str],
    load: Callable[[str | os.PathLike[str]], Checkable],
    *,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> int:
    """Loads ``path`` with ``load``, checks the files it names, reports; 0 if all is well, else 1."""
    label = os.fspath(path)
    try:
        config = load(path)
    except ConfigError as error:
        for line in str(error).splitlines():
            err(line)
        return 1
    problems = config.check_files()
    if problems:
        for problem in problems:
            err(f"{label}: {problem}")
        return 1
    out(f"{label}: OK")
    for line in config.summary():
        out(f"  {line}")
    return 0
