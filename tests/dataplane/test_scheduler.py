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
    batch = scheduler.next_micro_batch()
    assert [len(work.token_ids) for _, work in batch] == [8, 8, 4], "the budget's last 4 tokens start a chunk"
    assert sum(len(work.token_ids) for _, work in batch) == 20
    assert scheduler.allocator.num_free == 0 and [s.seq_id for s in scheduler.waiting] == [3]


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_and_others_keep_going():
    scheduler = Scheduler(BlockAllocator(64, 4), num_stages=1, max_num_seqs=16, max_num_batched_tokens=16)
    long, short = seq(0, prompt_len=40), seq(1, prompt_len=3)
    scheduler.add(short)
    complete(next_batch(scheduler))
    scheduler.add(long)
    starts = []
    while not long.output_token_ids:
        batch = scheduler.next_micro_batch()
        assert sum(len(work.token_ids) for _, work in batch) <= 16
        for s, work in batch:
            if s is long:
                starts.append((work.start, len(work.token_ids)))
            if s.chunk_in_flight:
                s.chunk_done()
            else:
                s.append_token(1)
    assert starts == [(0, 15), (15, 15), (30, 10)], "the decode takes 1 token of 16; three chunks cover the prompt once"
    assert len(short.output_token_ids) == 4, "the running request decodes at every step of the long prefill"
    assert len(long.block_table) == 10, "blocks grew with the chunks to the 40 prompt positions"


def test_a_preempted_request_recomputes_in_chunks_within_the_budget():
    scheduler = Scheduler(BlockAllocator(64, 4), num_stages=1, max_num_seqs=16, max_num_batched_tokens=8)
    s = seq(0, prompt_len=6, max_tokens=64)
    scheduler.add(s)
    for _ in range(6):
        for each, _work in scheduler.next_micro_batch():
            each.append_token(2)
    scheduler.preempt(s)
    assert s.num_computed == 0 and s.num_tokens == 12
    first = scheduler.next_micro_batch()
    assert [(w.start, len(w.token_ids)) for _, w in first] == [(0, 8)] and s.chunk_in_flight
    s.chunk_done()
    second = scheduler.next_micro_batch()
    assert [(w.start, len(w.token_ids)) for _, w in second] == [(8, 4)] and not s.chunk_in_flight


def test_a_solo_request_is_scheduled_alone():
    scheduler = Scheduler(BlockAllocator(64, 4), num_stages=1, max_num_seqs=16, max_num_batched_tokens=64)
    a, b, c = seq(0), seq(1), seq(2)
    for s in (a, b, c):
        scheduler.add(s)
    for s, _ in scheduler.next_micro_batch():
        s.retry()
    b.solo = True
    assert next_batch(scheduler) == [b]
    assert next_batch(scheduler) == [a, c]


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
