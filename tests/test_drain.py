"""Drain by migration, the pure half: victim choice from load, drain steps, and the plans
reconcile makes while a worker drains (scale-in and by hand)."""

from shoal.operator.drain import Load, RequestLoad, choose_scale_in, drain_step
from shoal.operator.migration_spec import MigrationSpec
from shoal.operator.observe import observe_pod
from shoal.operator.reconcile import reconcile
from tests.test_operator_reconcile import NOW, SPEC, mdep, pod

T0 = "2026-01-01T00:00:00Z"
T30 = "2026-01-01T00:00:30Z"
T500 = "2026-01-01T00:08:20Z"


def busy(tokens_left: int, running: int = 1) -> Load:
    reqs = tuple(RequestLoad(f"r{i}", 100, 10, 10 + tokens_left) for i in range(running))
    return Load(num_running=running, kv_usage=0.5, requests=reqs)


def draining_pod(reason="ScaleDown", started=T0, **kw):
    p = pod(**kw)
    p["metadata"]["annotations"] = {
        "shoal.dev/draining": "true",
        "shoal.dev/drain-started": started,
        "shoal.dev/drain-reason": reason,
    }
    return p


def names(pods):
    return [p["metadata"]["name"] for p in pods]


def test_scale_in_picks_the_worker_with_least_work_left():
    a, b, c = pod(), pod(), pod()
    workers = [observe_pod(p) for p in (a, b, c)]
    loads = {w.name: busy(n) for w, n in zip(workers, (50, 5, 500), strict=True)}
    assert [w.name for w in choose_scale_in(workers, 1, loads)] == [workers[1].name]
    assert [w.name for w in choose_scale_in(workers, 2, loads)] == names([b, a])


def test_scale_in_falls_back_to_newest_when_a_load_is_unknown():
    a, b = pod(), pod()
    workers = [observe_pod(a), observe_pod(b)]
    loads = {workers[0].name: busy(1), workers[1].name: None}
    assert [w.name for w in choose_scale_in(workers, 1, loads)] == names([b])


def test_not_ready_workers_go_before_busy_ones():
    ready, idle = pod(), pod(ready=False)
    workers = [observe_pod(ready), observe_pod(idle)]
    loads = {workers[0].name: Load()}
    assert [w.name for w in choose_scale_in(workers, 1, loads)] == names([idle])


def test_scale_down_marks_the_victim_and_drains_it_to_the_survivor():
    a, b = pod(), pod()
    loads = {a["metadata"]["name"]: busy(100), b["metadata"]["name"]: busy(3)}
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [a, b], NOW, loads=loads)
    victim = b["metadata"]["name"]
    assert plan.delete == () and plan.create == ()
    assert [(m.name, m.reason) for m in plan.marks] == [(victim, "ScaleDown")]
    assert plan.marks[0].annotations()["shoal.dev/draining"] == "true"
    (call,) = plan.drains
    assert call.name == victim
    assert call.source == f"{b['status']['podIP']}:50051"
    assert call.targets == (f"{a['status']['podIP']}:50051",)
    assert plan.status["drain"]["active"] == [
        {"name": victim, "reason": "ScaleDown", "startedAt": NOW}
    ]
    progressing = next(c for c in plan.status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "Draining" and victim in progressing["message"]
    assert "DrainStarted" in [e.reason for e in plan.events]


def test_a_running_drain_continues_and_is_not_replaced():
    kept, leaving = pod(), draining_pod()
    loads = {leaving["metadata"]["name"]: busy(20)}
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [kept, leaving], T30, loads=loads)
    assert plan.create == () and plan.delete == () and plan.marks == ()
    assert [c.name for c in plan.drains] == names([leaving])
    assert plan.drains[0].timeout_s == 90  # 120 s default, 30 s gone
    assert plan.status["phase"] == "Ready"  # the kept worker serves
    assert [w["draining"] for w in plan.status["workers"]] == [
        w["name"] == leaving["metadata"]["name"] for w in plan.status["workers"]
    ]


def test_drained_worker_is_deleted_with_its_outcome():
    kept, leaving = pod(), draining_pod()
    loads = {leaving["metadata"]["name"]: Load()}
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [kept, leaving], T30, loads=loads)
    (d,) = plan.delete
    assert (d.name, d.reason, d.drain_outcome, d.drain_seconds) == (
        leaving["metadata"]["name"],
        "ScaleDown",
        "Drained",
        30.0,
    )
    last = plan.status["drain"]["last"]
    assert last["outcome"] == "Drained" and last["durationSeconds"] == 30
    assert plan.status["drain"]["active"] == []
    assert plan.drains == ()


def test_drain_times_out_with_a_warning():
    kept, leaving = pod(), draining_pod()
    loads = {leaving["metadata"]["name"]: busy(20, running=2)}
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [kept, leaving], T500, loads=loads)
    assert [d.drain_outcome for d in plan.delete] == ["TimedOut"]
    (warning,) = [e for e in plan.events if e.type == "Warning"]
    assert warning.reason == "DrainTimedOut" and "2 running" in warning.message


def test_drain_step_waits_without_survivors_and_ends_when_not_serving():
    leaving = observe_pod(draining_pod())
    spec = MigrationSpec()
    assert drain_step(leaving, busy(5), [], T30, spec) is None  # scale to 0: let them finish
    gone = observe_pod(draining_pod(ready=False))
    assert drain_step(gone, None, ["x:1"], T30, spec).outcome == "NotServing"


def test_unknown_load_keeps_draining_until_the_timeout():
    leaving = observe_pod(draining_pod())
    spec = MigrationSpec(drain_timeout_seconds=60)
    assert drain_step(leaving, None, ["x:1"], T30, spec).timeout_s == 30
    assert drain_step(leaving, None, ["x:1"], T500, spec).outcome == "TimedOut"


def test_drain_on_scale_in_off_deletes_at_once():
    a, b = pod(), pod()
    spec = {**SPEC, "replicas": 1, "migration": {"drainOnScaleIn": False}}
    plan = reconcile(mdep(spec), [a, b], NOW, loads={})
    assert [d.reason for d in plan.delete] == ["ScaleDown"] and plan.marks == ()


def test_hand_drain_replaces_first_then_drains_to_the_replacement():
    only = pod()
    only["metadata"]["annotations"] = {"shoal.dev/drain": "true"}
    one = {**SPEC, "replicas": 1}
    first = reconcile(mdep(one), [only], NOW, loads={})
    assert len(first.create) == 1 and first.marks == ()  # alone: it keeps serving meanwhile
    replacement = pod()
    second = reconcile(mdep(one), [only, replacement], NOW, loads={})
    assert second.create == ()
    assert [(m.name, m.reason) for m in second.marks] == [(only["metadata"]["name"], "Manual")]
    assert second.drains[0].targets == (f"{replacement['status']['podIP']}:50051",)


def test_hand_drain_in_a_bigger_pool_starts_at_once():
    a, b = pod(), pod()
    a["metadata"]["annotations"] = {"shoal.dev/drain": "true"}
    plan = reconcile(mdep(SPEC), [a, b], NOW, loads={})
    assert len(plan.create) == 1  # replicas stay 2
    assert [m.name for m in plan.marks] == names([a])


def test_hand_set_draining_alone_is_not_a_drain():
    # `shoal.dev/draining` by hand only stops new requests (the gateway test relies on it).
    a, b = pod(), pod()
    a["metadata"]["annotations"] = {"shoal.dev/draining": "true"}
    plan = reconcile(mdep(SPEC), [a, b], NOW, loads={})
    assert plan.marks == () and plan.delete == () and plan.drains == ()


def test_load_is_asked_only_while_a_drain_is_due():
    from shoal.operator.drain import load_wanted

    a, b, idle = pod(), pod(), pod(ready=False)
    m = mdep(SPEC)
    assert load_wanted(m, [a, b], replicas=2, drain_on=True) == []  # at rest: no gRPC
    scale_in = load_wanted(m, [a, b, idle], replicas=1, drain_on=True)
    assert sorted(w.name for w in scale_in) == sorted(names([a, b]))  # the ready ones
    assert load_wanted(m, [a, b], replicas=1, drain_on=False) == []
    assert [w.name for w in load_wanted(m, [a, draining_pod()], 2, True)][:1] == names([a])
    asked = pod()
    asked["metadata"]["annotations"] = {"shoal.dev/drain": "true"}
    assert len(load_wanted(m, [a, asked], replicas=2, drain_on=False)) == 2
