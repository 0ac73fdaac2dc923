"""`LoadSpec`: everything loading a model needs, as plain values (no API type).

The API layer turns a `Which` selection and the Runner's load arguments into one `LoadSpec`
(`mistralrs/api/load_spec.py`); `loader.pipeline.load(spec)` dispatches on `spec.kind`. A new kind of model
(vision, diffusion) adds a `LoadKind` member, its own nested options if it needs some, and one loader function.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from mistralrs.quant.isq_types import IsqType
from mistralrs.worker.auto_device_map import AutoMapParams
from mistralrs.worker.options import ExecutionOptions

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the dtypes a spec may ask for besides "auto"
DIFFUSION_ARCHS = ("Flux", "FluxOffloaded")  # the arch names a DIFFUSION spec may carry


class LoadKind(enum.Enum):
    """What to load: each kind has one loader function in `loader/pipeline.py`."""

    PLAIN = "plain"  # a Hugging Face safetensors text model (local directory or hub repo)
    GGUF = "gguf"    # a GGUF text model (one file or several split files)
    GGML = "ggml"    # a legacy GGML (llama.cpp `ggjt`) llama file
    VISION = "vision"  # a Hugging Face safetensors vision-language model (`*ForConditionalGeneration`)
    DIFFUSION = "diffusion"  # a FLUX image model in the diffusers layout (local directory or hub repo)


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
class LoraExpertSpec:
    """AnyMoE experts that are the base MLP plus a LoRA delta read from each expert model id (REFERENCE §8.10)."""

    rank: int  # LoRA rank r of every adapter
    alpha: float  # LoRA alpha; the delta B @ A is scaled by alpha / rank
    target_modules: tuple[str, ...]  # MLP projections the adapters apply to, e.g. ("gate_proj",)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"anymoe_config.expert_type.rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"anymoe_config.expert_type.alpha must be a finite number, got {self.alpha!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"anymoe_config.expert_type.target_modules must name at least one MLP projection, "
                             f"got {self.target_modules!r}")


@dataclass(frozen=True)
class AnyMoeSpec:
    """An AnyMoE model over the loaded base (REFERENCE §8.10): expert 0 is the base MLP, experts 1..n come from
    `model_ids`; a gate per selected decoder layer routes each sequence to one expert."""

    hidden_size: int  # the base model's hidden size (each gate's input width)
    dataset_json: str  # {"rows": [{"prompt", "expert", "image_urls"?}]}: the gates' training data
    prefix: str  # module path of the decoder layers, e.g. "model.layers"
    mlp: str  # the MLP's name inside a decoder layer, e.g. "mlp"
    model_ids: tuple[str, ...]  # expert sources, in expert order 1..n (fine-tuned checkpoints or LoRA adapters)
    lora: LoraExpertSpec | None = None  # LoRA-adapter experts; None: fine-tuned experts (the MLPs of model_ids)
    layers: tuple[int, ...] = ()  # decoder layers that get a gate and experts; empty: all
    lr: float = 1e-3  # AdamW learning rate of the gates
    epochs: int = 100  # passes over the dataset
    batch_size: int = 4  # prompts per training step
    gate_model_id: str | None = None  # directory the trained gates are saved to, or (training False) read from
    training: bool = True  # train the gates; False: load them from gate_model_id/gate.safetensors
    loss_csv_path: str | None = None  # a .csv file for the per-step loss of every gating layer

    def __post_init__(self) -> None:
        for name in ("hidden_size", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"anymoe_config.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ValueError(f"anymoe_config.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("dataset_json", "prefix", "mlp"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"anymoe_config.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not self.model_ids or not all(isinstance(m, str) and m for m in self.model_ids):
            raise ValueError(f"anymoe_config.model_ids must name at least one expert model, got {self.model_ids!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
            raise ValueError(f"anymoe_config.layers must be decoder layer indices >= 0, got {self.layers!r}")
        if not self.training and self.gate_model_id is None:
            raise ValueError("anymoe_config.gate_model_id is required when training=False (the gates are read "
                             "from it)")
        if self.loss_csv_path is not None and not self.loss_csv_path.endswith(".csv"):
            raise ValueError(f"anymoe_config.loss_csv_path must end with '.csv', got {self.loss_csv_path!r}")


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
    arch: str | None = None  # PLAIN: the architecture's enum name (e.g. "Llama"); None: from config.json;
    #                          DIFFUSION (required): "Flux" or "FluxOffloaded"
    gqa: int = 1  # GGML: num_heads / num_kv_heads (GGML files do not store it)
    topology: str | None = None  # per-layer ISQ/device YAML file (§5)
    isq: IsqSpec = IsqSpec()  # PLAIN: in-situ quantization (no type: none unless the topology asks); DIFFUSION:
    #                           the type only, applied to the FLUX transformer's and T5's blocks
    from_uqff: str | None = None  # PLAIN: load pre-quantized weights from this UQFF file (in the model repo)
    write_uqff: str | None = None  # PLAIN: write the ISQ-quantized weights to this UQFF file
    adapters: AdapterSpec | None = None  # LoRA / X-LoRA adapters on the base model
    anymoe: AnyMoeSpec | None = None  # PLAIN: turn the model into an AnyMoE model (experts and trained gates)
    token: str | None = None  # Hugging Face token (resolved from the Runner's token_source)
    chat_template: str | None = None  # Runner(chat_template=...): a .json file or a literal Jinja template
    jinja_explicit: str | None = None  # Runner(jinja_explicit=...): a .jinja file overriding every other template
    num_device_layers: tuple[str, ...] | None = None  # device map: ("N",) or ("ORD:NUM", ...)
    auto_map: AutoMapParams | None = None  # the automatic device map's sizes (auto_map_params); None: defaults
    show_progress: bool | None = None  # progress bars; None: on a terminal unless MISTRALRS_NO_PROGRESS is set
    device: torch.device | None = None  # the model's device; None: CUDA device 0 when available, else the CPU
    max_edge: int | None = None  # VISION: longest image edge the processor resizes to (None: the checkpoint's)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions.from_env)  # fast/plain paths (the
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
        if (self.kind in (LoadKind.GGUF, LoadKind.GGML)) != bool(self.filenames):
            raise ValueError(f"{self.label}: LoadSpec.filenames name the GGUF/GGML files, and only those "
                             f"(kind {self.kind.value}, filenames {self.filenames!r})")
        if self.kind is LoadKind.GGML and len(self.filenames) != 1:
            raise ValueError(f"{self.label}: a GGML model is one file, got {self.filenames!r}")
        if self.kind is LoadKind.GGML and (self.topology is not None or self.num_device_layers is not None):
            raise ValueError(f"{self.label}: a manual device map (topology, num_device_layers) is not supported "
                             "for GGML models")
        allowed_isq = IsqSpec(self.isq.isq_type) if self.kind is LoadKind.DIFFUSION else IsqSpec()
        if not safetensors and self.isq != allowed_isq:
            raise ValueError(f"{self.label}: in-situ quantization applies to safetensors models only (a diffusion "
                             "model takes only the ISQ type)")
        if (self.from_uqff is not None or self.write_uqff is not None) and (
                not safetensors or self.adapters is not None):
            raise ValueError(f"{self.label}: from_uqff and write_uqff apply to safetensors models without adapters")
        if self.anymoe is not None and (self.kind is not LoadKind.PLAIN or self.adapters is not None
                                        or self.from_uqff is not None or self.write_uqff is not None):
            raise ValueError(f"{self.label}: anymoe_config applies to full-precision models without adapters "
                             "(Which.Plain, without from_uqff and write_uqff)")
        if self.anymoe is not None and (self.isq.imatrix is not None or self.isq.calibration_file is not None):
            raise ValueError(f"{self.label}: anymoe_config cannot be combined with an imatrix or calibration_file "
                             "(the importance matrix would not cover the experts)")
        if self.kind is LoadKind.VISION and (self.adapters is not None or self.isq.moqe):
            raise ValueError(f"{self.label}: adapters and MoQE do not apply to vision models")
        if self.max_edge is not None and (self.kind is not LoadKind.VISION or self.max_edge < 1):
            raise ValueError(f"{self.label}: max_edge must be a positive integer and applies to vision models only, "
                             f"got {self.max_edge!r}")
        if self.kind is LoadKind.DIFFUSION:
            self._check_diffusion()
        if self.arch is not None and not safetensors and self.kind is not LoadKind.DIFFUSION:
            raise ValueError(f"{self.label}: arch applies to safetensors models only (GGUF/GGML files name theirs)")

    def _check_diffusion(self) -> None:
        """What a DIFFUSION spec may not carry."""
        if self.arch not in DIFFUSION_ARCHS:
            raise ValueError(f"{self.label}: a diffusion model's arch must be one of {DIFFUSION_ARCHS}, got "
                             f"{self.arch!r}")
        if self.topology is not None or self.num_device_layers is not None or self.adapters is not None:
            raise ValueError(f"{self.label}: a diffusion model takes no topology, num_device_layers or adapters")
        if self.isq.isq_type is not None and self.arch == "FluxOffloaded":
            raise ValueError(f"{self.label}: in_situ_quant is not supported with FluxOffloaded (its blocks move "
                             "to the device as dense weights); use Flux")
