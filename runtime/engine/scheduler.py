"""Who runs this step, and how many tokens each.

Decisions are in tokens per sequence, not in phases (as in vLLM v1): a running
sequence asks for its uncomputed tokens (1 when decoding, the rest of its prompt when
prefilling), under a per-step token budget, so decodes and prefill chunks share a step.
Running sequences go first, oldest first; when the KV cache is full the newest running
sequence is preempted (its blocks freed, recomputed later). Waiting sequences are
admitted oldest first while budget, sequence slots and blocks remain.

With LoRA adapters, a sequence runs only while its adapter holds a resident slot of
the pool (``lora``), pinned from admission to preemption or finish; a waiting sequence
whose adapter is not resident yet is passed over (its swap-in goes on meanwhile) and
the ones behind it are admitted. So a step never holds more distinct adapters than
slots. Sequences are ordered by slot within a step, so each adapter's tokens are few
contiguous runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.engine.block_manager import BlockManager
from shoal.runtime.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence has K/V for all its tokens: sample the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # single-token ones first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        lora: Any = None,
    ):
        self.block_manager = block_manager
        self.lora = lora  # a shoal.runtime.lora.pool.LoRAPool, or None
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:  # (cannot happen for a running sequence, kept for safety)
                i += 1
                continue
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing newer is left to run

        # 2. Waiting sequences, if nothing had to be preempted this step.
        passed_over: list[Sequence] = []  # their adapter is not resident yet
        while (
            self.waiting
            and not out.preempted
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if not self._acquire_adapter(seq):
                passed_over.append(self.waiting.popleft())
                continue
            bm.attach_cached_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget:
                if not self.enable_chunked_prefill:
                    bm.free_sequence(seq)
                    self._release_adapter(seq)
                    break
                n = budget
            if not bm.can_allocate(seq, n):
                # A waiting sequence holds no blocks, or two of them could each hold
                # what the other needs; cached prefix blocks stay findable when freed.
                bm.free_sequence(seq)
                self._release_adapter(seq)
                break
            if seq.metrics.first_scheduled_time is None:  # first admission, not a resume
                seq.num_cached_tokens = seq.num_computed_tokens
                bm.count_prefix_lookup(seq)
            self.waiting.popleft()
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        self.waiting.extendleft(reversed(passed_over))  # back in front, in their order

        # Single-token sequences first: attention handles them as one batched decode;
        # then by adapter slot, so each adapter's tokens are contiguous.
        out.scheduled.sort(key=lambda s: (s.num_new_tokens != 1, s.seq.lora_slot))
        return out

    def _acquire_adapter(self, seq: Sequence) -> bool:
        """Pin the sequence's adapter in a resident slot; False while it is not resident."""
        if not seq.lora_uid or seq.lora_slot >= 0:
            return True
        slot = self.lora.acquire(seq.lora_uid)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.lora.release(seq.lora_uid)
            seq.lora_slot = -1

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and free its blocks (also for aborts of waiting sequences)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        self._release_adapter(seq)
        if seq.lora_uid and self.lora is not None:
            self.lora.unref(seq.lora_uid)
            seq.lora_uid = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
