"""uvicorn's h11 protocol with a deadline and a size limit for every request head, connections
shared fairly between clients, and a shutdown signal.

uvicorn bounds the size of a request head (`h11_max_incomplete_event_size`) and closes idle
keep-alive connections, but its keep-alive timer only runs after a response and any byte
cancels it: a client that connects and sends nothing, or half a request head a byte at a time,
holds the connection for ever. Here every request head has a deadline (`header_timeout_s`),
counted from the connection's start or from the end of the previous response. h11 checks the
size only of a head still incomplete, so a long head that arrives whole in one piece passed:
here the bytes up to the blank line are counted however they arrive (400 beyond the limit).

uvicorn's connection cap (`limit_concurrency`) lets one client take every connection, and its
503 has no Retry-After. Here a connection is refused as it opens when its client address
already has `max_connections_per_client` open, or the server `limit_concurrency`: it takes no
slot, gets its 503 with Retry-After after REFUSAL_DELAY_S, and is closed when the client
closes it, after LINGER_S or after LINGER_BYTES more (lingering, so that the client's request
arriving meanwhile does not reset the connection before the client has read the answer). A
head over the limit is refused the same way, at once. Behind a proxy every
connection comes from the proxy's address: the proxy caps per client (docker/nginx.conf).

On SIGTERM uvicorn stops taking requests and waits for those in progress; a stalled upload
would hold the shutdown until uvicorn cancels it (a 500 with a traceback). The first connection
told to shut down starts the policy's draining: uploads still arriving may go on for
`shutdown_upload_grace_s` (less than uvicorn's graceful-shutdown time), and one that pauses or
is not complete by then is answered 503 (galmorph.service.uploads).

The app builds one ConnectionPolicy from its settings and returns it as lifespan state, which
uvicorn hands every connection (and every request as `scope["state"]`): each worker process
uses its own app's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

if TYPE_CHECKING:  # uvicorn's private typing module: annotations only, never at run time
    from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope

# The key of the ConnectionPolicy in the app's lifespan state.
POLICY_STATE_KEY = "galmorph_connection_policy"
# For uvicorn's `http` option (a string, so worker processes import it themselves).
PROTOCOL_PATH = f"{__name__}:GuardedH11Protocol"
# A refused connection is told to come back after this; one of its client's connections has
# usually closed by then.
CONNECTION_RETRY_AFTER_S = 1
# A refused connection is closed after this at the latest, or once the client has sent this
# much more (a request head, the start of a body: what a client sends before it reads).
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024
REFUSAL_DELAY_S = 1.0  # a connection over a cap is answered after this
# The blank line that ends a request head, as h11 finds it (bare LF line ends included).
_HEAD_END = re.compile(rb"\n\r?\n")


@dataclass
class ConnectionPolicy:
    header_timeout_s: float
    body_timeout_s: float  # the longest pause within an upload
    upload_timeout_s: float  # the whole upload, however steadily it trickles in
    shutdown_upload_grace_s: float
    on_header_timeout: Callable[[], None]
    max_connections_per_client: int
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    # Open connections per client address (this worker process's).
    clients: Counter[str] = field(default_factory=Counter)
    # Event-loop time by which uploads must be complete once draining (never before).
    drain_deadline: float = math.inf

    def start_draining(self) -> None:
        if not self.draining.is_set():
            loop_time = asyncio.get_running_loop().time()
            self.drain_deadline = loop_time + self.shutdown_upload_grace_s
            self.draining.set()


def connection_policy(state: Mapping[str, Any]) -> ConnectionPolicy | None:
    """The policy in a lifespan state (None when the app was run without its lifespan)."""
    policy = state.get(POLICY_STATE_KEY)
    return policy if isinstance(policy, ConnectionPolicy) else None


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = connection_policy(self.app_state)
        self._head_timer: asyncio.TimerHandle | None = None
        # The cycle that was current when the wait for a request head began: a new one means
        # a head arrived.
        self._cycle_before_head: RequestResponseCycle | None = None
        max_head = self.config.h11_max_incomplete_event_size
        self._max_head = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if max_head is None else max_head
        self._head_size = 0  # bytes of the request head being received
        self._head_tail = b""  # its last bytes, where a blank line split across reads begins
        self._client_address: str | None = None  # counted in policy.clients while open
        self._refused = False
        self._lingered = 0
        self._linger: asyncio.TimerHandle | None = None
        # The connection cap is applied here (as a connection opens, and for requests still
        # running after their client left), with the Retry-After uvicorn's own 503 lacks.
        self._max_connections: int | None = None
        if self._policy is not None:
            self._max_connections, self.limit_concurrency = self.limit_concurrency, None
            self._asgi_app, self.app = self.app, self._app_within_cap

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        refusal = self._connection_refusal()
        if refusal is not None:
            # Answered after a pause: a client that reopens each refused connection at once
            # would otherwise keep the server busy refusing (measured: 2,000 a second).
            self._refused = True
            self.connections.discard(self)
            self._linger = self.loop.call_later(
                REFUSAL_DELAY_S, lambda: self._refuse(503, refusal, retry=True)
            )
            return
        self._start_head()
        self._await_request_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering: read and dropped
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            self.logger.warning("Request head over %d bytes refused.", self._max_head)
            self._refuse(400, f"the request head (request line and headers) is over "
                         f"{self._max_head} bytes")  # fmt: skip
            return
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._cycle_before_head:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.DONE:
            # A pipelined next request may already be here, whole: h11 would not check it.
            self._start_head()
            if self._head_too_long(self.conn.trailing_data[0]):
                self._refuse(400, f"a pipelined request head is over {self._max_head} bytes")
                return
        super().on_response_complete()
        # Unless a pipelined request has already started, the next head is awaited now.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request_head()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_head_timer()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger is not None:
            self._linger.cancel()
        if self._policy is not None and self._client_address is not None:
            clients = self._policy.clients
            clients[self._client_address] -= 1
            if clients[self._client_address] <= 0:
                del clients[self._client_address]
            self._client_address = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._policy is not None:
            self._policy.start_draining()
        super().shutdown()

    def _connection_refusal(self) -> str | None:
        """Why this new connection is refused (None: it is not); counts it when accepted."""
        policy = self._policy
        if policy is None:
            return None
        limit = self._max_connections
        if limit is not None and len(self.connections) > limit:  # this one included
            return f"the server has its limit of {limit} connections open"
        address = self.client[0] if self.client else None
        if address is not None:
            if policy.clients[address] >= policy.max_connections_per_client:
                return (
                    f"this client address has {policy.max_connections_per_client} connections "
                    "open, the limit for one client"
                )
            policy.clients[address] += 1
            self._client_address = address
        return None

    async def _app_within_cap(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        # Requests whose clients have left still run: they count against the cap too.
        limit = self._max_connections
        if limit is not None and len(self.tasks) > limit:  # this request's task included
            body = _detail(f"the server has its limit of {limit} requests in progress")
            await send({
                "type": "http.response.start", "status": 503, "headers": _refusal_headers(body),
            })  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        await self._asgi_app(scope, receive, send)

    def _refuse(self, status: int, message: str, *, retry: bool = False) -> None:
        """Answer `status` at once and linger until the client closes (LINGER_S at most); the
        connection no longer counts against the server's cap."""
        self._refused = True
        self._cancel_head_timer()
        self.connections.discard(self)
        body = _detail(message + (f"; retry after {CONNECTION_RETRY_AFTER_S} s" if retry else ""))
        headers = _refusal_headers(body, retry=retry)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        self.transport.write(b"".join(head) + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER_S, self.transport.close)

    def _start_head(self) -> None:
        self._head_size, self._head_tail = 0, b""

    def _head_too_long(self, data: bytes) -> bool:
        """Count `data` into the request head being received, up to its blank line."""
        joint = self._head_tail + data[:3]  # a blank line split across two reads
        end = _HEAD_END.search(joint)
        if end is not None:
            self._head_size += end.end() - len(self._head_tail)
        else:
            end = _HEAD_END.search(data)
            self._head_size += len(data) if end is None else end.end()
        self._head_tail = (self._head_tail + data[-3:])[-3:]
        return self._head_size > self._max_head

    def _await_request_head(self) -> None:
        if self._policy is None:
            return
        self._cancel_head_timer()
        self._cycle_before_head = self.cycle
        self._head_timer = self.loop.call_later(self._policy.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._cycle_before_head:
            return
        if self._policy is not None:
            self._policy.on_header_timeout()
        # Nothing is owed to a client that never finished asking: close without an answer.
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


_REASONS = {400: b"Bad Request", 503: b"Service Unavailable"}


def _detail(message: str) -> bytes:
    """The JSON error body every galmorph refusal has."""
    return json.dumps({"detail": message}).encode()


def _refusal_headers(body: bytes, *, retry: bool = True) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    if retry:
        headers.append((b"retry-after", b"%d" % CONNECTION_RETRY_AFTER_S))
    return headers
