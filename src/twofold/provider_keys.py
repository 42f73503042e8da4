"""The provider's signing keys — the portal's notice key and each gateway's response key —
and the one JWKS that lists them.

A key lives in a 0600 file of the node that signs with it (made on first use). Before a
process signs anything with its key it *publishes* the public half in the registry
(:meth:`twofold.registry.service.Registry.publish_signing_key`); the portal serves every
published key that has not been retired at ``/.well-known/jwks.json``. So with several
gateway workers (they share the data directory, hence one key) or several nodes (a key
each, or one file deployed to all), whatever signed a response is in the JWKS clients
fetch. ``kid`` is the key's RFC 7638 thumbprint: the same key has the same ``kid`` on every
node, and no two keys share one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twofold.crypto import jws, keys
from twofold.crypto.jwk import jwk_from_public_key
from twofold.crypto.keys import PrivateKey
from twofold.errors import UsageError

JWKS_PATH = "/.well-known/jwks.json"
PURPOSES = ("notices", "responses")
SIGNING_ALGORITHMS = ("ES256", "PS256", "RS256")  # what provider keys sign with
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url)."""
    members = _THUMBPRINT_MEMBERS[str(jwk["kty"])]
    canonical = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return jws.b64url_encode(hashlib.sha256(canonical.encode()).digest())


def _check_alg(key: PrivateKey, alg: str, name: str) -> None:
    if alg not in SIGNING_ALGORITHMS:
        raise UsageError(f"{name}: sign with one of {', '.join(SIGNING_ALGORITHMS)}, not {alg!r}")
    if alg == "ES256":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise UsageError(f"{name} is not an EC P-256 key, which ES256 needs")
    elif not isinstance(key, rsa.RSAPrivateKey) or key.key_size < jws.MIN_RSA_BITS:
        raise UsageError(f"{name} is not an RSA key of at least {jws.MIN_RSA_BITS} bits, which {alg} needs")


class ProviderKey:
    """A private key the provider signs with, its algorithm, and its public JWK."""

    def __init__(self, key: PrivateKey, *, alg: str | None = None, name: str = "the signing key") -> None:
        alg = alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256")
        _check_alg(key, alg, name)
        self.key = key
        self.alg = alg
        public = jwk_from_public_key(key.public_key())
        self.kid = thumbprint(public)
        self.jwk: dict[str, Any] = {**public, "kid": self.kid, "use": "sig", "alg": alg}

    @classmethod
    def load_or_create(cls, path: Path, *, alg: str | None = None) -> ProviderKey:
        """The key in ``path``, or a new one written there (0600): EC P-256 for ES256 (the
        default), RSA-2048 for RS256 and PS256. Several processes may start at once: one
        creates the file, the others read it."""
        key = _load_or_create(path, "rsa" if alg in ("RS256", "PS256") else "ec")
        return cls(key, alg=alg, name=str(path))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def sign_bytes(
        self, payload: bytes, *, typ: str | None = None, headers: Mapping[str, Any] | None = None
    ) -> str:
        return jws.sign(payload, self.key, alg=self.alg, kid=self.kid, typ=typ, headers=headers)


def _load_or_create(path: Path, kind: str) -> PrivateKey:
    if not path.exists():
        key = keys.generate_private_key(kind, bits=2048)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(keys.private_key_bytes(key))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # whole, and never over a key another process wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return keys.load_private_key(path.read_bytes(), name=str(path))


def merge_jwks(*documents: Mapping[str, Any] | None) -> dict[str, Any]:
    """One JWKS of the keys of ``documents``, each ``kid`` once (the first wins)."""
    seen: dict[str, Any] = {}
    for document in documents:
        for jwk in (document or {}).get("keys", []):
            kid = jwk.get("kid")
            if isinstance(kid, str) and kid not in seen:
                seen[kid] = dict(jwk)
    return {"keys": list(seen.values())}
