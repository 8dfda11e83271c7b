"""Wire format: a msgpack header frame followed by raw tensor frames.

A message on any socket of the project is a multipart ZeroMQ message::

    [header, payload_0, payload_1, ...]

``header`` is a msgpack map (op, ids, dtype, shape, times ...). Payload frames
are the raw bytes of contiguous tensors, sent without copying and rebuilt on
arrival with ``frombuffer``. Nothing that arrives on a socket is unpickled.

bfloat16 has no numpy dtype: on the wire it is the raw 2-byte pattern, carried
as ``uint16`` in numpy and viewed back as ``torch.bfloat16`` when torch is used.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# name -> (numpy storage dtype, element size in bytes)
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "float32": (np.dtype(np.float32), 4),
    "float16": (np.dtype(np.float16), 2),
    "bfloat16": (np.dtype(np.uint16), 2),
    "float64": (np.dtype(np.float64), 8),
    "int8": (np.dtype(np.int8), 1),
    "uint8": (np.dtype(np.uint8), 1),
    "int16": (np.dtype(np.int16), 2),
    "int32": (np.dtype(np.int32), 4),
    "int64": (np.dtype(np.int64), 8),
    "bool": (np.dtype(np.bool_), 1),
}

_NUMPY_NAMES = {np.dtype(d).name: n for n, (d, _) in DTYPES.items() if n != "bfloat16"}


class WireError(ValueError):
    """A frame that does not follow the wire format."""


def check_dtype(name: str) -> str:
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return name


def itemsize(dtype: str) -> int:
    return DTYPES[check_dtype(dtype)][1]


def nbytes_of(dtype: str, shape) -> int:
    n = 1
    for i, d in enumerate(shape):
        if type(d) is not int or d < 0:
            raise WireError(f"shape {list(shape)!r}: dimension {i} is {d!r}, not a size >= 0")
        n *= d
    return n * itemsize(dtype)


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack(frame) -> dict[str, Any]:
    """Decode a header frame; anything but a msgpack map is a WireError."""
    try:
        header = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise WireError("header must be a msgpack map with a string 'op'")
    return header


def to_wire(tensor) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, contiguous bytes) of a numpy array or torch tensor."""
    if type(tensor).__module__.startswith("torch"):
        import torch

        t = tensor.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        check_dtype(name)
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.uint16).numpy() if hasattr(torch, "uint16") else t.view(torch.int16).numpy()
        else:
            arr = t.numpy()
        return name, list(t.shape), memoryview(np.ascontiguousarray(arr)).cast("B")
    arr = np.ascontiguousarray(tensor)
    name = _NUMPY_NAMES.get(arr.dtype.name)
    if name is None:
        raise WireError(f"numpy dtype {arr.dtype} cannot travel on the wire")
    return name, list(arr.shape), memoryview(arr).cast("B")


def from_wire(buf, dtype: str, shape, *, as_torch: bool = False):
    """Rebuild a tensor over ``buf`` without copying (numpy, or torch if asked).

    bfloat16 always comes back as a torch tensor, since numpy cannot hold it.
    """
    np_dtype, size = DTYPES[check_dtype(dtype)]
    expected = nbytes_of(dtype, shape)
    mv = memoryview(buf).cast("B")
    if mv.nbytes != expected:
        raise WireError(f"payload has {mv.nbytes} bytes, {dtype}{list(shape)} needs {expected}")
    arr = np.frombuffer(mv, dtype=np_dtype).reshape(shape) if expected else np.empty(shape, np_dtype)
    if dtype == "bfloat16" or as_torch:
        import torch

        if not arr.flags.writeable:
            arr = arr.copy()
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return arr
