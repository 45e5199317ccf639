"""uvicorn's h11 protocol with a deadline for every request head, and a shutdown signal.

uvicorn bounds the size of a request head (`h11_max_incomplete_event_size`) and closes idle
keep-alive connections, but its keep-alive timer only runs after a response and any byte
cancels it: a client that connects and sends nothing, or half a request head a byte at a time,
holds the connection for ever. Here every request head has a deadline (`header_timeout_s`),
counted from the connection's start or from the end of the previous response.

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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

# The key of the ConnectionPolicy in the app's lifespan state.
POLICY_STATE_KEY = "galmorph_connection_policy"
# For uvicorn's `http` option (a string, so worker processes import it themselves).
PROTOCOL_PATH = f"{__name__}:GuardedH11Protocol"


@dataclass
class ConnectionPolicy:
    header_timeout_s: float
    body_timeout_s: float  # the longest pause within an upload
    upload_timeout_s: float  # the whole upload, however steadily it trickles in
    shutdown_upload_grace_s: float
    on_header_timeout: Callable[[], None]
    draining: asyncio.Event = field(default_factory=asyncio.Event)
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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._cycle_before_head:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless a pipelined request has already started, the next head is awaited now.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request_head()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._cancel_head_timer()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._policy is not None:
            self._policy.start_draining()
        super().shutdown()

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
