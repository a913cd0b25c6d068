"""The engine loop, synchronously: add requests, step, collect outputs.

One step = schedule -> run the model on the scheduled tokens -> append sampled tokens,
detokenize, check stop conditions -> RequestOutputs for the requests that moved.
AsyncLLMEngine runs this loop in a thread for the server; tests drive it directly.
"""

from __future__ import annotations

import logging
import time

from shoal.runtime.config import EngineConfig
from shoal.runtime.engine.block_manager import BlockManager
from shoal.runtime.engine.detokenizer import Detokenizer
from shoal.runtime.engine.model_runner import ModelRunner
from shoal.runtime.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from shoal.runtime.engine.scheduler import Scheduler
from shoal.runtime.engine.sequence import Sequence
from shoal.runtime.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        info = self.runner.info
        self.tokenizer = load_tokenizer(config.model)
        self.detokenizer = Detokenizer(self.tokenizer)
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or info.max_model_len, info.max_model_len)
        if capacity < self.max_model_len:
            log.warning(
                "the KV cache holds %d tokens, less than the context window %d: "
                "requests are limited to %d tokens (raise --kv-cache-memory)",
                capacity,
                self.max_model_len,
                capacity,
            )
            self.max_model_len = capacity
        self.vocab_size = info.vocab_size
        self.eos_token_ids = set(info.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            lora=self.runner.lora,
        )
        self.requests: dict[str, list[Sequence]] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.lora = self.runner.lora
        for name, path in config.lora_modules.items():  # --lora NAME=DIR
            self.lora.load(name, path)

    # ---- requests ------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request cannot be served as asked."""
        params.validate()
        if params.lora_name is not None and not self.lora.has(params.lora_name):
            raise InvalidRequestError(f"The model '{params.lora_name}' does not exist", "model")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if any(t < 0 or t >= self.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size})", "prompt"
            )
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"request asks for {n + params.max_tokens} ({n} in the prompt, "
                f"{params.max_tokens} for the completion). Shorten the prompt or lower "
                "max_tokens.",
                "max_tokens" if n < self.max_model_len else "prompt",
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [
            Sequence(request_id, i, list(prompt_token_ids), params, arrival_time=arrival)
            for i in range(params.n)
        ]
        if params.lora_name is not None:
            try:
                for seq in seqs:
                    seq.lora_uid = self.lora.ref(params.lora_name)
            except KeyError:  # unloaded since check_request
                for seq in seqs:
                    if seq.lora_uid:
                        self.lora.unref(seq.lora_uid)
                raise InvalidRequestError(
                    f"The model '{params.lora_name}' does not exist", "model"
                ) from None
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        if params.lora_name is not None:
            self.lora.count(params.lora_name, requests=1)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Returns its final output."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        return self._output(request_id, seqs)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failed = self._fail_unreadable_adapters()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting:
                # Only requests whose adapter is still being read from disk: wait for
                # the read a moment rather than spin.
                self.lora.ready.wait(0.005)
                self.lora.ready.clear()
            return failed
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.metrics.first_scheduled_time is None:
                s.seq.metrics.first_scheduled_time = now
        sampled = [s.seq for s in sched.scheduled if s.completes_prompt]
        result = self.runner.execute(sched.scheduled)
        for s in sched.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.seq)

        now = time.monotonic()
        moved: dict[str, None] = {}
        for seq, token, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
            if not seq.output_token_ids:
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.output_token_ids.append(token)
            self.generation_tokens_total += 1
            if seq.params.lora_name is not None:
                first = len(seq.output_token_ids) == 1
                prompt = seq.num_prompt_tokens if first else 0
                self.lora.count(seq.params.lora_name, prompt=prompt, generated=1)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.metrics.last_token_time = now
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                seq.metrics.finished_time = now
            moved[seq.request_id] = None

        outputs = failed
        for request_id in moved:
            seqs = self.requests[request_id]
            out = self._output(request_id, seqs)
            if out.finished:
                del self.requests[request_id]
            outputs.append(out)
        return outputs

    def _fail_unreadable_adapters(self) -> list[RequestOutput]:
        """Abort the requests of an adapter whose files went bad after it was loaded
        (it was evicted from host memory and could not be read back)."""
        outputs = []
        for uid, reason in self.lora.take_failed():
            doomed = [rid for rid, seqs in self.requests.items() if seqs[0].lora_uid == uid]
            for request_id in doomed:
                log.error("aborting request %s: %s", request_id, reason)
                out = self.abort(request_id)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        stop_hit = self.detokenizer.update(seq)
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if stop_hit:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        choices = []
        for seq in seqs:
            new_ids = seq.output_token_ids[seq.num_reported_tokens :]
            new_logprobs = (
                seq.logprobs[seq.num_reported_tokens :] if seq.params.logprobs is not None else None
            )
            seq.num_reported_tokens = len(seq.output_token_ids)
            choices.append(
                CompletionOutput(
                    index=seq.index,
                    token_ids=list(seq.output_token_ids),
                    text=seq.detok.text,
                    new_token_ids=new_ids,
                    new_text=self.detokenizer.take_delta(seq),
                    logprobs=new_logprobs,
                    finish_reason=seq.finish_reason,
                )
            )
        first = seqs[0]
        return RequestOutput(
            request_id=request_id,
            prompt_token_ids=first.prompt_token_ids,
            outputs=choices,
            finished=all(s.is_finished for s in seqs),
            num_cached_tokens=first.num_cached_tokens,
            metrics=first.metrics,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage(),
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries_total=self.block_manager.prefix_queries,
            prefix_cache_hits_total=self.block_manager.prefix_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )

    # ---- convenience for tests and offline use --------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        logprobs: dict[tuple[str, int], list] = {}
        while self.has_unfinished():
            for out in self.step():
                for choice in out.outputs:  # outputs carry deltas: gather the whole run
                    logprobs.setdefault((out.request_id, choice.index), []).extend(
                        choice.logprobs or []
                    )
                if out.finished:
                    final[out.request_id] = out
        for rid, out in final.items():
            for choice in out.outputs:
                if choice.logprobs is not None:
                    choice.logprobs = logprobs[(rid, choice.index)]
        return [final[rid] for rid in ids]
