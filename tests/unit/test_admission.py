"""Admission's turn logic on a real event loop: a free turn is taken at once, a taken one is
queued first come first served, a full queue and a passed deadline are refused with their
messages. tests/integration/test_gateway_limits.py checks the same through a running gateway."""

import asyncio

import grpc
import pytest

from explainserve.sidecar.admission import Admission, Refused


class Deadline:
    """The one method of a grpc.aio ServicerContext that Admission reads."""

    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


def test_a_free_turn_is_taken_without_yielding_to_the_loop():
    async def main():
        admission = Admission(2, 1)
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, "other")
        await admission.enter(Deadline(10.0))
        # the callback scheduled before would have run had enter() given the loop a turn
        assert ran == [] and admission.active == 1 and admission.queued == 0
        await admission.enter(Deadline(None))
        assert admission.active == 2 and admission.queued == 0
    asyncio.run(main())


def test_taken_turns_queue_first_come_first_served():
    async def main():
        admission = Admission(1, 2)
        await admission.enter(Deadline(10.0))
        order = []

        async def call(name):
            await admission.enter(Deadline(10.0))
            order.append(name)

        waiting = [asyncio.create_task(call(name)) for name in ("first", "second")]
        await asyncio.sleep(0)
        assert admission.queued == 2 and order == []
        admission.leave()
        for _ in range(100):  # a few loop turns: wait_for's task, then the call
            if order:
                break
            await asyncio.sleep(0)
        assert order == ["first"] and admission.queued == 1
        admission.leave()
        await asyncio.gather(*waiting)
        assert order == ["first", "second"] and admission.queued == 0 and admission.active == 1
    asyncio.run(main())


def test_a_full_queue_is_refused_at_once():
    async def main():
        admission = Admission(1, 1)
        await admission.enter(Deadline(10.0))
        queued = asyncio.create_task(admission.enter(Deadline(10.0)))
        await asyncio.sleep(0)
        with pytest.raises(Refused) as refused:
            await admission.enter(Deadline(10.0))
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.reason == "overloaded"
        assert refused.value.message == "overloaded: 1 calls at work and 1 waiting; retry later"
        admission.leave()
        await queued
    asyncio.run(main())


def test_a_deadline_that_passes_in_the_queue_or_before_the_start_is_refused():
    async def main():
        admission = Admission(1, 1)
        with pytest.raises(Refused) as late:  # a free turn, but no time left
            await admission.enter(Deadline(0.0))
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert late.value.message == "the deadline passed before the call started"
        assert admission.active == 0 and not admission._turns.locked()  # the turn went back
        await admission.enter(Deadline(10.0))
        with pytest.raises(Refused) as waited:
            await admission.enter(Deadline(0.06))  # 10 ms of waiting after the 50 ms margin
        assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert waited.value.message == "the deadline passed while the call waited for a turn"
        assert admission.queued == 0 and admission.active == 1
    asyncio.run(main())


def test_a_draining_gateway_refuses_new_calls_and_serves_those_already_in():
    async def main():
        admission = Admission(1, 1)
        assert await admission.wait_idle(0.0)  # nothing in yet
        await admission.enter(Deadline(10.0))
        queued = asyncio.create_task(admission.enter(Deadline(10.0)))
        await asyncio.sleep(0)
        admission.drain()
        with pytest.raises(Refused) as refused:
            await admission.enter(Deadline(10.0))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.reason == "draining"
        assert "shutting down" in refused.value.message
        assert not await admission.wait_idle(0.05)  # one at work, one waiting
        admission.leave()
        await queued  # the call that was waiting gets its turn
        assert admission.active == 1 and not await admission.wait_idle(0.05)
        idle = asyncio.create_task(admission.wait_idle(10.0))
        await asyncio.sleep(0)
        admission.leave()
        assert await idle and admission.active == 0 and admission.queued == 0
    asyncio.run(main())
