"""A small byte-level BPE tokenizer trained in-process, saved the way hub models ship one.

Byte-level, so any text encodes (no unknown tokens) and decodes back exactly. Trained on
a fixed built-in corpus, so the same vocabulary comes out every time.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4, in this order

# ChatML, as Qwen models use it; `add_generation_prompt` opens the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A shoal of fish swims in the shallow water.
Kubernetes schedules pods onto nodes; an operator reconciles the desired state with the world.
Large language models predict the next token from the tokens before it, one step at a time.
Continuous batching lets new requests join a running batch at every iteration of the engine.
A paged key-value cache stores attention keys and values in fixed-size blocks of memory.
When memory runs out, the scheduler preempts the newest request and recomputes it later.
Prefix caching shares the blocks of a common prompt prefix between many requests.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Tell me a story about a lighthouse keeper who counted the waves every night until dawn.
Once upon a time there was a small village by the sea, where the wind always smelled of salt.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 65536 3.14159 2.71828 -1 +1
Mixture-of-experts layers route every token to a few experts chosen by a small gating network.
Rotary position embeddings rotate queries and keys by an angle that grows with the position.
The gateway routes each request to the least loaded worker of the pool that serves its model.
Latency objectives are written as percentiles of the time to first token and per output token.
She sells sea shells by the sea shore; the shells she sells are surely seashells.
In the beginning the universe was created. This has made a lot of people very angry.
It was the best of times, it was the worst of times, it was the age of wisdom.
To be, or not to be, that is the question: whether it is nobler in the mind to suffer.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The mitochondria is the powerhouse of the cell; plants turn sunlight into sugar.
Please summarize the following text in one sentence, then list three key points.
Translate to French: good morning, good night, thank you very much, see you tomorrow.
"""


def synthetic_lines(num_lines: int, seed: int = 0) -> list[str]:
    """Made-up words with English-like letter frequencies: enough distinct pairs for BPE
    to learn a large vocabulary (the built-in English corpus tops out near 600 tokens)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    freq = [127, 91, 82, 75, 70, 67, 63, 61, 60, 43, 40, 28, 28, 24, 24, 22, 20, 20, 19, 15,
            10, 8, 2, 2, 1, 1]  # fmt: skip
    syllables = ["".join(rng.choices(letters, freq, k=rng.randint(1, 3))) for _ in range(3000)]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60000)]
    return [" ".join(rng.choices(words, k=12)) for _ in range(num_lines)]


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE with the special tokens first; deterministic for a given vocab_size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.splitlines() * 4
    if vocab_size > 512:
        lines += synthetic_lines(vocab_size)
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def save_tokenizer(path: Path, vocab_size: int = 512) -> int:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) to ``path``;
    return the tokenizer's vocabulary size."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(path))
    return len(fast)
