"""Server-sent events in OpenAI's chunk format, built from the engine's streamed outputs.

Each builder turns one `RequestOutput` (deltas for every choice) into the chunks to send;
it remembers per choice what was already sent, so a choice that finished is not
reported again while its siblings (n > 1) keep going. Pure: the app does the writing.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from shoal.runtime.engine.outputs import CompletionOutput, RequestOutput
from shoal.runtime.server.convert import DecodeToken, chat_logprobs, completion_logprobs, usage
from shoal.runtime.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class _ChunkBuilder:
    def __init__(
        self,
        *,
        request_id: str,
        created: int,
        model: str,
        decode: DecodeToken,
        logprobs: bool,
        include_usage: bool,
    ):
        self.request_id = request_id
        self.created = created
        self.model = model
        self.decode = decode
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._finished: set[int] = set()
        self._text_len: dict[int, int] = {}

    def _fresh(self, out: RequestOutput) -> list[CompletionOutput]:
        """Choices with something new to say: tokens, or a finish not yet reported."""
        fresh = []
        for choice in sorted(out.outputs, key=lambda c: c.index):
            if choice.index in self._finished:
                continue
            if choice.new_token_ids or choice.new_text or choice.finish_reason is not None:
                fresh.append(choice)
            if choice.finish_reason is not None:
                self._finished.add(choice.index)
        return fresh

    def usage_chunk(self, final: RequestOutput) -> BaseModel | None:
        """The last chunk when stream_options.include_usage is set: no choices, usage."""
        raise NotImplementedError

    def resume_context(self) -> dict[str, Any]:
        """What another worker needs to go on with this stream after a migration."""
        return {
            "chat": isinstance(self, ChatChunks),
            "created": self.created,
            "model": self.model,
            "logprobs": self.logprobs,
            "include_usage": self.include_usage,
            "finished": sorted(self._finished),
            "text_len": {str(k): v for k, v in self._text_len.items()},
        }

    def restore(self, ctx: dict[str, Any]) -> None:
        """Take over what a builder on another worker had sent (see resume_context)."""
        self._finished = set(ctx.get("finished", []))
        self._text_len = {int(k): int(v) for k, v in ctx.get("text_len", {}).items()}


class CompletionChunks(_ChunkBuilder):
    def chunks(self, out: RequestOutput) -> list[BaseModel]:
        result: list[BaseModel] = []
        for choice in self._fresh(out):
            logprobs = None
            if self.logprobs:
                start = self._text_len.get(choice.index, 0)
                logprobs = completion_logprobs(choice.logprobs or [], self.decode, start)
            self._text_len[choice.index] = self._text_len.get(choice.index, 0) + len(
                choice.new_text
            )
            result.append(
                CompletionResponse(
                    id=self.request_id,
                    created=self.created,
                    model=self.model,
                    choices=[
                        CompletionChoice(
                            index=choice.index,
                            text=choice.new_text,
                            logprobs=logprobs,
                            finish_reason=choice.finish_reason,
                        )
                    ],
                )
            )
        return result

    def usage_chunk(self, final: RequestOutput) -> BaseModel | None:
        if not self.include_usage:
            return None
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(final),
        )


class ChatChunks(_ChunkBuilder):
    def first_chunks(self, n: int) -> list[BaseModel]:
        """OpenAI opens every choice with a delta carrying the role and empty content."""
        return [
            self._chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(n)
        ]

    def chunks(self, out: RequestOutput) -> list[BaseModel]:
        return [
            self._chunk(
                ChatChunkChoice(
                    index=choice.index,
                    delta=DeltaMessage(content=choice.new_text),
                    logprobs=(
                        chat_logprobs(choice.logprobs or [], self.decode) if self.logprobs else None
                    ),
                    finish_reason=choice.finish_reason,
                )
            )
            for choice in self._fresh(out)
        ]

    def usage_chunk(self, final: RequestOutput) -> BaseModel | None:
        if not self.include_usage:
            return None
        return ChatCompletionChunk(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(final),
        )

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )
