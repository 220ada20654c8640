"""A full backend's slots go to the waiting keys in weighted turns (raystack.router.fair_share.FairGate)."""

from __future__ import annotations

import asyncio

import pytest

from raystack.router.fair_share import Band, FairGate, GateFull, QueueTimeout


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


# Priority classes: bands served in order, a band's share of the slots, sheddable bands refused first.
INTERACTIVE = Band(rank=0, name="interactive")
STANDARD = Band(rank=1, name="standard")
BATCH = Band(rank=2, name="batch", sheddable=True, max_share=0.75)


def test_waiting_requests_leave_in_class_order_and_fairly_within_a_class():
    async def run():
        gate = FairGate(lambda: 1, max_waiting=100)
        await gate.acquire("busy", 1, timeout_s=1, band=STANDARD)
        order = []

        async def wait(key, band):
            await gate.acquire(key, 1, timeout_s=10, band=band)
            order.append((band.name, key))

        # three standard requests queue (two of one key), then an interactive one
        tasks = [asyncio.create_task(wait(k, b)) for k, b in
                 [("s1", STANDARD), ("s1", STANDARD), ("s2", STANDARD), ("i1", INTERACTIVE)]]
        await asyncio.sleep(0)
        held = STANDARD
        while len(order) < 4:
            gate.release(held)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            held = {"interactive": INTERACTIVE, "standard": STANDARD}[order[-1][0]]
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(run())
    assert order[0] == ("interactive", "i1")
    assert [k for _, k in order[1:]] in (["s1", "s2", "s1"], ["s2", "s1", "s1"])  # keys take turns in a class


def test_a_band_holds_at_most_its_share_and_leaves_the_rest_to_the_classes_above():
    async def run():
        gate = FairGate(lambda: 4, max_waiting=100)
        for _ in range(3):
            await gate.acquire("b", 1, timeout_s=1, band=BATCH)
        fourth = asyncio.create_task(gate.acquire("b", 1, timeout_s=5, band=BATCH))
        await asyncio.sleep(0.05)
        assert not fourth.done() and gate.in_use == 3  # 0.75 of 4 slots: one stays free
        await asyncio.wait_for(gate.acquire("i", 1, timeout_s=1, band=INTERACTIVE), 0.1)  # at once
        gate.release(BATCH)  # a batch answer ends: the waiting batch request takes its slot
        await asyncio.wait_for(fourth, 1)
        assert gate.band_in_use[BATCH.rank] == 3 and gate.in_use == 4

    asyncio.run(run())


def test_the_share_counts_the_engines_running_limit_when_it_is_lower():
    async def run():
        gate = FairGate(lambda: 16, max_waiting=100, slots=lambda: 4)  # max_ongoing 16, max_num_seqs 4
        for _ in range(3):
            await gate.acquire("b", 1, timeout_s=1, band=BATCH)
        with pytest.raises(TimeoutError):
            await gate.acquire("b", 1, timeout_s=0.1, band=BATCH)

    asyncio.run(run())


def test_a_saturated_backend_refuses_the_sheddable_class_first():
    async def run():
        gate = FairGate(lambda: 1, max_waiting=100)
        await gate.acquire("b", 1, timeout_s=1, band=STANDARD)
        queued = [asyncio.create_task(gate.acquire("b", 1, timeout_s=5, band=BATCH)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert gate.queued == 2  # batch may wait while nothing more urgent does
        chat = asyncio.create_task(gate.acquire("i", 1, timeout_s=5, band=INTERACTIVE))
        await asyncio.sleep(0.05)
        for task in queued:  # an interactive request had to wait: the waiting batch ones are refused
            with pytest.raises(GateFull) as refused:
                await task
            assert refused.value.reason == "shed"
        with pytest.raises(GateFull) as refused:  # and batch arriving meanwhile is refused at once
            await gate.acquire("b", 1, timeout_s=5, band=BATCH)
        assert refused.value.reason == "shed" and gate.queued == 1
        gate.release(STANDARD)
        await asyncio.wait_for(chat, 1)
        gate.release(INTERACTIVE)
        assert (gate.queued, gate.in_use) == (0, 0)

    asyncio.run(run())


def test_a_full_queue_makes_room_for_an_urgent_request_by_refusing_the_newest_sheddable_one():
    async def run():
        gate = FairGate(lambda: 1, max_waiting=2)
        await gate.acquire("x", 1, timeout_s=1, band=BATCH)
        first, newest = (asyncio.create_task(gate.acquire(k, 1, timeout_s=5, band=BATCH)) for k in ("b1", "b2"))
        await asyncio.sleep(0.05)
        with pytest.raises(GateFull):  # full, and nothing less urgent than batch to refuse
            await gate.acquire("b3", 1, timeout_s=5, band=BATCH)
        urgent = asyncio.create_task(gate.acquire("s", 1, timeout_s=5, band=STANDARD))
        await asyncio.sleep(0.05)
        with pytest.raises(GateFull):
            await newest
        # the standard request now waits, so the other batch waiter is shed as well
        with pytest.raises(GateFull):
            await first
        gate.release(BATCH)
        await asyncio.wait_for(urgent, 1)

    asyncio.run(run())


def test_a_class_queue_cap_and_its_queue_timeout_bound_its_waiting():
    async def run():
        capped = Band(rank=1, name="standard", max_queued=1, queue_timeout_s=0.2)
        gate = FairGate(lambda: 1, max_waiting=100)
        await gate.acquire("x", 1, timeout_s=1, band=capped)
        waiter = asyncio.create_task(gate.acquire("a", 1, timeout_s=10, band=capped))
        await asyncio.sleep(0.05)
        with pytest.raises(GateFull) as refused:
            await gate.acquire("b", 1, timeout_s=10, band=capped)
        assert refused.value.reason == "class_queue_full"
        with pytest.raises(QueueTimeout):
            await waiter  # 0.2 s, its class's bound, not the 10 s the request had
        assert gate.queued == 0 and gate.in_use == 1

    asyncio.run(run())
