"""benchmarks/timing.py: the synchronous, pipelined and dispatch timings, on a call of known duration."""

from __future__ import annotations

import time

import jax.numpy as jnp

from benchmarks import timing


def _call_of(seconds: float, counter: list):
    """A call whose host part takes ``seconds`` (a sleep) and returns a fresh array; counts its calls."""
    def call():
        counter.append(1)
        time.sleep(seconds)
        return jnp.asarray(len(counter), jnp.float32)
    return call


def test_each_timing_sees_the_host_time_and_makes_its_calls():
    counter = []
    call = _call_of(0.004, counter)
    # every timing includes the 4 ms of host work per call (a sleep lasts at least as long) and not much more
    for measured in (timing.median_seconds(call, 1, 3), timing.median_seconds(call, 1, 3, until_ready=False),
                     timing.pipelined_seconds(call, 1, 3, depth=4)):
        assert 0.004 <= measured < 0.1
    # warm-ups included: 1 + 3 calls, 1 + 3 calls, (1 + 3) groups of 4 calls
    assert len(counter) == 4 + 4 + 16
