"""The gateway's HTTP/1.1 server protocol: an ``asyncio.Protocol`` that parses with
``httptools`` (llhttp, strict) and takes each request through the pipeline.

Per connection, requests are answered strictly in order (pipelining): the parser fills a
queue of requests, the first one is processed, the next starts when its answer is
written. Everything decided before the body (identify → route → authorise → the declared
length) runs as soon as the head is in, so a refusal needs no body and ``Expect:
100-continue`` gets its ``100 Continue`` only when the request would be accepted.

Limits are checked as bytes arrive: the request target, each header, all headers, the
body, the framing of chunked bodies (chunk extensions and trailers); a request over one
is refused with a JSON error and the connection closed. Deadlines (:class:`Limits`) bound
reading the head, reading the body, idle keep-alive and a client that does not read its
answers. Reading pauses while the client's answers are not being read (backpressure) and
while a request is being processed with another already queued, so one connection can
buffer little more than one request ahead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, cast

import httptools

from twofold.errors import TwofoldError
from twofold.gateway import pipeline
from twofold.gateway.facts import ConnectionFacts, RequestHead
from twofold.gateway.forward import Response, refusal
from twofold.gateway.pipeline import Admitted, GatewayError, Outcome
from twofold.gateway.sandbox import Forwarded
from twofold.gateway.upstream import UpstreamResponse
from twofold.gateway.wire import Limits, serialise_response

if TYPE_CHECKING:
    from twofold.gateway.core import Gateway

log = logging.getLogger("twofold.gateway")

_SLICE = 16 * 1024  # the parser is fed at most this much at a time (limits are checked in between)
_CHUNK_FRAMING = 64  # bytes of framing allowed per chunk (size line, CRLFs) before the slack


class _Refused(Exception):
    """Raised inside a parser callback to stop the parser; the reason is on the protocol."""


# Deadlines: what the connection is waiting for, and what happens when it does not come.
_IDLE, _HEAD, _BODY, _SEND = "idle", "head", "body", "send"


class _Request:
    __slots__ = (
        "admitted",
        "body",
        "chunks",
        "close",
        "complete",
        "continue_sent",
        "discard",
        "error",
        "expect",
        "framing",
        "head",
        "keep_alive",
        "outcome",
        "responded",
        "size",
        "started",
    )

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.chunks = 0
        self.framing = 0
        self.complete = False
        self.keep_alive = True
        self.expect = False
        self.continue_sent = False
        self.admitted: Admitted | None = None
        self.error: TwofoldError | None = None
        self.discard = False  # answered before its body: the rest of the body is read and dropped
        self.close = False  # close the connection after answering
        self.responded = False
        self.outcome = Outcome()
        self.started = time.perf_counter()


class GatewayProtocol(asyncio.Protocol):
    """One client connection of an environment's listener. ``facts`` says how it arrived
    (for direct TLS: the handshake's client certificate); :meth:`facts_for` may derive
    per-request facts (a TLS edge's certificate header) from them."""

    def __init__(
        self,
        gateway: Gateway,
        environment: str,
        limits: Limits,
        *,
        on_open: Callable[[GatewayProtocol], None] | None = None,
        on_close: Callable[[GatewayProtocol], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.environment = environment
        self.limits = limits
        self.facts: ConnectionFacts | None = None
        self._headers: list[tuple[str, str]] = []
        self._max_field, self._max_fields, self._max_head = (
            limits.max_field,
            limits.max_fields,
            limits.max_head,
        )
        self._max_body = limits.max_body
        self._task: asyncio.Task[None] | None = None
        self._on_open, self._on_close = on_open, on_close
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: _Request | None = None  # the message the parser is filling
        self._queue: deque[_Request] = deque()  # heads complete, in order; [0] is being answered
        self._target: list[bytes] = []
        self._target_size = 0
        self._head_bytes = 0
        self._fields = 0
        self._refusal: TwofoldError | None = None
        self._parser_done = False  # after a refusal or an upgrade: nothing more is parsed
        self._busy = False  # the first request is being forwarded
        self._held = False  # reading paused by this protocol
        self._backlog: list[bytes] = []  # received while held
        self._write_paused = False
        self._closing = False
        self._epoch = 0  # bumped on every parser phase change (limits count whole slices in one phase)
        self._feed_body = 0
        self.deadline: float | None = None
        self.waiting_for = _IDLE

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if self.facts is None:
            self.facts = self.connection_facts(self._transport)
        self._set_deadline(_IDLE, self.limits.header_timeout)
        if self._on_open is not None:
            self._on_open(self)

    def connection_facts(self, transport: asyncio.Transport) -> ConnectionFacts:
        """How this connection arrived: the client certificate of the TLS handshake."""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = transport.get_extra_info("peername")
        return ConnectionFacts.of(self.environment, str(peer[0]) if isinstance(peer, tuple) else "", der)

    def facts_for(self, head: RequestHead) -> ConnectionFacts:
        """The facts a request is judged by (the connection's, for direct TLS)."""
        assert self.facts is not None
        return self.facts

    def data_received(self, data: bytes) -> None:
        self._feed(data)
        self._advance()

    def eof_received(self) -> bool | None:
        return None  # TLS cannot half-close: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.deadline = None
        parsing = self._parsing
        if (
            parsing is not None
            and parsing.head is not None
            and not parsing.complete
            and not parsing.responded
        ):
            # the client hung up mid-body: its fault, recorded as such (nothing can be answered)
            self._record(parsing, pipeline.client_disconnected(), 400)
        for request in self._queue:
            if (
                request is not parsing
                and not request.responded
                and not (request is self._queue[0] and self._busy)
            ):
                self._record(request, pipeline.client_disconnected(), 400)
        self._queue.clear()
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._hold()
        self._set_deadline(_SEND, self.limits.send_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.waiting_for == _SEND:
            self.deadline = None
        self._advance()

    # --- deadlines (checked by the listener about twice a second) ----------------------------

    def _set_deadline(self, what: str, seconds: float) -> None:
        if self._write_paused and what != _SEND:
            return  # the client not reading its answers is what times out
        self.waiting_for = what
        self.deadline = time.monotonic() + seconds

    def expire(self) -> None:
        """The deadline passed: refuse what is being read (408) or close an idle connection."""
        what, self.deadline = self.waiting_for, None
        if self._closing or self._transport is None:
            return
        if what == _SEND:
            self._transport.abort()  # it does not read: nothing more can be sent
            return
        if what == _IDLE and self._parsing is None:
            self._close()
            return
        seconds = self.limits.header_timeout if what in (_HEAD, _IDLE) else self.limits.body_timeout
        self._stop_parsing(
            GatewayError(
                f"the request was not received within {seconds:g} s; send it at once",
                code="request_timeout",
                status=408,
            )
        )
        self._advance()

    # --- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = _Request()
        self._target, self._headers = [], []
        self._target_size = self._head_bytes = self._fields = 0
        self._epoch += 1
        self._set_deadline(_HEAD, self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._target_size += len(url)
        if self._target_size > self.limits.max_target:
            self._refuse(
                414, "uri_too_long", f"the request target is longer than {self.limits.max_target} bytes"
            )
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        request = self._parsing
        if request is not None and request.head is not None:  # a trailer of a chunked body: framing
            request.framing += size
            return
        self._fields += 1
        self._head_bytes += size
        if size > self._max_field or self._fields > self._max_fields or self._head_bytes > self._max_head:
            self._refuse(
                400,
                "headers_too_large",
                f"the request's headers are too large (at most {self.limits.max_fields} headers of "
                f"{self.limits.max_field} bytes, {self.limits.max_head} bytes in all)",
            )
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        headers = self._headers
        target = (self._target[0] if len(self._target) == 1 else b"".join(self._target)).decode("latin-1")
        if not target.startswith("/"):  # absolute-form, authority-form, '*'
            try:
                url = httptools.parse_url(target.encode("latin-1"))
            except httptools.HttpParserInvalidURLError:
                self._refuse(400, "bad_request", "the request target is not a URL")
            target = (url.path or b"").decode("latin-1") + (
                "?" + url.query.decode("latin-1") if url.query else ""
            )
        path, _, query = target.partition("?")
        if "#" in target:
            query = query.partition("#")[0]
            path = path.partition("#")[0]
        method = self._parser.get_method().decode("ascii")
        try:
            head = RequestHead.parse_target(method, path, query, headers)
        except ValueError:
            self._refuse(400, "bad_request", "the Content-Length header is not a number")
        request.head = head
        request.keep_alive = self._parser.should_keep_alive()
        expect = head.expect
        if expect is not None:
            if expect.lower() != "100-continue":
                self._refuse(417, "expectation_failed", "the only expectation understood is 100-continue")
            request.expect = self._parser.get_http_version() == "1.1"
        self._queue.append(request)
        self._epoch += 1
        if head.has_body:
            self._set_deadline(_BODY, self.limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        size = len(body)
        self._feed_body += size
        request.size += size
        if request.size > self._max_body:
            request.body = []
            self._refuse(413, "body_too_large", f"the body is larger than {self.limits.max_body} bytes")
        if not request.discard:
            request.body.append(body)

    def on_chunk_header(self) -> None:
        assert self._parsing is not None
        self._parsing.chunks += 1

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        request.complete = True
        self._parsing = None
        self._epoch += 1
        if self.waiting_for in (_HEAD, _BODY):
            self.deadline = None

    # --- parsing --------------------------------------------------------------------------------

    def _refuse(self, status: int, code: str, message: str) -> NoReturn:
        self._refusal = GatewayError(message, code=code, status=status)
        raise _Refused

    def _feed(self, data: bytes) -> None:
        if self._held or self._parser_done:  # feeding the backlog, and it filled the queue again
            if not self._parser_done:
                self._backlog.append(data)
            return
        if len(data) <= _SLICE:  # the common case: one piece
            self._feed_piece(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), _SLICE):
            if self._held or self._parser_done:
                self._backlog.append(bytes(view[start:]))
                return
            if not self._feed_piece(view[start : start + _SLICE]):
                return

    def _feed_piece(self, piece: bytes | memoryview) -> bool:
        """Parse one piece; False when parsing stopped."""
        epoch, self._feed_body = self._epoch, 0
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self._stop_parsing(None)  # answer the request, then close: the rest is not HTTP
            return False
        except httptools.HttpParserCallbackError:
            refusal, self._refusal = self._refusal, None
            if refusal is None:  # a defect of this module, not of the request
                log.error("unexpected error in the HTTP parser's callbacks")
                refusal = GatewayError(
                    "the gateway failed; it has been logged", code="internal_error", status=500
                )
            self._stop_parsing(refusal)
            return False
        except httptools.HttpParserError as exc:
            self._stop_parsing(
                GatewayError(
                    f"the request could not be read as HTTP/1.1 ({exc})", code="bad_request", status=400
                )
            )
            return False
        if epoch == self._epoch and self._parsing is not None:  # the whole piece inside one phase
            self._count_slice(len(piece))
            if self._parser_done:
                return False
        if self._queue and (self._busy or len(self._queue) > 1):
            self._hold()
        return True

    def _count_slice(self, size: int) -> None:
        """Bytes the parser buffers without a callback: a header line still arriving, or a
        chunked body's framing (chunk extensions, trailers)."""
        request = self._parsing
        assert request is not None
        limits = self.limits
        if request.head is None:
            self._head_bytes += size
            if self._head_bytes > limits.max_head + limits.max_field:
                self._stop_parsing(
                    GatewayError(
                        f"the request's head is larger than {limits.max_head} bytes",
                        code="headers_too_large",
                        status=400,
                    )
                )
        elif request.head.chunked:
            request.framing += size - self._feed_body
            if request.framing > _CHUNK_FRAMING * request.chunks + limits.max_field:
                self._stop_parsing(
                    GatewayError(
                        "the chunked body's framing (chunk extensions, trailers) is too large",
                        code="chunk_framing_too_large",
                        status=400,
                    )
                )

    def _stop_parsing(self, refusal: TwofoldError | None) -> None:
        """Nothing more is parsed on this connection: answer what is queued (with the
        refusal in the place of the request being read), then close."""
        self._parser_done = True
        self._backlog.clear()
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()
        request, self._parsing = self._parsing, None
        if refusal is not None:
            peer = self.facts.client_address if self.facts else "-"
            log.info("refused a request from %s: %s", peer, refusal.code)  # never the request itself
            if request is None or request.head is None:  # its head is incomplete: not queued yet
                request = request or _Request()
                self._queue.append(request)
            if not request.responded:
                request.error = refusal
                request.close = True
        if request is not None:
            request.complete = True  # nothing more of it will come
        if not self._queue:
            self._close()

    def _hold(self) -> None:
        if not self._held and self._transport is not None and not self._closing:
            self._held = True
            self._transport.pause_reading()
            if self.waiting_for in (_HEAD, _BODY):
                self.deadline = None  # this side stopped reading: the client is not late

    def _release(self) -> None:
        if not self._held or self._closing:
            return
        self._held = False
        backlog, self._backlog = self._backlog, []
        for data in backlog:
            self._feed(data)
        if not self._held and not self._parser_done and self._transport is not None:
            self._transport.resume_reading()
            request = self._parsing
            if request is not None and self.deadline is None:  # the client's time starts again
                if request.head is None:
                    self._set_deadline(_HEAD, self.limits.header_timeout)
                else:
                    self._set_deadline(_BODY, self.limits.body_timeout)

    # --- answering ------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Answer queued requests in order, as far as possible without waiting; then read
        on if the first request needs more bytes."""
        while self._queue and not self._busy and not self._write_paused and not self._closing:
            request = self._queue[0]
            if not request.responded:
                if request.error is not None:
                    self._answer_refusal(request, request.error)
                elif request.admitted is None:
                    self._admit(request)
                elif request.complete:
                    self._start(request)
                if self._busy or not request.responded:
                    break  # being forwarded, or its body is still coming
            if not request.complete:
                break  # answered early: its body is read and dropped
            self._queue.popleft()
            if request.close or not request.keep_alive or (self._parser_done and not self._queue):
                self._close()
                return
        if self._closing:
            return
        if not self._queue and not self._busy and self._parsing is None and self.waiting_for != _SEND:
            self._set_deadline(_IDLE, self.limits.idle_timeout)
        if self._held and not self._write_paused and not self._busy and len(self._queue) <= 1:
            self._release()  # nothing queued ahead: read (the first request's body, or the next one)
            if self._queue and not self._busy:
                self._advance()

    def _admit(self, request: _Request) -> None:
        head = request.head
        assert head is not None
        try:
            request.admitted = self.gateway.admit(self.facts_for(head), head, request.outcome)
        except TwofoldError as error:
            self._answer_refusal(request, error)
            return
        if request.expect and not request.complete and not request.continue_sent:
            request.continue_sent = True
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if request.complete:
            self._start(request)

    def _answer_refusal(self, request: _Request, error: TwofoldError) -> None:
        request.outcome.refused(error)
        if not request.complete:
            # Answered before its body: read and drop the rest — unless the client waits for
            # 100 Continue (it may never send it) or the refusal is about the body.
            if request.expect or error.code in ("body_too_large", "request_timeout"):
                request.close = True
                self._stop_parsing(None)
            else:
                request.discard = True
                request.body = []
        self._write(request, refusal(error))

    def _start(self, request: _Request) -> None:
        """read → verify, then forward (asynchronously: the upstream answers later)."""
        head, admitted = request.head, request.admitted
        assert head is not None
        assert admitted is not None
        body = b"".join(request.body) if request.body else b""
        request.body = []
        try:
            forwarded = self.gateway.prepare(self.facts_for(head), admitted, head, body, request.outcome)
        except TwofoldError as error:
            self._answer_refusal(request, error)
            return
        self._busy = True
        forwarder = self.gateway.forwarder
        waiter = forwarder.send(admitted.product, forwarded)
        if waiter is None:  # the sandbox, HTTPS, HEAD, or no idle upstream connection
            self._task = asyncio.get_running_loop().create_task(self._forward(request, admitted, forwarded))
            return

        def relay(done: asyncio.Future[UpstreamResponse]) -> None:
            try:
                response = forwarder.relay(admitted.product, forwarded, request.outcome, done)
            except TwofoldError as error:
                request.outcome.refused(error)
                response = refusal(error)
            except Exception as exc:
                response = self.gateway.internal_error(exc, request.head, request.outcome)
            self._busy = False
            self._write(request, response)
            self._advance()

        waiter.add_done_callback(relay)

    async def _forward(self, request: _Request, admitted: Admitted, forwarded: Forwarded) -> None:
        try:
            response = await self.gateway.forward(admitted, forwarded, request.outcome)
        except TwofoldError as error:
            request.outcome.refused(error)
            response = refusal(error)
        except Exception as exc:
            response = self.gateway.internal_error(exc, request.head, request.outcome)
        self._busy, self._task = False, None
        self._write(request, response)
        self._advance()

    def _write(self, request: _Request, response: Response) -> None:
        request.responded = True
        head = request.head
        last = self._parser_done and bool(self._queue) and request is self._queue[-1]
        close = request.close or not request.keep_alive or last
        # Recorded first: the TLS transport writes to the socket at once, and the access log
        # line and the metrics must be there by the time the client has its answer.
        self._record(request, None, response.status)
        if self._transport is not None and not self._closing:
            self._transport.write(
                serialise_response(
                    response, head_only=head is not None and head.method == "HEAD", close=close
                )
            )

    def _record(self, request: _Request, error: TwofoldError | None, status: int) -> None:
        if error is not None:
            request.outcome.refused(error)
        head = request.head
        assert self.facts is not None
        self.gateway.record(
            self.facts_for(head) if head is not None else self.facts,
            head.method if head is not None else None,
            head.path if head is not None else None,
            status,
            request.outcome,
            time.perf_counter() - request.started,
        )

    def abort(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    def _close(self) -> None:
        if not self._closing and self._transport is not None:
            self._closing = True
            self.deadline = None
            self._transport.close()

    def shutdown(self) -> None:
        """The listener is stopping: close now if idle, else after the answer in progress
        (a request still arriving is refused with 503)."""
        if not self._queue and self._parsing is None:
            self._close()
            return
        refusal = None
        if self._parsing is not None:
            refusal = GatewayError(
                "the gateway is stopping; send the request again", code="gateway_stopping", status=503
            )
        self._stop_parsing(refusal)
        self._advance()
