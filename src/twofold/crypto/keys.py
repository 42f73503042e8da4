"""Private and public keys: make them, write them, and read every form integrators meet.

Reading accepts PEM or DER; PKCS#1, PKCS#8 or SEC1; encrypted or not; PKCS#12 bundles;
OpenSSH private keys. Each refusal names what the file is and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from twofold.crypto import _pem
from twofold.errors import KeyLoadError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

Passphrase = bytes | str | Callable[[], bytes | str | None] | None
"""A passphrase, or a function asked for one only when the key turns out to be encrypted."""

CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_CURVE_ALIASES = {
    "p256": "P-256",
    "secp256r1": "P-256",
    "prime256v1": "P-256",
    "p384": "P-384",
    "secp384r1": "P-384",
    "p521": "P-521",
    "secp521r1": "P-521",
}
_JOSE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
RSA_SIZES = (2048, 3072, 4096)


def jose_curve(curve: ec.EllipticCurve) -> str:
    """``P-256`` for secp256r1 and so on (the name JWK and ``twofold`` use)."""
    return _JOSE_NAMES.get(curve.name, curve.name)


def curve_name(name: str) -> str:
    """Normalise a curve name (``P-256``, ``prime256v1``, ``secp256r1`` …) to the JOSE name."""
    key = name.replace("-", "").replace("_", "").lower()
    if name in CURVES:
        return name
    if key in _CURVE_ALIASES:
        return _CURVE_ALIASES[key]
    raise KeyLoadError(
        f"unknown curve {name!r}: use one of {', '.join(CURVES)}", code="key_curve_unsupported"
    )


def generate_private_key(kind: str = "rsa", *, bits: int = 2048, curve: str = "P-256") -> PrivateKey:
    """A new RSA (default 2048-bit, e=65537) or EC (default P-256) private key."""
    if kind == "rsa":
        if bits not in RSA_SIZES:
            raise KeyLoadError(
                f"RSA keys must be {', '.join(map(str, RSA_SIZES))} bits, not {bits}",
                code="key_size_unsupported",
            )
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if kind == "ec":
        return ec.generate_private_key(CURVES[curve_name(curve)]())
    raise KeyLoadError(f"unknown key type {kind!r}: use rsa or ec", code="key_type_unsupported")


def private_key_bytes(key: PrivateKey, *, der: bool = False, passphrase: bytes | None = None) -> bytes:
    """PKCS#8, PEM (default) or DER, encrypted with the best available scheme if a passphrase
    is given (PBES2 with AES-256-CBC and a strong KDF, what OpenSSL 3 writes too)."""
    encryption: serialization.KeySerializationEncryption
    if passphrase:
        encryption = serialization.BestAvailableEncryption(passphrase)
    else:
        encryption = serialization.NoEncryption()
    return key.private_bytes(
        serialization.Encoding.DER if der else serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption,
    )


def public_key_bytes(key: PublicKey | PrivateKey, *, der: bool = False) -> bytes:
    public = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    return public.public_bytes(
        serialization.Encoding.DER if der else serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def describe_key(key: PrivateKey | PublicKey) -> str:
    """``RSA 2048`` or ``EC P-256``: what people write in tickets."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size}"
    return f"EC {jose_curve(key.curve)}"


@dataclass(frozen=True)
class Credentials:
    """What one file gave: a private key, maybe its certificate and a chain (PKCS#12, PEM bundle)."""

    key: PrivateKey
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = field(default_factory=tuple)


def _resolve(passphrase: Passphrase) -> bytes | None:
    value = passphrase() if callable(passphrase) else passphrase
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else value


def _check_type(key: object, name: str) -> PrivateKey:
    if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        return key
    kind = "Ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else type(key).__name__
    raise KeyLoadError(
        f"{name} holds a {kind} key; twofold signs and calls with RSA or EC keys only",
        code="key_type_unsupported",
    )


def _needs_passphrase(name: str) -> KeyLoadError:
    return KeyLoadError(
        f"the private key in {name} is encrypted and no passphrase was given",
        code="key_passphrase_required",
    )


def _wrong_passphrase(name: str) -> KeyLoadError:
    return KeyLoadError(
        f"the passphrase does not decrypt the private key in {name} (wrong passphrase?)",
        code="key_passphrase_wrong",
    )


def _not_a_private_key(data: bytes, name: str) -> KeyLoadError:
    what = _pem.describe(data)
    hint = ""
    if "certificate" in what and "request" not in what and not what.startswith("neither"):
        hint = "; give the private key file that belongs to it"
    elif "public key" in what:
        hint = "; a public key cannot sign or authenticate: give the private key"
    elif "signing request" in what:
        hint = "; give the private key the request was made with"
    return KeyLoadError(f"{name} is {what}, but a private key was expected{hint}", code="key_not_private")


def _load_one(pem_or_der: bytes, password: bytes | None, der: bool) -> object:
    loader = serialization.load_der_private_key if der else serialization.load_pem_private_key
    return loader(pem_or_der, password=password)


def load_credentials(
    data: bytes, passphrase: Passphrase = None, *, name: str = "the key file"
) -> Credentials:
    """Read a private key (and its certificate, if the file carries one) from any usual form."""
    if _pem.is_pem(data):
        return _load_pem_credentials(data, passphrase, name)
    return _load_der_credentials(data, passphrase, name)


def _decrypting(attempt: Callable[[bytes | None], object], passphrase: Passphrase, name: str) -> object:
    """Try without a password first; ask for the passphrase only if the key is encrypted."""
    try:
        return attempt(None)
    except TypeError:  # "password was not given but private key is encrypted"
        pass
    except ValueError as exc:
        raise KeyLoadError(f"{name}: the private key cannot be read ({exc})") from None
    password = _resolve(passphrase)
    if not password:
        raise _needs_passphrase(name)
    try:
        return attempt(password)
    except (TypeError, ValueError):
        raise _wrong_passphrase(name) from None


def _load_pem_credentials(data: bytes, passphrase: Passphrase, name: str) -> Credentials:
    blocks = list(_pem.pem_blocks(data))
    keys = [b for b in blocks if b.label in _pem.PRIVATE_LABELS]
    certs = [b for b in blocks if b.label in _pem.CERTIFICATE_LABELS and b.der]
    if not keys:
        raise _not_a_private_key(data, name)
    if len(keys) > 1:
        raise KeyLoadError(
            f"{name} holds {len(keys)} private keys; give a file with one", code="key_ambiguous"
        )
    block = keys[0]
    if block.label == "OPENSSH PRIVATE KEY":
        raw = _decrypting(
            lambda pw: serialization.load_ssh_private_key(block.text, password=pw), passphrase, name
        )
    else:
        raw = _decrypting(lambda pw: _load_one(block.text, pw, der=False), passphrase, name)
    key = _check_type(raw, name)
    parsed = [x509.load_der_x509_certificate(c.der) for c in certs if c.der]
    leaf, chain = _pick_leaf(key, parsed)
    return Credentials(key, leaf, chain)


def _load_der_credentials(data: bytes, passphrase: Passphrase, name: str) -> Credentials:
    kind = _pem.sniff_der(data)
    if kind == "pkcs12":
        return _load_pkcs12(data, passphrase, name)
    if kind != "private key":
        raise _not_a_private_key(data, name)
    raw = _decrypting(lambda pw: _load_one(data, pw, der=True), passphrase, name)
    return Credentials(_check_type(raw, name))


def _load_pkcs12(data: bytes, passphrase: Passphrase, name: str) -> Credentials:
    try:  # many bundles are protected by an empty password
        bundle = pkcs12.load_key_and_certificates(data, None)
    except ValueError:
        password = _resolve(passphrase)
        if not password:
            raise _needs_passphrase(name) from None
        try:
            bundle = pkcs12.load_key_and_certificates(data, password)
        except ValueError:
            raise _wrong_passphrase(name) from None
    key, cert, extra = bundle
    if key is None:
        raise KeyLoadError(f"{name} is a PKCS#12 bundle without a private key", code="key_not_private")
    return Credentials(_check_type(key, name), cert, tuple(extra))


def _pick_leaf(
    key: PrivateKey, certs: list[x509.Certificate]
) -> tuple[x509.Certificate | None, tuple[x509.Certificate, ...]]:
    mine = public_key_bytes(key, der=True)
    leaf = next((c for c in certs if public_key_bytes(c.public_key(), der=True) == mine), None)  # type: ignore[arg-type]
    return leaf, tuple(c for c in certs if c is not leaf)


def load_private_key(data: bytes, passphrase: Passphrase = None, *, name: str = "the key file") -> PrivateKey:
    return load_credentials(data, passphrase, name=name).key


def load_public_key(data: bytes, *, name: str = "the key file") -> PublicKey:
    """A public key from a public key, a certificate or an (unencrypted) private key file."""
    from twofold.crypto.certs import load_certificate

    candidates: list[bytes] = []
    if _pem.is_pem(data):
        for block in _pem.pem_blocks(data):
            if block.label in _pem.CERTIFICATE_LABELS:
                return _check_public(load_certificate(block.text, name=name).public_key(), name)
            if block.label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                candidates.append(block.text)
        for text in candidates:
            try:
                return _check_public(serialization.load_pem_public_key(text), name)
            except ValueError as exc:
                raise KeyLoadError(f"{name}: the public key is damaged ({exc})") from None
    else:
        kind = _pem.sniff_der(data)
        if kind == "certificate":
            return _check_public(load_certificate(data, name=name).public_key(), name)
        if kind == "public key":
            return _check_public(serialization.load_der_public_key(data), name)
    try:
        return load_private_key(data, name=name).public_key()
    except KeyLoadError:
        pass
    raise KeyLoadError(
        f"{name} is {_pem.describe(data)}, but a public key or certificate was expected",
        code="key_not_public",
    )


def _check_public(key: object, name: str) -> PublicKey:
    if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return key
    raise KeyLoadError(
        f"{name} holds a {type(key).__name__}; only RSA and EC keys are supported",
        code="key_type_unsupported",
    )
