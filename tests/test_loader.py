"""Checkpoint loading: config parsing and name mapping (pure), then real directories:
sharded checkpoints, transformers 5's fused expert layout, and the errors people see."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.runtime.layers.rotary import RopeConfig, rope_inv_freq
from shoal.runtime.models import SUPPORTED_ARCHITECTURES, ModelLoadError, load_model
from shoal.runtime.models.config import FAMILIES, parse_config, parse_rope
from shoal.runtime.models.loader import resolve_dtype
from shoal.runtime.models.weights import Target, checkpoint_name, map_name
from shoal.runtime.testing import PagedRunner

BASE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "vocab_size": 100,
}

# ---------------------------------------------------------------- config (pure)


def test_rope_from_transformers5_and_legacy_forms_agree():
    new = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert parse_rope(new) == parse_rope(old) == RopeConfig(5e5, "linear", 2.0)
    assert parse_rope({}) == RopeConfig(theta=10000.0)
    assert parse_rope({"rope_theta": 1e6, "rope_scaling": None}) == RopeConfig(theta=1e6)


def test_llama3_rope_parsed_from_hub_config():
    cfg = {
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert parse_rope(cfg) == RopeConfig(500000.0, "llama3", 32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 1e6},
    ],
    ids=lambda r: r["rope_type"],
)  # fmt: skip
def test_rope_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=rope)
    ours = rope_inv_freq(parse_rope({"rope_parameters": rope}), 128)
    if rope["rope_type"] == "default":
        ref = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ModelLoadError, match=r"'yarn'.*supported: default, linear, llama3"):
        parse_rope({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unsupported_architecture_is_named_with_the_supported_list():
    with pytest.raises(ModelLoadError) as e:
        parse_config({**BASE, "architectures": ["GPT2LMHeadModel"]})
    assert "GPT2LMHeadModel" in str(e.value)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)


def test_family_switches_and_defaults():
    llama = parse_config({**BASE, "architectures": ["LlamaForCausalLM"]})
    assert (llama.qkv_bias, llama.o_bias, llama.qk_norm, llama.head_dim) == (
        False,
        False,
        False,
        16,
    )
    assert llama.moe is None and not llama.tie_word_embeddings
    biased = parse_config({**BASE, "architectures": ["LlamaForCausalLM"], "attention_bias": True})
    assert biased.qkv_bias and biased.o_bias
    qwen2 = parse_config({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.qkv_bias and not qwen2.o_bias
    qwen3 = parse_config({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm and qwen3.head_dim == 32
    mixtral = parse_config({**BASE, "architectures": ["MixtralForCausalLM"],
                            "num_local_experts": 8, "num_experts_per_tok": 2})  # fmt: skip
    assert mixtral.rms_norm_eps == 1e-5
    assert mixtral.moe.norm_topk_prob and mixtral.moe.intermediate_size == 128


def test_qwen_moe_layer_rules():
    cfg = parse_config(
        {**BASE, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2,
         "mlp_only_layers": [3], "shared_expert_intermediate_size": 48}
    )  # fmt: skip
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert cfg.moe.shared_expert_intermediate_size == 48 and not cfg.moe.norm_topk_prob
    qwen3 = parse_config(
        {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
    )  # fmt: skip
    assert qwen3.moe.shared_expert_intermediate_size == 0 and qwen3.moe.norm_topk_prob


def test_sliding_window_caps_the_context():
    mistral = parse_config(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
         "max_position_embeddings": 32768}
    )  # fmt: skip
    assert mistral.max_model_len == 4096
    qwen2 = parse_config(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
         "use_sliding_window": False, "max_position_embeddings": 32768}
    )  # fmt: skip
    assert qwen2.max_model_len == 32768


def test_resolve_dtype():
    assert resolve_dtype("auto", "bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("bf16", "float32") is torch.bfloat16
    assert resolve_dtype(torch.float16, None) is torch.float16
    with pytest.raises(ModelLoadError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", None)


# ---------------------------------------------------------------- name mapping (pure)

L = "model.layers.3."


@pytest.mark.parametrize(
    ("name", "target"),
    [
        (L + "self_attn.k_proj.weight", Target(L + "self_attn.qkv_proj.weight", "k")),
        (L + "self_attn.q_proj.bias", Target(L + "self_attn.qkv_proj.bias", "q")),
        (L + "self_attn.o_proj.weight", Target(L + "self_attn.o_proj.weight")),
        (L + "mlp.up_proj.weight", Target(L + "mlp.gate_up_proj.weight", "up")),
        (L + "mlp.down_proj.weight", Target(L + "mlp.down_proj.weight")),
        (L + "block_sparse_moe.experts.5.w1.weight", Target(L + "mlp.experts.w13", "gate", 5)),
        (L + "block_sparse_moe.experts.5.w3.weight", Target(L + "mlp.experts.w13", "up", 5)),
        (L + "block_sparse_moe.experts.5.w2.weight", Target(L + "mlp.experts.w2", None, 5)),
        (L + "block_sparse_moe.gate.weight", Target(L + "mlp.gate.weight")),
        (L + "mlp.experts.0.gate_proj.weight", Target(L + "mlp.experts.w13", "gate", 0)),
        (L + "mlp.experts.12.down_proj.weight", Target(L + "mlp.experts.w2", None, 12)),
        (L + "mlp.experts.gate_up_proj", Target(L + "mlp.experts.w13")),
        (L + "mlp.experts.down_proj", Target(L + "mlp.experts.w2")),
        (L + "mlp.shared_expert.gate_proj.weight",
         Target(L + "mlp.shared_expert.gate_up_proj.weight", "gate")),
        (L + "mlp.shared_expert_gate.weight", Target(L + "mlp.shared_expert_gate.weight")),
        ("lm_head.weight", Target("lm_head.weight")),
    ],
)  # fmt: skip
def test_map_name(name, target):
    assert map_name(name) == target


def test_checkpoint_name_inverts_map_name_for_hub_layouts():
    qwen, mixtral = FAMILIES["Qwen3MoeForCausalLM"], FAMILIES["MixtralForCausalLM"]
    for name, family in [
        (L + "self_attn.v_proj.bias", qwen),
        (L + "mlp.gate_proj.weight", qwen),
        (L + "mlp.experts.7.up_proj.weight", qwen),
        (L + "mlp.experts.7.down_proj.weight", qwen),
        (L + "block_sparse_moe.experts.2.w3.weight", mixtral),
        (L + "block_sparse_moe.experts.2.w2.weight", mixtral),
        ("model.norm.weight", qwen),
    ]:
        assert checkpoint_name(map_name(name), family) == name


# ---------------------------------------------------------------- real directories


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def logits_of(path, prompt=(5, 17, 99, 3, 250, 42, 8, 77, 130)) -> torch.Tensor:
    model, info = load_model(str(path))
    return PagedRunner(model, info).step({"a": list(prompt)})["a"]


def test_sharded_checkpoint_loads_like_a_single_file(tiny_model_factory):
    single = tiny_model_factory("qwen2")
    sharded = tiny_model_factory("qwen2", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    torch.testing.assert_close(logits_of(sharded), logits_of(single), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers5_fused_expert_layout_loads(arch, tiny_model_factory, tmp_path):
    """save_pretrained(save_original_format=False) keeps experts fused:
    experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]."""
    from transformers import AutoModelForCausalLM

    classic = tiny_model_factory(arch)
    fused = copy_model(classic, tmp_path / "fused")
    (fused / "model.safetensors").unlink()
    hf = AutoModelForCausalLM.from_pretrained(classic, dtype=torch.float32)
    hf.save_pretrained(str(fused), save_original_format=False)
    names = load_file(fused / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in n for n in names)
    torch.testing.assert_close(logits_of(fused), logits_of(classic), rtol=0, atol=0)


def rewrite_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("mixtral"), tmp_path / "m")
    rewrite_weights(path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\): model\.layers\.1\."
                       r"block_sparse_moe\.experts\.2\.w3\.weight$"):  # fmt: skip
        load_model(str(path))


def test_missing_fused_shard_is_named(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("qwen2"), tmp_path / "m")
    rewrite_weights(path, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_model(str(path))


def test_unexpected_tensor_is_named(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.wat.weight": torch.ones(4)}))  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.wat\.weight"):  # fmt: skip
        load_model(str(path))


def test_wrong_shape_is_named(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight has shape \[63\], expected \[64\]"):  # fmt: skip
        load_model(str(path))


def test_unsupported_architecture_directory(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'FalconForCausalLM'.*LlamaForCausalLM"):  # fmt: skip
        load_model(str(path))


def test_directory_problems_are_explained(tmp_path, tiny_model_factory):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(path))


def test_tiny_model_cli_writes_a_loadable_model(tmp_path):
    from shoal.cli import main

    assert main(["tiny-model", "--arch", "qwen3", "--out", str(tmp_path / "q")]) == 0
    _, info = load_model(str(tmp_path / "q"))
    assert info.architecture == "Qwen3ForCausalLM"
    assert main(["tiny-model", "--arch", "gpt2", "--out", str(tmp_path / "g")]) == 2


def test_factory_is_deterministic_and_transformers_loads_tokenizer(tmp_path, tiny_model_factory):
    from transformers import AutoTokenizer

    from shoal.runtime.testing import make_tiny_model

    a = make_tiny_model("llama", tmp_path / "a", seed=3)
    b = make_tiny_model("llama", tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    text = "Hello, shoal! Ünïcødé 🐟"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "</s>" and tok.convert_tokens_to_ids("<|im_end|>") == 4


def test_larger_tokenizers_reach_their_size_and_every_id_decodes():
    from shoal.runtime.testing.tokenizer import train_tokenizer

    a, b = train_tokenizer(3000), train_tokenizer(3000)
    assert a.get_vocab_size() == 3000
    assert a.to_str() == b.to_str()  # deterministic
    assert all(a.decode([i], skip_special_tokens=False) for i in range(3000))


def test_expert_beyond_the_configured_count_is_unexpected(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("qwen3_moe"), tmp_path / "m")
    extra = "model.layers.0.mlp.experts.8.up_proj.weight"  # the model has experts 0..7
    rewrite_weights(path, lambda t: t.update({extra: t["model.layers.0.mlp.experts.0.up_proj.weight"].clone()}))  # fmt: skip
    with pytest.raises(ModelLoadError, match=rf"unexpected tensor\(s\): {extra}"):
        load_model(str(path))


def test_corrupt_files_are_explained(tiny_model_factory, tmp_path):
    path = copy_model(tiny_model_factory("llama"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ModelLoadError, match="cannot read .*model.safetensors"):
        load_model(str(path))
    with pytest.raises(ModelLoadError, match="malformed size"):
        parse_config({**BASE, "architectures": ["LlamaForCausalLM"], "hidden_size": "big"})
