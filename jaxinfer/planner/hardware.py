"""Accelerator catalogue: memory, memory bandwidth, dense matmul FLOP/s and interconnect of the GPUs the planner
knows, from their vendors' data sheets, or custom figures.

Units. Capacity is in GiB (2**30 bytes): data sheets write "80 GB" for what is 80 GiB of HBM (an 80 GB A100
reports 81,920 MiB to nvidia-smi; an H100 81,559 MiB, the driver keeping a little). Bandwidth, FLOP/s and link
rates are decimal (1 TB/s = 1e12 bytes/s), as the data sheets give them.

FLOP/s are dense (no 2:4 structured sparsity). NVIDIA's data sheets print the tensor-core figures with
sparsity and footnote "specifications are one-half lower without sparsity": the dense figure is half the
printed one. AMD's MI300X data sheet gives both; the dense one is used. Interconnect is the data sheet's
per-GPU aggregate, both directions together (NVLink 900 GB/s on H100 is 450 GB/s each way).
"""
from __future__ import annotations

import dataclasses

GiB = 2**30
TB = 1e12
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int            # capacity (see the module docstring: GiB)
    bandwidth: float             # memory bandwidth, bytes/s
    flops: dict                  # compute dtype ("bf16", "fp8", "fp32") -> dense FLOP/s
    interconnect: float | None   # device-to-device link, bytes/s, both directions (None: not given)
    source: str = ""
    platform: str = "gpu"        # "gpu": JAX's allocator reports a limit; "cpu": it does not (kv_budget)

    def peak_flops(self, compute_dtype: str) -> float:
        if compute_dtype not in self.flops:
            raise ValueError(f"{self.name} has no {compute_dtype} figure (it has {sorted(self.flops)}); "
                             "pick another --compute-dtype or give --tflops")
        return self.flops[compute_dtype]

    def ridge_point(self, compute_dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound: peak FLOP/s / bandwidth."""
        return self.peak_flops(compute_dtype) / self.bandwidth


def _gpu(name, memory_gib, bandwidth_tbs, bf16_tflops, fp8_tflops, link_gbs, source) -> Accelerator:
    flops = {"bf16": bf16_tflops * TFLOPS, "fp16": bf16_tflops * TFLOPS}
    if fp8_tflops:
        flops["fp8"] = fp8_tflops * TFLOPS
    return Accelerator(name, int(memory_gib * GiB), bandwidth_tbs * TB, flops,
                       link_gbs * 1e9 if link_gbs else None, source)


# Dense figures: NVIDIA's printed sparse tensor figures halved (see the module docstring).
GPUS: dict[str, Accelerator] = {g.name: g for g in (
    _gpu("A100-80G", 80, 2.039, 312, None, 600,
         "NVIDIA A100 Tensor Core GPU data sheet, A100 80GB SXM: 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense "
         "(624 sparse), no FP8, NVLink 600 GB/s"),
    _gpu("H100-SXM", 80, 3.35, 1979 / 2, 3958 / 2, 900,
         "NVIDIA H100 Tensor Core GPU data sheet, H100 SXM: 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958 "
         "TFLOPS with sparsity (989.5 / 1,979 dense), NVLink 900 GB/s"),
    _gpu("H200", 141, 4.8, 1979 / 2, 3958 / 2, 900,
         "NVIDIA H200 Tensor Core GPU data sheet, H200 SXM: 141 GB HBM3e, 4.8 TB/s, BF16 1,979 / FP8 3,958 "
         "TFLOPS with sparsity (989.5 / 1,979 dense), NVLink 900 GB/s"),
    _gpu("B200", 180, 8.0, 36000 / 8 / 2, 72000 / 8 / 2, 1800,
         "NVIDIA HGX B200 data sheet, per GPU (the 8-GPU board's figures / 8): 180 GB HBM3e (1.44 TB per board), "
         "8 TB/s, FP16/BF16 36 PFLOPS and FP8 72 PFLOPS per board with sparsity (2.25 / 4.5 PFLOPS dense per "
         "GPU), NVLink 5 1.8 TB/s. (Early announcements, and the article, say 192 GB.)"),
    _gpu("MI300X", 192, 5.3, 1307.4, 2614.9, 896,
         "AMD Instinct MI300X data sheet: 192 GB HBM3, 5.3 TB/s, FP16/BF16 1,307.4 TFLOPS dense (2,614.9 sparse), "
         "FP8 2,614.9 dense (5,229.8 sparse), Infinity Fabric 896 GB/s aggregate (7 links x 128 GB/s)"),
    _gpu("L4", 24, 0.300, 242 / 2, 485 / 2, 64,
         "NVIDIA L4 Tensor Core GPU data sheet: 24 GB GDDR6, 300 GB/s, FP16/BF16 242 / FP8 485 TFLOPS with "
         "sparsity (121 / 242.5 dense); no NVLink: PCIe Gen4 x16, 64 GB/s"),
)}

_ALIASES = {"A100": "A100-80G", "A100-80GB": "A100-80G", "H100": "H100-SXM", "H100-SXM5": "H100-SXM",
            "H200-SXM": "H200", "MI300": "MI300X"}


def get_accelerator(name: str) -> Accelerator:
    key = name.upper()
    for known in GPUS:
        if known.upper() == key:
            return GPUS[known]
    if key in _ALIASES:
        return GPUS[_ALIASES[key]]
    raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)} (or give --memory-gib, --bandwidth-gbs and "
                     "--tflops for a custom device)")


def custom_accelerator(memory_gib: float, bandwidth_gbs: float, tflops: float, *, name: str = "custom",
                       interconnect_gbs: float | None = None, platform: str = "gpu") -> Accelerator:
    """A device described by its figures: memory in GiB, bandwidth in GB/s (1e9), dense TFLOP/s (1e12) of the
    matmuls it will run (one figure, used whatever compute dtype is asked for).
    platform "cpu" makes the KV budget follow the engine's CPU rule (2 GiB unless given)."""
    if min(memory_gib, bandwidth_gbs, tflops) <= 0:
        raise ValueError("custom device figures must be positive (memory GiB, bandwidth GB/s, TFLOP/s)")
    flops = {d: tflops * TFLOPS for d in ("bf16", "fp16", "fp8", "fp32")}
    return Accelerator(name, int(memory_gib * GiB), bandwidth_gbs * 1e9, flops,
                       interconnect_gbs * 1e9 if interconnect_gbs else None, "given on the command line",
                       platform)
