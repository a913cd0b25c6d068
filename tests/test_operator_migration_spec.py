"""`spec.migration`: defaults, limits, clear errors; it never changes the spec hash."""

import pytest

from shoal.operator.migration_spec import MigrationSpec, parse_migration
from shoal.operator.spec import SpecError, parse_spec
from shoal.operator.workers import spec_hash

BASE = {"model": {"name": "m", "source": "/m"}}


def test_defaults_when_absent():
    assert parse_migration({}) == MigrationSpec()
    m = parse_spec(BASE).migration
    assert m.drain_on_scale_in and not m.rebalance.enabled
    assert (m.max_concurrent_migrations, m.max_stages, m.drain_timeout_seconds) == (4, 3, 120)


def test_all_fields():
    m = parse_migration(
        {
            "migration": {
                "drainOnScaleIn": False,
                "maxConcurrentMigrations": 2,
                "maxStages": 5,
                "drainTimeoutSeconds": 30,
                "rebalance": {
                    "enabled": True,
                    "threshold": 0.5,
                    "hysteresis": 0.2,
                    "cooldownSeconds": 0,
                },
            }
        }
    )
    assert not m.drain_on_scale_in
    assert (m.max_concurrent_migrations, m.max_stages, m.drain_timeout_seconds) == (2, 5, 30)
    r = m.rebalance
    assert (r.enabled, r.threshold, r.hysteresis, r.cooldown_seconds) == (True, 0.5, 0.2, 0)


@pytest.mark.parametrize(
    ("migration", "message"),
    [
        ("yes", "spec.migration: must be an object"),
        ({"drainOnScaleIn": "yes"}, "spec.migration.drainOnScaleIn: must be true or false"),
        ({"maxStages": 0}, "spec.migration.maxStages: must be >= 1"),
        ({"drainTimeoutSeconds": 1.5}, "spec.migration.drainTimeoutSeconds: must be an integer"),
        ({"rebalance": {"threshold": 2}}, "spec.migration.rebalance.threshold: must be between"),
        (
            {"rebalance": {"threshold": 0.1, "hysteresis": 0.2}},
            "spec.migration.rebalance.hysteresis: 0.2 must not exceed threshold 0.1",
        ),
        ({"drainOnScaleOut": True}, "spec.migration: unknown field 'drainOnScaleOut'"),
    ],
)
def test_bad_values_name_the_field(migration, message):
    with pytest.raises(SpecError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        parse_spec({**BASE, "migration": migration})


def test_migration_settings_do_not_roll_workers():
    plain = parse_spec(BASE)
    tuned = parse_spec({**BASE, "migration": {"maxStages": 7, "rebalance": {"enabled": True}}})
    assert spec_hash(plain) == spec_hash(tuned)
