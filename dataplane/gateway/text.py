"""Output text as it grows: whole characters only, stop strings cut out.

``IncrementalDetokenizer`` follows vLLM's incremental detokenization (``detokenize_incrementally``):
decode a short window of tokens twice, with and without the new ones, and release the difference only
when it does not end inside a multi-byte character (the tokenizer shows a partial one as U+FFFD).
"""

from __future__ import annotations

REPLACEMENT_CHARACTER = "\ufffd"
CONTEXT_TOKENS = (
    5  # prompt tokens decoded with the first output tokens (vLLM: INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
)


class IncrementalDetokenizer:
    """Turns output token ids, as they arrive, into text deltas that never split a character.

    Invariant: the deltas returned by ``add`` and ``flush`` concatenate to the decode of all output
    tokens (special tokens skipped) for byte-level and SentencePiece tokenizers alike, because every
    window starts at a token boundary already released.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.token_ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def add(self, token_ids: list[int]) -> str:
        """The text the new ``token_ids`` complete; "" while a character is still incomplete."""
        self.token_ids.extend(token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character is released as U+FFFD, as a full decode shows it)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith(REPLACEMENT_CHARACTER) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if token_ids else ""


class StopStrings:
    """Finds the first stop string in streamed text, across delta boundaries, and never releases it.

    Invariant: text is released only once no stop string can start inside it, so what ``feed`` returns
    is final; the held-back tail is at most the longest stop string minus one character.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found); after a stop, nothing more counts."""
        if not self.stops:
            return delta, False
        self.pending += delta
        found = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if found:
            released, self.pending = self.pending[: min(found)], ""
            return released, True
        held = self._longest_stop_prefix_suffix()
        released = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(self.pending) - held :]
        return released, False

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if stop.startswith(self.pending[-size:]):
                    longest = size
                    break
        return longest
