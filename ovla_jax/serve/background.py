"""The server on uvicorn in a background thread of this process, on a free port: for tests, benchmarks
and notebooks (``with BackgroundServer(policy) as srv: requests.post(srv.url + "/act", ...)``)."""
from __future__ import annotations

import socket
import threading
import time

from ovla_jax.serve.app import serving_app


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    def __init__(self, policy, *, max_batch: int = 4, max_wait_ms: float = 20.0, unnorm_key=None, **app_kw):
        import uvicorn

        self.port = free_port()
        self.app = serving_app(policy, max_batch=max_batch, max_wait_ms=max_wait_ms, unnorm_key=unnorm_key,
                               progress=None, **app_kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    ws_max_size=app_kw.get("max_body_bytes", 16 << 20)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
