"""Incremental detokenization and stop strings.

Decoding only a short window of recent tokens keeps each step O(1) per sequence.
Text is released once it no longer ends in an incomplete UTF-8 character, and, when the
request has stop strings, the last len(longest stop) - 1 characters are held back so a
client never sees the beginning of a stop string that is then cut.
"""

from __future__ import annotations

from shoal.runtime.engine.sequence import Sequence

_INCOMPLETE = "\ufffd"
_WINDOW = 6  # tokens of left context re-decoded so merges across tokens come out right


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, seq: Sequence) -> bool:
        """Fold the newest output token into seq.detok.text. Returns True if a stop
        string matched (the text is then cut at it and the sequence should finish)."""
        st = seq.detok
        ids = seq.output_token_ids
        prefix_text = self._decode(ids[st.prefix_offset : st.read_offset])
        new_text = self._decode(ids[st.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_INCOMPLETE):
            delta = new_text[len(prefix_text) :]
            st.text += delta
            st.prefix_offset = max(st.read_offset - _WINDOW, 0)
            st.read_offset = len(ids)
            if seq.params.stop:
                return self._cut_at_stop(seq, len(delta))
        return False

    @staticmethod
    def _cut_at_stop(seq: Sequence, delta_len: int) -> bool:
        st = seq.detok
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, len(st.text) - delta_len - longest + 1)
        hits = [(st.text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i != -1]
        if not hits:
            return False
        i, s = min(hits)
        st.text = st.text[: i + len(s)] if seq.params.include_stop_str_in_output else st.text[:i]
        return True

    @staticmethod
    def take_delta(seq: Sequence) -> str:
        """The text not yet handed out, minus what could still become a stop string."""
        st = seq.detok
        end = len(st.text)
        if seq.params.stop and not seq.is_finished:
            end = max(st.emitted, end - (max(len(s) for s in seq.params.stop) - 1))
        delta = st.text[st.emitted : end]
        st.emitted = end
        return delta
