"""The values a DICOM node is addressed by: AE titles, ``AE@HOST:PORT`` destinations, sizes, TLS.

Each parser raises :class:`~agcnn.errors.UsageError` naming the option, the value and what a
valid one looks like, before any association is opened.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass

from agcnn.errors import UsageError

# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, without backslash or
# control characters; leading and trailing spaces are not significant, so an all-blank title is empty.
_AE_FORBIDDEN = re.compile(r"[\\\x00-\x1f\x7f]")


def check_ae_title(text: str, option: str) -> str:
    """``text`` as an AE title (surrounding spaces removed), or a UsageError naming ``option``."""
    title = text.strip(" ")
    if not title:
        raise UsageError(f"{option} {text!r} is empty; an AE title is 1 to 16 characters, e.g. AGCNN")
    if len(title) > 16:
        raise UsageError(f"{option} {text!r} has {len(title)} characters; an AE title has at most 16")
    if not title.isascii() or _AE_FORBIDDEN.search(title):
        raise UsageError(
            f"{option} {text!r} holds a character an AE title cannot (backslash, control or non-ASCII); "
            f"use letters, digits, spaces and _-. e.g. AGCNN"
        )
    return title


def check_port(value: int | str, option: str, *, allow_zero: bool = False) -> int:
    """A TCP port number; 0 (any free port) only where ``allow_zero``."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r} is not a port number; use an integer from 1 to 65535, e.g. 11112") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError(f"{option} {port} is outside 1..65535; DICOM's registered port is 104, a common unprivileged one 11112")
    return port


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send to: its (called) AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def parse_destination(text: str, option: str = "--to") -> Destination:
    """``AE@HOST:PORT`` (an IPv6 host in brackets: ``AE@[::1]:104``) -> :class:`Destination`."""
    example = "e.g. PACS@pacs.hospital.org:104 or ORTHANC@127.0.0.1:4242"
    ae, at, rest = text.rpartition("@")
    if not at or not ae:
        raise UsageError(f"{option} {text!r} names no AE title; write AE@HOST:PORT, {example}")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise UsageError(f"{option} {text!r}: an IPv6 host is written [HOST]:PORT; write AE@[::1]:104")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise UsageError(f"{option} {text!r} names no port; write AE@HOST:PORT, {example}")
    if not host:
        raise UsageError(f"{option} {text!r} names no host; write AE@HOST:PORT, {example}")
    if not port_text.isdigit():
        raise UsageError(f"{option} {text!r}: the port {port_text!r} is not a number; write AE@HOST:PORT, {example}")
    return Destination(check_ae_title(ae, f"{option} {text!r}: the AE title"), host, check_port(port_text, f"{option} {text!r}: the port"))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, option: str) -> int:
    """``"500M"``, ``"2G"``, ``"1.5G"``, ``"1048576"`` -> bytes (binary units; a trailing B or iB is allowed)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{option} {text!r} is not a size; write a number with an optional unit K, M, G or T, e.g. 10G")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise UsageError(f"{option} {text!r} is zero; give the largest size the folder may hold, e.g. 10G")
    return size


def _readable(path: str | os.PathLike[str] | None, option: str) -> str | None:
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} is not a file; pass the PEM file's path")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path!r} cannot be read (permission denied); give this user read access")
    return path


def _load_chain(ctx: ssl.SSLContext, cert: str | None, key: str | None, prefix: str) -> None:
    if key and not cert:
        raise UsageError(f"{prefix}-key needs {prefix}-cert (the certificate the key belongs to)")
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(
                f"{prefix}-cert {cert!r} / {prefix}-key {key!r} cannot be used ({e}); pass a PEM certificate and "
                f"its unencrypted private key"
            ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str | None, option: str) -> None:
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"{option} {ca!r} cannot be used ({e}); pass a PEM file of CA certificates") from None


def client_tls(*, ca: str | None = None, cert: str | None = None, key: str | None = None,
               prefix: str = "--tls") -> ssl.SSLContext:
    """The TLS context of an association this node opens (DICOM PS3.15 B.1, TLS 1.2 or later).

    The peer's certificate is verified against ``ca`` (the system's CAs without one), and its
    name against the host the association goes to; ``cert`` / ``key``: this node's own
    certificate, for a peer that asks for one.
    """
    ca, cert, key = _readable(ca, f"{prefix}-ca"), _readable(cert, f"{prefix}-cert"), _readable(key, f"{prefix}-key")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, ca, f"{prefix}-ca")
    _load_chain(ctx, cert, key, prefix)
    return ctx


def server_tls(*, cert: str, key: str | None = None, ca: str | None = None, prefix: str = "--tls") -> ssl.SSLContext:
    """The TLS context of a listening node: its certificate, and with ``ca`` the CAs whose
    client certificates it requires (a peer without one is turned away in the handshake)."""
    ca, cert, key = _readable(ca, f"{prefix}-ca"), _readable(cert, f"{prefix}-cert"), _readable(key, f"{prefix}-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, prefix)
    if ca:
        _load_ca(ctx, ca, f"{prefix}-ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
