"""The scheduler as a pure state machine: sequences in, micro-batches out."""

from __future__ import annotations

from dataplane.engine.kv_blocks import BlockAllocator
from dataplane.engine.sampling_params import SamplingParams
from dataplane.engine.scheduler import Scheduler
from dataplane.engine.sequence import Sequence
from dataplane.transport.messages import SamplingOptions


def seq(seq_id: int, prompt_len: int = 8, max_tokens: int = 8) -> Sequence:
    return Sequence(
        seq_id,
        list(range(prompt_len)),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        SamplingOptions(),
        frozenset(),
        1024,
    )


def next_batch(scheduler: Scheduler) -> list[Sequence]:
    return [s for s, _ in scheduler.next_micro_batch()]


def complete(batch: list[Sequence], token: int = 1) -> None:
    for s in batch:
        s.append_token(token)


def test_micro_batches_split_active_sequences_across_stages():
    scheduler = Scheduler(BlockAllocator(64, 4), num_stages=2, max_num_seqs=16, max_num_batched_tokens=1024)
    for i in range(6):
        scheduler.add(seq(i))
    first, second = next_batch(scheduler), next_batch(scheduler)
    assert [s.seq_id for s in first] == [0, 1, 2] and [s.seq_id for s in second] == [3, 4, 5]
    assert next_batch(scheduler) == [], "every sequence is in flight"
    complete(first)
    third = next_batch(scheduler)
    assert [s.seq_id for s in third] == [0, 1, 2]
    assert all(s.pending_tokens == 1 and s.num_computed == 8 for s in third)


def test_token_budget_and_block_availability_gate_admission():
    scheduler = Scheduler(BlockAllocator(5, 4), num_stages=1, max_num_seqs=16, max_num_batched_tokens=20)
    for i in range(4):
        scheduler.add(seq(i, prompt_len=8))
    batch = next_batch(scheduler)
    assert len(batch) == 2, "5 blocks of 4 hold two 8-token prompts"
    assert scheduler.allocator.num_free == 1


def test_preemption_frees_blocks_and_requeues_for_recompute():
    scheduler = Scheduler(BlockAllocator(4, 4), num_stages=1, max_num_seqs=16, max_num_batched_tokens=64)
    a, b = seq(0, prompt_len=8), seq(1, prompt_len=8)
    scheduler.add(a)
    scheduler.add(b)
    complete(next_batch(scheduler))
    nxt = next_batch(scheduler)
    assert nxt == [a] and scheduler.num_preemptions == 1
    assert b.num_computed == 0 and b.block_table == [] and scheduler.waiting[0] is b
    assert a.block_table and len(a.block_table) == 3


def test_finished_sequences_return_their_blocks():
    allocator = BlockAllocator(16, 4)
    scheduler = Scheduler(allocator, num_stages=1, max_num_seqs=16, max_num_batched_tokens=64)
    s = seq(0, max_tokens=1)
    scheduler.add(s)
    complete(next_batch(scheduler))
    assert s.finished and s.finish_reason == "length"
    scheduler.finish(s)
    assert allocator.num_free == 16 and not scheduler.has_work
