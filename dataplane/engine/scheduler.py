"""Continuous batching across pipeline stages: which sequences go into the next micro-batch."""

from __future__ import annotations

from collections import deque

from dataplane.engine.kv_blocks import BlockAllocator
from dataplane.engine.sequence import Sequence
from dataplane.transport.messages import SeqWork


class Scheduler:
    """Forms micro-batches from running and waiting sequences. Pure logic, no I/O.

    Invariants: a sequence is in ``waiting`` or ``running``, never both; only a
    sequence that is not in flight is scheduled or preempted; blocks are allocated
    before a micro-batch is formed, so a launched micro-batch never runs out of KV;
    a micro-batch carries at most ``max_num_batched_tokens`` tokens.
    With K stages each micro-batch takes about 1/K of the active sequences, so K
    micro-batches keep every stage busy.
    """

    def __init__(
        self, allocator: BlockAllocator, num_stages: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.allocator = allocator
        self.num_stages = num_stages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_micro_batch(self) -> list[tuple[Sequence, SeqWork]]:
        """The next micro-batch's sequences with their work, now marked in flight; empty if none is ready.

        Running sequences go first (decodes, then prefills), then waiting ones in arrival order.
        A sequence whose uncomputed tokens exceed what is left of the token budget gets a chunk of
        that size (chunked prefill, also for a preempted sequence's recompute), so every admitted
        sequence progresses whatever its length. A ``solo`` sequence goes alone."""
        solo = next((seq for seq in self.running if seq.solo and not seq.in_flight), None)
        if solo is not None:
            tokens = min(solo.num_uncomputed, self.max_num_batched_tokens)
            return [(solo, solo.work(tokens))] if self._grow(solo, tokens, protect=[]) else []
        active = len(self.running) + min(len(self.waiting), self.max_num_seqs - len(self.running))
        target = max(1, -(-active // self.num_stages))
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_num_batched_tokens
        for seq in sorted(self.running, key=_prefilling):
            if len(batch) >= target or budget < 1:
                break
            if seq.in_flight or seq.solo or seq not in self.running:
                continue
            tokens = min(seq.num_uncomputed, budget)
            if not self._grow(seq, tokens, protect=[s for s, _ in batch]):
                continue
            batch.append((seq, tokens))
            budget -= tokens
        while self.waiting and len(batch) < target and len(self.running) < self.max_num_seqs and budget >= 1:
            seq = self.waiting[0]
            if seq.solo and batch:
                break
            tokens = min(seq.num_tokens, budget)
            blocks = self.allocator.blocks_for(tokens)
            if not self.allocator.can_allocate(blocks):
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(blocks)
            self.running.append(seq)
            batch.append((seq, tokens))
            budget -= tokens
            if seq.solo:
                break
        return [(seq, seq.work(tokens)) for seq, tokens in batch]

    def _grow(self, seq: Sequence, tokens: int, protect: list[Sequence]) -> bool:
        """Make the block table cover the KV of ``seq``'s next ``tokens`` tokens, preempting others if needed."""
        needed = self.allocator.blocks_for(seq.num_computed + tokens) - len(seq.block_table)
        while needed > 0 and not self.allocator.can_allocate(needed):
            victim = self._preemption_victim(exclude=[seq, *protect])
            if victim is None:
                return False
            self.preempt(victim)
        if needed > 0:
            seq.block_table += self.allocator.allocate(needed)
        return True

    def _preemption_victim(self, exclude: list[Sequence]) -> Sequence | None:
        for seq in reversed(self.running):
            if not seq.in_flight and seq not in exclude:
                return seq
        return None

    def preempt(self, seq: Sequence) -> None:
        """Drop a sequence's KV; it recomputes prompt + generated tokens when readmitted."""
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def kv_in_use(self, in_flight: bool = False) -> list[tuple[int, tuple[int, ...], int]]:
        """(request id, block table, positions whose KV is written) of every running request holding KV;
        with ``in_flight``, counting the positions in-flight micro-batches are writing now."""
        held = []
        for s in self.running:
            upto = s.num_computed + (s.pending_tokens if in_flight else 0)
            if s.block_table and upto:
                held.append((s.seq_id, tuple(s.block_table), upto))
        return held

    def find(self, seq_id: int) -> Sequence | None:
        """The running or waiting sequence with id ``seq_id``."""
        return next((s for s in (*self.running, *self.waiting) if s.seq_id == seq_id), None)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []


def _prefilling(seq: Sequence) -> bool:
    return seq.num_uncomputed > 1
