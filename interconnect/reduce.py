"""Reduction operators on raw buffers, as torch.distributed names them.

Buffers are numpy arrays in wire storage dtypes (bfloat16 travels as uint16).
float16 and bfloat16 are added in float32 and rounded back to nearest-even
once per reduction step, which is what torch's CPU kernels do for one add.
"""
from __future__ import annotations

import enum

import numpy as np

from interconnect import wire


class ReduceOp(enum.Enum):
    SUM = "sum"
    AVG = "avg"
    MAX = "max"
    MIN = "min"

    @classmethod
    def parse(cls, op) -> "ReduceOp":
        if isinstance(op, cls):
            return op
        try:
            return cls(str(op).lower())
        except ValueError:
            raise ValueError(f"unknown reduce op {op!r}; known: {', '.join(o.value for o in cls)}") from None


INT_DTYPES = {"int8", "uint8", "int16", "int32", "int64"}
_UFUNC = {ReduceOp.SUM: np.add, ReduceOp.AVG: np.add, ReduceOp.MAX: np.maximum, ReduceOp.MIN: np.minimum}


def check_op(op: ReduceOp, dtype: str) -> None:
    if op is ReduceOp.AVG and dtype in INT_DTYPES:
        raise ValueError(f"ReduceOp.AVG needs a floating dtype, got {dtype}")


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f32: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Round to nearest even; NaN stays NaN (quiet)."""
    bits = f32.view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = np.where(np.isnan(f32), (bits >> 16) | 0x40, rounded).astype(np.uint16)
    if out is None:
        return rounded
    out[...] = rounded
    return out


def reduce_into(dst: np.ndarray, src: np.ndarray, op: ReduceOp, dtype: str) -> None:
    """dst = op(dst, src), elementwise, in place."""
    fn = _UFUNC[op]
    if dtype == "bfloat16":
        f32_to_bf16(fn(bf16_to_f32(dst), bf16_to_f32(src)), out=dst)
    elif dtype == "float16":
        # numpy's float16 ufuncs also compute in float32 and round once
        fn(dst, src, out=dst)
    else:
        fn(dst, src, out=dst)


def finish_avg(buf: np.ndarray, world_size: int, dtype: str) -> None:
    """Divide a SUM result by the group size (AVG), in the storage dtype."""
    if dtype == "bfloat16":
        f32_to_bf16(bf16_to_f32(buf) / np.float32(world_size), out=buf)
    else:
        np.divide(buf, buf.dtype.type(world_size), out=buf, casting="unsafe")


def as_storage(buf, dtype: str, count: int | None = None) -> np.ndarray:
    """A flat numpy view of raw bytes in the storage dtype."""
    np_dtype = wire.DTYPES[wire.check_dtype(dtype)][0]
    return np.frombuffer(buf, np_dtype, count if count is not None else -1)
