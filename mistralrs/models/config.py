"""`TextModelConfig`: the decoder hyper-parameters read from a Hugging Face `config.json` dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any, TypeVar

from mistralrs.layers.activation import get_act_fn
from mistralrs.layers.rotary import rope_type_of, validate_rope_scaling

LAYER_TYPES = ("full_attention", "sliding_attention")
ExtrasT = TypeVar("ExtrasT")


@dataclass
class TextModelConfig:
    """Decoder-only text model configuration (HF field names; validated on construction).

    Keys of the HF dict that are not fields here are kept in `extra`; a family that needs some reads them once into
    its own typed extras dataclass (`read_family_extras`), never from `extra` directly.
    """

    hidden_size: int  # residual stream width
    intermediate_size: int  # MLP inner width
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    vocab_size: int  # rows of the embedding and LM head
    num_key_value_heads: int | None = None  # K/V heads (GQA); None -> num_attention_heads
    head_dim: int | None = None  # features per head; None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"  # MLP activation, HF name
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # HF rope_scaling dict (rope_type/type + parameters) or None
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    max_position_embeddings: int = 4096  # trained context length
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    attention_bias: bool = False  # q/k/v/o projections have biases (Llama-style flag)
    mlp_bias: bool = False  # MLP projections have biases
    sliding_window: int | None = None  # attention window in tokens for sliding layers; None: full attention
    use_sliding_window: bool | None = None  # Qwen2-style switch for sliding_window (None: not given)
    max_window_layers: int | None = None  # Qwen2-style: layers below this index use full attention
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention" (newer HF configs)
    architectures: list[str] | None = None  # HF class names, e.g. ["LlamaForCausalLM"]
    model_type: str | None = None  # HF model_type, e.g. "llama"
    bos_token_id: int | list[int] | None = None  # beginning-of-sequence id(s)
    eos_token_id: int | list[int] | None = None  # end-of-sequence id(s)
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the HF dict, untouched
    hf_keys: frozenset[str] | None = None  # field names the HF dict set; None: built in code (all count as set)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self._validate_sizes()
        self._validate_attention()
        get_act_fn(self.hidden_act)
        validate_rope_scaling(self.rope_scaling)

    def _validate_sizes(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"config field 'rms_norm_eps' must be positive, got {self.rms_norm_eps!r}")

    def _validate_attention(self) -> None:
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(
                f"config field 'partial_rotary_factor' must be in (0, 1], got {self.partial_rotary_factor!r}")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(f"config field 'sliding_window' must be a positive integer or null, got {window!r}")
        types = self.layer_types
        if types is not None and (len(types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in types)):
            raise ValueError(f"config field 'layer_types' must list num_hidden_layers ({self.num_hidden_layers}) "
                             f"entries from {list(LAYER_TYPES)}, got {types!r}")

    def with_family_defaults(self, **defaults: Any) -> TextModelConfig:
        """A copy where each field named in `defaults` that the HF dict did not set takes the family's default.

        Families whose `transformers` defaults differ from this class's (Gemma ties embeddings, Phi-2 rotates
        half of each head, ...) call this first, so a sparse `config.json` means what it means to `transformers`.
        """
        unknown = sorted(set(defaults) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"with_family_defaults: {unknown} are not TextModelConfig fields")
        given = self.hf_keys
        if given is None:
            return self
        return replace(self, **{k: v for k, v in defaults.items() if k not in given})

    @property
    def rotary_dim(self) -> int:
        """Features per head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        """"default" or the rope_scaling type."""
        return rope_type_of(self.rope_scaling)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> TextModelConfig:
        """Reads an HF `config.json` dict; ValueError naming a missing or invalid field.

        Accepts both the classic `rope_theta` + `rope_scaling` keys and the newer `rope_parameters` dict.
        """
        d = dict(d)
        rope_parameters = d.get("rope_parameters")
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:  # flat form, one rope for all
            d.setdefault("rope_theta", rope_parameters["rope_theta"])
            if rope_type_of(rope_parameters) != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
            if "partial_rotary_factor" in rope_parameters:
                d.setdefault("partial_rotary_factor", rope_parameters["partial_rotary_factor"])
        _move_original_max_position_into_rope_scaling(d)
        names = {f.name for f in fields(cls)} - {"extra", "hf_keys"}
        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if d.get(n) is None]
        if missing:
            raise ValueError(f"config.json is missing required field(s) {missing}")
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names}
        if rope_type_of(known.get("rope_scaling")) == "default":
            known.pop("rope_scaling", None)
        return cls(**known, extra=extra, hf_keys=frozenset(k for k in d if k in names))


def _move_original_max_position_into_rope_scaling(d: dict[str, Any]) -> None:
    """As `transformers` does: scaled rope types that read the pre-training length take the top-level
    `original_max_position_embeddings` (Phi-3 keeps it there) over their own, else `max_position_embeddings`."""
    scaling = d.get("rope_scaling")
    if rope_type_of(scaling) not in ("llama3", "yarn", "longrope", "su"):
        return
    scaling = dict(scaling)
    if d.get("original_max_position_embeddings") is not None:
        scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    elif d.get("max_position_embeddings") is not None:
        scaling.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
    d["rope_scaling"] = scaling


def extra_key(default: Any, *, aliases: tuple[str, ...] = (), falsy_is_default: bool = False) -> Any:
    """A field of a family's extras dataclass (see `read_family_extras`) with a default and reading options:
    `aliases`, other config.json spellings of the key; `falsy_is_default`, a null, 0, false or empty value (of the
    key, then of each alias) counts as absent, so the field takes its default."""
    return field(default=default, metadata={"aliases": aliases, "falsy_is_default": falsy_is_default})


def read_family_extras(cls: type[ExtrasT], config: TextModelConfig,
                       defaults: Mapping[str, Any] | None = None) -> ExtrasT:
    """A family's typed extras: `cls`, a dataclass whose fields are config.json keys that `TextModelConfig` does
    not have, built from `config.extra`. A field takes the value of its key as given (a null included, unless the
    field is `extra_key(..., falsy_is_default=True)`); a missing key takes `defaults[name]` (a family variant's
    defaults), else the field's default. `cls` validates in `__post_init__` (ValueError naming the field)."""
    defaults = defaults or {}
    values = {}
    for f in fields(cls):
        found, value = _extra_value(config.extra, f)
        if found:
            values[f.name] = value
        elif f.name in defaults:
            values[f.name] = defaults[f.name]
    return cls(**values)


def _extra_value(extra: Mapping[str, Any], f: Field) -> tuple[bool, Any]:
    """(whether the HF dict gives field `f`, its value) under the field's `extra_key` options."""
    keys = (f.name, *f.metadata.get("aliases", ()))
    if f.metadata.get("falsy_is_default"):
        value = next((extra[k] for k in keys if extra.get(k)), MISSING)
    else:
        value = next((extra[k] for k in keys if k in extra), MISSING)
    return value is not MISSING, value
