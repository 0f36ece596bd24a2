"""Compiled step executables kept on disk, so a restart loads them instead of tracing, lowering and compiling.

JAX's persistent compilation cache saves XLA's compile, but every restart still traces and lowers the whole
unrolled model per token bucket, which on a 2-core CPU costs as much as the compile it saves. This cache stores
the finished executable (`jax.experimental.serialize_executable`) and loads it back with no Python tracing.

A file is found by a key over everything the executable depends on: the function and its static arguments, the
shape, dtype, sharding and tree structure of every argument (weights and their packing, the KV cache, the step
batch), the model config and runner options (`parts`), and the environment: JAX / jaxlib versions, backend,
platform version, device kinds, XLA_FLAGS, and a digest of jaxinfer's own source (an edit to the model must not
load an old executable). A different anything is a different file, so nothing is ever invalidated in place.

Files live in `<directory>/<environment digest>/<key>.jexe`: when a new environment folder is made (jaxinfer
edited, JAX upgraded), all but the KEEP_ENVIRONMENTS most recently used ones are deleted, so the cache does not
grow without bound. Files are written to a temporary name and renamed (atomic on POSIX), and carry a header with a SHA-256 of the
payload and the key they were written for; a missing, truncated, corrupt or foreign file, or one this jaxlib
cannot load, is reported as a miss and the caller compiles (and rewrites it). Like pickle, deserialising runs
code from the file: only point the cache at a directory you trust (your own ~/.cache).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)

MAGIC = b"jaxinfer-executable-v1\n"
_DIGEST = 32  # SHA-256 bytes
SUBDIR = "executables"  # under the persistent compilation cache directory
KEEP_ENVIRONMENTS = 8  # environment folders kept (each source edit or upgrade makes a new one); older are removed
_SOURCE_PACKAGES = ("jaxinfer", "pallas_kernels")


@dataclasses.dataclass(frozen=True)
class ExecutableRecord:
    """How one executable of the warm-up was obtained, and what each part cost (seconds)."""
    name: str            # e.g. "forward/T=64", "sample/S=8/greedy", "copy_blocks/n=4"
    source: str          # "loaded" (from this cache) or "compiled" (traced, lowered, compiled, then stored)
    trace_s: float = 0.0
    lower_s: float = 0.0
    compile_s: float = 0.0  # XLA compile (a hit in JAX's persistent cache makes it a load of XLA's own entry)
    load_s: float = 0.0     # reading and deserialising our cached executable
    store_s: float = 0.0    # serialising and writing it


@contextlib.contextmanager
def _persistent_cache_bypassed():
    """Compile afresh, past JAX's persistent compilation cache (and its in-memory copy of past compiles).

    An XLA:CPU executable that JAX read back from its persistent cache serialises without its kernels' object
    code: the file loads elsewhere, then its first call fails with "Function <fusion> not found". Only a freshly
    compiled executable is complete, so that is what this cache stores. JAX reads its enable flag once per
    process, hence the reset on both sides.
    """
    from jax._src import compilation_cache
    from jax._src.interpreters import pxla

    enabled = jax.config.jax_enable_compilation_cache
    jax_log = logging.getLogger(compilation_cache.__name__)  # it logs every reset at INFO
    level = jax_log.level
    jax_log.setLevel(max(level, logging.WARNING))
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    pxla._cached_compilation.cache_clear()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
        jax_log.setLevel(level)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over the .py files of jaxinfer and pallas_kernels (names and contents)."""
    h = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        spec = __import__(package)
        root = os.path.dirname(os.path.abspath(spec.__file__))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(f for f in filenames if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """What an executable depends on besides its arguments: versions, backend, devices, flags, our source."""
    import jaxlib

    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "platform_version": devices[0].client.platform_version,
            "devices": sorted({d.device_kind for d in devices}), "num_devices": len(devices),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "source": source_digest()}


def abstract(tree):
    """ShapeDtypeStructs (with shardings) for a pytree of arrays: compile against these, so tracing never reads
    device buffers (the KV cache may be donated by a step running meanwhile)."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree_util.tree_map(leaf, tree)


def signature(args) -> str:
    """The arguments' tree structure and every leaf's shape, dtype and sharding, as one string."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return json.dumps([str(treedef)] + [[list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))]
                                         for x in leaves])


class ExecutableCache:
    """Executables in `directory` (None: no cache, always compile), keyed by `parts` plus `environment()`."""

    def __init__(self, directory: str | None, parts: dict[str, Any]):
        env = json.dumps(environment(), sort_keys=True)
        self.root = directory
        self.directory = os.path.join(directory, hashlib.sha256(env.encode()).hexdigest()[:20]) if directory \
            else None
        self._base = json.dumps({"env": env, "parts": parts}, sort_keys=True, default=str)
        if self.directory and os.path.isdir(self.directory):
            try:
                os.utime(self.directory)  # in use: the last folder pruning removes
            except OSError:
                pass

    def key(self, name: str, args, static: dict[str, Any]) -> str:
        text = json.dumps({"base": self._base, "name": name, "args": signature(args),
                           "static": repr(sorted(static.items()))}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.jexe")

    def load(self, key: str):
        """The executable stored under `key`, or None on a miss or any unreadable file (logged, then the caller
        compiles and overwrites it)."""
        if not self.directory:
            return None
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("executable cache: cannot read %s (%s); compiling", path, e)
            return None
        try:
            if not blob.startswith(MAGIC):
                raise ValueError("not a jaxinfer executable file")
            digest, payload = blob[len(MAGIC):len(MAGIC) + _DIGEST], blob[len(MAGIC) + _DIGEST:]
            if hashlib.sha256(payload).digest() != digest:
                raise ValueError("checksum mismatch (truncated or corrupt)")
            stored_key, serialized, in_tree, out_tree = pickle.loads(payload)
            if stored_key != key:
                raise ValueError("written for another key")
            from jax.experimental.serialize_executable import deserialize_and_load

            return deserialize_and_load(serialized, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - any failure to load is a miss, never a crash
            log.warning("executable cache: ignoring %s (%s: %s); compiling", path, type(e).__name__, e)
            return None

    def store(self, key: str, compiled) -> bool:
        """Write atomically (temporary file + rename); False (logged) when this executable cannot be saved."""
        if not self.directory:
            return False
        try:
            from jax.experimental.serialize_executable import serialize

            serialized, in_tree, out_tree = serialize(compiled)
            payload = pickle.dumps((key, serialized, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory, exist_ok=True)
                self._prune()
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".jexe")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
                os.replace(tmp, self.path(key))
            except BaseException:
                os.unlink(tmp)
                raise
            return True
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs the next start
            log.warning("executable cache: not saved (%s: %s)", type(e).__name__, e)
            return False

    def _prune(self) -> None:
        """Delete the environment folders beyond the KEEP_ENVIRONMENTS most recently modified."""
        import shutil

        folders = [os.path.join(self.root, d) for d in os.listdir(self.root)]
        folders = sorted((f for f in folders if os.path.isdir(f)), key=os.path.getmtime, reverse=True)
        for old in folders[KEEP_ENVIRONMENTS:]:
            shutil.rmtree(old, ignore_errors=True)

    def get(self, name: str, jitted: Callable, args: tuple, static: dict[str, Any] | None = None):
        """(Compiled, ExecutableRecord): loaded from the cache, else traced, lowered and compiled from `jitted`
        at `args` (abstract: ShapeDtypeStructs) and stored."""
        static = static or {}
        key = self.key(name, args, static)
        start = time.perf_counter()
        compiled = self.load(key)
        if compiled is not None:
            return compiled, ExecutableRecord(name, "loaded", load_s=time.perf_counter() - start)
        t0 = time.perf_counter()
        traced = jitted.trace(*args, **static)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        with _persistent_cache_bypassed():
            compiled = lowered.compile(compiler_options={})  # options given: not the lowering's memoised one
        t3 = time.perf_counter()
        self.store(key, compiled)
        t4 = time.perf_counter()
        return compiled, ExecutableRecord(name, "compiled", t1 - t0, t2 - t1, t3 - t2, t0 - start, t4 - t3)
