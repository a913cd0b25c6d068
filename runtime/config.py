"""Engine configuration: what `shoal serve` flags and the operator's engine settings set."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str  # a Hugging Face directory: config.json, *.safetensors, tokenizer files
    served_model_name: str | None = None  # defaults to the directory's name
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: config's torch_dtype)
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # defaults to the config's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit block count; else from kv_cache_memory
    kv_cache_memory: int = 1 << 30  # bytes for the KV cache when num_kv_blocks is unset
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    # LoRA adapters: served names -> PEFT directories loaded at start, and the pool sizes
    lora_modules: dict[str, str] = field(default_factory=dict)
    max_lora_rank: int = 16
    max_loras: int = 8  # resident slots: most distinct adapters in one step
    max_cpu_loras: int = 32  # adapters kept in host memory

    @property
    def model_name(self) -> str:
        import os

        return self.served_model_name or os.path.basename(os.path.normpath(self.model))
