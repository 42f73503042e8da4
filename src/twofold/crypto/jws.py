"""Compact JWS (RFC 7515): sign exact payload bytes, verify strictly and fast.

Why not wrap a JOSE library on the hot path: measured here, joserfc verifies RS256 at
0.59× a plain ``cryptography`` loop and PyJWT at 0.45×, while the gateway's target is
0.85×. Compact JWS is small enough to implement strictly over ``cryptography``:

* only the compact form (three base64url segments, no padding, canonical encodings);
* an explicit algorithm allow-list (RS256 by default); ``none`` is never accepted and
  HMAC needs a symmetric key, so "HS256 keyed with the RSA public key" cannot happen;
* header parameters that carry keys (``jwk``, ``jku``, ``x5u``, ``x5c``) are never used
  to find a key: keys come only from the caller;
* ``crit`` must list only parameters the caller understands (none by default);
* duplicate header names, non-object headers and oversized tokens are refused.

The library tests run the RFC 7515 / RFC 7520 examples and every Wycheproof JWS, RSA
and ECDSA vector through this module, and interoperate with PyJWT, joserfc, jwcrypto
and ``openssl dgst``.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from twofold.crypto.keys import PrivateKey, PublicKey
from twofold.errors import JWSError

DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256",)
DEFAULT_MAX_SIZE = 1024 * 1024
MAX_HEADER = 4096  # base64url bytes of the protected header; real ones are under 300
MIN_RSA_BITS = 2048

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_EC_SIZES = {"ES256": 32, "ES384": 48, "ES512": 66}
SUPPORTED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "HS256",
    "HS384",
    "HS512",
)
# Header parameters registered by RFC 7515/7797: they may not appear in "crit".
_REGISTERED = frozenset({"alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit"})

_NOT_SECRETS = (b"-----BEGIN", b"ssh-", b"ecdsa-sha2-", b"\x30\x82")
_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_COMPACT_CHARS = _B64URL + b"."
# The last character of a base64url segment may only carry zero "unused" bits.
_CANONICAL_LAST = {2: frozenset(b"AQgw"), 3: frozenset(b"AEIMQUYcgkosw048")}
_PAD = (b"", b"", b"==", b"=")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str | bytes) -> bytes:
    """Strict, canonical base64url without padding."""
    raw = segment.encode("ascii", "replace") if isinstance(segment, str) else segment
    if raw.translate(None, _B64URL):
        raise JWSError("a JWS segment contains characters outside base64url", code="jws_malformed")
    return _b64decode(raw)


def _b64decode(segment: bytes) -> bytes:
    """Strict, canonical base64url (the alphabet is checked by the caller)."""
    rest = len(segment) & 3
    if rest == 1 or (rest and segment[-1] not in _CANONICAL_LAST[rest]):
        raise JWSError("a JWS segment is not canonical base64url", code="jws_malformed")
    return base64.urlsafe_b64decode(segment + _PAD[rest])


def _header_json(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()


def _check_alg_name(alg: str) -> None:
    if alg not in SUPPORTED_ALGORITHMS:
        raise JWSError(
            f"algorithm {alg!r} is not supported; use one of {', '.join(SUPPORTED_ALGORITHMS)}",
            code="jws_alg_not_allowed",
        )


# --- signing ---------------------------------------------------------------------------


def default_alg_for(key: PrivateKey | bytes) -> str:
    if isinstance(key, bytes):
        return "HS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    return "RS256"


def sign(
    payload: bytes | str,
    key: PrivateKey | bytes,
    *,
    alg: str | None = None,
    kid: str | None = None,
    x5t_s256: str | None = None,
    typ: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """The compact JWS of exactly ``payload`` (bytes are signed as given; a str as UTF-8).

    The protected header is ``{"alg":…}`` then ``kid``, ``x5t#S256``, ``typ`` and any
    extra ``headers``, serialised without spaces.
    """
    alg = alg or default_alg_for(key)
    _check_alg_name(alg)
    header: dict[str, Any] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    if x5t_s256 is not None:
        header["x5t#S256"] = x5t_s256
    if typ is not None:
        header["typ"] = typ
    for name, value in (headers or {}).items():
        if name == "alg":
            raise JWSError("set the algorithm with alg=, not in headers", code="jws_header_invalid")
        header[name] = value
    data = payload.encode() if isinstance(payload, str) else payload
    signing_input = b64url_encode(_header_json(header)) + "." + b64url_encode(data)
    signature = raw_sign(alg, key, signing_input.encode("ascii"))
    return signing_input + "." + b64url_encode(signature)


def raw_sign(alg: str, key: PrivateKey | bytes, data: bytes) -> bytes:
    """The JWS signature bytes of ``data`` (JOSE form: raw r‖s for ECDSA)."""
    _check_alg_name(alg)
    family, bits = alg[:2], alg[2:]
    digest = _HASHES[bits]()
    if family == "HS":
        if not isinstance(key, bytes):
            raise JWSError(f"{alg} needs a symmetric key", code="jws_key_mismatch")
        return hmac.new(key, data, digest.name).digest()
    if family in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise JWSError(f"{alg} needs an RSA private key", code="jws_key_mismatch")
        if key.key_size < MIN_RSA_BITS:
            raise JWSError(f"RSA keys under {MIN_RSA_BITS} bits are refused", code="jws_key_weak")
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if family == "RS"
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        return key.sign(data, pad, digest)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _EC_CURVES[alg]:
        raise JWSError(f"{alg} needs an EC private key on curve {_EC_CURVES[alg]}", code="jws_key_mismatch")
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(digest)))
    size = _EC_SIZES[alg]
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --- verifying -------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """A key the verifier may use, with the identifiers a JWS header may name it by.

    ``ids`` are matched against the header's ``kid``; ``x5t_s256`` against ``x5t#S256``.
    ``alg`` pins the key to one algorithm (a JWK's ``alg``). ``label`` is reported back
    (the gateway uses the certificate fingerprint).
    """

    key: PublicKey | bytes
    ids: frozenset[str] = field(default_factory=frozenset)
    x5t_s256: str | None = None
    alg: str | None = None
    label: str | None = None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, *, label: str | None = None) -> VerificationKey:
        from twofold.crypto.certs import fingerprint_sha256, sha1_thumbprint, x5t_s256

        fp = fingerprint_sha256(cert)
        thumb = sha1_thumbprint(cert)
        ids = frozenset(
            {
                fp,
                fp.upper(),
                thumb,
                thumb.lower(),
                x5t_s256(cert),
                format(cert.serial_number, "X"),
                str(cert.serial_number),
            }
        )
        public = cert.public_key()
        if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise JWSError("only RSA and EC certificates can verify signatures", code="jws_key_mismatch")
        return cls(public, ids, x5t_s256(cert), None, label or fp)


class Verified(NamedTuple):
    payload: bytes
    header: dict[str, Any]
    alg: str
    key: VerificationKey

    def json(self) -> Any:
        return json.loads(self.payload)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise JWSError(f"the JWS header repeats {name!r}", code="jws_header_invalid")
        out[name] = value
    return out


def parse_header(segment: str) -> dict[str, Any]:
    raw = b64url_decode(segment)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        if isinstance(exc, JWSError):
            raise
        raise JWSError("the JWS header is not valid JSON", code="jws_malformed") from None
    if not isinstance(header, dict):
        raise JWSError("the JWS header is not a JSON object", code="jws_malformed")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JWSError('the JWS header has no "alg"', code="jws_header_invalid")
    return header


Verify = Callable[[bytes, bytes], bool]


def _verify_fn(alg: str, key: PublicKey | bytes) -> Verify | None:
    """A function checking (signature, signing input) with this key and algorithm, or None
    when the key cannot be used with that algorithm."""
    family, bits = alg[:2], alg[2:]
    digest = _HASHES[bits]()
    if family == "HS":
        # A secret that is really a public key (PEM, SSH) is the "HS256 keyed with the
        # public key" confusion: never usable as an HMAC key.
        if (
            not isinstance(key, bytes)
            or len(key) < digest.digest_size
            or key.lstrip().startswith(_NOT_SECRETS)
        ):
            return None
        name = digest.name

        def verify_hmac(signature: bytes, data: bytes) -> bool:
            return hmac.compare_digest(hmac.new(key, data, name).digest(), signature)

        return verify_hmac
    if family in ("RS", "PS"):
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
            return None
        length = (key.key_size + 7) // 8
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if family == "RS"
            else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        )
        rsa_verify = key.verify

        def verify_rsa(signature: bytes, data: bytes) -> bool:
            if len(signature) != length:
                return False
            try:
                rsa_verify(signature, data, pad, digest)
            except InvalidSignature:
                return False
            return True

        return verify_rsa
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != _EC_CURVES[alg]:
        return None
    size = _EC_SIZES[alg]
    ecdsa = ec.ECDSA(digest)
    ec_verify = key.verify

    def verify_ec(signature: bytes, data: bytes) -> bool:
        if len(signature) != 2 * size:
            return False
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        try:
            ec_verify(encode_dss_signature(r, s), data, ecdsa)
        except InvalidSignature:
            return False
        return True

    return verify_ec


class _Prepared(NamedTuple):
    header: dict[str, Any]
    alg: str
    attempts: tuple[tuple[Verify, VerificationKey], ...]  # matching kid / x5t#S256 first


class Verifier:
    """Verifies compact JWS against a fixed set of keys under a fixed policy.

    Build one per key set and reuse it: keys are prepared once, and each distinct header
    is parsed and checked once (clients send the same header on every request).
    """

    _HEADER_CACHE_SIZE = 256

    def __init__(
        self,
        keys: Iterable[VerificationKey | PublicKey | x509.Certificate | bytes],
        *,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        critical: Iterable[str] = (),
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        if "none" in algorithms:
            raise JWSError("the algorithm 'none' can never be allowed", code="jws_alg_not_allowed")
        for alg in algorithms:
            _check_alg_name(alg)
        self.algorithms = tuple(algorithms)
        self.critical = frozenset(critical)
        self.max_size = max_size
        self.keys: list[VerificationKey] = []
        for item in keys:
            if isinstance(item, VerificationKey):
                self.keys.append(item)
            elif isinstance(item, x509.Certificate):
                self.keys.append(VerificationKey.from_certificate(item))
            else:
                self.keys.append(VerificationKey(item))
        self._prepared: dict[bytes, _Prepared] = {}

    def _prepare(self, segment: bytes) -> _Prepared:
        """The parsed and checked header with its candidate keys. Cached by :meth:`verify`
        only once a signature verified with it: refused tokens cannot fill the cache."""
        prepared = self._prepared.get(segment)
        if prepared is not None:
            return prepared
        if len(segment) > MAX_HEADER:
            raise JWSError(
                f"the JWS header is {len(segment)} bytes; headers over {MAX_HEADER} are refused",
                code="jws_header_invalid",
            )
        header = parse_header(segment.decode("ascii"))
        self._check_policy(header)
        alg = header["alg"]
        kid, thumb = header.get("kid"), header.get("x5t#S256")
        named, others = [], []
        for vk in self.keys:
            fn = _verify_fn(alg, vk.key) if vk.alg in (None, alg) else None
            if fn is None:
                continue
            if (isinstance(kid, str) and kid in vk.ids) or (isinstance(thumb, str) and thumb == vk.x5t_s256):
                named.append((fn, vk))
            else:
                others.append((fn, vk))
        return _Prepared(header, alg, tuple(named + others))

    def signed_by_a_known_key(self, token: str | bytes) -> bool | None:
        """For a token whose signature did not verify: True if one of the keys made the
        signature (over other bytes — the body changed after signing), False if none of them
        did (an unregistered key), None when the algorithm cannot tell. RS* can: the PKCS#1
        v1.5 padding comes out right only with the signer's public key."""
        raw = token.encode("ascii", "replace") if isinstance(token, str) else token
        parts = raw.strip().split(b".")
        if len(parts) != 3:
            return None
        try:
            prepared = self._prepare(parts[0])
            signature = _b64decode(parts[2])
        except JWSError:
            return None
        if not prepared.alg.startswith("RS"):
            return None
        for _fn, vk in prepared.attempts:
            if not isinstance(vk.key, rsa.RSAPublicKey):
                continue
            try:
                vk.key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
            except (InvalidSignature, ValueError):
                continue
            return True
        return False

    def _remember(self, segment: bytes, prepared: _Prepared) -> None:
        if segment not in self._prepared:
            if len(self._prepared) >= self._HEADER_CACHE_SIZE:
                self._prepared.clear()
            self._prepared[segment] = prepared

    def _check_policy(self, header: dict[str, Any]) -> None:
        alg = header["alg"]
        if alg not in self.algorithms:
            allowed = ", ".join(self.algorithms)
            raise JWSError(
                f"the JWS algorithm {alg!r} is not allowed here; sign with {allowed}",
                code="jws_alg_not_allowed",
            )
        crit = header.get("crit")
        if crit is not None:
            if (
                not isinstance(crit, list)
                or not crit
                or not all(isinstance(c, str) and c for c in crit)
                or len(set(crit)) != len(crit)
            ):
                raise JWSError('the JWS "crit" header must be a list of names', code="jws_header_invalid")
            for name in crit:
                if name in _REGISTERED:
                    raise JWSError(f'"crit" may not list {name!r}', code="jws_header_invalid")
                if name not in self.critical:
                    raise JWSError(
                        f"the JWS marks {name!r} as critical, which this verifier does not understand",
                        code="jws_crit_unsupported",
                    )
                if name not in header:
                    raise JWSError(
                        f'"crit" lists {name!r}, which the header lacks', code="jws_header_invalid"
                    )
        if header.get("b64", True) is not True:
            raise JWSError(
                'unencoded payloads (RFC 7797 "b64": false) are not accepted; sign the base64url form',
                code="jws_header_invalid",
            )

    def verify(self, token: str | bytes, *, detached_payload: bytes | None = None) -> Verified:
        """The verified payload and header, or :class:`JWSError` saying why not.

        ``detached_payload`` verifies a detached JWS (``header..signature``, RFC 7515 F).
        """
        if len(token) > self.max_size:
            raise JWSError(
                f"the JWS is {len(token)} bytes; the limit is {self.max_size}",
                code="jws_too_large",
                status=413,
            )
        if isinstance(token, str):
            if not token.isascii():
                raise _malformed(token.encode("utf-8", "replace"))
            token = token.encode("ascii")
        token = token.strip()
        parts = token.split(b".")
        if len(parts) != 3 or not parts[0] or not parts[2] or token.translate(None, _COMPACT_CHARS):
            raise _malformed(token)
        header_seg, payload_seg, signature_seg = parts
        prepared = self._prepare(header_seg)
        signature = _b64decode(signature_seg)
        if detached_payload is not None:
            if payload_seg:
                raise JWSError("a detached JWS must have an empty payload segment", code="jws_malformed")
            payload = detached_payload
            data = header_seg + b"." + base64.urlsafe_b64encode(payload).rstrip(b"=")
        else:
            payload = _b64decode(payload_seg)
            data = token[: len(token) - len(signature_seg) - 1]
        for fn, vk in prepared.attempts:
            if fn(signature, data):
                self._remember(header_seg, prepared)
                return Verified(payload, dict(prepared.header), prepared.alg, vk)
        if not prepared.attempts:
            raise JWSError(
                f"no key here can verify {prepared.alg}: the keys are of another type or size",
                code="jws_no_key",
            )
        raise JWSError("the signature does not verify against any of the keys", code="jws_signature_invalid")


def _malformed(token: bytes) -> JWSError:
    if token.startswith(b"{"):
        return JWSError(
            "JWS JSON serialization is not accepted; send the compact form header.payload.signature",
            code="jws_malformed",
        )
    parts = token.count(b".") + 1 if token else 0
    if parts != 3:
        return JWSError(f"a compact JWS has 3 dot-separated parts, this has {parts}", code="jws_malformed")
    head, _, rest = token.partition(b".")
    if not head or not rest.rpartition(b".")[2]:
        return JWSError("the JWS header or signature is empty (alg 'none' is refused)", code="jws_malformed")
    return JWSError("the JWS contains characters outside base64url", code="jws_malformed")


def verify(
    token: str | bytes,
    keys: VerificationKey
    | PublicKey
    | x509.Certificate
    | Iterable[VerificationKey | PublicKey | x509.Certificate],
    *,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    critical: Iterable[str] = (),
    detached_payload: bytes | None = None,
) -> Verified:
    """One-shot verification; build a :class:`Verifier` to verify many tokens."""
    if isinstance(
        keys, (VerificationKey, x509.Certificate, rsa.RSAPublicKey, ec.EllipticCurvePublicKey, bytes)
    ):
        keys = [keys]
    return Verifier(keys, algorithms=algorithms, critical=critical).verify(
        token, detached_payload=detached_payload
    )


def unverified_header(token: str) -> dict[str, Any]:
    """The header of a compact JWS, for display only: never trust it for a decision."""
    return parse_header(token.strip().split(".", 1)[0])
