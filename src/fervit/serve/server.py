"""The HTTP server under `fervit serve`: uvicorn's h11 protocol with a time limit on receiving each request.

uvicorn times out idle keep-alive connections, but not a client that sends its headers or its upload slowly:
1,500 such connections stayed open as long as they liked, each holding a socket and a task. Here every
request must arrive in full (headers and body) within `upload_timeout_s` of the connection opening, or of the
previous response on a kept-alive connection; a client that is too slow gets 408 and is dropped.
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

UPLOAD_TIMEOUT_S = 30.0  # a 10 MB upload at 3 Mbit/s; `fervit serve --upload-timeout` changes it
DRAIN_S = 1.0  # after its 408, a dropped client has this long to read it before the socket closes
_BODY = b'{"detail":"the request took too long to arrive"}'
TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


class DeadlineProtocol(H11Protocol):
    """H11Protocol that drops a connection whose request has not fully arrived in `upload_timeout_s`."""

    upload_timeout_s = UPLOAD_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline, self._dropping = None, False
        self._arm()

    def _arm(self) -> None:
        """Start the clock for the next request; the cycle seen now is the previous one (or none)."""
        self._disarm()
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.upload_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._dropping:
            return  # read and thrown away, so that the close is a clean FIN, not a reset that loses the 408
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._armed_for and not cycle.more_body:
            self._disarm()  # the whole request is in; answering it takes what it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # a kept-alive connection: its next request gets the same limit

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self.cycle is not self._armed_for else None
        if cycle is None or not cycle.response_started:
            self.transport.write(TIMED_OUT)
        if cycle is not None:  # the app, if it waits for the rest of the body, sees the client gone
            cycle.disconnected = True
            cycle.message_event.set()
        self._dropping = True
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the 408, then end of stream; the client's bytes are drained meanwhile
        self.loop.call_later(DRAIN_S, self.transport.close)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, upload_timeout_s: float = UPLOAD_TIMEOUT_S,
                  **kwargs) -> uvicorn.Config:
    """uvicorn's config for `app` with the deadline protocol (every other setting as uvicorn's default)."""
    protocol = type("DeadlineProtocol", (DeadlineProtocol,), {"upload_timeout_s": upload_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning", **kwargs)
