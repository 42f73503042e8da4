"""One exception tree for the whole project.

Every error carries a stable machine-readable ``code`` (part of the public interface: the
JSON APIs, ``--json`` output and exit messages all use it), a message that tells the user
what to do next, and the HTTP status a server should answer with.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TwofoldError(Exception):
    """Base of every error twofold raises on purpose."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 400
    retry_after: int | None = None  # seconds: servers send it as Retry-After (with a 503 or 429)

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]
        if status is not None:
            self.status = status  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class KeyLoadError(TwofoldError):
    """A file is not the private or public key that was expected (or cannot be decrypted)."""

    code = "key_invalid"


class CertificateError(TwofoldError):
    """A certificate (or CSR) cannot be parsed, built or accepted."""

    code = "certificate_invalid"


class JWSError(TwofoldError):
    """A JWS cannot be produced, or is refused by the verifier.

    Codes: ``jws_malformed`` (not a strict compact JWS), ``jws_alg_not_allowed``,
    ``jws_crit_unsupported``, ``jws_header_invalid``, ``jws_too_large``,
    ``jws_no_key`` (no key matches the header), ``jws_signature_invalid``.
    """

    code = "jws_malformed"


class ClientError(TwofoldError):
    """An mTLS call could not be made (TLS failure, connection refused, bad options)."""

    code = "client_error"


class UsageError(TwofoldError):
    """Options or input given to a command or function do not make sense together."""

    code = "usage"
