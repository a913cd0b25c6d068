"""The pure reconcile: plans for the situations a pool meets, and a simulated rolling update."""

import itertools

from shoal.operator.observe import observe_pod
from shoal.operator.reconcile import choose_victims, reconcile
from shoal.operator.spec import parse_spec
from shoal.operator.workers import spec_hash

UID = "uid-1"
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"
SPEC = {"model": {"name": "tiny", "source": "/m/tiny"}, "replicas": 2}
_seq = itertools.count()


def mdep(spec=SPEC, status=None, name="tiny"):
    return {
        "apiVersion": "shoal.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "ns", "uid": UID, "generation": 3},
        "spec": spec,
        "status": status or {},
    }


def pod(ready=True, spec=SPEC, owner=UID, name=None, phase=None, **status_extra):
    n = next(_seq)
    name = name or f"tiny-{n:05d}"
    status = {
        "phase": phase or ("Running" if ready else "Pending"),
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        **status_extra,
    }
    if ready:
        status["podIP"] = f"127.0.1.{n % 250 + 1}"
    meta = {
        "name": name,
        "creationTimestamp": f"2026-01-01T00:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "labels": {
            "shoal.dev/deployment": "tiny",
            "shoal.dev/spec-hash": spec_hash(parse_spec(spec)),
        },
    }
    if owner:
        meta["ownerReferences"] = [{"kind": "ModelDeployment", "uid": owner, "controller": True}]
    return {"metadata": meta, "status": status}


def cond(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_new_deployment_creates_its_workers():
    plan = reconcile(mdep(), [], NOW)
    assert len(plan.create) == 2
    assert plan.delete == ()
    assert plan.status["phase"] == "Pending"
    assert plan.status["replicas"] == 0
    assert plan.status["observedGeneration"] == 3
    assert plan.status["selector"] == (
        "app.kubernetes.io/name=shoal-worker,shoal.dev/deployment=tiny"
    )
    assert cond(plan, "Ready")["status"] == "False"
    assert cond(plan, "Progressing")["reason"] == "ScalingUp"
    assert plan.events == ()


def test_ready_pool_is_left_alone_and_reports_ready():
    pods = [pod(), pod()]
    plan = reconcile(mdep(), pods, NOW)
    assert plan.create == () and plan.delete == ()
    s = plan.status
    assert (s["phase"], s["replicas"], s["readyReplicas"]) == ("Ready", 2, 2)
    assert cond(plan, "Ready") | {} == {
        "type": "Ready",
        "status": "True",
        "reason": "AllWorkersReady",
        "message": "2/2 workers ready",
        "lastTransitionTime": NOW,
    }
    assert [e.reason for e in plan.events] == ["Ready"]
    w = s["workers"][0]
    assert w["endpoint"] == f"http://{w['ip']}:8000" and w["ready"] is True


def test_ready_event_and_transition_time_are_not_repeated():
    pods = [pod(), pod()]
    first = reconcile(mdep(), pods, NOW)
    again = reconcile(mdep(status=first.status), pods, LATER)
    assert again.events == ()
    assert cond(again, "Ready")["lastTransitionTime"] == NOW


def test_a_deleted_worker_comes_back():
    pods = [pod(), pod()]
    pods[1]["metadata"]["deletionTimestamp"] = NOW  # terminating: no longer counts
    plan = reconcile(mdep(), pods, NOW)
    assert len(plan.create) == 1
    assert plan.delete == ()


def test_stray_pods_go_but_terminating_ones_are_not_deleted_twice():
    stranger = pod(owner="someone-else")  # e.g. left by an earlier ModelDeployment "tiny"
    stranger["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "shoal-operator"
    foreign = pod(owner="a-replicaset")  # another controller's: not ours to delete
    orphan = pod(owner=None)
    leaving = pod(owner=None)
    leaving["metadata"]["deletionTimestamp"] = NOW
    plan = reconcile(mdep(), [pod(), pod(), stranger, foreign, orphan, leaving], NOW)
    assert {d.name for d in plan.delete} == {
        stranger["metadata"]["name"],
        orphan["metadata"]["name"],
    }
    assert {d.reason for d in plan.delete} == {"Stray"}
    assert plan.create == ()
    assert plan.status["replicas"] == 2


def test_scale_down_removes_not_ready_then_newest():
    old_ready, new_ready, not_ready = pod(), pod(), pod(ready=False)
    spec = {**SPEC, "replicas": 1, "migration": {"drainOnScaleIn": False}}  # drain: test_drain
    plan = reconcile(mdep(spec), [old_ready, new_ready, not_ready], NOW)
    assert [d.name for d in plan.delete] == [
        not_ready["metadata"]["name"],
        new_ready["metadata"]["name"],
    ]
    assert {d.reason for d in plan.delete} == {"ScaleDown"}
    assert cond(plan, "Progressing")["reason"] == "ScalingDown"


def test_draining_worker_is_chosen_first():
    a, b = pod(), pod()
    a["metadata"]["annotations"] = {"shoal.dev/draining": "true"}
    workers = [observe_pod(a), observe_pod(b)]
    assert [w.name for w in choose_victims(workers, 1)] == [a["metadata"]["name"]]


def test_scale_to_zero():
    no_drain = {**SPEC, "replicas": 0, "migration": {"drainOnScaleIn": False}}
    plan = reconcile(mdep(no_drain), [pod(), pod()], NOW)
    assert len(plan.delete) == 2 and plan.create == ()
    done = reconcile(mdep({**SPEC, "replicas": 0}), [], NOW)
    assert done.status["phase"] == "Ready"


def test_finished_worker_is_replaced():
    dead = pod(ready=False, phase="Failed")
    plan = reconcile(mdep(), [pod(), dead], NOW)
    assert [(d.name, d.reason) for d in plan.delete] == [(dead["metadata"]["name"], "Finished")]
    assert len(plan.create) == 1


def test_invalid_spec_fails_with_reason_and_one_warning():
    bad = {"model": {"name": "tiny", "source": "/m", "dtype": "int3"}}
    kept = pod()
    plan = reconcile(mdep(bad), [kept], NOW)
    assert plan.create == () and plan.delete == ()  # running workers are kept
    assert plan.status["phase"] == "Failed"
    ready = cond(plan, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.model.dtype" in ready["message"]
    assert cond(plan, "Degraded")["status"] == "True"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidSpec")]
    again = reconcile(mdep(bad, status=plan.status), [kept], LATER)
    assert again.events == ()


def test_bad_name_is_invalid():
    plan = reconcile(mdep(name="Tiny_Model"), [], NOW)
    assert cond(plan, "Ready")["reason"] == "InvalidSpec"
    assert plan.create == ()


def test_reserved_features_are_not_implemented_yet():
    # adapters, autoscaling and migration are implemented now; moe is still reserved.
    spec = {**SPEC, "moe": {"experts": 2}}
    plan = reconcile(mdep(spec), [], NOW)
    assert plan.create == ()
    ready = cond(plan, "Ready")
    assert ready["reason"] == "NotImplemented"
    assert "spec.moe" in ready["message"]
    assert "not implemented yet" in ready["message"]
    assert reconcile(mdep({**SPEC, "moe": {}}), [], NOW).create  # empty means unset


def test_missing_model_source_is_reported_not_retried():
    plan = reconcile(mdep(), [], NOW, path_exists=lambda p: False)
    assert plan.create == ()
    assert plan.status["phase"] == "Failed"
    assert cond(plan, "Ready")["reason"] == "ModelSourceNotFound"
    assert "/m/tiny" in cond(plan, "Ready")["message"]
    assert len(reconcile(mdep(), [], NOW, path_exists=lambda p: p == "/m/tiny").create) == 2


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
}


def unschedulable_pod():
    p = pod(ready=False)
    p["status"]["conditions"].append(UNSCHEDULABLE)
    return p


def test_unschedulable_workers_fail_without_creating_more():
    plan = reconcile(mdep(), [unschedulable_pod(), unschedulable_pod()], NOW)
    assert plan.create == () and plan.delete == ()
    assert plan.status["phase"] == "Failed"
    ready = cond(plan, "Ready")
    assert ready["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in ready["message"] and "(and 1 more)" in ready["message"]
    assert [e.reason for e in plan.events] == ["Unschedulable"]


def test_some_unschedulable_is_degraded():
    plan = reconcile(mdep(), [pod(), unschedulable_pod()], NOW)
    assert plan.status["phase"] == "Degraded"
    assert cond(plan, "Degraded")["reason"] == "Unschedulable"


def test_crash_loop_is_degraded_with_the_exit_code():
    crashing = pod(
        ready=False,
        phase="Running",
        containerStatuses=[
            {
                "name": "worker",
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 2, "reason": "Error"}},
            }
        ],
    )
    plan = reconcile(mdep(), [pod(), crashing], NOW)
    assert plan.create == () and plan.delete == ()
    assert plan.status["phase"] == "Degraded"
    ready = cond(plan, "Ready")
    assert ready["reason"] == "WorkerCrashLoop"
    assert "restarted 4 times, last exit code 2" in ready["message"]


def simulate(spec, pods, steps=40):
    """Apply plans to a fake world; new pods become ready one reconcile after creation."""
    history = []
    for _ in range(steps):
        plan = reconcile(mdep(spec), pods, NOW)
        history.append(plan)
        gone = {d.name for d in plan.delete}
        pods = [p for p in pods if p["metadata"]["name"] not in gone]
        for p in pods:  # whatever was pending is ready by now
            p["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
            p["status"]["phase"] = "Running"
        for manifest in plan.create:
            new = pod(ready=False, spec=spec)
            new["metadata"]["labels"] = manifest["metadata"]["labels"]
            pods.append(new)
        if not plan.create and not plan.delete and plan.status["phase"] == "Ready":
            return pods, history
    raise AssertionError("did not converge")


def test_spec_change_rolls_one_worker_at_a_time():
    want = 3
    old_spec = {**SPEC, "replicas": want}
    new_spec = {**old_spec, "model": {**SPEC["model"], "dtype": "float32"}}
    pods = [pod(spec=old_spec) for _ in range(want)]
    pods, history = simulate(new_spec, pods)
    new_hash = spec_hash(parse_spec(new_spec))
    assert len(pods) == want
    assert {p["metadata"]["labels"]["shoal.dev/spec-hash"] for p in pods} == {new_hash}
    for plan in history:
        assert len(plan.create) <= 1  # surge one
        assert len([d for d in plan.delete if d.reason == "Rollout"]) <= 1  # delete one
        assert plan.status["replicas"] <= want + 1
        assert plan.status["readyReplicas"] >= want  # no capacity lost during the roll
    assert cond(history[0], "Progressing")["reason"] == "RollingUpdate"
    assert history[0].status["phase"] == "Progressing"


def test_broken_old_workers_are_replaced_at_once():
    old_spec = {**SPEC, "model": {**SPEC["model"], "source": "/m/typo"}}
    old = [pod(ready=False, spec=old_spec), pod(ready=False, spec=old_spec)]
    plan = reconcile(mdep(), old, NOW)
    assert {d.reason for d in plan.delete} == {"Rollout"} and len(plan.delete) == 2
    assert len(plan.create) == 2


def test_crash_loop_holds_between_restarts():
    """Restarted once and running again but not ready: still reported, so it does not flap."""
    restarting = pod(
        ready=False,
        phase="Running",
        containerStatuses=[
            {
                "name": "worker",
                "restartCount": 1,
                "state": {"running": {}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            }
        ],
    )
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [restarting], NOW)
    assert plan.status["phase"] == "Failed"
    assert cond(plan, "Ready")["reason"] == "WorkerCrashLoop"
    fresh = pod(ready=False, phase="Running")
    plan = reconcile(mdep({**SPEC, "replicas": 1}), [fresh], NOW)
    assert cond(plan, "Ready")["reason"] == "WorkersNotReady"


def test_merge_conditions_keeps_types_owned_by_other_components():
    from shoal.operator.conditions import Condition, merge_conditions, set_condition

    prev = set_condition(None, Condition("Autoscaling", True, "Active", "ok"), "t0")
    merged = merge_conditions(prev, [Condition("Ready", True, "AllReady", "1/1")], "t1")
    types = {c["type"]: c for c in merged}
    assert set(types) == {"Ready", "Autoscaling"}
    assert types["Autoscaling"]["lastTransitionTime"] == "t0"
    flipped = set_condition(merged, Condition("Autoscaling", False, "NoMetrics", "x"), "t2")
    assert {c["type"]: c["lastTransitionTime"] for c in flipped} == {
        "Autoscaling": "t2",
        "Ready": "t1",
    }
