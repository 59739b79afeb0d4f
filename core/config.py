"""One typed configuration for every SmartClaw process.

Sources, later wins: built-in defaults < TOML file (``--config``) < environment variables
``CLAW_SECTION__KEY`` (e.g. ``CLAW_MQTT__PORT=8883``, ``CLAW_DATA_DIR=/srv/claw``) < explicit
overrides from the command line. Any secret may instead be read from a file named by its
``*_file`` key (``password_file``, ``secret_file`` ...). Everything is validated once at
start-up; a bad value stops the process with a message naming the key. Secrets never appear
in ``repr()``/logs: use :func:`redacted`.

Relative paths (``data_dir``, every secret ``*_file``, ``mqtt.ca_file``, ``broker.cert_file``,
``broker.key_file``) are relative to the directory of the config file when one is given, else to the
current directory; this holds for values from the environment too.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

import msgspec

ENV_PREFIX = "CLAW_"
SECRET_KEYS = frozenset(
    {"password", "token_secret", "api_key", "secret", "token", "encoding_aes_key", "metrics_token"}
)
# non-secret file paths that, like data_dir and the secret *_file keys, are relative to the config file
PATH_KEYS = (("mqtt", "ca_file"), ("broker", "cert_file"), ("broker", "key_file"))


class ConfigError(Exception):
    """A configuration value is missing, malformed or inconsistent (message names the key)."""


def _check_hostport(value: str, key: str, *, allow_empty: bool = False) -> None:
    if allow_empty and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key} must be HOST:PORT (port 0-65535), got {value!r}")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class BrokerSettings(_Section):
    """The amqtt broker embedded in the edge process (server A)."""

    enabled: bool = True
    listen: str = "0.0.0.0:8883"  # MQTT over TLS, for nodes and devices ("" = no public listener)
    local_listen: str = "127.0.0.1:0"  # plain MQTT on loopback for the edge's own client (port 0 = any free)
    cert_file: str = ""  # default: <data_dir>/pki/server.crt
    key_file: str = ""  # default: <data_dir>/pki/server.key
    session_expiry: int = 3600  # seconds a disconnected persistent session is kept
    max_packet: int = 1024 * 1024  # bytes; a bigger PUBLISH payload is dropped (up to max_drop) or closes
    max_drop: int = 16 * 1024 * 1024  # bytes; PUBLISH payloads above max_packet up to this are read and dropped
    max_keepalive: int = 300  # seconds; a client's keepalive of 0 or more is treated as this
    max_connections: int = 10000  # open client connections in all (0 = no cap); more are closed at once
    max_connections_per_ip: int = 500  # ... from one IP address (0 = no cap)
    auth_queue: int = 64  # password checks (scrypt) waiting or running; more -> CONNACK 3 at once
    max_inflight: int = 32  # unacknowledged QoS 1 messages per session before the broker waits for PUBACKs
    max_queued: int = 1000  # messages queued per session (offline, or waiting for the window); more are dropped
    device_publish_rate: float = 5.0  # messages/s a device account may publish on average (0 = no limit)
    device_publish_burst: int = 20  # messages a device account may publish at once
    cred_check_interval: float = 2.0  # seconds between checks for revoked/replaced credentials of open sessions

    def __post_init__(self) -> None:
        _check_hostport(self.listen, "broker.listen", allow_empty=True)
        _check_hostport(self.local_listen, "broker.local_listen")
        if self.session_expiry < 0 or self.max_packet < 1024:
            raise ValueError("broker.session_expiry must be >= 0 and broker.max_packet >= 1024")
        if self.max_drop < self.max_packet:
            raise ValueError("broker.max_drop must be >= broker.max_packet")
        if not 1 <= self.max_keepalive <= 65535:
            raise ValueError("broker.max_keepalive must be 1-65535 seconds")
        if self.max_connections < 0 or self.max_connections_per_ip < 0:
            raise ValueError("broker.max_connections and broker.max_connections_per_ip must be >= 0 (0 = no cap)")
        if self.auth_queue < 1:
            raise ValueError("broker.auth_queue must be >= 1")
        if not 1 <= self.max_inflight <= 65535 or self.max_queued < 0:
            raise ValueError("broker.max_inflight must be 1-65535 and broker.max_queued >= 0")
        if self.device_publish_rate < 0 or self.device_publish_burst < 1:
            raise ValueError("broker.device_publish_rate must be >= 0 and broker.device_publish_burst >= 1")
        if not 0.1 <= self.cred_check_interval <= 3600:
            raise ValueError("broker.cred_check_interval must be 0.1-3600 seconds")


class MqttSettings(_Section):
    """How this process reaches the broker (node: A's broker; edge: only with an external broker)."""

    host: str = "127.0.0.1"
    port: int = 8883
    tls: bool = True
    ca_file: str = ""  # default: <data_dir>/pki/ca.crt; verification (incl. host name) is always on with tls
    username: str = ""
    password: str = ""
    password_file: str = ""
    client_id: str = ""
    keepalive: int = 20
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    max_queued: int = 10000  # bound on aiomqtt's incoming queue

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"mqtt.port must be 1-65535, got {self.port}")
        if not 5 <= self.keepalive <= 3600:
            raise ValueError("mqtt.keepalive must be 5-3600 seconds")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ValueError("mqtt.reconnect_min must be > 0 and <= mqtt.reconnect_max")


class EdgeSettings(_Section):
    http: str = "127.0.0.1:8080"  # loopback: an HTTPS reverse proxy in front (docs/deploy.md)
    dev_login: bool = False  # POST /api/login {dev_user} without WeChat (demo/tests only)
    token_secret: str = ""  # HMAC key for client tokens; default: generated into <data_dir>/edge.secret
    token_secret_file: str = ""
    token_ttl: int = 900  # access token lifetime, seconds (renewed with the refresh token)
    session_ttl: int = 7 * 86400  # refresh token (login session) lifetime, seconds; rotated on every use
    public_url: str = ""  # e.g. https://claw.example.com: its origin may open the WebSocket
    # more origins allowed on /api/ws (a TOML array, or one comma-separated string, e.g. from the environment)
    allowed_origins: list[str] | str = msgspec.field(default_factory=list)
    metrics_token: str = ""  # Bearer token for /metrics and /healthz details from non-loopback peers
    metrics_token_file: str = ""
    header_timeout_s: float = 10.0  # request line + headers must arrive within this (also the idle keep-alive)
    body_timeout_s: float = 30.0  # a request body must arrive within this
    max_conns_per_ip: int = 64  # open HTTP connections per peer address; more are closed at once
    republish_s: float = 5.0  # re-send a task not yet accepted by a node after this long
    node_timeout_s: float = 15.0  # a node whose beats stop this long is offline
    max_ws_per_user: int = 5
    max_pending_per_user: int = 20
    history_days: float = 90.0  # finished tasks older than this are deleted from edge.lmdb; 0 = keep for ever
    store_map_mb: int = 1024  # the largest edge.lmdb may grow (address space reserved; the file grows as used)

    def __post_init__(self) -> None:
        _check_hostport(self.http, "edge.http")
        if self.republish_s <= 0 or self.node_timeout_s <= 0 or self.token_ttl <= 0:
            raise ValueError("edge.republish_s, edge.node_timeout_s and edge.token_ttl must be > 0")
        if self.session_ttl < self.token_ttl:
            raise ValueError("edge.session_ttl must be >= edge.token_ttl")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or self.max_conns_per_ip < 1:
            raise ValueError("edge.header_timeout_s and edge.body_timeout_s must be > 0, edge.max_conns_per_ip >= 1")
        if isinstance(self.allowed_origins, str):
            self.allowed_origins = [o.strip() for o in self.allowed_origins.split(",") if o.strip()]
        for origin in ([self.public_url] if self.public_url else []) + list(self.allowed_origins):
            if not re.fullmatch(r"https?://[^/?#\s]+/?", origin):
                raise ValueError(f"edge.public_url / edge.allowed_origins: want scheme://host[:port], got {origin!r}")
        if self.history_days < 0:
            raise ValueError("edge.history_days must be >= 0 (0 = keep for ever)")
        if not 1 <= self.store_map_mb <= 1 << 20:
            raise ValueError("edge.store_map_mb must be 1 .. 1048576 (MiB)")


class NodeSettings(_Section):
    id: str = "node1"
    llm_url: str = "http://127.0.0.1:1234/v1"
    model: str = ""  # "" = the first model LM Studio lists
    api_key: str = ""  # LM Studio "Require Authentication" token
    api_key_file: str = ""
    system_prompt: str = "你是“智控未来”智能助手。请用简体中文简洁、准确地回答。"
    concurrency: int = 2  # answers generated at once (match LM Studio's parallel slots)
    coalesce_ms: float = 40.0  # deltas within this window go out as one chunk
    coalesce_bytes: int = 1024  # ... or as soon as this many bytes are waiting
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 300.0  # first request may load the model
    stall_timeout_s: float = 60.0  # no bytes for this long mid-stream = error
    max_tokens: int = 2048  # an answer's token limit sent to the LLM; 0 or less = not sent (the server's own)
    beat_s: float = 5.0
    history_turns: int = 10  # previous turns of a conversation sent with a question, at most ...
    history_tokens: int = 1500  # ... and within this many estimated tokens (node/history.py); 0 = none sent
    stop_grace_s: float = 20.0  # on stop, running answers get this long to finish
    batch_replies: bool = True  # replies for the edge go in batches on claw/v1/batch/{id} (the edge must know them)
    batch_linger_ms: float = 0.0  # a batch leaves at least this long after the previous one (0 = when acked)
    metrics_listen: str = ""  # HOST:PORT of the node's Prometheus GET /metrics ("" = off)
    max_pending_per_uid: int = 20  # tasks of one uid held at once (running + queued); more are refused
    max_pending: int = 4000  # tasks held at once in all (running + queued); more are refused

    def __post_init__(self) -> None:
        import re

        if self.max_pending_per_uid < 1 or self.max_pending < 1:
            raise ValueError("node.max_pending_per_uid and node.max_pending must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.id):
            raise ValueError(f"node.id must match [A-Za-z0-9_-]{{1,64}}, got {self.id!r}")
        if not self.llm_url.startswith(("http://", "https://")):
            raise ValueError(f"node.llm_url must be an http(s) URL, got {self.llm_url!r}")
        if self.concurrency < 1 or self.coalesce_ms < 0 or self.coalesce_bytes < 1:
            raise ValueError("node.concurrency >= 1, node.coalesce_ms >= 0, node.coalesce_bytes >= 1")
        if min(self.connect_timeout_s, self.first_token_timeout_s, self.stall_timeout_s, self.beat_s) <= 0:
            raise ValueError("node timeouts and node.beat_s must be > 0")
        if self.stop_grace_s < 0:
            raise ValueError("node.stop_grace_s must be >= 0")
        if self.history_turns < 0 or self.history_tokens < 0:
            raise ValueError("node.history_turns and node.history_tokens must be >= 0 (0 = no history sent)")
        if not 0 <= self.batch_linger_ms <= 1000:
            raise ValueError("node.batch_linger_ms must be within 0..1000")
        _check_hostport(self.metrics_listen, "node.metrics_listen", allow_empty=True)


class WecomSettings(_Section):
    """The WeCom self-built app (智控未来). Enabled when corp_id, token and encoding_aes_key are set."""

    corp_id: str = ""
    agent_id: int = 0
    secret: str = ""
    secret_file: str = ""
    token: str = ""
    token_file: str = ""
    encoding_aes_key: str = ""
    encoding_aes_key_file: str = ""
    api_base: str = "https://qyapi.weixin.qq.com"
    progressive: bool = False  # send finished paragraphs while the answer is generated
    progressive_min_bytes: int = 600  # ... gathered into messages of at least this size
    per_user_per_min: int = 20  # our pace per user (WeCom silently drops beyond 30/min)
    per_user_per_hour: int = 600  # (WeCom: 1000/hour)
    welcome: str = "您好，我是“智控未来”智能助手。直接发送问题即可，我会尽快回答。发送 /help 查看用法。"
    offline_notice: str = "助手暂时离线，您的消息已排队，恢复后会自动回答。"
    token_refresh_margin_s: int = 600  # refresh the access_token this long before it expires
    send_max_age_s: int = 86400  # a message that could not be delivered for this long is given up
    replay_window_s: int = 300  # a callback whose (signed) timestamp is further than this from our clock is refused; 0 = off
    # web sign-in (GET /auth/wecom): on when the app is configured (secret, agent_id) and edge.public_url is set
    oauth_base: str = "https://open.weixin.qq.com"  # where /auth/wecom sends the browser (a test server in tests)
    oauth_timeout_s: float = 5.0  # the code exchange (a token fetch included); over it: login_error wecom_unreachable

    @property
    def enabled(self) -> bool:
        return bool(self.corp_id and self.token and self.encoding_aes_key)

    @property
    def oauth_ready(self) -> bool:
        """The app can sign web users in (GET /auth/wecom) -- given ``edge.public_url`` too."""
        return self.enabled and bool(self.secret) and self.agent_id > 0

    def __post_init__(self) -> None:
        import re

        if not self.corp_id and not self.token and not self.encoding_aes_key:
            return
        if not (self.corp_id and self.token and self.encoding_aes_key):
            raise ValueError("wecom: corp_id, token and encoding_aes_key must be set together")
        if not re.fullmatch(r"[A-Za-z0-9]{43}", self.encoding_aes_key):
            raise ValueError("wecom.encoding_aes_key must be the 43 letters/digits from the WeCom console")
        if not re.fullmatch(r"[A-Za-z0-9]{1,32}", self.token):
            raise ValueError("wecom.token must be 1-32 letters/digits (the Token from the WeCom console)")
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"wecom.api_base must be an http(s) URL, got {self.api_base!r}")
        if self.agent_id < 0:
            raise ValueError("wecom.agent_id must be the app's AgentId (a positive number)")
        if not re.fullmatch(r"https?://[^/?#\s]+/?", self.oauth_base):
            raise ValueError(f"wecom.oauth_base must be an http(s) scheme://host[:port], got {self.oauth_base!r}")
        if not 0 < self.oauth_timeout_s <= 60:
            raise ValueError("wecom.oauth_timeout_s must be > 0 and <= 60 seconds")
        if not (1 <= self.per_user_per_min <= 30 and 1 <= self.per_user_per_hour <= 1000):
            raise ValueError("wecom.per_user_per_min must be 1-30 and wecom.per_user_per_hour 1-1000 "
                             "(WeCom drops messages beyond 30/min and 1000/hour per user)")


class MiniappSettings(_Section):
    """The WeChat mini-program (智控未来): sign-in through ``jscode2session``. On when appid and secret are set."""

    appid: str = ""
    secret: str = ""  # the AppSecret: stays on server A, never logged
    secret_file: str = ""
    api_base: str = "https://api.weixin.qq.com"
    timeout_s: float = 5.0  # one jscode2session call, connect to last byte; over it the login answers 504

    @property
    def enabled(self) -> bool:
        return bool(self.appid and self.secret)

    def __post_init__(self) -> None:
        import re

        if not self.appid and not self.secret:
            return
        if not (self.appid and self.secret):
            raise ValueError("miniapp: appid and secret (or secret_file) must be set together")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.appid):
            raise ValueError("miniapp.appid must be the mini-program's AppID (letters/digits, e.g. wx0123456789ab)")
        if not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"miniapp.api_base must be an http(s) URL, got {self.api_base!r}")
        if not 0 < self.timeout_s <= 60:
            raise ValueError("miniapp.timeout_s must be > 0 and <= 60 seconds")


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = ".claw"
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    mqtt: MqttSettings = msgspec.field(default_factory=MqttSettings)
    edge: EdgeSettings = msgspec.field(default_factory=EdgeSettings)
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    wecom: WecomSettings = msgspec.field(default_factory=WecomSettings)
    miniapp: MiniappSettings = msgspec.field(default_factory=MiniappSettings)

    @property
    def data(self) -> Path:
        return Path(self.data_dir)

    def __repr__(self) -> str:  # never leak secrets through repr
        return f"Settings({redacted(self)!r})"


SECTIONS = tuple(f for f in Settings.__struct_fields__ if f != "data_dir")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """``CLAW_SECTION__KEY=value`` -> ``{"section": {"key": "value"}}`` (values converted later)."""
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if "__" in rest:
            section, _, key = rest.partition("__")
            if section not in SECTIONS:
                raise ConfigError(f"environment variable {name}: unknown section {section!r} "
                                  f"(known: {', '.join(SECTIONS)})")
            out.setdefault(section, {})[key] = value
        elif rest == "data_dir":
            out["data_dir"] = value
    return out


def _read_secret_files(raw: dict[str, Any], base: Path) -> None:
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key in list(values):
            if key.endswith("_file") and key[:-5] in SECRET_KEYS and values[key]:
                path = Path(str(values[key]))
                if not path.is_absolute():
                    path = base / path
                try:
                    secret = path.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(f"{section}.{key}: cannot read {path}: {exc.strerror}") from None
                if not values.get(key[:-5]):
                    values[key[:-5]] = secret


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative file paths in a config file (see PATH_KEYS) are relative to the file's directory."""
    for section, key in PATH_KEYS:
        values = raw.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str) and values[key] \
                and not Path(values[key]).is_absolute():
            values[key] = str(base / values[key])


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build and validate Settings; raises ConfigError with a clear message on any problem."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        base = p.resolve().parent
    raw = _merge(raw, env_overrides(os.environ if env is None else env))
    if overrides:
        raw = _merge(raw, overrides)
    if isinstance(raw.get("data_dir"), str) and path is not None and not Path(raw["data_dir"]).is_absolute():
        raw["data_dir"] = str(base / raw["data_dir"])
    if path is not None:
        _resolve_paths(raw, base)
    _read_secret_files(raw, base)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        where = msg.rpartition(" - at `$.")[2].rstrip("`") if " - at `$." in msg else ""
        detail = msg.partition(" - at `$.")[0]
        src = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{src}: {where + ': ' if where else ''}{detail}") from None


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as a dict with every secret replaced by '***' (safe to log)."""
    data = msgspec.to_builtins(settings)
    for values in data.values():
        if isinstance(values, dict):
            for key in values:
                if key in SECRET_KEYS and values[key]:
                    values[key] = "***"
    return data
