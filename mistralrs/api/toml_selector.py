"""The reference's TOML model selector (`mistralrs-server toml -f FILE`, REFERENCE §2.1; `docs/TOML_SELECTOR.md` and
`toml-selectors/*.toml` of mistral.rs 0.5.0), read into the `Runner`'s arguments.

    tokenizer_json = "tok.json"          # optional: for every model of the file whose Which has the field
    [model]                              # the fields of one Which variant (REFERENCE §1.3)
    model_id = "mistralai/Mistral-7B-Instruct-v0.1"
    arch = "mistral"
    [speculative]                        # optional: speculative decoding
    gamma = 32
    [speculative.draft_model]            # a second selector, like [model]
    quantized_model_id = "..."
    [anymoe]                             # optional: AnyMoE; dataset_json, prefix, mlp, model_ids, layers
    [anymoe.config]                      # hidden_size, lr, epochs, batch_size, expert_type, gate_model_id, ...
    [anymoe.config.expert_type.lora_adapter]   # rank, alpha, target_modules (or expert_type = "fine_tuned")

As in the reference, a selector names no kind: its fields select the variant (`max_seq_len`, `max_batch_size`,
`max_num_images`, `max_image_length` become `auto_map_params`; several GGUF files are separated by spaces). Where
several variants take the same fields the reference's order decides (GGUF before GGML, text `arch` before vision);
beyond the reference, `kind = "ggml"` (a subcommand name) picks one explicitly, and a GGUF selector may leave
out `tok_model_id` (the tokenizer then comes from the GGUF file, as on the command line). Unlike the reference, which ignores
them, an unknown field or section is an error naming it, and every error names the file.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields
from typing import Any

from mistralrs.api.enums import AnyMoeConfig, AnyMoeExpertType, TextAutoMapParams, VisionAutoMapParams
from mistralrs.api.which import Which

logger = logging.getLogger(__name__)

_TEXT_AUTO_MAP = ("max_seq_len", "max_batch_size")
_VISION_AUTO_MAP = (*_TEXT_AUTO_MAP, "max_num_images", "max_image_length")
_QUANTIZED = ("quantized_model_id", "quantized_filename")


@dataclass(frozen=True)
class _Variant:
    """One kind of selector: the subcommand name, its Which variant and the TOML fields it takes."""

    kind: str                     # the CLI subcommand of the same model kind, for `kind = ...`
    which: type                   # the Which variant built
    required: frozenset[str]      # fields it needs
    optional: frozenset[str]      # fields it may take besides

    @property
    def allowed(self) -> frozenset[str]:
        return self.required | self.optional


def _variant(kind: str, which: type, required: tuple[str, ...], optional: tuple[str, ...]) -> _Variant:
    auto_map = _VISION_AUTO_MAP if which is Which.VisionPlain else _TEXT_AUTO_MAP
    return _Variant(kind, which, frozenset(required), frozenset((*optional, "dtype", "topology", *auto_map)))


_UQFF = ("write_uqff", "from_uqff")
# In the reference's order: the first variant whose fields fit a selector is the one it selects.
VARIANTS: tuple[_Variant, ...] = (
    _variant("plain", Which.Plain, ("model_id",),
             ("arch", "organization", *_UQFF, "imatrix", "calibration_file")),
    _variant("x-lora", Which.XLora, ("xlora_model_id", "order"),
             ("model_id", "tgt_non_granular_index", "arch", *_UQFF)),
    _variant("lora", Which.Lora, ("adapters_model_id", "order"), ("model_id", "arch", *_UQFF)),
    _variant("gguf", Which.GGUF, _QUANTIZED, ("tok_model_id",)),   # the reference requires tok_model_id
    _variant("x-lora-gguf", Which.XLoraGGUF, (*_QUANTIZED, "xlora_model_id", "order"),
             ("tok_model_id", "tgt_non_granular_index")),
    _variant("lora-gguf", Which.LoraGGUF, (*_QUANTIZED, "adapters_model_id", "order"), ("tok_model_id",)),
    _variant("ggml", Which.GGML, ("tok_model_id", *_QUANTIZED), ("gqa",)),
    _variant("x-lora-ggml", Which.XLoraGGML, (*_QUANTIZED, "xlora_model_id", "order"),
             ("tok_model_id", "tgt_non_granular_index", "gqa")),
    _variant("lora-ggml", Which.LoraGGML, (*_QUANTIZED, "adapters_model_id", "order"), ("tok_model_id", "gqa")),
    _variant("vision-plain", Which.VisionPlain, ("model_id", "arch"),
             (*_UQFF, "max_edge", "calibration_file", "imatrix")),
)
_BY_KIND = {variant.kind: variant for variant in VARIANTS}
_SELECTOR_FIELDS = frozenset().union(*(v.allowed for v in VARIANTS)) | {"kind"}
_ANYMOE_FIELDS = {"dataset_json": True, "prefix": True, "mlp": True, "model_ids": True, "layers": False,
                  "config": True}   # field -> required
_ANYMOE_CONFIG_FIELDS = {"hidden_size": True, "expert_type": True, "lr": False, "epochs": False, "batch_size": False,
                         "gate_model_id": False, "training": False, "loss_csv_path": False}


@dataclass(frozen=True)
class TomlSelection:
    """A TOML selector read into the `Runner` arguments it sets."""

    which: Which                            # [model]
    which_draft: Which | None = None        # [speculative.draft_model]
    speculative_gamma: int | None = None    # [speculative] gamma
    anymoe_config: AnyMoeConfig | None = None  # [anymoe] with [anymoe.config]

    def runner_kwargs(self) -> dict[str, Any]:
        """The Runner keyword arguments besides `which` that the file sets."""
        kwargs: dict[str, Any] = {}
        if self.which_draft is not None:
            kwargs.update(which_draft=self.which_draft, speculative_gamma=self.speculative_gamma)
        if self.anymoe_config is not None:
            kwargs["anymoe_config"] = self.anymoe_config
        return kwargs


def read_toml_selector(path: str | os.PathLike) -> TomlSelection:
    """The selection of the TOML file at `path`; ValueError naming the file and the field (and the line, for
    malformed TOML) for any problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"toml selector {path!r}: cannot read it ({exc.strerror})") from None
    return parse_toml_selector(data.decode("utf-8", errors="replace"), path)


def parse_toml_selector(text: str, source: str = "<toml>") -> TomlSelection:
    """The selection of TOML `text` (`source` names it in errors)."""
    toml = _toml_module()
    try:
        document = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise ValueError(f"{source}: malformed TOML: {exc}") from None
    try:
        return _selection(document)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def _toml_module():
    """The standard library's tomllib (Python 3.11+), else the tomli package it came from."""
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    import tomli
    return tomli


def _selection(document: dict[str, Any]) -> TomlSelection:
    _check_keys(document, "", {"tokenizer_json": False, "model": True, "speculative": False, "anymoe": False})
    tokenizer_json = document.get("tokenizer_json")
    which = selector_which(_table(document, "model", ""), "[model]", tokenizer_json)
    speculative = document.get("speculative")
    draft = gamma = None
    if speculative is not None:
        speculative = _table(document, "speculative", "")
        _check_keys(speculative, "[speculative]", {"gamma": True, "draft_model": True})
        gamma = speculative["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"[speculative].gamma must be an int >= 1 (draft tokens per step), got {gamma!r}")
        draft = selector_which(_table(speculative, "draft_model", "[speculative]"), "[speculative.draft_model]",
                               tokenizer_json)
    anymoe = _anymoe(_table(document, "anymoe", "")) if "anymoe" in document else None
    return TomlSelection(which, draft, gamma, anymoe)


def _table(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent[key]
    name = f"{where}.{key}" if where else f"[{key}]"
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a table, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], where: str, known: dict[str, bool]) -> None:
    """ValueError for a key `table` must not have (naming it and the known ones) or a required one it lacks."""
    for key in table:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ValueError(f"{name}: unknown field (known: {', '.join(known)})")
    missing = [key for key, required in known.items() if required and key not in table]
    if missing:
        raise ValueError(f"{where or 'the file'}: missing field {', '.join(repr(k) for k in missing)}")


def selector_which(table: dict[str, Any], where: str, tokenizer_json: str | None = None) -> Which:
    """The `Which` of one selector table (`[model]` or `[speculative.draft_model]`); `tokenizer_json` (the file's
    top-level one) goes to a variant with that field and is logged as unused by the others."""
    variant = _select_variant(table, where)
    values = {key: value for key, value in table.items() if key != "kind"}
    auto_map_names = _VISION_AUTO_MAP if variant.which is Which.VisionPlain else _TEXT_AUTO_MAP
    auto_map = {name: values.pop(name) for name in auto_map_names if name in values}
    if isinstance(values.get("quantized_filename"), str):   # the reference separates several files with spaces
        files = values["quantized_filename"].split()
        values["quantized_filename"] = files[0] if len(files) == 1 else files
    field_names = {f.name for f in fields(variant.which)}
    if tokenizer_json is not None:
        if "tokenizer_json" in field_names:
            values["tokenizer_json"] = tokenizer_json
        else:
            logger.warning("%s: tokenizer_json %r is not used by Which.%s (the model's tokenizer comes from "
                           "tok_model_id or the GGUF file)", where, tokenizer_json, variant.which.__name__)
    try:
        if auto_map:
            params = VisionAutoMapParams if variant.which is Which.VisionPlain else TextAutoMapParams
            values["auto_map_params"] = params(**auto_map)
        return variant.which(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} ({variant.kind} selector): {exc}") from None


def _select_variant(table: dict[str, Any], where: str) -> _Variant:
    """The variant a selector's fields select (module doc); ValueError naming the unknown or missing field."""
    given = set(table) - {"kind"}
    if "kind" in table:
        variant = _BY_KIND.get(table["kind"]) if isinstance(table["kind"], str) else None
        if variant is None:
            raise ValueError(f"{where}.kind: unknown model kind {table['kind']!r} (known: {', '.join(_BY_KIND)})")
        _check_keys(table, where, {**{f: False for f in variant.optional | {'kind'}},
                                   **{f: True for f in variant.required}})
        return variant
    unknown = sorted(given - _SELECTOR_FIELDS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (a model selector takes "
                         f"{', '.join(sorted(_SELECTOR_FIELDS))})")
    fitting = [v for v in VARIANTS if v.required <= given <= v.allowed]
    if fitting:
        return next((v for v in fitting if _arch_fits(v, table.get("arch"))), fitting[0])
    covering = [v for v in VARIANTS if given <= v.allowed]
    if covering:
        closest = min(covering, key=lambda v: len(v.required - given))
        missing = ", ".join(repr(f) for f in sorted(closest.required - given))
        raise ValueError(f"{where}: missing field {missing} (its other fields select a {closest.kind} model)")
    raise ValueError(f"{where}: no model kind takes all of the fields {', '.join(sorted(given))}; each selector "
                     f"takes the fields of one kind ({', '.join(_BY_KIND)})")


def _arch_fits(variant: _Variant, arch: Any) -> bool:
    """Whether `arch` (absent, or a TOML string) names an architecture of the variant's kind (text or vision)."""
    if arch is None:
        return True
    try:
        variant.which._arch_enum.from_str(arch)
    except (TypeError, ValueError):
        return False
    return True


def _anymoe(table: dict[str, Any]) -> AnyMoeConfig:
    """`[anymoe]` and `[anymoe.config]` as the Runner's `AnyMoeConfig`."""
    _check_keys(table, "[anymoe]", _ANYMOE_FIELDS)
    config = _table(table, "config", "[anymoe]")
    _check_keys(config, "[anymoe.config]", _ANYMOE_CONFIG_FIELDS)
    settings = {key: value for key, value in config.items() if key != "expert_type"}
    expert_type = _expert_type(config["expert_type"])
    try:
        return AnyMoeConfig(dataset_json=table["dataset_json"], prefix=table["prefix"], mlp=table["mlp"],
                            model_ids=table["model_ids"], layers=table.get("layers", []), expert_type=expert_type,
                            **settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[anymoe]: {exc}") from None


def _expert_type(value: Any) -> AnyMoeExpertType:
    """`"fine_tuned"`, or a `lora_adapter` table of rank, alpha and target_modules (the reference's serde form)."""
    where = "[anymoe.config].expert_type"
    if value == "fine_tuned":
        return AnyMoeExpertType.FineTuned()
    if isinstance(value, dict) and list(value) == ["lora_adapter"] and isinstance(value["lora_adapter"], dict):
        adapter = value["lora_adapter"]
        _check_keys(adapter, "[anymoe.config.expert_type.lora_adapter]",
                    {"rank": True, "alpha": True, "target_modules": True})
        try:
            return AnyMoeExpertType.LoraAdapter(adapter["rank"], adapter["alpha"], adapter["target_modules"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[anymoe.config.expert_type.lora_adapter]: {exc}") from None
    raise ValueError(f"{where} must be \"fine_tuned\" or a [anymoe.config.expert_type.lora_adapter] table, "
                     f"got {value!r}")
