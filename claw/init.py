"""``claw init``: everything two servers need, written into one directory.

``claw init --public-host H [--public-host H2 ...] [--dir claw-deploy] [--node b1] [--force]`` writes::

    <dir>/a/                      server A (stays on A: it holds the CA key)
        a.toml                    commented edge config (embedded broker on 0.0.0.0:8883, MQTT over TLS)
        data/pki/ca.crt, ca.key   the private CA (ca.key mode 0600, never leaves A)
        data/pki/server.crt, .key the broker's certificate for every --public-host (DNS names / IP SANs)
        data/broker.lmdb/         the broker's credential store, holding the node credential node.<NAME>
    <dir>/b/                      server B (copy the whole directory to B)
        b.toml                    commented node config (dials the first --public-host:8883, TLS verified)
        ca.crt                    copy of the CA certificate (never the key)
        node.secret               the node's MQTT password (mode 0600)

Every relative path in a.toml/b.toml is relative to the directory of that file (see :mod:`core.config`), so
``claw edge --config a/a.toml`` and ``claw node --config b.toml`` work from any working directory and b/ can be
copied anywhere.

Without ``--force`` nothing is overwritten (exit 2, the existing files are named). With ``--force`` the
existing CA is kept (nodes already deployed keep trusting the broker) unless it is absent, the server
certificate is re-issued for the given host names, the node credential is kept if ``b/node.secret`` still
matches it (else a new password is issued), and the two config files are rewritten (the old ones are kept as
``*.bak``). The password is never printed.

Every file written is mode 0600 and every directory 0700, whatever the umask (the configs invite secrets, the
data directory holds keys and credentials); with ``--force`` an older, more open deployment is tightened too.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from core.config import (BrokerSettings, EdgeSettings, LogSettings, MiniappSettings, MqttSettings, NodeSettings,
                     WecomSettings)
from core.perms import private_dir, secure_tree, write_private
from core.pki import PkiPaths, ensure_ca, issue_server_cert

MQTT_TLS_PORT = 8883
EDGE_HTTP = "127.0.0.1:8080"  # behind an HTTPS reverse proxy on 443
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


class InitError(Exception):
    """A bad argument or a refused overwrite (exit 2)."""


def _q(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value, ensure_ascii=False)


def _check_host(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        if len(h) > 253 or not _DNS_RE.fullmatch(h) or h.replace(".", "").isdigit():
            raise InitError(f"--public-host {host!r} is not a DNS name or an IP address "
                            "(give the bare name, no scheme or port)") from None
        return h.rstrip(".").lower()
    if ip.is_unspecified or ip.is_multicast:
        raise InitError(f"--public-host {host!r}: nodes cannot dial that address")
    return str(ip)


def _check_node(name: str) -> str:
    from broker.creds import check_name

    try:
        return check_name(name)
    except ValueError as exc:
        raise InitError(f"--node: {exc}") from None


def _write_file(path: Path, data: bytes) -> None:
    """Write atomically (temp file + rename), mode 0600 in a directory made 0700."""
    write_private(path, data)


def _backup(path: Path) -> None:
    if path.exists():
        _write_file(path.with_name(path.name + ".bak"), path.read_bytes())


# ---- the two config files --------------------------------------------------------------------------------

def a_toml(hosts: list[str], node: str) -> str:
    br, ed, lg, wc = BrokerSettings(), EdgeSettings(), LogSettings(), WecomSettings()
    m = MqttSettings()
    return f"""\
# SmartClaw 智控未来 -- server A (edge + embedded MQTT broker). Written by `claw init`.
#
# Run:   claw edge --config a.toml        (from any directory: relative paths below are relative to THIS file)
# Every key can be overridden by an environment variable CLAW_SECTION__KEY, e.g. CLAW_EDGE__HTTP=0.0.0.0:8080,
# CLAW_DATA_DIR=/srv/claw (relative values are then relative to this file too).
# Secrets can be given directly or, better, in a file named by the matching *_file key (mode 0600).

# Directory for everything the edge keeps: pki/ (CA + broker certificate), broker.lmdb (broker credentials),
# edge.lmdb (the durable task inbox), auth.lmdb (client sessions and revocations), edge.secret (client-token
# key, generated on first start). Back it up.
# pki/ca.key is the CA's private key: it never leaves this server.
data_dir = "data"

[log]
# DEBUG | INFO | WARNING | ERROR (also: claw --log-level LEVEL edge ...). Logs go to stderr.
level = {_q(lg.level)}

[broker]
# The MQTT broker embedded in the edge process.
enabled = true
# MQTT over TLS for nodes (server B) and devices. Open this TCP port in the firewall.
# "" = no public listener.
listen = "0.0.0.0:{MQTT_TLS_PORT}"
# Plain MQTT for the edge's own client. Keep it on loopback and NEVER expose it (port 0 = any free port).
local_listen = {_q(br.local_listen)}
# The broker's TLS certificate and key, issued by the private CA for: {", ".join(hosts)}
# Nodes verify it against ca.crt, host name included. Renew: see docs/deploy.md.
cert_file = "data/pki/server.crt"
key_file = "data/pki/server.key"
# Seconds a disconnected persistent MQTT session is kept.
session_expiry = {br.session_expiry}
# Largest PUBLISH payload in bytes; a bigger one up to max_drop is dropped (and acknowledged at QoS 1),
# a bigger one still closes the client's connection.
max_packet = {br.max_packet}
max_drop = {br.max_drop}
# A client's keepalive of 0 ("never") or above this many seconds counts as this.
max_keepalive = {br.max_keepalive}
# Open client connections in all and per IP address; more are closed at once (0 = no cap).
max_connections = {br.max_connections}
max_connections_per_ip = {br.max_connections_per_ip}
# Password checks waiting at once; more are refused with "server unavailable" (the client retries).
auth_queue = {br.auth_queue}
# Seconds between checks for `claw cred revoke`/`--replace`: a revoked credential's open connections are closed.
cred_check_interval = {br.cred_check_interval}
# Per session: unacknowledged QoS 1 messages in flight, and messages queued (offline or behind them).
max_inflight = {br.max_inflight}
max_queued = {br.max_queued}
# Messages per second a device account may publish on average, and at once (0 = no limit); above it the
# broker acknowledges and drops them. Nodes are not limited.
device_publish_rate = {br.device_publish_rate}
device_publish_burst = {br.device_publish_burst}

# [mqtt] is used by the edge only with an external broker (broker.enabled = false, e.g. Mosquitto);
# with the embedded broker the edge talks to it over the loopback listener. Keys as in b.toml:
# [mqtt]
# host = "127.0.0.1"
# port = {m.port}
# tls = true
# ca_file = "data/pki/ca.crt"
# username = "edge"
# password_file = "mqtt.secret"
# keepalive = {m.keepalive}
# max_queued = {m.max_queued}

[edge]
# HTTP listener for the client API (/api/login, /api/ws, /api/tasks), /healthz, /metrics and the chat page.
# The edge speaks plain HTTP: put an HTTPS reverse proxy (nginx, Caddy) on 443 in front of it and keep this
# on loopback. "0.0.0.0:8080" exposes plain HTTP to the network (testing only).
http = {_q(EDGE_HTTP)}
# POST /api/login {{"dev_user": NAME}} without WeChat: anyone can log in as anyone. Demo/tests only.
dev_login = false
# HMAC key for client tokens. Default: generated into data/edge.secret on first start.
# token_secret_file = "edge-token.secret"
# Access token lifetime in seconds (renewed with the refresh token), and the login session's (refresh token).
token_ttl = {ed.token_ttl}
session_ttl = {ed.session_ttl}
# The HTTPS address users open (its origin may open the WebSocket; pages of other sites may not). With [wecom]
# configured it also turns on the web sign-in inside WeCom (docs/wecom.md "Web sign-in").
# public_url = "https://a.example.com"
# allowed_origins = []   # more "https://host[:port]" origins allowed to open the WebSocket
# /metrics and /healthz details from other hosts than loopback need "Authorization: Bearer <this>".
# metrics_token_file = "metrics.secret"
# Slow clients: request line + headers within header_timeout_s, a body within body_timeout_s; connections per IP
# (behind a proxy on this host all connections come from the proxy).
header_timeout_s = {ed.header_timeout_s}
body_timeout_s = {ed.body_timeout_s}
max_conns_per_ip = {ed.max_conns_per_ip}
# Re-send a task that no node has accepted after this many seconds.
republish_s = {ed.republish_s}
# A node whose heartbeats stop for this long is shown as offline.
node_timeout_s = {ed.node_timeout_s}
# WebSockets per user, and tasks waiting per user.
max_ws_per_user = {ed.max_ws_per_user}
max_pending_per_user = {ed.max_pending_per_user}
# Finished tasks older than this many days are deleted from edge.lmdb (0 = keep for ever).
history_days = {ed.history_days}
# The most edge.lmdb may grow to, in MiB; at 90 % new questions are refused until retention frees room.
store_map_mb = {ed.store_map_mb}

[wecom]
# WeCom (企业微信) self-built app 智控未来, read by the WeCom channel. Leave empty until the app is set up;
# the values come from the WeCom admin console (应用管理 -> 自建应用; API 接收消息 for token/EncodingAESKey).
# Server A's public IP must be listed under 企业可信IP, or message/send fails with errcode 60020.
corp_id = ""            # 企业ID (My Company -> Company info)
agent_id = 0            # the app's AgentId
secret = ""             # the app's Secret -- better: secret_file = "wecom.secret"
token = ""              # callback Token -- or token_file = "wecom.token"
encoding_aes_key = ""   # callback EncodingAESKey (43 chars) -- or encoding_aes_key_file = "wecom.aeskey"
api_base = {_q(wc.api_base)}
# Answers are sent whole (split into numbered parts of <= 2048 bytes) once complete. progressive = true
# sends finished paragraphs while the answer is generated, in messages of at least progressive_min_bytes.
progressive = {str(wc.progressive).lower()}
progressive_min_bytes = {wc.progressive_min_bytes}
# Our pace per user; WeCom silently drops app messages beyond 30/min and 1000/hour per user.
per_user_per_min = {wc.per_user_per_min}
per_user_per_hour = {wc.per_user_per_hour}
welcome = {_q(wc.welcome)}          # on entering the app, once per user per day; "" = off
offline_notice = {_q(wc.offline_notice)}
token_refresh_margin_s = {wc.token_refresh_margin_s}   # refresh the access_token this early
send_max_age_s = {wc.send_max_age_s}   # give up a message not delivered for this long
replay_window_s = {wc.replay_window_s}   # refuse callbacks whose signed timestamp is older (0 = off)
# Web sign-in inside WeCom (app home page = <public_url>/; needs edge.public_url, secret and agent_id).
oauth_base = {_q(wc.oauth_base)}
oauth_timeout_s = {wc.oauth_timeout_s}   # seconds for the code exchange (over it: login_error wecom_unreachable)

[miniapp]
# WeChat mini-program login (POST /api/login {{code}} -> jscode2session). Leave empty if unused.
appid = ""
secret = ""             # AppSecret -- better: secret_file = "miniapp.secret"
api_base = {_q(MiniappSettings().api_base)}
timeout_s = {MiniappSettings().timeout_s}         # seconds for one jscode2session call (over it: 504)

# Node credential created by claw init: node.{node} (password in ../b/node.secret; only a hash is stored here).
# Manage credentials while the edge runs: claw cred list|add|revoke --config a.toml
"""


def b_toml(host: str, node: str) -> str:
    n, m, lg = NodeSettings(), MqttSettings(), LogSettings()
    return f"""\
# SmartClaw 智控未来 -- server B (node). Written by `claw init`.
#
# Copy this whole directory (b.toml, ca.crt, node.secret) to server B, then run:
#     claw node --config b.toml
# Relative paths below are relative to THIS file, so the directory can live anywhere.
# Every key can be overridden by an environment variable CLAW_SECTION__KEY, e.g. CLAW_NODE__LLM_URL=...
# Server B needs no inbound port: it dials server A's broker and LM Studio on this machine.

# Directory for the node's local state (relative to this file). The CA defaults to <data_dir>/pki/ca.crt
# when ca_file is empty.
data_dir = "data"

[log]
# DEBUG | INFO | WARNING | ERROR. Logs go to stderr.
level = {_q(lg.level)}

[mqtt]
# Server A's broker: MQTT over TLS. host must be one of the names in server A's certificate.
host = {_q(host)}
port = {MQTT_TLS_PORT}
tls = true
# The private CA that signed server A's certificate. Verification (host name included) is always on.
ca_file = "ca.crt"
# This node's credential (created on server A; rotate with `claw cred add node {node} --replace`).
username = "node.{node}"
password_file = "node.secret"
# MQTT client id; "" = the username. Server A accepts only the username or "<username>:<suffix>".
client_id = ""
# Seconds between MQTT keepalive pings (5-3600).
keepalive = {m.keepalive}
# Reconnect backoff, seconds (exponential with jitter).
reconnect_min = {m.reconnect_min}
reconnect_max = {m.reconnect_max}
# Bound on queued incoming messages.
max_queued = {m.max_queued}

[node]
# Node id: must be the NAME of the credential node.NAME above.
id = {_q(node)}
# LM Studio's OpenAI-compatible server on this machine (Developer -> Start Server, port 1234).
llm_url = {_q(n.llm_url)}
# Model id as listed by GET {n.llm_url}/models; "" = the first model LM Studio lists.
model = ""
# LM Studio "Require Authentication" token, if enabled: api_key_file = "lmstudio.key" (mode 0600).
# api_key_file = "lmstudio.key"
system_prompt = {_q(n.system_prompt)}
# Answers generated at once: match LM Studio's parallel slots.
concurrency = {n.concurrency}
# Streamed tokens are sent in chunks: every coalesce_ms milliseconds or coalesce_bytes bytes.
coalesce_ms = {n.coalesce_ms}
coalesce_bytes = {n.coalesce_bytes}
# Seconds: connect to LM Studio; wait for the first token (loading a model can be slow); silence mid-answer.
connect_timeout_s = {n.connect_timeout_s}
first_token_timeout_s = {n.first_token_timeout_s}
stall_timeout_s = {n.stall_timeout_s}
# Max tokens per answer, sent to the LLM server; 0 = not sent (the server's own limit). An answer that hits
# it ends with a short note saying so.
max_tokens = {n.max_tokens}
# Heartbeat to the edge every beat_s seconds.
beat_s = {n.beat_s}
# Previous turns of a conversation sent with each question: at most history_turns turns, and only the newest
# that fit history_tokens (estimated: one per Chinese character, one per 3 other characters; 0 = no history).
# Keep history_tokens + a long question + max_tokens within the model's context length (per parallel slot);
# the defaults fit a 4096-token context. A prompt that still does not fit is sent again without the history.
history_turns = {n.history_turns}
history_tokens = {n.history_tokens}
# On stop (systemctl stop, service stop, Ctrl-C) running answers get this many seconds to
# finish; the rest end with a clear "server B is stopping" error. New questions wait at A.
stop_grace_s = {n.stop_grace_s}
# Send the replies of many answers in one MQTT message to the edge (far less broker work under load).
batch_replies = {str(n.batch_replies).lower()}
# Milliseconds between two reply batches at least (0 = as soon as the previous one is acknowledged):
# a few ms save CPU on both servers under load, at that much more latency per chunk.
batch_linger_ms = {n.batch_linger_ms:g}
# Prometheus GET /metrics of this node (counters, running tasks, stage latencies) on HOST:PORT, e.g.
# "127.0.0.1:9464"; "" = off. Keep it on loopback or a private network: it has no authentication.
metrics_listen = {_q(n.metrics_listen)}
# Tasks of one user held at once (running + queued). An MQTT device's task over it is answered at once with
# done error rate_limited and not kept; the edge's tasks wait at the edge (keep >= edge.max_pending_per_user).
max_pending_per_uid = {n.max_pending_per_uid}
# Tasks held at once in all: over it a device gets done error node_busy, the edge's tasks wait at the edge.
max_pending = {n.max_pending}
"""


# ---- the command -----------------------------------------------------------------------------------------

def _fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def run_init(args: Any) -> int:
    try:
        return _init(args)
    except InitError as exc:
        print(f"claw init: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --dir, full disk ...
        print(f"claw init: error: {exc}", file=sys.stderr)
        return 1


def _init(args: Any) -> int:
    from broker.creds import CredentialStore, username_for

    hosts = list(dict.fromkeys(_check_host(h) for h in args.public_host))
    node = _check_node(args.node)
    force = bool(args.force)
    out = Path(args.dir)
    a_dir, b_dir = out / "a", out / "b"
    data = a_dir / "data"
    pki = PkiPaths(data / "pki")
    a_cfg, b_cfg, b_ca, b_secret = a_dir / "a.toml", b_dir / "b.toml", b_dir / "ca.crt", b_dir / "node.secret"
    username = username_for("node", node)

    if out.exists() and not out.is_dir():
        raise InitError(f"--dir {out} exists and is not a directory")
    targets = [a_cfg, pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key, b_cfg, b_ca, b_secret]
    existing = [str(p) for p in targets if p.exists()]
    if not force and (data / "broker.lmdb").exists() and CredentialStore(data).get(username) is not None:
        existing.append(f"credential {username} in {data / 'broker.lmdb'}")
    if existing and not force:
        raise InitError("refusing to overwrite existing files (use --force; the CA is kept):\n  "
                        + "\n  ".join(existing))

    for d in (a_dir, b_dir):
        private_dir(d)  # and a new --dir, 0700 too
        secure_tree(d, "claw init: existing")
    private_dir(data)
    ca_kept = pki.ca_cert.exists() and pki.ca_key.exists()
    ensure_ca(pki.dir)
    issue_server_cert(pki.dir, hosts, force=True)

    store = CredentialStore(data)
    password = None
    if force and b_secret.exists():
        old = b_secret.read_text(encoding="utf-8").strip()
        if store.verify(username, old) == "node":
            password = old  # the deployed node keeps working
    cred_kept = password is not None
    if password is None:
        try:
            _, password = store.add("node", node, replace=force)
        except ValueError as exc:
            raise InitError(str(exc)) from None

    ca_pem = pki.ca_cert.read_bytes()
    for path, text in ((a_cfg, a_toml(hosts, node)), (b_cfg, b_toml(hosts[0], node))):
        if path.exists() and path.read_text(encoding="utf-8") != text:
            _backup(path)
        _write_file(path, text.encode("utf-8"))
    _write_file(b_ca, ca_pem)
    _write_file(b_secret, password.encode("utf-8"))
    del password

    _summary(out, hosts, node, username, ca_pem, ca_kept=ca_kept, cred_kept=cred_kept)
    return 0


def _summary(out: Path, hosts: list[str], node: str, username: str, ca_pem: bytes, *, ca_kept: bool,
             cred_kept: bool) -> None:
    from core.runtime import claw_command

    a, b, claw = out / "a", out / "b", claw_command()
    print(f"""\
SmartClaw deployment written to {out.resolve()}
  {a}/  server A -- keep it there (holds the CA key)
      a.toml                  edge config: MQTT over TLS on 0.0.0.0:{MQTT_TLS_PORT}, HTTP on {EDGE_HTTP}
      data/pki/ca.crt, ca.key private CA ({'existing CA kept' if ca_kept else 'new'}; ca.key mode 0600, never copy it)
      data/pki/server.crt     broker certificate for: {', '.join(hosts)}
      data/broker.lmdb        node credential {username} ({'kept' if cred_kept else 'new password'})
  {b}/  server B -- copy the whole directory
      b.toml                  node config: dials {hosts[0]}:{MQTT_TLS_PORT} as {username}
      ca.crt                  CA certificate (SHA-256 {_fingerprint(ca_pem)})
      node.secret             the node's password (mode 0600; not shown here)

Next steps:
  1. Copy {b}/ to server B (e.g. scp -r {b} user@serverB:smartclaw-b).
  2. Server A firewall: allow TCP {MQTT_TLS_PORT} (MQTT over TLS) and 443 (HTTPS reverse proxy -> {EDGE_HTTP}).
  3. Server A: {claw} edge --config {a / 'a.toml'}
  4. Server B: install SmartClaw (docs/deploy.md), start LM Studio's server (127.0.0.1:1234), then in the
     copied directory: <SmartClaw's venv>/bin/claw node --config b.toml
  5. Check on A: curl http://{EDGE_HTTP}/healthz  -> "node_online": true
  Details: docs/deploy.md

下一步：把 {b}/ 复制到服务器 B；A 的防火墙开放 {MQTT_TLS_PORT}（MQTT over TLS）和 443（HTTPS 反向代理）；
  A 上运行 {claw} edge --config {a / 'a.toml'}；B 上安装 SmartClaw、启动 LM Studio 后，在复制的目录中运行
  <SmartClaw 虚拟环境>/bin/claw node --config b.toml。""")
