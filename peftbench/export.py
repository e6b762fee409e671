"""``peftbench export RUN_ID DIR``: a stored run's adapter in HF PEFT's format, of one checkpoint.

A run has one reported checkpoint, chosen by ``train.select``: its table columns (dev and test), its
``generations.jsonl`` and, by default, its export are all of it. ``--checkpoint final`` exports the weights after
the last step instead, kept (as ``trainable_final.safetensors``) only where they differ from the selected ones;
the export's ``peftbench_run.json`` says which checkpoint and step it holds.

The run's model is rebuilt by the trainer's own :func:`~peftbench.assembly.assemble` (same base, same seed, the
method injected with the run's solved params, trainable tensors in fp32), its saved best trainable weights are loaded (a layer whose shape changed during
training, like PrunedLoRA's shrunk ranks, takes the saved shape itself: ``peftbench_resizable``), and the method's
``peftbench_export_peft`` hook turns the adapter into PEFT's layout. The head (pooler, classifier) goes into
``modules_to_save``, so ``PeftModel.from_pretrained(base, DIR)`` reproduces the run's dev predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import modeling
from .assembly import assemble
from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .host import Host
from .lora import PREFIX
from .schema import from_dict, to_dict


def run_host(run: dict[str, Any], plugins: list[str] | tuple[str, ...] = ()) -> Host:
    """The plugin host of a stored run: the entry points, ``plugins`` (``--plugin``) and the plugins the run was
    trained with (a config's ``plugins:``, kept in its stored spec), so its method and task are found again."""
    host = Host(plugins=plugins)
    for spec in (run.get("spec") or {}).get("plugins") or ():
        host.load_spec(spec, source=f"the plugins of run {run['run_id']}")
    return host


#: the checkpoints a run can export (``--checkpoint``): ``selected`` (``best``), the reported one; ``final``
CHECKPOINTS = ("selected", "best", "final")


def checkpoint_info(run: dict[str, Any], checkpoint: str = "selected") -> dict[str, Any]:
    """Which weights ``checkpoint`` is: ``{"checkpoint", "step", "steps", "select", "reported"}`` (``reported``:
    whether the run's table columns and ``generations.jsonl`` are of these weights)."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    select = ((run.get("spec") or {}).get("train") or {}).get("select") or "dev"
    steps = run.get("steps")
    step = steps if checkpoint == "final" else run.get("best_step")
    return {"checkpoint": "final" if checkpoint == "final" else "selected", "step": step, "steps": steps,
            "select": select, "reported": step == run.get("best_step")}


def rebuild(run: dict[str, Any], host: Host, load_weights: bool = True, checkpoint: str = "selected"):
    """``(model, targets, head, method)`` of a stored run, with the trainable weights of ``checkpoint`` loaded
    (:data:`CHECKPOINTS`)."""
    spec = run["spec"]
    model_config = from_dict(ModelConfig, spec["model"], "spec.model")
    train = from_dict(TrainConfig, spec["train"], "spec.train")
    task = host.task(spec["task"])
    cls = host.method(spec["method"])
    method = cls(from_dict(cls.Params, spec["params"], "spec.params"))
    with host.activate(method):
        built = assemble(model_config, task, host, spec["seed"], train.classifier_dropout)
    model, targets, head = built.model, built.targets, built.head
    if load_weights:
        load_trainable(model, weights_path(run, checkpoint))
    model.eval()
    return model, targets, head, method


def weights_path(run: dict[str, Any], checkpoint: str = "selected") -> Path:
    """The saved trainable weights of ``checkpoint``: ``trainable.safetensors`` (the selected checkpoint, and the
    final one where the two are the same), ``trainable_final.safetensors``."""
    info, artifacts = checkpoint_info(run, checkpoint), run.get("artifacts")
    path = Path(artifacts or "") / "trainable.safetensors"
    if not artifacts or not path.exists():
        raise ConfigError(f"run {run['run_id']} has no saved weights ({path}); it ran with output.save_adapters: "
                          "false, or its output directory moved")
    if info["checkpoint"] == "final" and not info["reported"]:
        path = path.with_name("trainable_final.safetensors")
        if not path.exists():
            raise ConfigError(f"run {run['run_id']} did not keep its final weights ({path}): its reported checkpoint "
                              f"is step {run.get('best_step')} of {info['steps']}; runs trained before peftbench kept "
                              "both have only that one (export it with --checkpoint selected)")
    return path


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load saved trainable weights (safetensors: data only, nothing executed) into the rebuilt model."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    unknown, missing = sorted(set(state) - trainable), sorted(trainable - set(state))
    if unknown or missing:
        raise ConfigError(f"{path}: the saved weights do not fit the rebuilt model: "
                          f"{'unexpected ' + str(unknown[:5]) if unknown else 'missing ' + str(missing[:5])}")
    try:
        model.load_state_dict(state, strict=False)  # frozen weights are rebuilt, not saved
    except RuntimeError as exc:  # a shape no layer can take (only peftbench_resizable ones resize)
        raise ConfigError(f"{path}: the saved weights do not fit the rebuilt model: {exc}") from None


def peft_adapter(model: nn.Module, targets, head: list[str], host: Host
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """``(adapter_config, state_dict)`` of ``adapter_model.safetensors`` as ``peftbench export`` writes it: the
    active method's ``peftbench_export_peft`` plus the head's ``modules_to_save``; ``None`` if the method
    cannot be exported."""
    exported = host.hook.peftbench_export_peft(model=model, targets=targets)
    if exported is None:
        return None
    config, state = exported
    for module_name in head:
        for name, p in model.get_submodule(module_name).named_parameters():
            state[f"{PREFIX}{module_name}.{name}"] = p.detach().to("cpu", torch.float32).contiguous()
    return config, state


def adapter_file_bytes(model: nn.Module, targets, head: list[str], host: Host) -> int | None:
    """Bytes of the file a trained method ships, measured by serialising it (safetensors): the exported
    ``adapter_model.safetensors``; for a method without a PEFT export that trains every weight (full
    fine-tuning), all its weights (its ``trainable.safetensors``); else ``None``."""
    from safetensors.torch import save

    exported = peft_adapter(model, targets, head, host)
    if exported is not None:
        return len(save(exported[1]))
    if all(p.requires_grad for p in model.parameters()):
        return len(save({n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}))
    return None


def export_run(run: dict[str, Any], out_dir: str | Path, host: Host, checkpoint: str = "selected") -> Path:
    """Write ``run``'s adapter at ``checkpoint`` (:data:`CHECKPOINTS`; by default the reported one) in HF PEFT's
    format into ``out_dir``; a run that trained every weight (full fine-tuning) has no adapter: its trained
    model is written as a plain transformers model instead (``config.json`` and ``model.safetensors``, loaded by
    ``from_pretrained(DIR)``). Its ``peftbench_run.json`` names the checkpoint and its step."""
    model, targets, head, method = rebuild(run, host, checkpoint=checkpoint)
    with host.activate(method):
        exported = peft_adapter(model, targets, head, host)
    out = Path(out_dir)
    if exported is None and "peftbench_export_peft" in type(method).implemented_hooks():
        raise ConfigError(f"method {run['method']!r} cannot export this run in HF PEFT format: its "
                          f"peftbench_export_peft returned None for the run's params {to_dict(method.params)}")
    if exported is None and all(p.requires_grad for p in model.parameters()):
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        _readable(out / "model.safetensors")
        _write_run_file(run, out, checkpoint)
        return out
    if exported is None:
        raise ConfigError(f"method {run['method']!r} does not implement peftbench_export_peft: it cannot be exported "
                          "in HF PEFT format")
    config, state = exported
    spec_model = run["spec"]["model"]
    base = modeling.resolve_name(spec_model["name_or_path"], spec_model.get("gguf_file"))
    config = {**config, "modules_to_save": head, "base_model_name_or_path": base}
    task_type = host.task(run["task"]).peft_task_type
    if task_type:  # e.g. CAUSAL_LM: PeftModel.from_pretrained then gives a PeftModelForCausalLM
        config["task_type"] = task_type
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, str(out / "adapter_model.safetensors"))
    _readable(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _write_run_file(run, out, checkpoint)
    return out


def _write_run_file(run: dict[str, Any], out: Path, checkpoint: str) -> None:
    """``peftbench_run.json``: the run, and which of its checkpoints the folder holds (``best``: the reported
    metrics, of the selected checkpoint, whichever is exported)."""
    (out / "peftbench_run.json").write_text(json.dumps(
        {**{k: run.get(k) for k in ("run_id", "label", "method", "task", "seed")},
         **checkpoint_info(run, checkpoint),
         **{k: run.get(k) for k in ("best", "best_step", "spec")}},
        indent=2, default=str))


def _readable(path: Path) -> None:
    """Give ``path`` the mode the other exported files get (the umask's): safetensors may create it 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_with_peft(run: dict[str, Any], directory: str | Path, host: Host) -> nn.Module:
    """The base model of ``run`` (rebuilt, no adapters) with the exported adapter loaded by HF PEFT; for an
    exported full fine-tuning run (no adapter), its model class loading the folder with ``from_pretrained``."""
    spec = run["spec"]
    model_config = from_dict(ModelConfig, spec["model"], "spec.model")
    train = from_dict(TrainConfig, spec["train"], "spec.train")
    task = host.task(spec["task"])
    base = task.load_model(model_config, spec["seed"], train.classifier_dropout)
    if not (Path(directory) / "adapter_config.json").exists() and (Path(directory) / "config.json").exists():
        return type(base).from_pretrained(str(directory)).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory)).eval()
