"""Multi-host runs: one model over the devices of several processes (`jax.distributed`), one scheduler.

JAX is multi-controller: every process runs the same program, and each jitted call spans the devices of all
of them. So process 0 runs the engine (scheduler, block pool, requests, and later the servers), and the other
processes run only the model runner: before each device call (a step, a block copy, warm-up) process 0 sends
the call's host inputs, which are small (the step batch's int32 arrays and the sampling tensors), and every
process makes the same call on them. The inputs travel pickled through `multihost_utils.broadcast_one_to_all`,
JAX's own collective (gloo on CPU, NCCL on GPU), so no other channel is needed. The other processes' weights
are loaded by themselves, each reading only its own devices' slices (`ShardingPlan.place`).
"""
from __future__ import annotations

import atexit
import pickle

import jax
import numpy as np


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> "Channel | None":
    """Join a multi-process run (`jax.distributed.initialize`; must come before anything touches a device) and
    return its channel, or None for a single-process run. On CPU the cross-process collectives use gloo."""
    if num_processes <= 1 and coordinator_address is None:
        return None
    if not jax.distributed.is_initialized():
        if coordinator_address is None:
            raise ValueError(f"num_processes={num_processes} needs coordinator_address (host:port of process 0)")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    return Channel()


class Channel:
    """Process 0 -> all: Python objects (numpy arrays inside) broadcast over the devices' collectives. Every
    process must take part in each transfer, in the same order: process 0 sends, the others receive."""

    def __init__(self):
        self.is_leader = jax.process_index() == 0
        self.process_index = jax.process_index()

    def send(self, message) -> None:
        assert self.is_leader, "only process 0 sends"
        self._broadcast(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self):
        assert not self.is_leader, "process 0 sends; the others receive"
        return pickle.loads(self._broadcast(b""))

    def agree(self, value):
        """Process 0's value, on every process (e.g. a choice that must be the same everywhere)."""
        if self.is_leader:
            self.send(value)
            return value
        return self.receive()

    @staticmethod
    def min(value: float) -> float:
        """The smallest of every process's value (e.g. the KV budget their devices allow)."""
        from jax.experimental import multihost_utils

        return float(np.min(multihost_utils.process_allgather(np.array([value], np.float32))))

    def release_at_exit(self, runner) -> None:
        """Process 0: when it exits, tell the other processes to stop following."""
        if self.is_leader:
            atexit.register(runner.close)

    def _broadcast(self, payload: bytes) -> bytes:
        from jax.experimental import multihost_utils

        n = int(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int32))[0])
        size = max(1024, 1 << (n - 1).bit_length())  # bucketed: each size compiles one small program
        buf = np.zeros(size, np.uint8)
        if self.is_leader:
            buf[:n] = np.frombuffer(payload, np.uint8)
        return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n].tobytes()
