"""A witness that sends each signed anchor to the hospital SIEM: syslog over TLS.

Messages are RFC 5424 (facility 13 "log audit", severity 6 "informational", MSGID
``anchor``, structured data ``[medrelay@32473 anchor=".." size=".." root=".."]`` and the
anchor's JSON as the message) in RFC 5425 octet-counting frames (``MSG-LEN SP SYSLOG-MSG``)
over TLS 1.2 or later with the server's certificate verified. One connection per publish:
anchors are rare, and a fresh connection never writes into a half-dead socket. The SIEM
keeps its own copy, which an auditor compares with ``audit verify``'s witness file or
feeds back to it. (32473 is the private enterprise number reserved for documentation,
RFC 5612; a deployment registers its own.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path

from .anchor import Anchor
from .witness import WitnessUnavailable

FACILITY_LOG_AUDIT = 13
SEVERITY_INFO = 6
SD_ID = "medrelay@32473"


def format_message(anchor: Anchor, *, hostname: str, app: str = "medrelay") -> bytes:
    pri = FACILITY_LOG_AUDIT * 8 + SEVERITY_INFO
    stamp = dt.datetime.fromtimestamp(anchor.ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    params = f'anchor="{anchor.anchor_no}" size="{anchor.tree_size}" root="{anchor.root.hex()}"'
    sd = f"[{SD_ID} {params}]"
    header = f"<{pri}>1 {stamp} {hostname} {app} - anchor {sd} "
    return header.encode("ascii") + anchor.to_json().encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 5425 §4.3 octet counting."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogWitness:
    def __init__(
        self,
        host: str,
        port: int = 6514,
        *,
        cafile: Path | None = None,
        server_hostname: str | None = None,
        hostname: str = "medrelay",
        timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._server_hostname = server_hostname or host
        self._hostname = hostname
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2

    async def publish(self, anchor: Anchor) -> None:
        data = frame(format_message(anchor, hostname=self._hostname))
        try:
            async with asyncio.timeout(self._timeout):
                _, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
                try:
                    writer.write(data)
                    await writer.drain()
                finally:
                    writer.close()
                    await writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise WitnessUnavailable(f"syslog {self._host}:{self._port}: {exc}") from exc

    def __repr__(self) -> str:
        return f"SyslogWitness({self._host}:{self._port})"
