"""The embedded broker's socket reader: MQTT framing with size limits checked before any body is read.

amqtt parses packets with many small reads (a SUBSCRIBE topic by topic, a CONNECT field by field), so a limit
on single reads does not bound a packet: a 38 MiB SUBSCRIBE was accepted. :class:`PacketReader` is the
``ReaderAdapter`` amqtt reads from; it reads one whole packet at a time from the socket -- the fixed header
first, then, only if the remaining length is within that packet type's limit, the body -- and serves amqtt's
reads from that packet. A read past the end of the packet (a malformed one) closes the connection.

Limits (docs/broker.md "Limits"):

- the first packet must be a CONNECT of at most ``connect_max`` bytes (64 KiB), before anything is authenticated;
- any other packet but PUBLISH: at most ``control_max`` bytes (64 KiB);
- PUBLISH: a payload of at most ``max_packet`` bytes is passed on. A bigger one up to ``drop_max`` bytes is read
  in 64 KiB pieces and thrown away, never buffered: QoS 0 is simply dropped, QoS 1 is acknowledged (PUBACK) so
  the client does not send it again on every reconnect; QoS 2 closes the connection. Every drop is counted
  (``Counters.oversize_dropped``) and logged at most once a minute. Above ``drop_max`` the connection is closed.

Protocol checks that amqtt gets wrong, each closing the connection (through amqtt's normal path, so a will
fires) with a WARNING at most once a minute per kind: a second CONNECT [MQTT-3.1.0-2] (amqtt logged it at
ERROR); a PUBLISH whose topic name is empty, not UTF-8, holds U+0000 or a wildcard (amqtt's parser refused
a wildcard in the middle of the packet and read on from there, leaving the connection half-dead); a packet of
a reserved type, or of a type with a fixed remaining length (PUBACK, PINGREQ, ...) but another one (amqtt
parsed the rest of such a packet as further packets).
"""

from __future__ import annotations

import asyncio
import logging
import struct

from amqtt.adapters import ReaderAdapter

from core.guard import Counters, RateLimitedLog

log = logging.getLogger(__name__)

CONNECT, PUBLISH = 1, 3
# The remaining length MQTT 3.1.1 fixes for a packet type: CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK
# (a packet id or two bytes), PINGREQ, PINGRESP, DISCONNECT (nothing). amqtt reads just that much and takes
# whatever follows inside the packet for the next packet (a CONNECT hidden in a long PUBACK was handled).
_FIXED_LENGTH = {2: 2, 4: 2, 5: 2, 6: 2, 7: 2, 11: 2, 12: 0, 13: 0, 14: 0}
CONNECT_MAX = 64 * 1024
CONTROL_MAX = 64 * 1024
_DROP_CHUNK = 64 * 1024


class PacketTooLargeError(Exception):
    """A packet above its hard limit (not an MQTTError: amqtt must close the connection, not skip the packet)."""


class ProtocolViolation(Exception):
    """Not MQTT framing we accept (first packet not CONNECT, bad remaining length, read past a packet's end)."""


class PacketReader(ReaderAdapter):
    """Per connection: frames packets and enforces the limits in the module docstring."""

    __slots__ = ("_reader", "_writer", "_buf", "_pos", "_first", "_broken", "max_packet", "drop_max",
                 "connect_max", "control_max", "peer", "who", "counters", "ratelog", "connect_client_id")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_packet: int,
                 drop_max: int, peer: str, counters: Counters, ratelog: RateLimitedLog,
                 connect_max: int = CONNECT_MAX, control_max: int = CONTROL_MAX) -> None:
        self._reader = reader
        self._writer = writer
        self._buf = b""
        self._pos = 0
        self._first = True
        self._broken = False
        self.max_packet = max_packet
        self.drop_max = max(drop_max, max_packet)
        self.connect_max = connect_max
        self.control_max = control_max
        self.peer = peer
        self.who = f"client at {peer}"  # the broker names the client here once it is authenticated
        self.counters = counters
        self.ratelog = ratelog
        self.connect_client_id: str | None = None  # the client id exactly as sent in CONNECT ("" = none)

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    async def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if not self._buf:
            if self._broken:
                raise ProtocolViolation(f"{self.who}: connection abandoned in the middle of a packet")
            try:
                await self._next_packet()
            except asyncio.CancelledError:
                # amqtt's keepalive timeout cancelled us mid-packet; the framing is lost, the connection closes
                self._broken = True
                raise
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ProtocolViolation(f"{self.who}: malformed packet (a field runs past the end of the packet)")
        data = self._buf[self._pos:end]
        if end >= len(self._buf):  # packet consumed: do not keep up to max_packet bytes per idle connection
            self._buf, self._pos = b"", 0
        else:
            self._pos = end
        return data

    async def _next_packet(self) -> None:
        rd = self._reader
        while True:
            self._buf, self._pos = b"", 0
            b1 = await rd.readexactly(1)
            ptype = b1[0] >> 4
            header = bytearray(b1)
            rl, mult = 0, 1
            for _ in range(4):
                byte = (await rd.readexactly(1))[0]
                header.append(byte)
                rl += (byte & 0x7F) * mult
                if not byte & 0x80:
                    break
                mult *= 128
            else:
                raise ProtocolViolation(f"{self.who}: invalid remaining length")
            if self._first:
                if ptype != CONNECT:
                    raise ProtocolViolation(f"{self.who}: first packet is type {ptype}, not CONNECT")
                if rl > self.connect_max:
                    self._too_large(f"CONNECT of {rl} bytes exceeds {self.connect_max}")
                self._first = False
                body = await rd.readexactly(rl)
                self.connect_client_id = _connect_client_id(body)
                self._buf = bytes(header) + body
                return
            if ptype == CONNECT:  # [MQTT-3.1.0-2]: a second CONNECT is a protocol violation
                self._violation("second-connect", "sent a second CONNECT")
            if ptype in (0, 15):  # reserved (amqtt read on after its header)
                self._violation("malformed", f"sent a packet of reserved type {ptype}")
            want = _FIXED_LENGTH.get(ptype)
            if want is not None and rl != want:
                self._violation("malformed", f"sent a packet of type {ptype} with remaining length {rl}, not {want}")
            if ptype != PUBLISH:
                if rl > self.control_max:
                    self._too_large(f"packet of type {ptype} with {rl} bytes exceeds {self.control_max}")
                self._buf = bytes(header) + await rd.readexactly(rl) if rl else bytes(header)
                return
            if rl <= self.max_packet:  # the payload is smaller still
                body = await rd.readexactly(rl)
                self._check_topic(body)
                self._buf = bytes(header) + body
                return
            if rl > self.drop_max + 2 + 65535 + 2:
                self._too_large(f"PUBLISH of {rl} bytes exceeds broker.max_drop={self.drop_max}")
            qos = (b1[0] >> 1) & 3
            head = await rd.readexactly(2)
            tlen = struct.unpack("!H", head)[0]
            head += await rd.readexactly(tlen + (2 if qos else 0))
            payload = rl - len(head)
            if payload < 0:
                raise ProtocolViolation(f"{self.who}: malformed PUBLISH")
            self._check_topic(head)
            if payload <= self.max_packet:
                self._buf = bytes(header) + head + await rd.readexactly(payload)
                return
            topic = head[2:2 + tlen].decode("utf-8", "replace")
            if payload > self.drop_max or qos == 2:
                self._too_large(f"PUBLISH of a {payload}-byte payload on {topic[:200]!r} (QoS {qos}) exceeds "
                                f"broker.max_packet={self.max_packet}"
                                + (" (QoS 2 is not supported for it)" if qos == 2 else
                                   f" and broker.max_drop={self.drop_max}"))
            left = payload
            while left:
                chunk = await rd.read(min(left, _DROP_CHUNK))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
            if qos == 1 and not self._writer.is_closing():
                self._writer.write(b"\x40\x02" + head[-2:])  # PUBACK with the packet id
            self.counters.oversize_dropped += 1
            self.ratelog.log("oversize-drop", logging.WARNING,
                             "%s: dropped a PUBLISH with a %d-byte payload on %r (QoS %d): broker.max_packet is "
                             "%d bytes%s", self.who, payload, topic[:200], qos, self.max_packet,
                             " (acknowledged so that it is not sent again)" if qos == 1 else "")
            # and on to the next packet: amqtt never sees this one

    def _check_topic(self, body: bytes) -> None:
        """Close the connection on a PUBLISH whose topic name is not one (the body starts with the topic).

        amqtt's parser raised on a wildcard topic in the middle of the packet and read on from there, taking
        the rest of the packet for the next one: no PUBACK, no PINGRESP, and the connection stayed open;
        a topic of invalid UTF-8 was taken as the ``repr`` of its bytes."""
        if len(body) < 2:
            return  # amqtt reads past the end of the packet: ProtocolViolation
        (tlen,) = struct.unpack_from("!H", body, 0)
        if 2 + tlen > len(body):
            return  # likewise
        problem = topic_name_problem(body[2:2 + tlen])
        if problem is not None:
            self._violation("bad-topic", f"sent a PUBLISH with {problem}")

    def _violation(self, kind: str, what: str) -> None:
        self.ratelog.log(kind, logging.WARNING, "%s: %s; closing the connection", self.who, what)
        raise ProtocolViolation(f"{self.who}: {what}")

    def _too_large(self, what: str) -> None:
        self.counters.oversize_closed += 1
        self.ratelog.log("oversize-close", logging.WARNING, "%s: %s; closing the connection", self.who, what)
        raise PacketTooLargeError(f"{self.who}: {what}")


def topic_name_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a valid MQTT 3.1.1 topic name, or None: at least one character [MQTT-4.7.3-1], UTF-8
    without U+0000 [MQTT-1.5.3-1, -2] (Python's decoder refuses surrogates), no wildcard [MQTT-3.3.2-2]."""
    if not raw:
        return "an empty topic name"
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "a topic name that is not valid UTF-8"
    if "\x00" in topic:
        return "U+0000 in the topic name"
    if "+" in topic or "#" in topic:
        return f"a wildcard in the topic name {topic[:200]!r}"
    return None


def _connect_client_id(body: bytes) -> str | None:
    """The client id field of a CONNECT body (after the fixed header), or None if it cannot be parsed."""
    try:
        (plen,) = struct.unpack_from("!H", body, 0)
        pos = 2 + plen + 1 + 1 + 2  # protocol name, level, flags, keepalive
        (clen,) = struct.unpack_from("!H", body, pos)
        raw = body[pos + 2:pos + 2 + clen]
        if len(raw) != clen:
            return None
        return raw.decode("utf-8")
    except (struct.error, UnicodeDecodeError):
        return None
