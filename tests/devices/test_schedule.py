"""The two engines of a card, layer pipelining and fusion, against figures worked out by hand."""
from __future__ import annotations

import math

from devices import fusion
from devices.cost import CostModel, OpCost
from devices.program import StepProgram
from devices.schedule import COMPUTE, DMA, Task, build_tasks, split_plan, walk
from devices.spec import get_spec
from devices.step import SeqSlice, StepPlan
from interconnect.emulation import memory_reduce_ns
from interconnect.sim import Call, simulate
from interconnect.topology import get_topology

ATOM = get_spec("atom-plus")  # 32 TFLOPS bf16 x 0.7, 256 GB/s x 0.8, 2 us per launch, 64 MiB SRAM


def run(tasks, ns: dict[int, int]):
    """Walk tasks whose durations are given; (start, end) of each and the engines' free times."""
    spans = {}

    def go(i, start):
        spans[i] = (start, start + ns[i])
        return start + ns[i]

    free = walk(tasks, 0, go, go)
    return spans, free


def test_a_dependency_chain_on_two_engines():
    # A (compute, 100) -> B (collective of A's output, 50) -> C (compute, reads B); D (compute, reads A only)
    tasks = [Task(COMPUTE, 0, (0,), ()), Task(DMA, 0, (1,), (0,)), Task(COMPUTE, 0, (2,), (0,)),
             Task(COMPUTE, 0, (3,), (1,))]
    spans, free = run(tasks, {0: 100, 1: 50, 2: 30, 3: 20})
    assert spans == {0: (0, 100), 1: (100, 150), 2: (100, 130), 3: (150, 170)}
    assert free == {COMPUTE: 170, DMA: 150}
    # the same ops with every task depending on the one before: one after another
    serial = [Task(t.engine, 0, t.ops, (i - 1,) if i else ()) for i, t in enumerate(tasks)]
    assert run(serial, {0: 100, 1: 50, 2: 30, 3: 20})[1] == {COMPUTE: 200, DMA: 150}


def stream():
    """A row-parallel matmul, its all_reduce, the residual add (4096 wide, bf16)."""
    return [{"op": "linear", "in": "a", "out": "o", "w": "o", "b": None}, {"op": "all_reduce", "buf": "o"},
            {"op": "add", "a": "x", "b": "o", "out": "x"}]


def test_a_chunked_all_reduce_hides_behind_the_next_chunks_matmul():
    cm = CostModel(ATOM, "bfloat16", "bfloat16")
    # 128 tokens through 4096 -> 4096: 4.29 GFLOP at 22.4 TFLOP/s = 191 740 ns (compute bound: the weights
    # and activations, 35.7 MB, take 174 080 ns at 204.8 GB/s), + 2 us launch
    matmul = cm.time_ns(cm.linear(128, 4096, 4096))
    assert matmul == math.ceil(2 * 128 * 4096 * 4096 / 22.4e3) + 2000 == 193_740
    add = cm.time_ns(cm.elementwise(128, 4096))
    assert add == math.ceil(3 * 128 * 4096 * 2 / 204.8) + 2000 == 17_360
    # 128 x 4096 bf16 = 1 MiB all_reduce over 4 cards on a switch: 44 088 ns (tests/devices/test_cost.py)
    topo = get_topology("switch", 4)
    reduce_ns = memory_reduce_ns(ATOM.memory_bw, ATOM.memory_efficiency)
    ar = simulate(Call("all_reduce", 1 << 20, "uint8", "ring"), [0, 1, 2, 3], topo, reduce_ns, [(0, 0, 0)] * 4)
    assert [c for c, _, _ in ar] == [44_088] * 4
    tasks = build_tasks(stream(), 2)
    assert [(t.engine, t.chunk, t.deps) for t in tasks] == [(COMPUTE, 0, ()), (DMA, 0, (0,)), (COMPUTE, 1, ()),
                                                             (DMA, 1, (2,)), (COMPUTE, 0, (1,)), (COMPUTE, 1, (3,))]
    spans, free = run(tasks, {0: matmul, 1: 44_088, 2: matmul, 3: 44_088, 4: add, 5: add})
    # chunk 0's all_reduce [193 740, 237 828] runs while chunk 1's matmul runs [193 740, 387 480]
    assert spans[1] == (193_740, 237_828) and spans[2] == (193_740, 387_480)
    assert spans[3] == (387_480, 431_568) and spans[4] == (387_480, 404_840) and spans[5] == (431_568, 448_928)
    assert max(free.values()) == 448_928
    # unchunked: 256 tokens (compute bound, 383 479 + 2000), then 2 MiB all_reduce, then the add
    whole = cm.time_ns(cm.linear(256, 4096, 4096))
    ar2 = simulate(Call("all_reduce", 2 << 20, "uint8", "ring"), [0, 1, 2, 3], topo, reduce_ns, [(0, 0, 0)] * 4)[0][0]
    serial = whole + ar2 + cm.time_ns(cm.elementwise(256, 4096))
    assert whole == 385_480 and serial > 448_928


def test_split_plan_cuts_prefill_by_tokens_and_decode_by_sequences():
    prefill = StepPlan(0, [SeqSlice(0, 10, 4, [0])], [9])
    a, b = split_plan(prefill, 2)
    assert [(s.row, s.num_tokens, s.start) for s in a.seqs + b.seqs] == [(0, 5, 4), (0, 5, 9)]
    decode = StepPlan(0, [SeqSlice(i, 1, 30 + i, [i]) for i in range(4)], [0, 1, 2, 3])
    a, b = split_plan(decode, 2)
    assert [(s.row, s.start) for s in a.seqs] == [(0, 30), (1, 31)] and [(s.row, s.start) for s in b.seqs] == [
        (0, 32), (1, 33)]


def mlp_half(T: int, d: int = 4096, i: int = 3584):
    """The second half of a Llama layer at tp=4 (llama3-8b: d 4096, intermediate 14336 / 4), bf16."""
    ops = [{"op": "add", "a": "x", "b": "o", "out": "x"},
           {"op": "rmsnorm", "in": "x", "out": "h", "w": "post"},
           {"op": "linear", "in": "h", "out": "g", "w": "gate", "b": None},
           {"op": "linear", "in": "h", "out": "u", "w": "up", "b": None},
           {"op": "silu_mul", "a": "g", "b": "u", "out": "m"},
           {"op": "linear", "in": "m", "out": "d", "w": "down", "b": None},
           {"op": "all_reduce", "buf": "d"},
           {"op": "add", "a": "x", "b": "d", "out": "x"}]
    meta = {"hidden_size": d, "intermediate_local": i, "weight_dtype": "bfloat16", "compute_dtype": "bfloat16",
            "num_heads": 8, "num_kv_heads": 2, "head_dim": 128, "vocab_local": 1}
    shapes = {"post": (d,), "gate": (i, d), "up": (i, d), "down": (d, i)}
    plan = StepPlan(0, [SeqSlice(0, T, 0, [])], [T - 1])
    return ops, meta, shapes, plan


def test_fused_and_unfused_traffic_of_one_layer():
    T = 16
    ops, meta, shapes, plan = mlp_half(T)
    d, i = 4096, 3584
    run_ = (0, 1, 2, 3, 4, 5)
    weights = 2 * d + 3 * 2 * d * i
    progs = {f: StepProgram(ops, {**meta, "fusion": f}, ATOM, shapes) for f in fusion.FUSIONS}
    spans = {f: progs[f].spans(run_, plan) for f in fusion.FUSIONS}
    # none: every op reads its inputs and writes its output
    unfused = 3 * T * d * 2 + (2 * T * d * 2 + d * 2) + 2 * (d * i * 2 + T * (d + i) * 2) + 3 * T * i * 2 + (
        i * d * 2 + T * (i + d) * 2)
    assert [s.name for s in spans["none"]] == ["add", "rmsnorm post", "linear gate", "linear up", "silu_mul",
                                               "linear down"]
    assert sum(s.bytes for s in spans["none"]) == unfused
    # ops: [add + norm + gate + up + silu] reads x and o, writes x (read later) and m; h, g, u stay on chip
    assert [len(s.name.split("+")) for s in spans["ops"]] == [5, 1]
    assert spans["ops"][0].bytes == 2 * d + 2 * 2 * d * i + 2 * T * d * 2 + T * d * 2 + T * i * 2
    assert spans["ops"][1].bytes == i * d * 2 + T * (i + d) * 2
    # layer: one launch; reads x and o, writes x and d (the all_reduce's buffer); m stays on chip too
    (layer,) = spans["layer"]
    assert layer.bytes == weights + 2 * T * d * 2 + 2 * T * d * 2 and layer.spill == 0
    # the launches: 6, 2, 1 x 2 us; the times follow the roofline of each group's sums
    cm = progs["none"].model
    assert progs["layer"].compute_ns(run_, plan) == cm.time_ns(OpCost(layer.flops, layer.bytes))
    assert (progs["none"].compute_ns(run_, plan) > progs["ops"].compute_ns(run_, plan)
            > progs["layer"].compute_ns(run_, plan))


def test_layer_fusion_spills_what_does_not_fit_in_sram():
    d, i = 4096, 3584
    for T, spill in ((2048, 0), (4096, 4096 * (2 * d + 6 * i) - 64 * (1 << 20))):
        ops, meta, shapes, plan = mlp_half(T)
        prog = StepProgram(ops, {**meta, "fusion": "layer"}, ATOM, shapes)
        (span,) = prog.spans((0, 1, 2, 3, 4, 5), plan)
        # intermediates on chip: h (T d), g, u, m (T i each), bf16: T x 29 696 bytes against 64 MiB
        assert span.spill == spill
        assert span.bytes == 2 * d + 6 * d * i + 4 * T * d * 2 + 2 * spill
    assert 4096 * (2 * d + 6 * i) - 64 * (1 << 20) == 54_525_952
