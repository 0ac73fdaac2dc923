"""From a `Which` selection and the Runner's load arguments to the loader's `LoadSpec`.

One converter per `Which` variant (the `_CONVERTERS` table). Everything that depends only on the selection and
the arguments is checked here, with messages naming the variant; the loader checks what needs the files.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mistralrs.api.enums import (
    AnyMoeConfig,
    Architecture,
    IsqOrganization,
    LoraAdapterExpert,
    ModelDType,
    TextAutoMapParams,
    VisionAutoMapParams,
)
from mistralrs.api.which import Which
from mistralrs.loader.source import resolve_token
from mistralrs.loader.spec import (
    AdapterKind, AdapterSpec, AnyMoeSpec, IsqSpec, LoadKind, LoadSpec, LoraExpertSpec,
)
from mistralrs.quant.isq_types import IsqType, parse_isq_type
from mistralrs.worker.auto_device_map import AutoMapParams
from mistralrs.worker.options import ExecutionOptions

_DTYPES: dict[ModelDType, str | torch.dtype] = {
    ModelDType.Auto: "auto", ModelDType.BF16: torch.bfloat16, ModelDType.F16: torch.float16,
    ModelDType.F32: torch.float32,
}


def load_spec(which: Which, *, token_source: str = "cache", chat_template: str | None = None,
              jinja_explicit: str | None = None, show_progress: bool | None = None,
              device: torch.device | None = None, in_situ_quant: str | None = None,
              num_device_layers: list[str] | None = None, execution: ExecutionOptions | None = None,
              anymoe_config: AnyMoeConfig | None = None) -> LoadSpec:
    """The `LoadSpec` of `which` with the Runner's load arguments; ValueError for an unknown ISQ type, ISQ on a
    quantized model, an unbuilt variant or an unsupported combination (AnyMoE on anything but Which.Plain
    included); TypeError when `which` is no variant or `anymoe_config` no AnyMoeConfig.
    `auto_map_params` become the automatic device map's `AutoMapParams` (worker/auto_device_map.py)."""
    variant = type(which).__name__
    isq_type = _parse_isq(in_situ_quant)
    if isq_type is not None and not isinstance(which, (Which.Plain, Which.Lora, Which.VisionPlain,
                                                       Which.DiffusionPlain)):
        raise ValueError(f"in_situ_quant: ISQ applies to full-precision models (Which.Plain, Which.Lora, "
                         f"Which.VisionPlain, Which.DiffusionPlain), not "
                         f"Which.{variant}" + (" (its weights are quantized already)" if "GG" in variant else ""))
    convert = _CONVERTERS.get(type(which))
    if convert is None:
        raise TypeError(f"which must be a Which variant, got {variant}")
    common = dict(
        auto_map=_auto_map(getattr(which, "auto_map_params", None)),
        label=f"Which.{variant}", token=resolve_token(token_source), chat_template=chat_template,
        jinja_explicit=jinja_explicit, show_progress=show_progress, device=device,
        num_device_layers=tuple(num_device_layers) if num_device_layers is not None else None,
        execution=ExecutionOptions.from_env() if execution is None else execution,
        anymoe=_anymoe_spec(anymoe_config))
    return convert(which, isq_type, common)


def _anymoe_spec(config: AnyMoeConfig | None) -> AnyMoeSpec | None:
    """`anymoe_config` as the loader's `AnyMoeSpec` (REFERENCE §1.11, §8.10)."""
    if config is None:
        return None
    if not isinstance(config, AnyMoeConfig):
        raise TypeError(f"anymoe_config must be an AnyMoeConfig, got {type(config).__name__}")
    expert = config.expert_type
    lora = LoraExpertSpec(expert.rank, expert.alpha, tuple(expert.target_modules)) \
        if isinstance(expert, LoraAdapterExpert) else None
    return AnyMoeSpec(
        hidden_size=config.hidden_size, dataset_json=config.dataset_json, prefix=config.prefix, mlp=config.mlp,
        model_ids=tuple(config.model_ids), lora=lora, layers=tuple(config.layers), lr=config.lr,
        epochs=config.epochs, batch_size=config.batch_size, gate_model_id=config.gate_model_id,
        training=config.training, loss_csv_path=config.loss_csv_path)


def draft_load_spec(which_draft: Which, *, in_situ_quant: str | None = None, **kwargs: Any) -> LoadSpec:
    """The `LoadSpec` of a speculative decoding draft (`Runner(which_draft=...)`): as `load_spec` with the
    Runner's arguments, `in_situ_quant` applied only when the draft is a full-precision model (Which.Plain,
    Which.Lora); its errors name `which_draft`."""
    isq = in_situ_quant if isinstance(which_draft, (Which.Plain, Which.Lora)) else None
    try:
        return load_spec(which_draft, in_situ_quant=isq, **kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"which_draft: {exc}") from None


def _parse_isq(in_situ_quant: str | None) -> IsqType | None:
    """`in_situ_quant` parsed (the only place it is); ValueError naming the argument for an unknown type."""
    if in_situ_quant is None:
        return None
    try:
        return parse_isq_type(in_situ_quant)
    except ValueError as exc:
        raise ValueError(f"in_situ_quant: {exc}") from None


def _auto_map(params: TextAutoMapParams | VisionAutoMapParams | None) -> AutoMapParams | None:
    """`auto_map_params` as the loader's plain `AutoMapParams` (None: the planner's defaults)."""
    if params is None:
        return None
    images = dict(max_num_images=params.max_num_images, max_image_length=params.max_image_length) \
        if isinstance(params, VisionAutoMapParams) else {}
    return AutoMapParams(max_seq_len=params.max_seq_len, max_batch_size=params.max_batch_size, **images)


def _arch(arch: Architecture | None) -> str | None:
    return arch.name if arch is not None else None


def _filenames(names: str | list[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _not_yet(which: Which, what: str) -> ValueError:
    return ValueError(f"{type(which).__qualname__}: {what} not supported yet")


def _plain(which: Which.Plain, isq_type: IsqType | None, common: dict[str, Any]) -> LoadSpec:
    isq = IsqSpec(isq_type, moqe=which.organization == IsqOrganization.MoQE, imatrix=which.imatrix,
                  calibration_file=which.calibration_file)
    return LoadSpec(LoadKind.PLAIN, model_id=which.model_id, tokenizer_json=which.tokenizer_json,
                    dtype=_DTYPES[which.dtype], arch=_arch(which.arch), topology=which.topology, isq=isq,
                    from_uqff=which.from_uqff, write_uqff=which.write_uqff, **common)


def _lora(which: Which.Lora, isq_type: IsqType | None, common: dict[str, Any]) -> LoadSpec:
    if which.from_uqff is not None or which.write_uqff is not None:
        raise _not_yet(which, "from_uqff and write_uqff are")
    return LoadSpec(LoadKind.PLAIN, model_id=which.model_id, tokenizer_json=which.tokenizer_json,
                    dtype=_DTYPES[which.dtype], arch=_arch(which.arch), topology=which.topology,
                    isq=IsqSpec(isq_type), **common,
                    adapters=AdapterSpec(AdapterKind.LORA, which.adapters_model_id, which.order))


def _xlora(which: Which.XLora, _isq_type: None, common: dict[str, Any]) -> LoadSpec:
    if which.from_uqff is not None or which.write_uqff is not None or which.topology is not None:
        raise _not_yet(which, "from_uqff, write_uqff and topology are")
    adapters = AdapterSpec(AdapterKind.XLORA, which.xlora_model_id, which.order, which.tgt_non_granular_index)
    return LoadSpec(LoadKind.PLAIN, model_id=which.model_id, tokenizer_json=which.tokenizer_json,
                    dtype=_DTYPES[which.dtype], arch=_arch(which.arch), adapters=adapters, **common)


def _gguf(which: Which.GGUF, _isq_type: None, common: dict[str, Any]) -> LoadSpec:
    return LoadSpec(LoadKind.GGUF, model_id=which.quantized_model_id, filenames=_filenames(which.quantized_filename),
                    tokenizer_model_id=which.tok_model_id, dtype=_DTYPES[which.dtype], topology=which.topology,
                    **common)


def _ggml(which: Which.GGML, _isq_type: None, common: dict[str, Any]) -> LoadSpec:
    return LoadSpec(LoadKind.GGML, model_id=which.quantized_model_id, filenames=(which.quantized_filename,),
                    tokenizer_model_id=which.tok_model_id, tokenizer_json=which.tokenizer_json, gqa=1 if which.gqa is None else which.gqa,
                    dtype=_DTYPES[which.dtype], topology=which.topology, **common)


def _adapters(which: Which) -> AdapterSpec:
    """The adapters of a GGUF/GGML adapter variant."""
    if isinstance(which, (Which.XLoraGGUF, Which.XLoraGGML)):
        return AdapterSpec(AdapterKind.XLORA, which.xlora_model_id, which.order, which.tgt_non_granular_index)
    return AdapterSpec(AdapterKind.LORA, which.adapters_model_id, which.order)


def _gguf_adapters(which: Which.LoraGGUF | Which.XLoraGGUF, _isq_type: None, common: dict[str, Any]) -> LoadSpec:
    if which.topology is not None:
        raise _not_yet(which, "topology is")
    return LoadSpec(LoadKind.GGUF, model_id=which.quantized_model_id, filenames=_filenames(which.quantized_filename),
                    tokenizer_model_id=which.tok_model_id, dtype=_DTYPES[which.dtype], adapters=_adapters(which),
                    **common)


def _ggml_adapters(which: Which.LoraGGML | Which.XLoraGGML, _isq_type: None, common: dict[str, Any]) -> LoadSpec:
    if which.topology is not None:
        raise _not_yet(which, "topology is")
    return LoadSpec(LoadKind.GGML, model_id=which.quantized_model_id, filenames=(which.quantized_filename,),
                    tokenizer_model_id=which.tok_model_id, tokenizer_json=which.tokenizer_json, gqa=1 if which.gqa is None else which.gqa,
                    dtype=_DTYPES[which.dtype], adapters=_adapters(which), **common)


def _vision_plain(which: Which.VisionPlain, isq_type: IsqType | None, common: dict[str, Any]) -> LoadSpec:
    isq = IsqSpec(isq_type, imatrix=which.imatrix, calibration_file=which.calibration_file)
    return LoadSpec(LoadKind.VISION, model_id=which.model_id, tokenizer_json=which.tokenizer_json,
                    dtype=_DTYPES[which.dtype], arch=which.arch.name, topology=which.topology, isq=isq,
                    from_uqff=which.from_uqff, write_uqff=which.write_uqff, max_edge=which.max_edge, **common)


def _diffusion(which: Which.DiffusionPlain, isq_type: IsqType | None, common: dict[str, Any]) -> LoadSpec:
    if common["num_device_layers"] is not None:
        raise ValueError("num_device_layers: a diffusion model is not spread over devices (FluxOffloaded keeps its "
                         "weights in CPU memory instead)")
    return LoadSpec(LoadKind.DIFFUSION, model_id=which.model_id, dtype=_DTYPES[which.dtype], arch=which.arch.name,
                    isq=IsqSpec(isq_type), **common)


# Which variant -> its converter (variant, parsed in_situ_quant, the arguments every spec takes) -> LoadSpec.
_CONVERTERS: dict[type, Callable[[Any, IsqType | None, dict[str, Any]], LoadSpec]] = {
    Which.Plain: _plain, Which.Lora: _lora, Which.XLora: _xlora,
    Which.GGUF: _gguf, Which.LoraGGUF: _gguf_adapters, Which.XLoraGGUF: _gguf_adapters,
    Which.GGML: _ggml, Which.LoraGGML: _ggml_adapters, Which.XLoraGGML: _ggml_adapters,
    Which.VisionPlain: _vision_plain,
    Which.DiffusionPlain: _diffusion,
}
