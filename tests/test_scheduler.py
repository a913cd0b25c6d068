"""Scheduler decisions without a model: budgets, chunking, admission and preemption."""

from shoal.runtime.engine.block_manager import BlockManager
from shoal.runtime.engine.scheduler import Scheduler
from shoal.runtime.engine.sequence import Sequence
from shoal.runtime.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=16, chunked=True):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_seqs, budget, chunked), bm


def run_step(sched, bm, out, token=7):
    """Apply a step as the engine does: advance computed tokens, append a token."""
    for s in out.scheduled:
        done = s.completes_prompt
        s.seq.num_computed_tokens += s.num_new_tokens
        bm.cache_full_blocks(s.seq)
        if done:
            s.seq.output_token_ids.append(token)


def test_long_prompt_is_chunked_under_the_budget():
    sched, bm = make(budget=16)
    s = Sequence("a", 0, list(range(40)), SamplingParams())
    sched.add(s)
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        sizes.append(out.scheduled[0].num_new_tokens)
        run_step(sched, bm, out)
    assert sizes == [16, 16, 8]
    assert s.output_token_ids == [7]  # sampled only when the prompt completed


def test_without_chunking_a_prompt_over_budget_waits():
    sched, _ = make(budget=16, chunked=False)
    sched.add(Sequence("a", 0, list(range(40)), SamplingParams()))
    assert sched.schedule().is_empty


def test_decodes_and_prefill_share_a_step_decodes_first():
    sched, bm = make(budget=16)
    a = Sequence("a", 0, list(range(5)), SamplingParams())
    sched.add(a)
    run_step(sched, bm, sched.schedule())
    b = Sequence("b", 0, list(range(100, 130)), SamplingParams())
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]


def test_max_num_seqs_limits_admission():
    sched, _ = make(max_seqs=2, budget=100)
    for i in range(3):
        sched.add(Sequence(f"r{i}", 0, [1, 2, 3], SamplingParams()))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_newest_running_is_preempted_when_blocks_run_out():
    # 4 blocks of 4 tokens: two 7-token prompts take 2 blocks each; the next decode
    # of the older one needs a third block, so the newer one is preempted.
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    old = Sequence("old", 0, list(range(8)), SamplingParams())
    new = Sequence("new", 0, list(range(100, 107)), SamplingParams())
    sched.add(old)
    sched.add(new)
    run_step(sched, bm, sched.schedule())
    assert bm.num_free_blocks == 0
    out = sched.schedule()
    assert out.preempted == [new]
    assert [s.seq for s in out.scheduled] == [old]
    assert sched.waiting[0] is new and new.num_computed_tokens == 0 and new.block_table == []
    assert sched.num_preemptions == 1
    # The preempted sequence keeps its output and is recomputed later; its first full
    # block is still in the prefix cache, so only the rest is recomputed.
    assert new.output_token_ids == [7]
    run_step(sched, bm, out)
    sched.finish(old, "stop")
    out = sched.schedule()
    assert out.scheduled[0].seq is new
    assert new.num_computed_tokens == 4 and out.scheduled[0].num_new_tokens == new.num_tokens - 4
