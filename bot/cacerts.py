"""Extra CA certificates: the PEM file of the server setting `extra_ca_certs`, read and checked.

Some networks reach package registries through a proxy that presents its own CA. The host trusts
it; containers trust only Debian's list unless Trimo adds the extra certificates to the base image.
"""

from __future__ import annotations

import re
from pathlib import Path

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----"
)
NO_CERTIFICATE = (
    "{path} holds no PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----): "
    "point extra_ca_certs at a PEM file, e.g. /etc/ssl/certs/ca-certificates.crt"
)
UNREADABLE = "{path} cannot be read ({problem}): check extra_ca_certs and the file's permissions"


def read_certificates(path: Path) -> list[str]:
    """The certificates in `path`, each one PEM block, duplicates dropped, order kept.

    Raises ValueError with a message naming the file and the fix.
    """
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(UNREADABLE.format(path=path, problem=exc.strerror or exc)) from None
    seen: dict[str, None] = {}
    for block in _PEM_CERT.findall(data):
        seen.setdefault(block.decode("ascii").replace("\r\n", "\n") + "\n", None)
    if not seen:
        raise ValueError(NO_CERTIFICATE.format(path=path))
    return list(seen)
