"""Finds the local files of LoRA and X-LoRA adapters (PEFT layout) in their repos or directories.

The adapters package reads only the paths resolved here: `apply_lora` gets one `AdapterFiles` per adapter,
`apply_xlora` an `XLoraFiles`.
"""

from __future__ import annotations

from mistralrs.adapters.lora import AdapterFiles
from mistralrs.adapters.ordering import OrderingFile
from mistralrs.adapters.xlora import CLASSIFIER_FILE, CONFIG_FILE, XLoraFiles, read_xlora_config
from mistralrs.loader.source import ModelSource


def adapter_files(source: ModelSource, name: str, allow_root: bool = False) -> AdapterFiles:
    """The files of adapter `name`: those with `name` as a folder of their path (or, when `allow_root`, the
    repo's own top-level files); ValueError unless there is one adapter_config.json and some safetensors."""
    files = source.list_files()
    mine = [f for f in files if name in f.split("/")[:-1]]
    if not mine and allow_root:
        mine = [f for f in files if "/" not in f]
    configs = [f for f in mine if f.rsplit("/", 1)[-1] == "adapter_config.json"]
    tensors = sorted(f for f in mine if f.endswith(".safetensors"))
    if len(configs) != 1 or not tensors:
        raise ValueError(f"Cannot load adapter {name!r}: {source.model_id!r} needs one adapter_config.json and "
                         f"*.safetensors weights under {name}/ (found {len(configs)} configs, {len(tensors)} weights)")
    return AdapterFiles(name, source.get(configs[0]), tuple(source.get(f) for f in tensors))


def lora_files(ordering: OrderingFile, adapters_model_id: str, token: str | None) -> list[AdapterFiles]:
    """The adapters `apply_lora` loads: those of the ordering's `order` from `adapters_model_id`, then each
    preloaded adapter not among them from its own repo."""
    source = ModelSource(adapters_model_id, token=token)
    found = [adapter_files(source, name) for name in ordering.order]
    for pre in ordering.preload_adapters:
        if pre.name not in ordering.order:
            found.append(adapter_files(ModelSource(pre.adapter_model_id, token=token), pre.name, allow_root=True))
    return found


def xlora_files(xlora_model_id: str, token: str | None) -> XLoraFiles:
    """The X-LoRA config, the files of every expert it names, and the classifier in `xlora_model_id`."""
    source = ModelSource(xlora_model_id, token=token)
    config_path = source.maybe_get(CONFIG_FILE)
    if config_path is None:
        raise ValueError(f"xlora_model_id {source.model_id!r}: no {CONFIG_FILE}")
    config = read_xlora_config(config_path)
    experts = {name: adapter_files(source, name) for name in config.adapters}
    classifier = source.maybe_get(CLASSIFIER_FILE)
    if classifier is None:
        raise ValueError(f"xlora_model_id {source.model_id!r}: no {CLASSIFIER_FILE}")
    return XLoraFiles(config, experts, classifier)
