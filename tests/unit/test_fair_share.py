"""A full backend's slots go to the waiting keys in weighted turns (raystack.router.fair_share.FairGate)."""

from __future__ import annotations

import asyncio

import pytest

from raystack.router.fair_share import FairGate, GateFull


def admissions(gate: FairGate, waiting: list[tuple[str, float]], slots_in_use: int) -> list[str]:
    """The order in which `waiting` requests (key, weight), queued in that order behind `slots_in_use`
    running requests, get a slot as the running ones end one by one."""
    order: list[str] = []

    async def run():
        for _ in range(slots_in_use):
            await gate.acquire("busy", 1, timeout_s=1)

        async def wait(key, weight):
            await gate.acquire(key, weight, timeout_s=10)
            order.append(key)

        tasks = [asyncio.create_task(wait(k, w)) for k, w in waiting]
        await asyncio.sleep(0)  # all queued
        while len(order) < len(waiting):
            gate.release()  # a running request ends: one slot
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        for _ in range(slots_in_use):  # the last ones end too
            gate.release()

    asyncio.run(run())
    return order


def test_a_burst_does_not_starve_a_single_request_of_another_key():
    gate = FairGate(lambda: 2, max_waiting=100)
    order = admissions(gate, [("a", 1)] * 10 + [("b", 1)], slots_in_use=2)
    assert order.index("b") <= 1  # next or the one after, not 11th as first come first served


def test_weights_share_the_slots_in_proportion():
    gate = FairGate(lambda: 1, max_waiting=100)
    order = admissions(gate, [("a", 1)] * 12 + [("b", 2)] * 12, slots_in_use=1)
    assert order[:12].count("b") == 8 and order[:12].count("a") == 4  # 2:1 while both wait


def test_one_key_alone_is_first_come_first_served_and_an_idle_key_banks_no_turns():
    gate = FairGate(lambda: 1, max_waiting=100)
    assert admissions(gate, [("a", 1)] * 5, slots_in_use=1) == ["a"] * 5
    # b was idle while a went 5 times: it gets its turn next, not 5 turns in a row.
    order = admissions(gate, [("a", 1)] * 4 + [("b", 1)] * 4, slots_in_use=1)
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_waiting_is_bounded_by_time_and_by_max_queued_requests():
    async def run():
        gate = FairGate(lambda: 1, max_waiting=1)
        await gate.acquire("a", 1, timeout_s=1)
        waiter = asyncio.create_task(gate.acquire("a", 1, timeout_s=0.3))
        await asyncio.sleep(0.05)
        with pytest.raises(GateFull):
            await gate.acquire("b", 1, timeout_s=1)
        with pytest.raises(TimeoutError):
            await waiter
        assert gate.queued == 0 and gate.in_use == 1
        cancelled = asyncio.create_task(gate.acquire("c", 1, timeout_s=5))  # a client that leaves
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        gate.release()
        assert gate.queued == 0 and gate.in_use == 0

    asyncio.run(run())


def test_no_running_replica_means_no_waiting_here_and_added_replicas_admit_waiters():
    async def run():
        capacity = {"slots": None}  # scaling from zero: Serve's queue holds the requests
        gate = FairGate(lambda: capacity["slots"], max_waiting=10)
        for _ in range(5):
            await gate.acquire("a", 1, timeout_s=0.1)
        capacity["slots"] = 5
        waiter = asyncio.create_task(gate.acquire("a", 1, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        capacity["slots"] = 6  # a replica more: the waiter looks again within PUMP_S
        await asyncio.wait_for(waiter, 2)

    asyncio.run(run())
