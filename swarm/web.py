"""The HTTP side of a peer: the live swarm dashboard and Prometheus ``/metrics``.

Served by hypercorn's trio worker inside the peer's own event loop (Starlette routes). The page and
its script ship in the package (``swarm/static``); nothing is fetched from the internet. The
dashboard is read-only: ``/api/swarm`` is the latest ``SwarmView`` snapshot, ``/events`` streams
each new one as a server-sent event, so the page updates without reloading.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from swarm.swarm_view import SwarmView

log = logging.getLogger(__name__)

MAX_EVENT_STREAMS = 64  # open /events streams at once: each holds a task and a connection
KEEPALIVE_SECONDS = 15.0


class AddressError(ValueError):
    """A HOST:PORT that cannot be served on."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0: any free one)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise AddressError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host, int(port)


def web_app(view: SwarmView | None = None, registry: CollectorRegistry | None = None) -> Starlette:
    """The dashboard's routes where ``view`` is given, ``/metrics`` where ``registry`` is."""
    routes: list[Route | Mount] = []
    if view is not None:
        streams = trio.CapacityLimiter(MAX_EVENT_STREAMS)

        async def index(request: Request) -> Response:
            return HTMLResponse(files("swarm").joinpath("static/index.html").read_text())

        async def snapshot(request: Request) -> Response:
            return JSONResponse(view.snapshot)

        async def events(request: Request) -> Response:
            try:
                streams.acquire_on_behalf_of_nowait(request)
            except trio.WouldBlock:
                return PlainTextResponse("too many dashboard streams open", status_code=503)

            async def stream():
                try:
                    version = -1
                    while True:
                        current = await view.next_snapshot(version, KEEPALIVE_SECONDS)
                        if current is None:
                            yield ": keepalive\n\n"
                            continue
                        version = current["version"]
                        yield f"data: {json.dumps(current, allow_nan=False)}\n\n"
                finally:
                    streams.release_on_behalf_of(request)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        routes += [Route("/", index), Route("/api/swarm", snapshot), Route("/events", events),
                   Mount("/static", StaticFiles(packages=[("swarm", "static")]), name="static")]
    if registry is not None:
        async def metrics(request: Request) -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        routes.append(Route("/metrics", metrics))
    return Starlette(routes=routes)


async def serve_web(app: Starlette, address: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``address`` (HOST:PORT) until cancelled; ``task_status`` gets its URL."""
    host, port = parse_address(address)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0

    class _Status:
        def started(self, urls: list[str] | None = None) -> None:
            task_status.started(f"{urls[0]}/" if urls else f"http://{address}/")

    try:
        await serve(app, config, task_status=_Status())
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise AddressError(f"cannot serve on {address}: {exc.strerror or exc}") from exc
