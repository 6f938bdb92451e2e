"""A throwaway PKI for tests: a CA, a server certificate and a client certificate, via `openssl`.

EC keys (prime256v1) keep it fast: a handful of `openssl` runs, well under a second.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

_CURVE = "prime256v1"
_DAYS = "2"
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TestPKI:
    """PEM files written by :func:`make_test_pki`."""

    __test__: ClassVar[bool] = False  # not a pytest test class despite the name

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _san(hostname: str) -> str:
    names = [hostname, "127.0.0.1"]
    entries: list[str] = []
    for name in dict.fromkeys(names):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            entries.append(f"DNS:{name}")
        else:
            entries.append(f"IP:{name}")
    return ", ".join(entries)


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_test_pki(directory: Path, hostname: str = "localhost") -> TestPKI:
    """Writes a CA and a server (SAN: `hostname` and 127.0.0.1) and client cert it signed."""
    if shutil.which("openssl") is None:
        raise RuntimeError("make_test_pki needs the openssl command-line tool")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(_CONFIG.format(san=_san(hostname)), encoding="utf-8")
    new_key = ("-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{_CURVE}", "-nodes")
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl(
        "req",
        "-x509",
        *new_key,
        "-config",
        config,
        "-extensions",
        "ca_ext",
        "-subj",
        "/CN=rlm test CA",
        "-days",
        _DAYS,
        "-keyout",
        ca_key,
        "-out",
        ca_cert,
    )
    pki = TestPKI(
        ca_cert=ca_cert,
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    for cert, key, common_name, extensions in (
        (pki.server_cert, pki.server_key, hostname, "server_ext"),
        (pki.client_cert, pki.client_key, "rlm test client", "client_ext"),
    ):
        request = directory / f"{extensions}.csr"
        _openssl(
            "req",
            "-new",
            *new_key,
            "-config",
            config,
            "-subj",
            f"/CN={common_name}",
            "-keyout",
            key,
            "-out",
            request,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            ca_cert,
            "-CAkey",
            ca_key,
            "-set_serial",
            str(secrets.randbits(63)),
            "-days",
            _DAYS,
            "-extfile",
            config,
            "-extensions",
            extensions,
            "-out",
            cert,
        )
        request.unlink()
    config.unlink()
    return pki
