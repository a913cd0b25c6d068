"""The pure parts of migration, without workers: a request's state to bytes and back,
the stream marker, the drain loop's bookkeeping, block reservations."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.runtime.engine.block_manager import BlockManager
from shoal.runtime.engine.outputs import TokenLogprob
from shoal.runtime.engine.sequence import Sequence, SequenceStatus
from shoal.runtime.migration import marker, state
from shoal.runtime.migration.drain import drain
from shoal.runtime.migration.source import Outcome, http_url
from shoal.runtime.sampling_params import SamplingParams


def _seq() -> Sequence:
    params = SamplingParams(max_tokens=50, temperature=0.7, seed=42, stop=["zz"], logprobs=2)
    seq = Sequence("cmpl-1", 0, [1, 2, 3, 4], params)
    seq.output_token_ids = [7, 8, 9]
    seq.logprobs = [TokenLogprob(7, -0.5, [(7, -0.5), (3, -1.5)])] * 3
    seq.detok.text, seq.detok.emitted, seq.detok.read_offset = "abc", 2, 3
    seq.num_reported_tokens = 3
    seq.num_computed_tokens = 6
    seq.status = SequenceStatus.RUNNING
    seq.block_table = [11, 12]
    torch.empty(10).exponential_(generator=seq.generator)  # advance: its position travels
    return seq


def test_state_round_trip_keeps_what_decides_the_next_tokens():
    seq = _seq()
    blob, gen = state.encode(seq, num_computed_tokens=6)
    back = state.decode(blob, gen)
    assert back.request_id == "cmpl-1" and back.index == 0
    assert back.prompt_token_ids == [1, 2, 3, 4] and back.output_token_ids == [7, 8, 9]
    assert back.params == seq.params
    assert back.logprobs == seq.logprobs
    assert back.detok == seq.detok
    assert back.num_reported_tokens == 3 and back.num_computed_tokens == 6
    assert back.status is SequenceStatus.RUNNING and back.block_table == []
    # the same random stream continues on the target
    assert torch.equal(back.generator.get_state(), seq.generator.get_state())
    draw = torch.empty(5).exponential_(generator=back.generator)
    assert torch.equal(draw, torch.empty(5).exponential_(generator=seq.generator))


def test_state_only_move_waits_to_recompute_and_drops_worker_local_fields():
    seq = _seq()
    seq.lora_uid, seq.lora_slot = 5, 2  # the source's adapter-pool handles
    blob, gen = state.encode(seq, num_computed_tokens=0)
    payload = json.loads(blob)
    assert "lora_uid" not in payload["extra"] and "lora_slot" not in payload["extra"]
    back = state.decode(blob, gen)
    assert back.status is SequenceStatus.WAITING and back.num_computed_tokens == 0
    assert back.lora_uid == 0 and back.lora_slot == -1


def test_unseeded_request_carries_no_generator():
    seq = Sequence("r", 0, [1], SamplingParams())
    blob, gen = state.encode(seq, num_computed_tokens=0)
    assert gen == b"" and state.decode(blob, gen).generator is None


def test_marker_is_found_across_chunk_boundaries_and_data_passes_untouched():
    event = marker.sse_event("http://10.0.0.2:8000/internal/resume/x", {"chat": True})
    stream = b'data: {"a":1}\n\n' + event.encode() + b"data: [DONE]\n\n"
    splitter = marker.SSEEvents()
    events = []
    for i in range(0, len(stream), 7):
        events += splitter.feed(stream[i : i + 7])
    assert events[0] == b'data: {"a":1}\n\n'
    assert marker.parse_event(events[0]) is None
    assert marker.parse_event(events[1]) == (
        "http://10.0.0.2:8000/internal/resume/x",
        {"chat": True},
    )
    assert splitter.rest() == b""


def test_resume_url_uses_the_grpc_host_and_the_targets_http_port():
    assert http_url("10.1.2.3:50051", 8000) == "http://10.1.2.3:8000"
    assert marker.resume_url("http://h:1/", "id") == "http://h:1/internal/resume/id"


def test_drain_spreads_over_targets_retries_failures_and_ignores_finished():
    here = {"r1", "r2", "r3"}
    calls: list[tuple[str, str]] = []
    fail_once = {"r2"}

    def migrate(rid: str, target: str) -> Outcome:
        calls.append((rid, target))
        if rid in fail_once:
            fail_once.discard(rid)
            return Outcome(ok=False, reason="target_full")
        if rid == "r3":  # finished on its own meanwhile
            here.discard(rid)
            return Outcome(ok=False, reason="finished")
        here.discard(rid)
        return Outcome(ok=True)

    result = drain(lambda: sorted(here), migrate, ["t1", "t2"], timeout_s=30, max_concurrent=1)
    assert (result.migrated, result.failed, result.remaining) == (2, 1, 0)
    assert result.errors == ["t2: target_full"]
    assert {t for _, t in calls} == {"t1", "t2"}
    assert [rid for rid, _ in calls].count("r2") == 2  # retried next round


def test_drain_without_targets_reports_what_stays():
    result = drain(lambda: ["r1"], lambda r, t: Outcome(ok=True), [], timeout_s=1, max_concurrent=1)
    assert result.remaining == 1 and result.errors == ["no targets to drain to"]


def test_drain_gives_up_at_its_deadline():
    result = drain(
        lambda: ["stuck"],
        lambda r, t: Outcome(ok=False, reason="connection_lost"),
        ["t"],
        timeout_s=0.3,
        max_concurrent=2,
    )
    assert result.migrated == 0 and result.remaining == 1 and result.failed >= 1


def test_reserved_blocks_leave_the_free_pool_until_released():
    bm = BlockManager(num_blocks=8, block_size=4)
    ids = bm.take_blocks(5)
    assert ids is not None and len(set(ids)) == 5 and bm.num_free_blocks == 3
    assert bm.take_blocks(4) is None  # never partially
    bm.release_blocks(ids)
    assert bm.num_free_blocks == 8


@pytest.mark.parametrize("bad", [b": shoal-migrated {", b": shoal-migrated []", b": other"])
def test_malformed_markers_are_not_markers(bad):
    assert marker.parse_event(bad + b"\n\n") is None
