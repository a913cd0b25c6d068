"""The rebalancer's pure decision: threshold, hysteresis, cooldown, bounded moves, fit."""

from shoal.operator.drain import Load, RequestLoad
from shoal.operator.migration_spec import RebalanceSpec
from shoal.operator.rebalancer import decide, pressure

ON = RebalanceSpec(enabled=True, threshold=0.3, hysteresis=0.1, cooldown_seconds=15)
NOW = "2026-01-01T00:01:00Z"


def worker(used: int, running: int, waiting: int = 0, total: int = 100, ctx: int = 64) -> Load:
    reqs = tuple(RequestLoad(f"r{used}-{i}", ctx + i, 5, 100) for i in range(running))
    return Load(running, waiting, used / total, total - used, total, False, reqs)


def test_pressure_counts_the_queue_as_average_requests():
    assert pressure(worker(40, 4)) == 0.4
    assert pressure(worker(40, 4, waiting=2)) == 0.6  # two more requests of 10 blocks each
    assert pressure(worker(0, 0, waiting=3)) == 0.03  # an idle queue: one block each


def test_moves_cheapest_requests_from_busiest_to_idlest_until_balanced():
    loads = {"a": worker(80, 8), "b": worker(10, 1), "c": worker(40, 4)}
    d = decide(loads, ON, max_moves=8, rebalancing=False, last_migration_at=None, now=NOW)
    assert {(m.source, m.target) for m in d.moves} == {("a", "b")}
    assert d.rebalancing
    # Cheapest (shortest context) first, and not so many that b ends up the busiest.
    assert [m.request_id for m in d.moves] == [f"r80-{i}" for i in range(len(d.moves))]
    moved = sum(m.blocks for m in d.moves)
    assert (80 - moved) - (10 + moved) >= -10
    assert 2 <= len(d.moves) <= 4


def test_below_threshold_nothing_moves():
    loads = {"a": worker(50, 5), "b": worker(30, 3)}
    d = decide(loads, ON, 8, rebalancing=False, last_migration_at=None, now=NOW)
    assert d.moves == () and not d.rebalancing


def test_hysteresis_keeps_moving_below_the_threshold_once_started():
    loads = {"a": worker(55, 5), "b": worker(30, 3)}  # gap 0.25: under 0.3, over 0.2
    assert decide(loads, ON, 8, rebalancing=False, last_migration_at=None, now=NOW).moves == ()
    d = decide(loads, ON, 8, rebalancing=True, last_migration_at=None, now=NOW)
    assert d.moves and d.rebalancing


def test_cooldown_after_a_migration():
    loads = {"a": worker(90, 9), "b": worker(0, 0)}
    recent = "2026-01-01T00:00:50Z"
    d = decide(loads, ON, 8, rebalancing=True, last_migration_at=recent, now=NOW)
    assert d.moves == () and d.reason == "cooldown" and d.rebalancing
    later = decide(
        loads, ON, 8, rebalancing=True, last_migration_at="2026-01-01T00:00:40Z", now=NOW
    )
    assert later.moves


def test_bounded_by_max_concurrent_migrations():
    loads = {"a": worker(90, 9), "b": worker(0, 0)}
    assert len(decide(loads, ON, 2, False, None, NOW).moves) == 2


def test_a_request_that_does_not_fit_the_target_stays():
    big = Load(1, 0, 0.9, 10, 100, False, (RequestLoad("huge", 900, 1, 100),))
    nearly_full = Load(0, 0, 0.85, 15, 100, False, ())
    d = decide({"a": big, "b": nearly_full}, ON, 8, False, None, NOW)
    assert d.moves == ()  # 0.9 vs 0.85: balanced anyway
    small_target = Load(0, 0, 0.0, 50, 50, False, ())
    d = decide({"a": big, "b": small_target}, ON, 8, False, None, NOW)
    assert d.moves == () and "no request fits" in d.reason


def test_draining_workers_and_disabled_spec_do_nothing():
    loads = {"a": worker(90, 9), "b": worker(0, 0)}
    off = RebalanceSpec(enabled=False)
    assert decide(loads, off, 8, False, None, NOW).reason == "disabled"
    b = loads["b"]
    draining = {"a": loads["a"], "b": Load(0, 0, 0, b.free_blocks, b.total_blocks, True, ())}
    assert decide(draining, ON, 8, False, None, NOW).moves == ()


def test_requests_about_to_finish_are_not_moved():
    ending = tuple(RequestLoad(f"e{i}", 50, 99, 100) for i in range(8))
    loads = {"a": Load(8, 0, 0.8, 20, 100, False, ending), "b": worker(0, 0)}
    assert decide(loads, ON, 8, False, None, NOW).moves == ()
