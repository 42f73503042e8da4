"""RS256 compact-JWS sign and verify throughput: twofold against a raw `cryptography` loop and
the JOSE libraries, measured side by side in one run.

Every implementation signs the same ~300-byte payment-initiation JSON with the same RSA-2048
key, loaded once, and every verifier verifies the same token (the reference loop's, header
``{"alg":"RS256"}``), as a gateway receives it: bytes, or str where the library takes only str.

The machines are shared and noisy, so runs are interleaved: each round runs every
(implementation, operation) pair for a fixed time slice in a shuffled order. The reported
ops/s is the median over rounds; "× raw" is the median over rounds of the ratio to the raw
loop measured in the same round, which cancels most of the drift between rounds.

Targets (exit status 1 when one fails): twofold verify ≥ 0.85× the raw loop, and not slower
than any library.

    .venv/bin/python bench/jws_bench.py [--rounds 7] [--seconds 0.3] [--json | --markdown]
"""

from __future__ import annotations

import argparse
import base64
import functools
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jws as joserfc_jws
from joserfc.jwk import RSAKey
from jwcrypto import jwk as jwcrypto_jwk  # type: ignore[import-untyped]
from jwcrypto import jws as jwcrypto_jws

from twofold.crypto import jws as twofold_jws

Operation = Literal["sign", "verify"]
OPERATIONS: tuple[Operation, ...] = ("sign", "verify")
REFERENCE = "raw cryptography"
VERIFY_TARGET = 0.85

# A bank payment initiation, serialised compactly: the body a client signs and sends.
PAYLOAD: bytes = json.dumps(
    {
        "paymentIdentifiers": {"endToEndId": "E2E-20250114-000042-7Q3F9K"},
        "value": {"currency": "EUR", "amount": "1250.00"},
        "debtor": {"name": "Acme Trading GmbH", "account": {"iban": "DE89370400440532013000"}},
        "creditor": {"name": "Nordic Parts Oy", "account": {"iban": "FI2112345600000785"}},
        "remittanceInformation": "INV-0117",
    },
    separators=(",", ":"),
).encode()

_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64url_decode(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


# --- the implementations ------------------------------------------------------------------


@dataclass
class Impl:
    """One row of the table.

    ``sign()`` signs ``PAYLOAD``; ``verify(token)`` verifies a token given as bytes, or as
    str when ``str_token`` is set (the library takes only str, or the row measures str input).
    """

    name: str
    sign: Callable[[], str | bytes] | None
    verify: Callable[[Any], object] | None
    note: str = ""
    str_token: bool = False

    def token_input(self, token: bytes) -> bytes | str:
        return token.decode("ascii") if self.str_token else token


@dataclass
class Material:
    private_key: rsa.RSAPrivateKey
    public_key: rsa.RSAPublicKey
    private_pem: bytes
    public_pem: bytes


def make_material() -> Material:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_key = private_key.public_key()
    return Material(
        private_key,
        public_key,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )


def reference_sign(private_key: rsa.RSAPrivateKey, payload: bytes) -> bytes:
    """The minimal correct RS256 compact JWS: base64url(header).base64url(payload).signature."""
    signing_input = _b64url(b'{"alg":"RS256"}') + b"." + _b64url(payload)
    return signing_input + b"." + _b64url(private_key.sign(signing_input, _PKCS1, _SHA256))


def reference_verify(public_key: rsa.RSAPublicKey, token: bytes) -> bytes:
    """The minimal correct verification: split, decode, verify; returns the payload."""
    _header, payload_segment, signature_segment = token.split(b".")
    signature = _b64url_decode(signature_segment)
    payload = _b64url_decode(payload_segment)
    public_key.verify(signature, token[: len(token) - len(signature_segment) - 1], _PKCS1, _SHA256)
    return payload


def build_impls(m: Material) -> list[Impl]:
    """Every implementation, with its keys loaded and its verifier built once."""
    verifier = twofold_jws.Verifier([m.public_key])

    pyjws = jwt.PyJWS()

    jwcrypto_private = jwcrypto_jwk.JWK.from_pyca(m.private_key)
    jwcrypto_public = jwcrypto_jwk.JWK.from_pyca(m.public_key)
    jwcrypto_protected = json.dumps({"alg": "RS256"})

    def jwcrypto_sign() -> str:
        obj = jwcrypto_jws.JWS(PAYLOAD)
        obj.add_signature(jwcrypto_private, alg="RS256", protected=jwcrypto_protected)
        return str(obj.serialize(compact=True))

    def jwcrypto_verify(token: str) -> bytes:
        obj = jwcrypto_jws.JWS()
        obj.deserialize(token, key=jwcrypto_public, alg="RS256")
        return bytes(obj.payload)

    joserfc_private = RSAKey.import_key(m.private_pem)
    joserfc_public = RSAKey.import_key(m.public_pem)
    joserfc_header = {"alg": "RS256"}

    return [
        Impl(
            REFERENCE,
            lambda: reference_sign(m.private_key, PAYLOAD),
            lambda token: reference_verify(m.public_key, token),
            "split, base64url-decode, `RSAPublicKey.verify`",
        ),
        Impl(
            "twofold",
            lambda: twofold_jws.sign(PAYLOAD, m.private_key),
            verifier.verify,
            "`sign`; `Verifier([public_key]).verify(token_bytes)`",
        ),
        Impl(
            "twofold, str token",
            None,
            verifier.verify,
            "`Verifier.verify(token_str)`",
            str_token=True,
        ),
        Impl(
            f"PyJWT {importlib.metadata.version('PyJWT')}",
            lambda: pyjws.encode(PAYLOAD, m.private_key, algorithm="RS256"),
            lambda token: pyjws.decode_complete(token, m.public_key, algorithms=["RS256"]),
            "`PyJWS.encode` (signs the exact bytes; header adds `typ`); "
            "`PyJWS.decode_complete` (no JWT claim checks)",
        ),
        Impl(
            f"joserfc {importlib.metadata.version('joserfc')}",
            lambda: joserfc_jws.serialize_compact(
                joserfc_header, PAYLOAD, joserfc_private, algorithms=["RS256"]
            ),
            lambda token: joserfc_jws.deserialize_compact(token, joserfc_public, algorithms=["RS256"]),
            "`serialize_compact` / `deserialize_compact`, imported `RSAKey`",
        ),
        Impl(
            f"jwcrypto {importlib.metadata.version('jwcrypto')}",
            jwcrypto_sign,
            jwcrypto_verify,
            "`JWS.add_signature` / `JWS.deserialize(key=...)`, pre-imported `JWK`; "
            "str token (it takes no bytes)",
            str_token=True,
        ),
    ]


def payload_of(result: object) -> bytes:
    """The payload a verify call returned, whatever shape the library returns it in."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, twofold_jws.Verified):
        return result.payload
    if isinstance(result, dict):
        return bytes(result["payload"])
    return bytes(result.payload)  # type: ignore[attr-defined]  # joserfc CompactSignature


def _abort(reason: str) -> NoReturn:
    print(f"sanity check failed, nothing measured: {reason}", file=sys.stderr)
    sys.exit(2)


def sanity_check(impls: list[Impl], m: Material, token: bytes) -> None:
    """Abort unless every token verifies in the reference verifier and every verifier
    returns the exact payload of the reference token and rejects a tampered one."""
    signature_segment = token.rsplit(b".", 1)[1]
    flipped = b"B" if signature_segment[:1] != b"B" else b"C"
    tampered = token[: len(token) - len(signature_segment)] + flipped + signature_segment[1:]
    try:
        reference_verify(m.public_key, tampered)
    except InvalidSignature:
        pass
    else:
        _abort("the reference verifier accepts a tampered token")
    for impl in impls:
        if impl.sign is not None:
            produced = impl.sign()
            produced_bytes = produced.encode("ascii") if isinstance(produced, str) else produced
            try:
                payload = reference_verify(m.public_key, produced_bytes)
            except (InvalidSignature, ValueError) as exc:
                _abort(f"{impl.name}'s token does not verify in the reference verifier: {exc!r}")
            if payload != PAYLOAD:
                _abort(f"{impl.name} signed a different payload")
        if impl.verify is not None:
            if payload_of(impl.verify(impl.token_input(token))) != PAYLOAD:
                _abort(f"{impl.name}'s verifier returns a different payload")
            try:
                impl.verify(impl.token_input(tampered))
            except Exception:
                pass
            else:
                _abort(f"{impl.name}'s verifier accepts a tampered token")


# --- measuring ------------------------------------------------------------------------------

Clock = Callable[[], float]


def run_slice(fn: Callable[[], object], seconds: float, batch: int, clock: Clock) -> float:
    """Call ``fn`` in batches for ``seconds``; the achieved calls per second."""
    calls = 0
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = clock()
        if now >= deadline:
            return calls / (now - start)


@dataclass
class Series:
    """The per-round measurements of one (implementation, operation)."""

    ops: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ops)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """(max − min) / median over rounds, as a fraction."""
        return (max(self.ops) - min(self.ops)) / self.median


Results = dict[tuple[str, Operation], Series]


def measure(
    impls: list[Impl], token: bytes, rounds: int, seconds: float, clock: Clock, progress: bool
) -> Results:
    tasks: list[tuple[str, Operation, Callable[[], object]]] = []
    for impl in impls:
        if impl.sign is not None:
            tasks.append((impl.name, "sign", impl.sign))
        if impl.verify is not None:
            tasks.append((impl.name, "verify", functools.partial(impl.verify, impl.token_input(token))))

    # Warm up and size the batches so the clock is read about every 5 ms.
    batches: dict[tuple[str, Operation], int] = {}
    for name, op, fn in tasks:
        rate = run_slice(fn, min(seconds, 0.1), 1, clock)
        batches[name, op] = max(1, int(rate * 0.005))

    results: Results = {(name, op): Series() for name, op, _ in tasks}
    for round_no in range(1, rounds + 1):
        order = tasks[:]
        random.shuffle(order)
        this_round: dict[tuple[str, Operation], float] = {}
        for name, op, fn in order:
            gc.collect()
            this_round[name, op] = run_slice(fn, seconds, batches[name, op], clock)
        for key, ops in this_round.items():
            results[key].ops.append(ops)
            results[key].ratios.append(ops / this_round[REFERENCE, key[1]])
        if progress:
            print(f"  round {round_no}/{rounds} done", file=sys.stderr)
    return results


def check_targets(impls: list[Impl], results: Results) -> list[tuple[str, bool]]:
    """(description, passed) for each target, on both token forms twofold accepts."""
    libraries = [
        i.name for i in impls if i.verify is not None and not i.name.startswith(("twofold", REFERENCE))
    ]
    checks: list[tuple[str, bool]] = []
    for name in ("twofold", "twofold, str token"):
        ours = results[name, "verify"].ratio
        checks.append(
            (f"{name} verify ≥ {VERIFY_TARGET:.2f}× raw (measured {ours:.2f}×)", ours >= VERIFY_TARGET)
        )
        for lib in libraries:
            theirs = results[lib, "verify"].ratio
            checks.append(
                (f"{name} verify not slower than {lib} ({ours:.2f}× vs {theirs:.2f}× raw)", ours >= theirs)
            )
    return checks


# --- reporting ------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cryptography": importlib.metadata.version("cryptography"),
        "openssl": openssl_backend.openssl_version_text(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def describe_run(facts: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"RS256, RSA-2048, {len(PAYLOAD)}-byte payload; median of {args.rounds} interleaved rounds × "
        f"{args.seconds:g} s ({args.clock} clock). {facts['python']}, cryptography {facts['cryptography']}, "
        f"{facts['openssl']}, {facts['cpus_usable']}/{facts['cpu_count']} CPUs ({facts['cpu_model']}), "
        f"load {facts['load_average']}"
    )


def _cell(series: Series | None) -> tuple[str, str]:
    if series is None:
        return "—", "—"
    return f"{series.median:,.0f}", f"{series.ratio:.2f}×"


def markdown_table(impls: list[Impl], results: Results) -> str:
    lines = ["| implementation | sign/s | × raw | verify/s | × raw |", "| --- | ---: | ---: | ---: | ---: |"]
    for impl in impls:
        sign = _cell(results.get((impl.name, "sign")))
        verify = _cell(results.get((impl.name, "verify")))
        lines.append(f"| {impl.name} | {sign[0]} | {sign[1]} | {verify[0]} | {verify[1]} |")
    return "\n".join(lines)


def text_table(impls: list[Impl], results: Results) -> str:
    header = (
        f"{'implementation':<22}{'sign/s':>10}{'× raw':>8}{'spread':>8}"
        f"{'verify/s':>11}{'× raw':>8}{'spread':>8}"
    )
    lines = [header, "-" * len(header)]
    for impl in impls:
        cells = []
        columns: tuple[tuple[Operation, int], ...] = (("sign", 10), ("verify", 11))
        for op, width in columns:
            series = results.get((impl.name, op))
            if series is None:
                cells.append(f"{'—':>{width}}{'—':>8}{'—':>8}")
            else:
                cells.append(f"{series.median:>{width},.0f}{series.ratio:>7.2f}×{series.spread:>8.0%}")
        lines.append(f"{impl.name:<22}{''.join(cells)}")
    lines.append("")
    lines.extend(f"  {impl.name}: {impl.note}" for impl in impls)
    return "\n".join(lines)


def json_report(
    facts: dict[str, Any],
    args: argparse.Namespace,
    impls: list[Impl],
    results: Results,
    checks: list[tuple[str, bool]],
) -> str:
    rows = []
    for impl in impls:
        row: dict[str, Any] = {"implementation": impl.name, "how": impl.note}
        for op in OPERATIONS:
            series = results.get((impl.name, op))
            row[op] = (
                None
                if series is None
                else {
                    "median_ops_per_s": round(series.median, 1),
                    "ratio_to_raw": round(series.ratio, 4),
                    "ops_per_s_by_round": [round(x, 1) for x in series.ops],
                    "ratio_by_round": [round(x, 4) for x in series.ratios],
                }
            )
        rows.append(row)
    report = {
        "benchmark": "jws_rs256",
        "machine": facts,
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "clock": args.clock},
        "payload_bytes": len(PAYLOAD),
        "key": "RSA-2048",
        "results": rows,
        "targets": [{"target": text, "passed": ok} for text, ok in checks],
        "passed": all(ok for _, ok in checks),
    }
    return json.dumps(report, indent=2, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--seconds", type=float, default=0.3, help="time slice per task per round (default 0.3)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter (default); cpu: process CPU time, less sensitive to other tenants",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="machine-readable output")
    output.add_argument("--markdown", action="store_true", help="a Markdown table for a README")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be ≥ 1 and --seconds > 0")
    clock: Clock = time.perf_counter if args.clock == "wall" else time.process_time

    facts = machine_facts()
    material = make_material()
    token = reference_sign(material.private_key, PAYLOAD)
    impls = build_impls(material)
    sanity_check(impls, material, token)

    if args.markdown:
        print(f"{describe_run(facts, args)}\n")
    elif not args.json:
        print(f"JWS RS256 benchmark\n{describe_run(facts, args)}\n")
        sys.stdout.flush()
    results = measure(impls, token, args.rounds, args.seconds, clock, progress=sys.stderr.isatty())
    checks = check_targets(impls, results)

    if args.json:
        print(json_report(facts, args, impls, results, checks))
    elif args.markdown:
        print(markdown_table(impls, results))
    else:
        print(text_table(impls, results))
        print("\nTargets:")
        for text, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")

    failed = [text for text, ok in checks if not ok]
    for text in failed:
        print(f"target failed: {text}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
