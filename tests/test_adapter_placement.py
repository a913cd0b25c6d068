"""Adapter placement (pure): replication, spread, stability, scale-out share, dead workers,
make-before-break unloads; and the status it reports."""

from __future__ import annotations

from shoal.operator.adapters_placement import Action, Placement, WorkerAdapters, place
from shoal.operator.adapters_spec import AdapterSpec
from shoal.operator.adapters_status import LoadFailure, adapters_status

ONE, TWO, ALL = AdapterSpec("one", "/a/one", 1), AdapterSpec("two", "/a/two", 2), None
EVERY = AdapterSpec("every", "/a/every", None)
DECLARED = [ONE, TWO, EVERY]


def w(name: str, *held: str, load: float = 0.0, **running: int) -> WorkerAdapters:
    return WorkerAdapters(name, frozenset(held), running, load)


def apply(workers: list[WorkerAdapters], plan: Placement) -> list[WorkerAdapters]:
    """The world after the plan's loads and unloads all succeed."""
    held = {x.name: set(x.held) for x in workers}
    for a in plan.loads:
        held[a.worker].add(a.adapter)
    for a in plan.unloads:
        held[a.worker].discard(a.adapter)
    return [WorkerAdapters(x.name, frozenset(held[x.name]), x.running, x.load) for x in workers]


def converge(workers, adapters=DECLARED, passes=6):
    for _ in range(passes):
        plan = place(workers, adapters)
        if not plan.loads and not plan.unloads:
            return workers
        workers = apply(workers, plan)
    raise AssertionError(f"no fixed point after {passes} passes: {workers}")


def holders(workers, adapter):
    return {x.name for x in workers if adapter in x.held}


def test_fresh_pool_gets_replication_spread_by_adapter_count():
    plan = place([w("w0"), w("w1")], DECLARED)
    assert plan.unloads == ()
    after = apply([w("w0"), w("w1")], plan)
    assert holders(after, "every") == {"w0", "w1"}
    assert holders(after, "two") == {"w0", "w1"}
    assert len(holders(after, "one")) == 1
    assert place(after, DECLARED).loads == ()  # a fixed point


def test_new_holders_are_the_least_loaded_workers():
    plan = place([w("w0", load=5), w("w1", load=0.5), w("w2", load=3)], [ONE])
    assert plan.loads == (Action("w1", "one"),)


def test_replication_is_clamped_to_the_pool():
    after = converge([w("w0")], [AdapterSpec("x", "/x", 5)])
    assert holders(after, "x") == {"w0"}


def test_stable_nothing_moves_when_nothing_needs_to():
    workers = [w("w0", "one", "two", "every", load=9), w("w1", "two", "every")]
    plan = place(workers, DECLARED)
    assert (plan.loads, plan.unloads) == ((), ())


def test_scale_out_gives_the_new_worker_all_adapters_and_more_replicas():
    workers = converge([w("w0"), w("w1")], [ONE, AdapterSpec("three", "/t", 3), EVERY])
    assert holders(workers, "three") == {"w0", "w1"}  # clamped to 2 workers
    workers = converge([*workers, w("w2")], [ONE, AdapterSpec("three", "/t", 3), EVERY])
    assert "w2" in holders(workers, "every") and "w2" in holders(workers, "three")
    assert len(holders(workers, "one")) == 1


def test_scale_out_shares_single_copies_with_the_new_worker():
    singles = [AdapterSpec(f"a{i}", f"/a{i}", 1) for i in range(6)]
    workers = converge([w("w0"), w("w1")], singles)
    workers = converge([*workers, w("w2")], singles)
    counts = sorted(len(x.held) for x in workers)
    assert counts == [2, 2, 2]
    assert all(len(holders(workers, a.name)) == 1 for a in singles)


def test_a_moved_adapter_is_loaded_before_it_is_unloaded():
    singles = [AdapterSpec(f"a{i}", f"/a{i}", 1) for i in range(4)]
    workers = [w("w0", "a0", "a1", "a2", "a3"), w("w1")]
    plan = place(workers, singles)
    assert plan.loads and plan.unloads == ()  # first the copy, same pass no removal
    after = apply(workers, plan)
    plan2 = place(after, singles)
    moved = {a.adapter for a in plan.loads}
    assert {a.adapter for a in plan2.unloads} == moved
    assert all(a.worker == "w0" for a in plan2.unloads)


def test_a_dead_workers_adapters_move_to_the_survivors():
    workers = converge([w("w0"), w("w1"), w("w2")], DECLARED)
    gone = next(x for x in workers if "one" in x.held)
    survivors = [x for x in workers if x is not gone]
    plan = place(survivors, DECLARED)
    assert [a.adapter for a in plan.loads if a.adapter == "one"] == ["one"]
    after = converge(survivors, DECLARED)
    assert len(holders(after, "one")) == 1 and len(holders(after, "two")) == 2


def test_undeclared_adapters_are_unloaded_once_idle():
    workers = [w("w0", "old", "busy", busy=1), w("w1")]
    plan = place(workers, [])
    assert plan.unloads == (Action("w0", "old"),)


def test_surplus_copies_are_trimmed_but_not_while_busy():
    workers = [w("w0", "one", one=2), w("w1", "one"), w("w2", "one")]
    plan = place(workers, [ONE])
    assert set(plan.unloads) == {Action("w1", "one"), Action("w2", "one")}
    workers = [w("w0", "one", one=2), w("w1", "one", one=1)]
    assert place(workers, [ONE]).unloads == ()


def test_status_reports_holders_and_a_failed_adapter_without_touching_the_others():
    bad = AdapterSpec("bad", "/a/bad", 1)
    workers = [w("w0", "one", "every"), w("w1", "every")]
    failure = LoadFailure("w1", "lora_rank_too_large", "rank 64 is above --max-lora-rank 16")
    entries, condition = adapters_status([ONE, EVERY, bad], workers, {"bad": failure})
    by = {e["name"]: e for e in entries}
    assert by["one"] == {
        "name": "one",
        "source": "/a/one",
        "desiredReplicas": 1,
        "workers": ["w0"],
        "state": "Ready",
    }
    assert by["every"]["workers"] == ["w0", "w1"] and by["every"]["state"] == "Ready"
    assert by["bad"]["state"] == "Failed" and by["bad"]["reason"] == "LoraRankTooLarge"
    assert "rank 64" in by["bad"]["message"] and "w1" in by["bad"]["message"]
    assert (condition.type, condition.status, condition.reason) == (
        "AdaptersReady",
        False,
        "AdapterLoadFailed",
    )
    assert "bad" in condition.message and "1 of 3" in condition.message


def test_status_condition_ready_loading_and_no_workers():
    _, ok = adapters_status([ONE], [w("w0", "one")], {})
    assert (ok.status, ok.reason) == (True, "AllAdaptersPlaced")
    _, loading = adapters_status([TWO], [w("w0", "two"), w("w1")], {})
    assert (loading.status, loading.reason) == (False, "AdaptersLoading")
    entries, none = adapters_status([ONE], [], {})
    assert (none.reason, entries[0]["state"]) == ("NoReadyWorkers", "Pending")
    entries, _ = adapters_status([AdapterSpec("lazy", "/l", 0)], [], {})
    assert entries[0]["state"] == "Ready"  # replicas 0: loaded on demand only


def test_a_refused_load_is_remembered_for_a_while_then_asked_again():
    from shoal.operator.adapters_sync import RETRY_REFUSED_AFTER_S, Refusals

    t = [0.0]
    refusals = Refusals(clock=lambda: t[0])
    key = ("ns", "pool", "w0", "bad", "/a/bad")
    failure = LoadFailure("w0", "lora_base_mismatch", "made for another base")
    refusals.remember(key, failure)
    t[0] = RETRY_REFUSED_AFTER_S - 1
    assert refusals.recent(key) == failure
    assert refusals.recent((*key[:4], "/a/fixed")) is None  # a new source is a new question
    t[0] = RETRY_REFUSED_AFTER_S + 1
    assert refusals.recent(key) is None


def test_unwanted_copies_of_declared_adapters_wait_out_a_grace_period():
    from shoal.operator.adapters_placement import UNLOAD_GRACE_S, defer_unloads

    burst, removed = Action("w1", "one"), Action("w0", "gone")
    now_do, keep = defer_unloads([burst, removed], {"one"}, {}, now=100.0)
    assert now_do == (removed,) and keep == {burst: 100.0}  # undeclared: at once
    now_do, keep = defer_unloads([burst], {"one"}, keep, now=100.0 + UNLOAD_GRACE_S - 1)
    assert now_do == () and keep == {burst: 100.0}
    now_do, keep = defer_unloads([burst], {"one"}, keep, now=100.0 + UNLOAD_GRACE_S)
    assert now_do == (burst,) and keep == {}
    # A copy that stopped being a candidate (busy again) starts over next time.
    _, keep = defer_unloads([], {"one"}, {burst: 100.0}, now=200.0)
    assert keep == {}
