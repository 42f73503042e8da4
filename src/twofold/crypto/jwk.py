"""JSON Web Keys (RFC 7517) to ``cryptography`` keys, honouring ``use`` and ``key_ops``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from twofold.crypto.jws import VerificationKey, b64url_decode, b64url_encode
from twofold.crypto.keys import CURVES, PrivateKey, PublicKey, jose_curve
from twofold.errors import KeyLoadError


def _int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise KeyLoadError(f"the JWK lacks {name!r}", code="jwk_invalid")
    return int.from_bytes(b64url_decode(value), "big")


def _check_purpose(jwk: Mapping[str, Any], op: str) -> None:
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise KeyLoadError(f"the JWK is for use {use!r}, not for signatures", code="jwk_wrong_use")
    ops = jwk.get("key_ops")
    if ops is not None and op not in ops:
        raise KeyLoadError(f"the JWK's key_ops {ops} do not include {op!r}", code="jwk_wrong_use")


def key_from_jwk(jwk: Mapping[str, Any], *, private: bool = False) -> PrivateKey | PublicKey | bytes:
    """The key a JWK describes: RSA, EC (P-256/384/521) or ``oct`` (returned as bytes)."""
    _check_purpose(jwk, "sign" if private else "verify")
    kty = jwk.get("kty")
    if kty == "oct":
        k = jwk.get("k")
        if not isinstance(k, str):
            raise KeyLoadError("the oct JWK lacks 'k'", code="jwk_invalid")
        return b64url_decode(k)
    if kty == "RSA":
        public = rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n"))
        if not private:
            return public.public_key()
        numbers = rsa.RSAPrivateNumbers(
            _int(jwk, "p"),
            _int(jwk, "q"),
            _int(jwk, "d"),
            _int(jwk, "dp"),
            _int(jwk, "dq"),
            _int(jwk, "qi"),
            public,
        )
        return numbers.private_key()
    if kty == "EC":
        crv = jwk.get("crv")
        if crv not in CURVES:
            raise KeyLoadError(f"unsupported JWK curve {crv!r}", code="jwk_invalid")
        point = ec.EllipticCurvePublicNumbers(_int(jwk, "x"), _int(jwk, "y"), CURVES[crv]())
        if not private:
            return point.public_key()
        return ec.EllipticCurvePrivateNumbers(_int(jwk, "d"), point).private_key()
    raise KeyLoadError(f"unsupported JWK key type {kty!r}", code="jwk_invalid")


def verification_key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """A verifier key pinned to the JWK's ``alg`` (if any) and named by its ``kid``."""
    key = key_from_jwk(jwk)
    assert not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    kid = jwk.get("kid")
    return VerificationKey(
        key,
        frozenset({kid}) if isinstance(kid, str) else frozenset(),
        alg=jwk.get("alg"),
        label=kid if isinstance(kid, str) else None,
    )


def jwk_from_public_key(key: PublicKey, *, kid: str | None = None) -> dict[str, str]:
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers()
        out = {
            "kty": "RSA",
            "n": b64url_encode(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
            "e": b64url_encode(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")),
        }
    else:
        p = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        name = jose_curve(key.curve)
        out = {
            "kty": "EC",
            "crv": name,
            "x": b64url_encode(p.x.to_bytes(size, "big")),
            "y": b64url_encode(p.y.to_bytes(size, "big")),
        }
    if kid:
        out["kid"] = kid
    return out
