"""Device specs: the figures of an emulated card, with named presets.

Every figure names its public source. Rates are peak (dense) figures; the
achievable share is given by the efficiency factors, which the cost model
applies.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from devices.tiers import MemoryTier

GiB = 1 << 30
TERA = 10**12
GIGA = 10**9


@dataclass(slots=True, frozen=True)
class DeviceSpec:
    name: str
    peak_ops: dict[str, float]  # dtype -> peak operations per second (FLOP/s or OP/s)
    memory_bytes: int  # device DRAM capacity, enforced on every allocation
    memory_bw: float  # device DRAM bandwidth, bytes/s
    sram_bytes: int  # on-chip memory
    tdp_watts: float
    compute_efficiency: float = 0.7  # share of peak_ops a large matmul reaches
    memory_efficiency: float = 0.8  # share of memory_bw a streaming read reaches
    op_overhead_ns: int = 2_000  # fixed cost to launch one unfused op (or one fused group); each preset says why
    host_link: str = "pcie-gen5-x16"
    ddr_bytes: int = 0  # a DDR tier beside device memory (0: none; host memory is reached over host_link)
    ddr_bw: float = 0.0  # DDR tier bandwidth, bytes/s
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.memory_bytes <= 0:
            raise ValueError(f"{self.name}: memory_bytes must be positive")
        if self.memory_bw <= 0:
            raise ValueError(f"{self.name}: memory_bw must be positive")
        if not self.peak_ops or any(v <= 0 for v in self.peak_ops.values()):
            raise ValueError(f"{self.name}: peak_ops needs positive rates")
        for f in ("compute_efficiency", "memory_efficiency"):
            v = getattr(self, f)
            if not 0 < v <= 1:
                raise ValueError(f"{self.name}: {f}={v} must be in (0, 1]")
        if self.op_overhead_ns < 0:
            raise ValueError(f"{self.name}: op_overhead_ns must be >= 0")
        if self.ddr_bytes < 0 or self.ddr_bw < 0 or (self.ddr_bytes > 0) != (self.ddr_bw > 0):
            raise ValueError(f"{self.name}: a DDR tier needs both ddr_bytes and ddr_bw positive "
                             f"(or both 0 for none), got {self.ddr_bytes} bytes at {self.ddr_bw} B/s")

    def tiers(self) -> dict[str, MemoryTier]:
        """The card's memory tiers, fastest first: SRAM, device memory and, if it has one, DDR."""
        out = {"sram": MemoryTier("sram", self.sram_bytes, 0.0),
               "device": MemoryTier("device", self.memory_bytes, self.memory_bw)}
        if self.ddr_bytes:
            out["ddr"] = MemoryTier("ddr", self.ddr_bytes, self.ddr_bw)
        return out

    def tier(self, name: str) -> MemoryTier:
        tiers = self.tiers()
        try:
            return tiers[name]
        except KeyError:
            raise ValueError(f"{self.name} has no memory tier {name!r}; its tiers: {', '.join(tiers)}") from None

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, DeviceSpec] = {
    # Rebellions ATOM+ (RBLN-CA12) product brief, rebellions.ai/atom:
    # 32 TFLOPS FP16 / 128 TOPS INT8, 16 GB GDDR6 at 256 GB/s, 64 MB on-chip
    # SRAM, 75 W TDP (single-slot, passive), PCIe Gen5 x16.
    "atom-plus": DeviceSpec(
        name="atom-plus",
        peak_ops={
            "float16": 32 * TERA,
            "bfloat16": 32 * TERA,
            "float32": 8 * TERA,  # assumed 1/4 of FP16: no FP32 figure is published
            "int8": 128 * TERA,
        },
        # the brief's "16 GB" is a memory capacity, whose G is 2**30 (JEDEC JESD100B.01, "giga" as a
        # prefix to units of semiconductor storage capacity): 16 GiB, as `rsd-launch status` prints it
        memory_bytes=16 * GiB,
        memory_bw=256 * GIGA,
        sram_bytes=64 * (1 << 20),
        tdp_watts=75.0,
        # no public launch figure for RBLN cards: assumed 2 us, a host-driven launch over PCIe of the
        # order of a CUDA kernel launch (a few us, NVIDIA CUDA best-practices guide); calibrate to refine
        op_overhead_ns=2_000,
        source="Rebellions ATOM+ RBLN-CA12 product brief",
    ),
    # SambaNova SN40L, Prabhakar et al., "SambaNova SN40L: Scaling the AI
    # Memory Wall with Dataflow and Composition of Experts" (MICRO 2024,
    # arXiv:2405.07518): per socket 638 TFLOPS BF16, 520 MiB on-chip SRAM,
    # 64 GiB HBM (~1.6 TB/s) and up to 1.5 TiB of direct-attached DDR (~100 GB/s);
    # the 64 GB HBM3 and 1.5 TB DDR5 per socket are also in SambaNova's SN40L
    # launch announcement (2023-09-19).
    "sn40l": DeviceSpec(
        name="sn40l",
        peak_ops={"bfloat16": 638 * TERA, "float16": 638 * TERA, "float32": 638 * TERA / 4},
        memory_bytes=64 * GiB,
        memory_bw=1.6e12,
        sram_bytes=520 * (1 << 20),
        tdp_watts=600.0,  # assumed socket power: SambaNova publishes only per-node figures
        # assumed 2 us per kernel call: the SN40L paper and "Kernel Looping" (Koeplinger et al.,
        # arXiv:2410.23668) report that synchronisation at kernel boundaries, not math, limits decode,
        # which is why whole decoder layers are fused into one kernel (--fusion layer)
        op_overhead_ns=2_000,
        source="SambaNova SN40L, MICRO 2024 paper",
        ddr_bytes=1536 * GiB,
        ddr_bw=100 * GIGA,
    ),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS dense BF16/FP16 (1979 with
    # sparsity), 1979 TOPS dense INT8, 80 GB HBM3 at 3.35 TB/s, 50 MB L2, 700 W.
    "gpu-h100": DeviceSpec(
        name="gpu-h100",
        peak_ops={
            "bfloat16": 989 * TERA,
            "float16": 989 * TERA,
            "float32": 67 * TERA,  # non-tensor-core FP32, same datasheet
            "int8": 1979 * TERA,
        },
        memory_bytes=80 * GiB,
        memory_bw=3.35e12,
        sram_bytes=50 * (1 << 20),
        tdp_watts=700.0,
        op_overhead_ns=4_000,  # CUDA kernel launch, a few us (NVIDIA CUDA best-practices guide)
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
    ),
    # AMD Instinct MI300X data sheet (OAM, 2023): 1307.4 TFLOPS dense FP16 and
    # BF16 (2614.9 with sparsity), 2614.9 TOPS dense INT8, 163.4 TFLOPS FP32
    # matrix, 192 GB HBM3 at 5.3 TB/s, 256 MB AMD Infinity Cache, 750 W peak
    # board power, PCIe Gen5 x16 to the host; 7 Infinity Fabric links to its
    # peers of an 8-GPU platform (link "infinity-fabric-mi300x").
    "gpu-mi300x": DeviceSpec(
        name="gpu-mi300x",
        peak_ops={
            "bfloat16": 1307.4 * TERA,
            "float16": 1307.4 * TERA,
            "float32": 163.4 * TERA,  # matrix FP32, same data sheet
            "int8": 2614.9 * TERA,
        },
        memory_bytes=192 * GiB,  # 8 stacks of 24 GB HBM3
        memory_bw=5.3e12,
        sram_bytes=256 * (1 << 20),  # Infinity Cache
        tdp_watts=750.0,
        op_overhead_ns=4_000,  # HIP kernel launch, a few us as with CUDA (the gpu-h100 figure)
        source="AMD Instinct MI300X data sheet; AMD CDNA 3 architecture white paper",
    ),
}


def get_spec(name: str) -> DeviceSpec:
    """A preset by name, or a custom card from a TOML file (``--device my-card.toml``)."""
    if name.endswith(".toml"):
        return load_spec_file(name)
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown device preset {name!r}; known presets: {', '.join(PRESETS)} "
                         f"(or a .toml file describing a card)") from None


def load_spec_file(path: str) -> DeviceSpec:
    """A custom card. Sizes in bytes, rates in per-second units; ``base = "atom-plus"`` starts from a preset::

        name = "atom-max"
        base = "atom-plus"
        memory_bytes = 68719476736
        [peak_ops]
        bfloat16 = 64e12
    """
    from dataclasses import replace

    from interconnect.topo_toml import read_toml

    doc = read_toml(path, "device")
    base = doc.pop("base", None)
    fields = set(DeviceSpec.__dataclass_fields__)
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(fields)}")
    try:
        if base is not None:
            start = get_spec(base)
            if "peak_ops" in doc:
                doc["peak_ops"] = {**start.peak_ops, **doc["peak_ops"]}
            return replace(start, **{"name": doc.pop("name", f"{base}-custom"), **doc})
        return DeviceSpec(**doc)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
