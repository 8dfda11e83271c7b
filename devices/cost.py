"""The cost model: the emulated time of one op on a card.

Roofline over the device spec::

    time = max(flops / (peak[dtype] * compute_efficiency),
               bytes / (memory_bw * memory_efficiency)) + op_overhead

Assumptions (documented in README, "Emulated performance"):

* Every op streams its operands from device DRAM once: weights, activations
  in and out, and the KV cache an attention step reads. On-chip SRAM reuse
  beyond that (tiling inside one op) is folded into the efficiency factors.
  Fused groups (``devices.fusion``) pay one launch and only the traffic that
  leaves SRAM.
* Compute ops do not overlap each other on one card; communication runs on the
  card's data-movement engine and the fabric's emulated clock
  (``interconnect.emulation``), beside compute where the schedule lets it
  (``devices.schedule``).
* FLOPs count a multiply-add as 2. Attention counts QK^T and PV over the whole
  context of each query token (causal masking is not subtracted: the kernels
  of the class of card emulated here compute whole tiles).

Times are integer nanoseconds, so that two runs agree to the last digit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from devices.spec import DeviceSpec
from interconnect import wire


@dataclass(slots=True, frozen=True)
class OpCost:
    flops: int
    bytes: int


class CostModel:
    def __init__(self, spec: DeviceSpec, weight_dtype: str, act_dtype: str):
        self.spec = spec
        self.w = wire.itemsize(weight_dtype)
        self.a = wire.itemsize(act_dtype)
        peak_dtype = weight_dtype if weight_dtype in spec.peak_ops else act_dtype
        if peak_dtype not in spec.peak_ops:
            raise ValueError(f"device {spec.name} has no peak rate for {weight_dtype} or {act_dtype}")
        self.flops_per_ns = spec.peak_ops[peak_dtype] * spec.compute_efficiency / 1e9
        self.bytes_per_ns = spec.memory_bw * spec.memory_efficiency / 1e9

    def time_ns(self, cost: OpCost) -> int:
        roof = max(cost.flops / self.flops_per_ns, cost.bytes / self.bytes_per_ns)
        return math.ceil(roof) + self.spec.op_overhead_ns

    # -- ops of a transformer step; T = tokens in the step -------------------------
    def linear(self, T: int, n_in: int, n_out: int, bias: bool = False) -> OpCost:
        return OpCost(2 * T * n_in * n_out,
                      (n_in * n_out + (n_out if bias else 0)) * self.w + T * (n_in + n_out) * self.a)

    def rmsnorm(self, T: int, d: int) -> OpCost:
        return OpCost(4 * T * d, 2 * T * d * self.a + d * self.w)

    def elementwise(self, T: int, d: int, inputs: int = 2) -> OpCost:
        return OpCost(T * d * inputs, (inputs + 1) * T * d * self.a)

    def embed(self, T: int, d: int) -> OpCost:
        return OpCost(0, T * d * (self.w + self.a))

    def attention(self, seqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int) -> OpCost:
        """seqs: (new tokens, context length after them) per sequence; includes RoPE and the KV write."""
        flops = bytes_ = 0
        for t, ctx in seqs:
            flops += 4 * t * ctx * num_heads * head_dim + 6 * t * (num_heads + num_kv_heads) * head_dim
            bytes_ += 2 * ctx * num_kv_heads * head_dim * self.a  # read K and V of the whole context
            bytes_ += 2 * t * num_kv_heads * head_dim * self.a  # write the new K and V
            bytes_ += 2 * t * (num_heads + 2 * num_kv_heads) * head_dim * self.a  # q, k, v in; out
        return OpCost(flops, bytes_)
