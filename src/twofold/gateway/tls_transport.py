"""Server-side TLS on the socket itself, for the gateway's direct listeners.

uvloop's TLS runs OpenSSL on memory BIOs: every record is copied from the socket into a BIO
and out of it again through ``ssl.py``'s Python wrappers, and each completed handshake has
its peer certificate parsed into a dict. Here OpenSSL reads and writes the non-blocking
socket directly — CPython's ``_ssl`` object, made by ``SSLContext._wrap_socket`` as
``ssl.SSLSocket`` does, without that class's Python layer — driven by the loop's reader and
writer callbacks. Measured in one run (bench/README.md): about 100 µs less CPU per mTLS
handshake than uvloop's TLS, and no Task per connection.

:class:`TLSConnection` is an ``asyncio.Transport`` for an ``asyncio.Protocol`` once its
handshake has completed: ``ready(connection)`` returns the protocol, then its
``connection_made`` is called; ``failed(connection, shed)`` is called instead when the
handshake fails or is ended. It is also the ``ssl_object`` of the connection
(``getpeercert``, ``cipher``, ``version``).

Closing sends ``close_notify`` after what is buffered, then waits for the client to close
(at most :data:`LINGER` seconds, reading and discarding), so that an answer written just
before the close is not lost to a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("twofold.gateway")

LINGER = 5.0  # seconds a closed connection waits for the client's close (its close_notify or FIN)
FLUSH_TIMEOUT = 30.0  # closing with an answer still buffered: seconds allowed without progress
_RECORDS_PER_EVENT = 16  # then other connections run, and this one goes on at the next iteration
_RECORD = 16 * 1024  # the most plaintext one TLS record carries
_HIGH_WATER, _LOW_WATER = 64 * 1024, 16 * 1024

_HANDSHAKE, _OPEN, _CLOSING, _LINGERING, _CLOSED = range(5)

Ready = Callable[["TLSConnection"], asyncio.Protocol]
Failed = Callable[["TLSConnection", bool], None]


class TLSConnection(asyncio.Transport):
    __slots__ = (
        "__weakref__",
        "_address",
        "_buffer",
        "_buffered",
        "_failed",
        "_fd",
        "_high",
        "_linger",
        "_loop",
        "_low",
        "_protocol",
        "_read_blocked",
        "_reading",
        "_ready",
        "_ssl",
        "_state",
        "_write_paused",
        "_writer",
        "accepted",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        address: Any,
        context: ssl.SSLContext,
        ready: Ready,
        failed: Failed,
    ) -> None:
        super().__init__()
        self._loop = loop
        self.sock = sock  # non-blocking; _ssl holds only a weak reference to it
        self._fd = sock.fileno()
        self._address = address
        self._ready, self._failed = ready, failed
        self._protocol: asyncio.Protocol | None = None
        self._state = _HANDSHAKE
        self._reading = True  # not paused by the protocol
        self._read_blocked = False  # OpenSSL must write before it can read on (the socket is full)
        self._writer = False  # a writer callback is registered
        self._buffer: deque[bytes] = deque()  # not yet taken by OpenSSL; [0] is being retried
        self._buffered = 0
        self._high, self._low = _HIGH_WATER, _LOW_WATER
        self._write_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self.accepted = time.monotonic()
        self._ssl = context._wrap_socket(sock, True, None, owner=self)  # type: ignore[attr-defined]

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._readable)
        self._handshake()

    # --- the ssl_object view ------------------------------------------------------------------

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()  # type: ignore[no-any-return]

    def version(self) -> str | None:
        return self._ssl.version()  # type: ignore[no-any-return]

    # --- events ---------------------------------------------------------------------------------

    def _readable(self) -> None:
        state = self._state
        if state == _OPEN:
            if self._reading and not self._read_blocked:
                self._read()
        elif state == _HANDSHAKE:
            self._handshake()
        elif state == _LINGERING:
            self._drain()

    def _writable(self) -> None:
        state = self._state
        if state == _HANDSHAKE:
            self._handshake()
        elif self._read_blocked and state == _OPEN:
            self._read_blocked = False
            if self._buffer:
                self._flush()  # it stops the writer once the buffer is empty
            else:
                self._stop_writer()
            if self._state == _OPEN and self._reading and not self._read_blocked:
                self._loop.add_reader(self._fd, self._readable)
                self._read()
        elif self._buffer:
            self._flush()
        elif state == _CLOSING:
            self._shutdown()
        else:
            self._stop_writer()

    def _want_writer(self) -> None:
        if not self._writer:
            self._writer = True
            self._loop.add_writer(self._fd, self._writable)

    def _stop_writer(self) -> None:
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)

    # --- the handshake ----------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._stop_writer()
            return
        except ssl.SSLWantWriteError:
            self._want_writer()
            return
        except (OSError, ValueError):  # ssl.SSLError is an OSError: no or an untrusted certificate, not TLS
            self.end_handshake(shed=False)
            return
        self._stop_writer()
        try:
            protocol = self._ready(self)
        except Exception:  # no protocol to tell: the listener is told instead
            log.exception("a connection could not be set up")
            self.end_handshake(shed=False)
            return
        self._protocol, self._state = protocol, _OPEN
        try:
            protocol.connection_made(self)
        except Exception:
            log.exception("a connection could not be set up")
            self.abort()
            return
        if self._state == _OPEN and self._reading:
            self._read()  # a request sent with the handshake's last flight, or a reset (see _read)

    def end_handshake(self, *, shed: bool = True) -> None:
        """End the connection before its handshake completes (shed, timed out, or failed)."""
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSED
        self._release_socket()
        self._failed(self, shed)

    # --- reading ----------------------------------------------------------------------------------

    def _read(self) -> None:
        ssl_object = self._ssl
        for _ in range(_RECORDS_PER_EVENT):
            try:
                data = ssl_object.read(_RECORD)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:  # OpenSSL has to write first (the socket is full): wait
                self._read_blocked = True
                self._loop.remove_reader(self._fd)
                self._want_writer()
                return
            except ssl.SSLZeroReturnError:  # the client's close_notify
                self._eof()
                return
            except (OSError, ValueError) as exc:  # reset, or an EOF without close_notify
                self._finish(exc if not isinstance(exc, ssl.SSLEOFError) else None)
                return
            if not data:
                self._eof()
                return
            try:
                self._protocol.data_received(data)  # type: ignore[union-attr]
            except Exception:
                log.exception("the gateway protocol failed on received data")
                self.abort()
                return
            if self._state != _OPEN or not self._reading:
                return
            # Read on until OpenSSL wants more from the socket: when the poll reported an error
            # (a reset), uvloop calls this once and then closes the poll, so an error not read
            # now would never be noticed.
        # A client that keeps the socket full: go on at the next iteration (not from the poll),
        # so that one connection cannot hold the loop.
        self._loop.call_soon(self._readable)

    def _eof(self) -> None:
        try:
            self._protocol.eof_received()  # type: ignore[union-attr]
        except Exception:
            log.exception("the gateway protocol failed on the end of the stream")
        self.close()  # TLS cannot half-close

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self._state == _OPEN and not self._read_blocked:
                self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if self._state == _OPEN and not self._read_blocked:
                self._loop.add_reader(self._fd, self._readable)
                if self._ssl.pending():  # decrypted already: the socket will not say it is readable
                    self._loop.call_soon(self._readable)

    def is_reading(self) -> bool:
        return self._reading and self._state == _OPEN

    # --- writing ----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return
        if self._buffer:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
        else:
            try:
                self._ssl.write(data)
                return
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                # OpenSSL keeps what it encrypted; the same bytes are written again when it can
                self._buffer.append(bytes(data))
                self._buffered += len(data)
                self._want_writer()
            except (OSError, ValueError) as exc:
                self._finish(exc)
                return
        if not self._write_paused and self._buffered > self._high:
            self._write_paused = True
            try:
                self._protocol.pause_writing()  # type: ignore[union-attr]
            except Exception:
                log.exception("the gateway protocol failed to pause writing")

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        buffer = self._buffer
        while buffer:
            try:
                self._ssl.write(buffer[0])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._want_writer()
                return
            except (OSError, ValueError) as exc:
                self._finish(exc)
                return
            self._buffered -= len(buffer.popleft())
            if self._state == _CLOSING:
                self._deadline(FLUSH_TIMEOUT)
            if len(buffer) > 1:  # fewer, larger records
                joined = b"".join(buffer)
                buffer.clear()
                buffer.append(joined)
            if self._write_paused and self._buffered <= self._low:
                self._write_paused = False
                try:
                    self._protocol.resume_writing()  # type: ignore[union-attr]
                except Exception:
                    log.exception("the gateway protocol failed to resume writing")
                if self._state == _CLOSED:
                    return
        self._stop_writer()
        if self._state == _CLOSING:
            self._shutdown()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH_WATER if high is None else high
        self._low = min(self._high, self._high // 4 if low is None else low)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS cannot half-close")

    # --- closing ----------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._state != _OPEN and self._state != _HANDSHAKE

    def close(self) -> None:
        """Send what is buffered and ``close_notify``, then wait briefly for the client's close."""
        if self._state == _HANDSHAKE:
            self.end_handshake(shed=False)
            return
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        if self._reading and not self._read_blocked:
            self._loop.remove_reader(self._fd)
        if self._buffer:
            self._deadline(FLUSH_TIMEOUT)  # re-armed by every write that makes progress
        else:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._ssl.shutdown()
        except ssl.SSLWantWriteError:
            self._want_writer()
            self._deadline(LINGER)
            return
        except (OSError, ValueError):
            # Our close_notify is sent (or cannot be); the client's has not come yet, or the
            # client is still sending (application data after close_notify is an SSL error).
            pass
        else:
            self._finish(None)  # both close_notify alerts are exchanged
            return
        self._stop_writer()
        self._state = _LINGERING
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._loop.add_reader(self._fd, self._readable)
        self._deadline(LINGER)

    def _deadline(self, seconds: float) -> None:
        """Closing: finish the connection in ``seconds`` (replacing the deadline set before)."""
        if self._linger is not None:
            self._linger.cancel()
        self._linger = self._loop.call_later(seconds, self._finish, None)

    def _drain(self) -> None:
        """Lingering: the client's last bytes (and its close_notify) are read and dropped."""
        for _ in range(_RECORDS_PER_EVENT):
            try:
                if not self.sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
        else:
            self._loop.call_soon(self._readable)
            return
        self._finish(None)

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self.end_handshake(shed=False)
        elif self._state != _CLOSED:
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._release_socket()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)

    def _release_socket(self) -> None:
        loop = self._loop
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._buffer.clear()
        self._buffered = 0
        with contextlib.suppress(Exception):  # removing a callback that is not there is no error
            loop.remove_reader(self._fd)
        self._stop_writer()
        self.sock.close()

    # --- asyncio.BaseTransport --------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._address
        if name == "ssl_object":
            return self
        if name == "socket":
            return self.sock
        if name == "sockname":
            with contextlib.suppress(OSError):
                return self.sock.getsockname()
            return default
        if name == "peercert":
            return self._ssl.getpeercert() if self._state != _HANDSHAKE else default
        if name == "cipher":
            return self._ssl.cipher()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]
