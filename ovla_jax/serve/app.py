"""The ASGI app (Starlette): ``POST /act`` (official REST), ``GET /healthz``, ``GET /metadata`` and the
openpi websocket at ``/`` (metadata frame on connect, then one msgpack observation -> one msgpack
``{"actions": float[K, D]}`` per message; an error is a text frame, as openpi's client expects)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ovla_jax.serve import wire
from ovla_jax.serve.batcher import Batcher
from ovla_jax.serve.requests import BadRequest, validate, warmup_example

log = logging.getLogger("ovla_jax.serve")


@dataclasses.dataclass(frozen=True)
class ObservationKeys:
    """Where each field sits in an openpi observation dict (openpi's LIBERO client names by default)."""

    image: str = "observation/image"
    wrist_image: str = "observation/wrist_image"
    proprio: str = "observation/state"
    instruction: str = "prompt"
    unnorm_key: str = "unnorm_key"

    @classmethod
    def parse(cls, spec: Optional[str]) -> "ObservationKeys":
        """``"image=observation/image,instruction=prompt"`` -> keys (unnamed fields keep their default)."""
        if not spec:
            return cls()
        fields = {}
        for item in spec.split(","):
            name, sep, key = item.partition("=")
            if not sep or name.strip() not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"observation key {item!r}: expected FIELD=KEY with FIELD one of "
                                 f"{[f.name for f in dataclasses.fields(cls)]}")
            fields[name.strip()] = key.strip()
        return cls(**fields)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(policy, *, name: str = "ovla-jax", max_batch: int = 8, max_wait_ms: float = 0.0,
             max_body_bytes: int = 16 << 20, keys: ObservationKeys = ObservationKeys(),
             batcher: Optional[Batcher] = None, unnorm_key: Optional[str] = None) -> Starlette:
    """The server's app around ``policy`` (an OpenVLAPolicy). Warm the batcher up before serving.
    ``unnorm_key``: the statistics for requests that name none."""
    batcher = batcher or Batcher(policy, max_batch, max_wait_ms)
    meta = wire.metadata(policy, name)

    async def act(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return _error(413, f"body of {size} bytes is over the limit of {max_body_bytes}")
        body = await request.body()
        if len(body) > max_body_bytes:
            return _error(413, f"body of {len(body)} bytes is over the limit of {max_body_bytes}")
        try:
            payload = wire.official_payload(body)
            unknown = sorted(set(payload) - {"image", "instruction", "unnorm_key", "wrist_image", "proprio"})
            if unknown:
                raise BadRequest(f"unknown field(s) {unknown}; expected image, instruction, unnorm_key "
                                 f"(and wrist_image, proprio for models that read them)")
            for field in ("image", "instruction"):
                if field not in payload:
                    raise BadRequest(f"{field}: missing (the body needs image and instruction)")
            example = validate(policy, **{"unnorm_key": unnorm_key, **payload})
        except BadRequest as e:
            return _error(e.status, str(e))
        action = await batcher.submit(example)
        return Response(wire.json_dumps(action), media_type="application/json")

    async def healthz(_):
        return JSONResponse({"status": "ok", "batched_calls": batcher.calls, "served": batcher.served})

    async def metadata(_):
        return JSONResponse(meta)

    async def openpi(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_bytes(wire.msgpack_dumps(meta))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    await websocket.send_text("error: expected a binary msgpack frame, got text")
                    continue
                if len(data) > max_body_bytes:
                    await websocket.send_text(f"error: frame of {len(data)} bytes is over the limit of {max_body_bytes}")
                    continue
                try:
                    obs = wire.msgpack_loads(data)
                    if not isinstance(obs, dict):
                        raise BadRequest(f"observation: expected a map, got {type(obs).__name__}")
                    if keys.image not in obs or keys.instruction not in obs:
                        raise BadRequest(f"observation: needs {keys.image!r} and {keys.instruction!r}; "
                                         f"got keys {sorted(map(str, obs))[:20]}")
                    example = validate(policy, image=obs[keys.image], instruction=obs[keys.instruction],
                                       unnorm_key=obs.get(keys.unnorm_key, unnorm_key),
                                       wrist_image=obs.get(keys.wrist_image),
                                       proprio=obs.get(keys.proprio))
                except BadRequest as e:
                    await websocket.send_text(f"error: {e}")
                    continue
                action = await batcher.submit(example)
                await websocket.send_bytes(wire.msgpack_dumps({"actions": action}))
        except WebSocketDisconnect:
            return

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(routes=[Route("/act", act, methods=["POST"]), Route("/healthz", healthz),
                            Route("/metadata", metadata), WebSocketRoute("/", openpi)], lifespan=lifespan)
    app.state.batcher = batcher
    return app


def serving_app(policy, *, max_batch: int = 8, max_wait_ms: float = 0.0, unnorm_key: Optional[str] = None,
                progress=print, **app_kw) -> Starlette:
    """``make_app`` with every batch bucket compiled first: what ``ovla-jax serve`` listens with."""
    batcher = Batcher(policy, max_batch, max_wait_ms)
    batcher.warm_up(warmup_example(policy, unnorm_key or next(iter(policy.norm_stats))), progress=progress)
    return make_app(policy, batcher=batcher, max_batch=max_batch, unnorm_key=unnorm_key, **app_kw)
