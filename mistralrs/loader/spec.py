"""`LoadSpec`: everything loading a model needs, as plain values (no API type).

The API layer turns a `Which` selection and the Runner's load arguments into one `LoadSpec`
(`mistralrs/api/load_spec.py`); `loader.pipeline.load(spec)` dispatches on `spec.kind`. A new kind of model
(vision, diffusion) adds a `LoadKind` member, its own nested options if it needs some, and one loader function.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from mistralrs.quant.isq_types import IsqType
from mistralrs.worker.options import ExecutionOptions

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the dtypes a spec may ask for besides "auto"


class LoadKind(enum.Enum):
    """What to load: each kind has one loader function in `loader/pipeline.py`."""

    PLAIN = "plain"  # a Hugging Face safetensors text model (local directory or hub repo)
    GGUF = "gguf"    # a GGUF text model (one file or several split files)
    GGML = "ggml"    # a legacy GGML (llama.cpp `ggjt`) llama file
    VISION = "vision"  # a Hugging Face safetensors vision-language model (`*ForConditionalGeneration`)


class AdapterKind(enum.Enum):
    """Which adapters sit on the base model."""

    LORA = "lora"    # LoRA adapters named by an ordering file (merged, or preloaded and switchable)
    XLORA = "xlora"  # X-LoRA: LoRA experts mixed per token by a classifier


@dataclass(frozen=True)
class AdapterSpec:
    """The adapters loaded on top of the base model (REFERENCE §6)."""

    kind: AdapterKind  # LoRA or X-LoRA
    model_id: str  # repo or directory of the adapters (`adapters_model_id` / `xlora_model_id`)
    order: str  # the ordering JSON file: base model id, adapter order, layers, preload_adapters (§6.1)
    non_granular_index: int | None = None  # X-LoRA `tgt_non_granular_index`: scalings freeze after this token

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AdapterKind):
            raise ValueError(f"AdapterSpec.kind must be an AdapterKind, got {self.kind!r}")
        if not self.model_id or not self.order:
            raise ValueError(f"AdapterSpec: model_id and order are required, got {self.model_id!r}, {self.order!r}")
        if self.non_granular_index is not None:
            if self.kind is not AdapterKind.XLORA:
                raise ValueError("AdapterSpec.non_granular_index applies to X-LoRA only")
            if self.non_granular_index < 0:
                raise ValueError(f"tgt_non_granular_index must be >= 0 or None, got {self.non_granular_index!r}")


@dataclass(frozen=True)
class IsqSpec:
    """In-situ quantization of a safetensors model (REFERENCE §3); the topology's `isq` entries add to it."""

    isq_type: IsqType | None = None  # Runner(in_situ_quant=...), parsed; None: only the topology's types
    moqe: bool = False  # IsqOrganization.MoQE: quantize only the LM head and the MoE experts
    imatrix: str | None = None  # llama.cpp .imatrix / .cimatrix file guiding the quantization
    calibration_file: str | None = None  # text to collect an imatrix from before quantizing

    def __post_init__(self) -> None:
        if self.isq_type is not None and not isinstance(self.isq_type, IsqType):
            raise ValueError(f"IsqSpec.isq_type must be a parsed IsqType, got {self.isq_type!r}")


@dataclass(frozen=True)
class LoadSpec:
    """Everything `loader.pipeline.load` needs to load one model and its tokenizer."""

    kind: LoadKind  # which loader reads the weights
    label: str  # names the selection in error messages, e.g. "Which.Lora"
    model_id: str | None  # PLAIN: repo or directory (None with adapters: the ordering file's base_model_id);
    #                       GGUF/GGML: repo or directory holding the quantized file(s)
    filenames: tuple[str, ...] = ()  # GGUF: the file or its split parts; GGML: the one file; PLAIN: none
    tokenizer_model_id: str | None = None  # GGUF/GGML: repo of the tokenizer files (None: GGUF metadata, or with
    #                                        adapters the ordering file's base_model_id)
    tokenizer_json: str | None = None  # a local tokenizer.json overriding the repo's
    dtype: str | torch.dtype = "auto"  # "auto" (BF16, F16 or F32: the first the device runs) or a torch dtype
    arch: str | None = None  # PLAIN: the architecture's enum name (e.g. "Llama"); None: from config.json
    gqa: int = 1  # GGML: num_heads / num_kv_heads (GGML files do not store it)
    topology: str | None = None  # per-layer ISQ/device YAML file (§5)
    isq: IsqSpec = IsqSpec()  # PLAIN: in-situ quantization (no type: none unless the topology asks)
    from_uqff: str | None = None  # PLAIN: load pre-quantized weights from this UQFF file (in the model repo)
    write_uqff: str | None = None  # PLAIN: write the ISQ-quantized weights to this UQFF file
    adapters: AdapterSpec | None = None  # LoRA / X-LoRA adapters on the base model
    token: str | None = None  # Hugging Face token (resolved from the Runner's token_source)
    chat_template: str | None = None  # Runner(chat_template=...): a .json file or a literal Jinja template
    jinja_explicit: str | None = None  # Runner(jinja_explicit=...): a .jinja file overriding every other template
    num_device_layers: tuple[str, ...] | None = None  # device map: ("N",) or ("ORD:NUM", ...)
    show_progress: bool | None = None  # progress bars; None: on a terminal unless MISTRALRS_NO_PROGRESS is set
    device: torch.device | None = None  # the model's device; None: CUDA device 0 when available, else the CPU
    max_edge: int | None = None  # VISION: longest image edge the processor resizes to (None: the checkpoint's)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions.for_library)  # fast/plain paths (the
    #                                  quant configs read `fast_kernels`; the engine gets the rest)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LoadKind):
            raise ValueError(f"LoadSpec.kind must be a LoadKind, got {self.kind!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"LoadSpec.dtype must be 'auto' or one of {DTYPES}, got {self.dtype!r}")
        if self.gqa < 1:
            raise ValueError(f"LoadSpec.gqa must be >= 1, got {self.gqa}")
        if self.model_id is None and (self.kind is not LoadKind.PLAIN or self.adapters is None):
            raise ValueError(f"{self.label}: LoadSpec.model_id is required (only an adapter model may take it from "
                             "its ordering file)")
        safetensors = self.kind in (LoadKind.PLAIN, LoadKind.VISION)
        if safetensors == bool(self.filenames):
            raise ValueError(f"{self.label}: LoadSpec.filenames name the GGUF/GGML files, and only those "
                             f"(kind {self.kind.value}, filenames {self.filenames!r})")
        if self.kind is LoadKind.GGML and len(self.filenames) != 1:
            raise ValueError(f"{self.label}: a GGML model is one file, got {self.filenames!r}")
        if self.kind is LoadKind.GGML and (self.topology is not None or self.num_device_layers is not None):
            raise ValueError(f"{self.label}: a manual device map (topology, num_device_layers) is not supported "
                             "for GGML models")
        if not safetensors and self.isq != IsqSpec():
            raise ValueError(f"{self.label}: in-situ quantization applies to safetensors models only")
        if (self.from_uqff is not None or self.write_uqff is not None) and (
                not safetensors or self.adapters is not None):
            raise ValueError(f"{self.label}: from_uqff and write_uqff apply to safetensors models without adapters")
        if self.kind is LoadKind.VISION and (self.adapters is not None or self.isq.moqe):
            raise ValueError(f"{self.label}: adapters and MoQE do not apply to vision models")
        if self.max_edge is not None and (self.kind is not LoadKind.VISION or self.max_edge < 1):
            raise ValueError(f"{self.label}: max_edge must be a positive integer and applies to vision models only, "
                             f"got {self.max_edge!r}")
        if self.arch is not None and not safetensors:
            raise ValueError(f"{self.label}: arch applies to safetensors models only (GGUF/GGML files name theirs)")
