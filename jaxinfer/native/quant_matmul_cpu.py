"""The packed-weight matmul as a native CPU kernel (`quant_matmul_cpu.cc`), for what XLA CPU does badly: at the
few rows of a decode step its f32 dots are not memory bound, and it cannot take a weight's dequantization into a
dot (benchmarks/quant_matmul_cpu.py has both). The kernel reads the packed codes and converts them to f32 in
registers (weight-only: activations stay f32), so a 4-bit weight costs its packed bytes, not four per value.

It is built from source with the system C++ compiler the first time a process asks for it (as Triton builds its
launchers), cached under ~/.cache/jaxinfer/native keyed by the source, the compiler and jaxlib, and registered
with XLA as the custom-call target `jaxinfer_quant_matmul`. It needs x86-64 with AVX2, FMA and F16C; without
them, without a compiler, or with JAXINFER_CPU_KERNEL=0 it is unavailable (`status()` says why) and the XLA
formulations run instead. Whether it runs at all is the probe's measurement (jaxinfer.cpu_probe), like every
other formulation.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import numpy as np

log = logging.getLogger(__name__)

TARGET = "jaxinfer_quant_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_matmul_cpu.cc")
_CPU_FLAGS = ("avx2", "fma", "f16c")
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mfma", "-mf16c", "-w")
_lock = threading.Lock()
_status: tuple[bool, str] | None = None  # status(), once per process


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build(cxx: str) -> str:
    """Path of the shared library for this source, compiler and jaxlib, compiled now unless cached."""
    import jax
    import jaxlib

    from jaxinfer.cpu_probe import default_cache_dir

    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source + version.encode() + jaxlib.__version__.encode()
                         + " ".join(_COMPILE_FLAGS).encode()).hexdigest()[:16]
    out_dir = os.path.join(default_cache_dir(), "native")
    path = os.path.join(out_dir, f"quant_matmul_cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = os.path.join(tmp, "lib.so")
        cmd = [cxx, *_COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", SOURCE, "-o", built]
        log.info("building the CPU quantized-matmul kernel: %s", " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{cxx} failed:\n{result.stderr[-2000:]}")
        os.replace(built, path)  # atomic: a concurrent builder's library is the same
    return path


def status() -> tuple[bool, str]:
    """(available, why): builds and registers the kernel on the first call in a process."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
        return _status


def _load() -> tuple[bool, str]:
    if os.environ.get("JAXINFER_CPU_KERNEL", "1") == "0":
        return False, "turned off by JAXINFER_CPU_KERNEL=0"
    from jaxinfer.cpu_probe import cpu_info

    missing = [f for f in _CPU_FLAGS if f not in cpu_info()[1]]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    cxx = _compiler()
    if cxx is None:
        return False, "no C++ compiler found (set CXX)"
    try:
        path = _build(cxx)
        import jax

        library = ctypes.CDLL(path)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxinferQuantMatmul), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("the CPU quantized-matmul kernel is unavailable: %s", e)
        return False, f"building it failed: {e}"
    return True, f"built from {os.path.basename(SOURCE)} at {path}"


def available() -> bool:
    return status()[0]


def identity() -> str | None:
    """A short hash of the kernel's source when it is available here (part of cached measurements' keys)."""
    if not available():
        return None
    with open(SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def supports(bits: int, group_size: int, n: int) -> bool:
    """Whether the kernel computes a weight of this packing and output dim (it works in 16-column strips)."""
    return bits in (4, 8) and n % 16 == 0 and (bits == 8 or group_size % 8 == 0)


def quant_matmul(x, w):
    """x `[M, K]` (any float dtype) @ the packed weight w `[K, N]` (stored row order) -> f32 `[M, N]`."""
    import jax
    import jax.numpy as jnp

    if not available():
        raise RuntimeError(f"the CPU quantized-matmul kernel is unavailable: {status()[1]}")
    m = x.shape[0]
    n = w.shape[1]
    offsets = w.offsets if w.offsets is not None else jnp.zeros((1,), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x.astype(jnp.float32), w.qweight, w.scales, offsets, bits=np.int32(w.bits),
                group_size=np.int32(w.group_size), has_offsets=w.offsets is not None)
