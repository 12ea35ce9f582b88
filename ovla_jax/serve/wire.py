"""The two wire formats: json_numpy (the official OpenVLA REST deploy protocol) and msgpack with NumPy
arrays (openpi's websocket protocol: arrays as {__ndarray__, data, dtype, shape} maps, written here
from its public description). Decoding never unpickles; a malformed body is a BadRequest."""
from __future__ import annotations

from typing import Any

import numpy as np

from ovla_jax.serve.requests import BadRequest


def json_loads(text: Any) -> Any:
    import json_numpy

    try:
        return json_numpy.loads(text)
    except Exception as e:  # json.JSONDecodeError, or a malformed array object
        raise BadRequest(f"body is not valid JSON (json_numpy): {str(e)[:200]}", 400) from None


def json_dumps(value: Any) -> str:
    import json_numpy

    return json_numpy.dumps(value)


def official_payload(body: bytes) -> dict:
    """The official server's body: the fields, or ``{"encoded": "<json of the fields>"}``."""
    payload = json_loads(body)
    if isinstance(payload, dict) and "encoded" in payload:
        if not isinstance(payload["encoded"], str):
            raise BadRequest("encoded: expected a JSON string", 400)
        payload = json_loads(payload["encoded"])
    if not isinstance(payload, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(payload).__name__}", 400)
    return payload


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "VOc":
            raise TypeError(f"cannot send arrays of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__}")


def _unpack_hook(obj):
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in "VOc":
            raise ValueError(f"arrays of dtype {dtype} are not accepted")
        shape = tuple(int(s) for s in obj[b"shape"])
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def msgpack_dumps(value: Any) -> bytes:
    import msgpack

    return msgpack.packb(value, default=_pack_default)


def msgpack_loads(data: bytes) -> Any:
    import msgpack

    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook)
    except Exception as e:
        raise BadRequest(f"frame is not valid msgpack-numpy: {str(e)[:200]}", 400) from None


def metadata(policy, name: str) -> dict:
    cfg = policy.config
    return {"model": name, "action_head": cfg.action_head, "action_dim": cfg.action_dim,
            "chunk": cfg.chunk if cfg.parallel else 1, "num_images": cfg.num_images, "proprio_dim": cfg.proprio_dim,
            "unnorm_keys": sorted(policy.norm_stats), "dtype": policy.dtype,
            "quantize": policy.quantize}

