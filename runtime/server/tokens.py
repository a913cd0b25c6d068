"""Per-token text and bytes for logprobs.

A byte-level BPE token may hold part of a UTF-8 character, so its decoded text alone can
be a replacement character; OpenAI's logprobs carry the token's raw `bytes` so clients
can rebuild the exact text. The bytes come from the vocabulary entry: byte-level vocabs
(GPT-2, Llama 3, Qwen) spell bytes with printable stand-in characters, SentencePiece
vocabs use "▁" for a space and "<0xAB>" for raw bytes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: stand-in character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def piece_bytes(piece: str) -> bytes:
    """The raw bytes a vocabulary entry stands for."""
    match = _SP_BYTE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    decoder = _byte_decoder()
    if piece and all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return piece.replace("\u2581", " ").encode()


class TokenText:
    """Decodes single tokens for logprobs, with a cache (the same ids recur constantly)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return list(self._text(token_id).encode())
        return list(piece_bytes(piece))
