"""MergedCalls: batches parked while the model is busy share its next call (no Ray, no model)."""

import asyncio

import pytest

from duetto.serve.merge import MergedCalls


class SlowModel:
    """Records every call; each takes `seconds`, like a launch-bound decode whatever its size."""

    def __init__(self, seconds: float = 0.05, fail_on: str | None = None):
        self.seconds, self.fail_on, self.calls = seconds, fail_on, []

    async def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [f"out:{x}" for x in items]


async def _staggered(merged: MergedCalls, batches: list[list], gap: float = 0.005) -> list:
    """Serve's batches as they would arrive: one after another, while the first is still running."""
    tasks = []
    for b in batches:
        tasks.append(asyncio.create_task(merged(b)))
        await asyncio.sleep(gap)
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_batches_parked_during_a_call_share_the_next_one():
    model = SlowModel()
    merged = MergedCalls(model, max_items=16)
    results = asyncio.run(_staggered(merged, [["a"], ["b", "c"], ["d"], ["e"]]))
    # the first batch runs alone; the four requests that arrived meanwhile go in one call, not three
    assert model.calls == [["a"], ["b", "c", "d", "e"]]
    assert [r for r, _ in results] == [["out:a"], ["out:b", "out:c"], ["out:d"], ["out:e"]]
    assert [info.requests for _, info in results] == [1, 4, 4, 4]
    assert all(info.model_ms >= 40 for _, info in results)  # the call's own time, 50 ms sleeps


def test_a_batch_arriving_while_idle_runs_at_once():
    model = SlowModel(seconds=0.0)
    merged = MergedCalls(model, max_items=4)

    async def one_by_one():
        return [await merged(["x"]), await merged(["y", "z"])]

    (r1, i1), (r2, i2) = asyncio.run(one_by_one())
    assert model.calls == [["x"], ["y", "z"]]
    assert (r1, i1.requests, r2, i2.requests) == (["out:x"], 1, ["out:y", "out:z"], 2)


def test_merged_calls_respect_max_items_and_keep_order():
    model = SlowModel()
    merged = MergedCalls(model, max_items=3)
    batches = [["a"], ["b", "c"], ["d"], ["e", "f"], ["g"]]
    results = asyncio.run(_staggered(merged, batches))
    assert model.calls == [["a"], ["b", "c", "d"], ["e", "f", "g"]]
    assert all(len(call) <= 3 for call in model.calls)
    assert [r for r, _ in results] == [[f"out:{x}" for x in b] for b in batches]


def test_an_error_reaches_every_batch_of_that_call_and_the_next_call_runs():
    model = SlowModel(fail_on="bad")
    merged = MergedCalls(model, max_items=16)
    results = asyncio.run(_staggered(merged, [["a"], ["b"], ["bad"], ["c"]]))
    assert results[0] == (["out:a"], results[0][1])
    assert all(isinstance(r, ValueError) for r in results[1:]), results
    # the replica goes on: a later batch gets its answer
    assert asyncio.run(_staggered(merged, [["d"]]))[0][0] == ["out:d"]


def test_a_cancelled_caller_leaves_no_batch_unanswered():
    model = SlowModel(seconds=0.1)
    merged = MergedCalls(model, max_items=16)

    async def scenario():
        first = asyncio.create_task(merged(["a"]))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(merged(["b"]))  # b and c park while a runs ...
        await asyncio.sleep(0.01)
        third = asyncio.create_task(merged(["c"]))
        await asyncio.sleep(0.13)  # ... and b's owner runs them both from t=0.1 to 0.2
        second.cancel()  # b's caller goes away mid-call: that call must still answer c
        return await asyncio.wait_for(asyncio.gather(first, third), timeout=2.0), second

    (r1, r3), second = asyncio.run(scenario())
    assert model.calls == [["a"], ["b", "c"]]
    assert r1[0] == ["out:a"] and r3[0] == ["out:c"] and r3[1].requests == 2
    assert second.cancelled()


def test_results_must_match_the_requests():
    async def short(items):
        return items[:-1]

    merged = MergedCalls(short, max_items=4)
    with pytest.raises(RuntimeError, match="2 results for 3 requests"):
        asyncio.run(merged(["a", "b", "c"]))
    with pytest.raises(ValueError, match="max_items"):
        MergedCalls(short, max_items=0)


def test_requests_whose_caller_left_are_skipped():
    model = SlowModel()
    gone = {"b"}
    merged = MergedCalls(model, max_items=16, dropped=lambda item: item in gone)
    results = asyncio.run(_staggered(merged, [["a"], ["b", "c"], ["b"]]))
    assert model.calls == [["a"], ["c"]]  # b never reaches the model
    assert [r for r, _ in results] == [["out:a"], [None, "out:c"], [None]]
    assert [info.requests for _, info in results] == [1, 1, 1]


def test_a_call_with_only_gone_requests_runs_no_model():
    model = SlowModel()
    merged = MergedCalls(model, max_items=4, dropped=lambda item: True)
    result, info = asyncio.run(merged(["x", "y"]))
    assert model.calls == [] and result == [None, None] and info.requests == 0


def test_a_replica_marks_the_request_of_a_caller_that_left():
    """The deployments' methods mark a cancelled caller's request: the mark is what `dropped` reads."""
    from duetto.serve.replicas import _CLIENT_GONE, _ModelReplica, _requests_from

    async def parked_forever(request):
        await asyncio.sleep(60)

    async def scenario(request):
        task = asyncio.create_task(_ModelReplica._batched(parked_forever, request))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    request = {"instruction": "hi", "k": 2}
    asyncio.run(scenario(request))
    assert request[_CLIENT_GONE] is True
    # a request marked while already inside a model call still builds (the mark is not a request field)
    assert _requests_from([request])[0].instruction == "hi"
