"""Public data types of the Python API against the reference's signatures and tables (REFERENCE §1)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import pickle
import time

import pytest

import mistralrs.api as api
from mistralrs.api import (
    AnyMoeConfig,
    AnyMoeExpertType,
    Architecture,
    CalledFunction,
    ChatCompletionChunkResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DiffusionArchitecture,
    ImageChoice,
    ImageGenerationResponse,
    IsqOrganization,
    Logprobs,
    ModelDType,
    ResponseLogprob,
    ResponseMessage,
    TextAutoMapParams,
    ToolCallResponse,
    ToolCallType,
    ToolChoice,
    TopLogprob,
    Usage,
    VisionArchitecture,
    VisionAutoMapParams,
    Which,
)

# ---- Reference text, copied verbatim from REFERENCE.md ------------------------------------------------

EXPORTED_AT_RUNTIME = """AnyMoeConfig, AnyMoeExpertType, Architecture, ChatCompletionChunkResponse, ChatCompletionRequest,
ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice, CompletionRequest, CompletionResponse, Delta,
DiffusionArchitecture, ImageGenerationResponseFormat, Logprobs, ModelDType, ResponseLogprob, ResponseMessage,
Runner, ToolChoice, TopLogprob, Usage, VisionArchitecture, Which"""
STUB_ONLY = """TextAutoMapParams, VisionAutoMapParams, IsqOrganization, ToolCallType, CalledFunction, ToolCallResponse,
ImageChoice, ImageGenerationResponse"""

ENUM_TABLE = """
| `Architecture` | Mistral 0, Gemma 1, Mixtral 2, Llama 3, Phi2 4, Phi3 5, Qwen2 6, Gemma2 7, Starcoder2 8, Phi3_5MoE 9, DeepseekV2 10, DeepseekV3 11 (⚠ the stub leaves out Phi3) |
| `VisionArchitecture` | Phi3V 0, Idefics2 1, LLaVANext 2, LLaVA 3, VLlama 4, Qwen2VL 5, Idefics3 6, MiniCpmO 7, Phi4MM 8, Qwen2_5VL 9, Gemma3 10, Mistral3 11 |
| `DiffusionArchitecture` | Flux 0, FluxOffloaded 1 |
| `ModelDType` | Auto 0, BF16 1, F16 2, F32 3 |
| `ImageGenerationResponseFormat` | Url 0, B64Json 1 |
| `ToolChoice` | NoTools 0, Auto 1 |
| `IsqOrganization` (not exported) | Default 0, MoQE 1 |
"""

CLI_NAMES = {
    "Architecture": "mistral, gemma, mixtral, llama, phi2, phi3, qwen2, gemma2, starcoder2, phi3.5moe, deepseekv2, deepseekv3",
    "VisionArchitecture": "phi3v, idefics2, llava_next, llava, vllama, qwen2vl, idefics3, minicpmo, phi4mm, qwen2_5vl, gemma3, mistral3",
    "DiffusionArchitecture": "flux, flux-offloaded",
    "ModelDType": "auto, bf16, f16, f32",
}

# REFERENCE §1.3's table, but for the GGML variants the seed's defaults (issue 11): tok_model_id=None (the load
# then raises ValueError) and gqa=None (meaning 1) where the reference's runtime requires tok_model_id and has gqa=1.
WHICH_TABLE = """
| `Plain` | `(model_id, arch=None, tokenizer_json=None, topology=None, organization=None, write_uqff=None, from_uqff=None, dtype=ModelDType.Auto, imatrix=None, calibration_file=None, auto_map_params=None)` |
| `XLora` | `(xlora_model_id, order, arch=None, model_id=None, tokenizer_json=None, tgt_non_granular_index=None, topology=None, write_uqff=None, from_uqff=None, dtype=Auto, auto_map_params=None)` |
| `Lora` | `(adapters_model_id, order, arch=None, model_id=None, tokenizer_json=None, topology=None, write_uqff=None, from_uqff=None, dtype=Auto, auto_map_params=None)` |
| `GGUF` | `(quantized_model_id, quantized_filename, tok_model_id=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `XLoraGGUF` | `(quantized_model_id, quantized_filename, xlora_model_id, order, tok_model_id=None, tgt_non_granular_index=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `LoraGGUF` | `(quantized_model_id, quantized_filename, adapters_model_id, order, tok_model_id=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `GGML` | `(quantized_model_id, quantized_filename, tok_model_id=None, tokenizer_json=None, gqa=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `XLoraGGML` | `(quantized_model_id, quantized_filename, xlora_model_id, order, tok_model_id=None, tokenizer_json=None, tgt_non_granular_index=None, gqa=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `LoraGGML` | `(quantized_model_id, quantized_filename, adapters_model_id, order, tok_model_id=None, tokenizer_json=None, gqa=None, topology=None, dtype=Auto, auto_map_params=None)` |
| `VisionPlain` | `(model_id, arch, tokenizer_json=None, topology=None, write_uqff=None, from_uqff=None, dtype=Auto, max_edge=None, calibration_file=None, imatrix=None, auto_map_params=None)` |
| `DiffusionPlain` | `(model_id, arch, dtype=Auto)` |
"""

CHAT_SIGNATURE = """(messages, model, logprobs=False, n_choices=1, logit_bias=None, top_logprobs=None,
   max_tokens=None, presence_penalty=None, frequency_penalty=None, stop_seqs=None, temperature=None,
   top_p=None, top_k=None, stream=False, grammar=None, grammar_type=None, adapters=None, min_p=None,
   tool_schemas=None, tool_choice=None, dry_multiplier=None, dry_base=None, dry_allowed_length=None,
   dry_sequence_breakers=None)"""
COMPLETION_SIGNATURE = """(prompt, model, best_of=1, echo_prompt=False, presence_penalty=None, frequency_penalty=None,
   logit_bias=None, max_tokens=None, n_choices=1, stop_seqs=None, temperature=None, top_p=None, suffix=None,
   top_k=None, grammar=None, grammar_type=None, adapters=None, min_p=None, tool_schemas=None, tool_choice=None,
   dry_multiplier=None, dry_base=None, dry_allowed_length=None, dry_sequence_breakers=None)"""
ANYMOE_SIGNATURE = """(hidden_size:int, dataset_json:str, prefix:str, mlp:str, model_ids:list[str],
             expert_type:AnyMoeExpertType, layers:list[int]=[], lr=1e-3, epochs=100, batch_size=4,
             gate_model_id=None, training=True, loss_csv_path=None)"""

# Field lists of the seed document's `Which` dataclasses (seed/mistralrs-python-API.md).
SEED_WHICH_FIELDS = {
    "Plain": "model_id arch tokenizer_json topology organization write_uqff dtype calibration_file imatrix",
    "XLora": "xlora_model_id order arch model_id tokenizer_json tgt_non_granular_index topology write_uqff dtype",
    "Lora": "adapters_model_id order arch model_id tokenizer_json topology write_uqff dtype",
    "GGUF": "quantized_model_id quantized_filename tok_model_id topology dtype",
    "XLoraGGUF": "quantized_model_id quantized_filename xlora_model_id order tok_model_id tgt_non_granular_index "
                 "topology dtype",
    "LoraGGUF": "quantized_model_id quantized_filename adapters_model_id order tok_model_id topology dtype",
    "GGML": "quantized_model_id quantized_filename tok_model_id tokenizer_json gqa topology dtype",
    "XLoraGGML": "quantized_model_id quantized_filename xlora_model_id order tok_model_id tgt_non_granular_index "
                 "tokenizer_json gqa topology dtype",
    "LoraGGML": "quantized_model_id quantized_filename adapters_model_id order tok_model_id tokenizer_json "
                "topology dtype",
    "VisionPlain": "model_id arch tokenizer_json topology write_uqff dtype max_edge calibration_file imatrix",
    "DiffusionPlain": "model_id arch dtype",
}


def _parse_signature(text: str) -> list[tuple[str, object]]:
    """`(a, b=None, c=Auto)` -> [("a", empty), ("b", None), ("c", ModelDType.Auto)] (annotations dropped)."""
    names = {"None": None, "True": True, "False": False, "Auto": ModelDType.Auto, "ModelDType": ModelDType}
    params = []
    for item in text.strip().strip("()").replace("\n", " ").split(","):
        name, _, default = item.partition("=")
        name = name.split(":")[0].strip()
        params.append((name, eval(default, names) if default else inspect.Parameter.empty))  # noqa: S307
    return params


def _actual_signature(cls: type) -> list[tuple[str, object]]:
    result = []
    for param in inspect.signature(cls).parameters.values():
        default = param.default
        for spec in dataclasses.fields(cls):
            if spec.name == param.name and spec.default_factory is not dataclasses.MISSING:
                default = spec.default_factory()
        result.append((param.name, default))
    return result


def _which_table() -> dict[str, str]:
    rows = {}
    for line in WHICH_TABLE.strip().splitlines():
        cells = line.split("|")
        rows[cells[1].strip().strip("`")] = cells[2].split("`")[1]
    return rows


def _usage() -> Usage:
    return Usage(completion_tokens=3, prompt_tokens=5, total_tokens=8, avg_tok_per_sec=8.0,
                 avg_prompt_tok_per_sec=10.0, avg_compl_tok_per_sec=6.0, total_time_sec=1.0,
                 total_prompt_time_sec=0.5, total_completion_time_sec=0.5)


# ---- Names ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n.strip() for n in (EXPORTED_AT_RUNTIME + "," + STUB_ONLY).split(",")])
def test_public_name_importable(name: str) -> None:
    import mistralrs

    assert name in mistralrs.__all__
    assert inspect.isclass(getattr(mistralrs, name))


# ---- Enums ---------------------------------------------------------------------------------------------

def _enum_rows() -> list[tuple[str, list[tuple[str, int]]]]:
    rows = []
    for line in ENUM_TABLE.strip().splitlines():
        cells = line.split("|")
        members = cells[2].split("(")[0]
        pairs = [(item.split()[0], int(item.split()[1])) for item in members.split(",")]
        rows.append((cells[1].split("`")[1], pairs))
    return rows


@pytest.mark.parametrize("enum_name,members", _enum_rows())
def test_enum_ordinals_and_repr(enum_name: str, members: list[tuple[str, int]]) -> None:
    enum = getattr(api, enum_name)
    assert [(m.name, int(m)) for m in enum] == members
    for name, ordinal in members:
        assert repr(getattr(enum, name)) == f"{enum_name}.{name}"
        assert str(getattr(enum, name)) == f"{enum_name}.{name}"
        assert enum(ordinal) is getattr(enum, name)


def test_enums_of_different_types_are_distinct() -> None:
    assert Architecture.Mistral == 0 and Architecture.Mistral != 1
    assert Architecture.Mistral != VisionArchitecture.Phi3V and not Architecture.Mistral == ModelDType.Auto
    assert len({Architecture.Mistral: 1, VisionArchitecture.Phi3V: 2, DiffusionArchitecture.Flux: 3}) == 3
    assert {Architecture.Llama: "x"}[Architecture.from_str("llama")] == "x"


def test_which_pickles() -> None:
    which = Which.VisionPlain("m", "gemma3", auto_map_params=VisionAutoMapParams(max_num_images=2))
    assert pickle.loads(pickle.dumps(which)) == which
    assert pickle.loads(pickle.dumps(AnyMoeExpertType.FineTuned())) == AnyMoeExpertType.FineTuned()


def test_tool_call_type_and_seed_aliases() -> None:
    assert int(ToolCallType.Function) == 0 and repr(ToolCallType.Function) == "ToolCallType.Function"
    assert VisionArchitecture.LLaVaNext is VisionArchitecture.LLaVANext
    assert VisionArchitecture.LLaVa is VisionArchitecture.LLaVA
    assert len(list(VisionArchitecture)) == 12


@pytest.mark.parametrize("enum_name", list(CLI_NAMES))
def test_enum_from_cli_strings(enum_name: str) -> None:
    enum = getattr(api, enum_name)
    spellings = [s.strip() for s in CLI_NAMES[enum_name].split(",")]
    assert [enum.from_str(s) for s in spellings] == list(enum)
    assert [enum.from_str(s.upper()) for s in spellings] == list(enum)
    with pytest.raises(ValueError) as err:
        enum.from_str("no-such-name")
    for spelling in spellings:
        assert spelling in str(err.value)


def test_other_enums_from_str() -> None:
    assert IsqOrganization.from_str("moqe") is IsqOrganization.MoQE
    assert IsqOrganization.from_str("Default") is IsqOrganization.Default
    assert ToolChoice.from_str("none") is ToolChoice.NoTools
    assert ToolChoice.from_str("auto") is ToolChoice.Auto
    assert api.ImageGenerationResponseFormat.from_str("b64_json") is api.ImageGenerationResponseFormat.B64Json
    assert Architecture.from_str(Architecture.Llama) is Architecture.Llama
    with pytest.raises(TypeError):
        Architecture.from_str(3)


# ---- Which ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,signature", list(_which_table().items()))
def test_which_signature_matches_reference(variant: str, signature: str) -> None:
    cls = getattr(Which, variant)
    assert _actual_signature(cls) == _parse_signature(signature)
    assert cls.__qualname__ == f"Which.{variant}"


def _seed_value(field_name: str) -> object:
    return {
        "arch": None, "dtype": ModelDType.F16, "organization": IsqOrganization.Default, "gqa": 8,
        "tgt_non_granular_index": 2, "max_edge": 512, "quantized_filename": "model.Q4_K_M.gguf",
    }.get(field_name, f"some/{field_name}")


@pytest.mark.parametrize("variant", list(SEED_WHICH_FIELDS))
def test_which_constructible_from_seed_fields(variant: str) -> None:
    cls = getattr(Which, variant)
    kwargs = {name: _seed_value(name) for name in SEED_WHICH_FIELDS[variant].split()}
    if variant == "VisionPlain":
        kwargs["arch"] = VisionArchitecture.Qwen2VL
    if variant == "DiffusionPlain":
        kwargs["arch"] = DiffusionArchitecture.Flux
    which = cls(**kwargs)
    assert isinstance(which, Which) and isinstance(which, cls)
    for name, value in kwargs.items():
        assert getattr(which, name) == value
    assert repr(which).startswith(f"Which.{variant}(")
    assert which == cls(**kwargs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        which.dtype = ModelDType.F32


def test_seed_gguf_example() -> None:
    which = Which.GGUF(
        tok_model_id="mistralai/Mistral-7B-Instruct-v0.1",
        quantized_model_id="TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
        quantized_filename="mistral-7b-instruct-v0.1.Q4_K_M.gguf",
    )
    assert which.quantized_filename == "mistral-7b-instruct-v0.1.Q4_K_M.gguf"
    assert which.dtype is ModelDType.Auto and which.topology is None


def test_which_positional_construction() -> None:
    plain = Which.Plain("mistralai/Mistral-7B", Architecture.Mistral)
    assert plain.model_id == "mistralai/Mistral-7B" and plain.arch is Architecture.Mistral
    ggml = Which.GGML("TheBloke/Llama-2-GGML", "llama.ggmlv3.q4_0.bin", "meta-llama/Llama-2-7b")
    assert ggml.tok_model_id == "meta-llama/Llama-2-7b" and ggml.gqa is None
    xlora = Which.XLoraGGUF("q", ["a-00001.gguf", "a-00002.gguf"], "x", "ordering.json")
    assert xlora.quantized_filename == ["a-00001.gguf", "a-00002.gguf"] and xlora.tok_model_id is None
    vision = Which.VisionPlain("Qwen/Qwen2-VL-2B-Instruct", VisionArchitecture.Qwen2VL, None, None, None, None,
                               ModelDType.BF16, 1024)
    assert vision.max_edge == 1024 and vision.dtype is ModelDType.BF16
    bare = Which.GGML("q", "f")  # as the seed: tok_model_id optional (the load needs it)
    assert bare.tok_model_id is None and bare.tokenizer_json is None and bare.gqa is None


def test_which_string_enums_and_paths() -> None:
    plain = Which.Plain(model_id=pathlib.Path("/models/phi"), arch="phi3.5moe", dtype="BF16", organization="moqe",
                        auto_map_params=TextAutoMapParams(max_batch_size=2))
    assert plain.model_id == "/models/phi"
    assert plain.arch is Architecture.Phi3_5MoE and plain.dtype is ModelDType.BF16
    assert plain.organization is IsqOrganization.MoQE
    assert Which.VisionPlain("m", "llava_next").arch is VisionArchitecture.LLaVANext
    assert Which.DiffusionPlain("m", "flux-offloaded").arch is DiffusionArchitecture.FluxOffloaded
    assert Which.Plain("m", "llama") == Which.Plain("m", Architecture.Llama)


@pytest.mark.parametrize("build,error,field_name", [
    (lambda: Which.Plain(3), TypeError, "Which.Plain.model_id"),
    (lambda: Which.Plain("m", arch="gpt5"), ValueError, "Which.Plain.arch"),
    (lambda: Which.Plain("m", arch=VisionArchitecture.Gemma3), TypeError, "Which.Plain.arch"),
    (lambda: Which.Plain("m", arch=3), TypeError, "Which.Plain.arch"),
    (lambda: Which.Plain("m", dtype="f64"), ValueError, "Which.Plain.dtype"),
    (lambda: Which.Plain("m", organization="all"), ValueError, "Which.Plain.organization"),
    (lambda: Which.Plain("m", topology=1), TypeError, "Which.Plain.topology"),
    (lambda: Which.Plain("m", auto_map_params=VisionAutoMapParams()), TypeError, "Which.Plain.auto_map_params"),
    (lambda: Which.Plain(""), ValueError, "Which.Plain.model_id"),
    (lambda: Which.GGUF("q", []), ValueError, "Which.GGUF.quantized_filename"),
    (lambda: Which.GGUF("q", 5), TypeError, "Which.GGUF.quantized_filename"),
    (lambda: Which.GGUF("q", ["a.gguf", 5]), TypeError, "Which.GGUF.quantized_filename[1]"),
    (lambda: Which.GGML("q", ["a.bin"], "t"), TypeError, "Which.GGML.quantized_filename"),
    (lambda: Which.GGML("q", "a.bin", "t", gqa=0), ValueError, "Which.GGML.gqa"),
    (lambda: Which.GGML("q", "a.bin", 7), TypeError, "Which.GGML.tok_model_id"),
    (lambda: Which.XLora("x", "o.json", tgt_non_granular_index=-1), ValueError, "Which.XLora.tgt_non_granular_index"),
    (lambda: Which.XLora("x", "o.json", tgt_non_granular_index=True), TypeError,
     "Which.XLora.tgt_non_granular_index"),
    (lambda: Which.VisionPlain("m", None), TypeError, "Which.VisionPlain.arch"),
    (lambda: Which.VisionPlain("m", Architecture.Llama), TypeError, "Which.VisionPlain.arch"),
    (lambda: Which.VisionPlain("m", "phi3v", max_edge=0), ValueError, "Which.VisionPlain.max_edge"),
    (lambda: Which.VisionPlain("m", "phi3v", auto_map_params=TextAutoMapParams()), TypeError,
     "Which.VisionPlain.auto_map_params"),
    (lambda: Which.DiffusionPlain("m", "llama"), ValueError, "Which.DiffusionPlain.arch"),
])
def test_which_validation_names_field(build, error, field_name: str) -> None:
    with pytest.raises(error) as err:
        build()
    assert field_name in str(err.value)


def test_auto_map_params_and_anymoe_defaults() -> None:
    assert (TextAutoMapParams().max_seq_len, TextAutoMapParams().max_batch_size) == (4096, 1)
    vision = VisionAutoMapParams()
    assert (vision.max_seq_len, vision.max_batch_size, vision.max_num_images, vision.max_image_length) == \
        (4096, 1, 1, 1024)
    assert _actual_signature(AnyMoeConfig) == _parse_signature(ANYMOE_SIGNATURE)
    lora = AnyMoeExpertType.LoraAdapter(rank=64, alpha=16, target_modules=["gate_proj"])
    assert isinstance(lora, AnyMoeExpertType) and isinstance(AnyMoeExpertType.FineTuned(), AnyMoeExpertType)
    assert (lora.rank, lora.alpha, lora.target_modules) == (64, 16.0, ["gate_proj"])
    config = AnyMoeConfig(hidden_size=4096, dataset_json="amoe.json", prefix="model.layers", mlp="mlp",
                          model_ids=["HuggingFaceH4/zephyr-7b-beta"], expert_type=AnyMoeExpertType.FineTuned(),
                          layers=list(range(16)), loss_csv_path="loss.csv")
    assert config.training is True and config.layers == list(range(16))
    with pytest.raises(ValueError, match="loss_csv_path"):
        AnyMoeConfig(4096, "a.json", "model.layers", "mlp", ["m"], AnyMoeExpertType.FineTuned(),
                     loss_csv_path="loss.txt")
    with pytest.raises(TypeError, match="rank"):
        AnyMoeExpertType.LoraAdapter("64", 16.0, ["gate_proj"])
    with pytest.raises(ValueError, match="max_seq_len"):
        TextAutoMapParams(max_seq_len=0)


# ---- Requests ------------------------------------------------------------------------------------------

def test_request_signatures_match_reference() -> None:
    seed = [("seed", None)]
    assert _actual_signature(ChatCompletionRequest) == _parse_signature(CHAT_SIGNATURE) + seed
    assert _actual_signature(CompletionRequest) == _parse_signature(COMPLETION_SIGNATURE) + [("stream", False)] + seed


def test_chat_request_seed_example_and_defaults() -> None:
    request = ChatCompletionRequest(
        model="mistral",
        messages=[{"role": "user", "content": "Tell me a story about the Rust type system."}],
        max_tokens=256, presence_penalty=1.0, top_p=0.1, temperature=0.1,
    )
    assert request.max_tokens == 256 and request.top_p == 0.1 and request.temperature == 0.1
    assert request.n_choices == 1 and request.stream is False and request.top_logprobs is None
    assert request.tool_choice is None and request.seed is None
    assert ChatCompletionRequest("hi", "m", logprobs=True).top_logprobs == 1
    assert ChatCompletionRequest("hi", "m", logprobs=True, top_logprobs=5).top_logprobs == 5
    assert ChatCompletionRequest("hi", "m").messages == [{"role": "user", "content": "hi"}]


def test_request_normalisation() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "d",
                                             "arguments": {"type": "object"}}}
    request = ChatCompletionRequest(
        "hi", "m", logit_bias={"42": 1, 7: -2.5}, stop_seqs="\n\n", tool_schemas=[json.dumps(tool)],
        grammar={"type": "object"}, grammar_type="json_schema", seed=3,
    )
    assert request.logit_bias == {42: 1.0, 7: -2.5}
    assert request.stop_seqs == ["\n\n"]
    assert request.tool_schemas == [{"type": "function", "function": {
        "name": "get_weather", "description": "d", "parameters": {"type": "object"}}}]
    assert request.tool_choice is ToolChoice.Auto
    assert json.loads(request.grammar) == {"type": "object"}
    assert ChatCompletionRequest("hi", "m", tool_schemas=[tool], tool_choice="none").tool_choice is ToolChoice.NoTools
    forced = {"type": "function", "function": {"name": "get_weather"}}
    assert ChatCompletionRequest("hi", "m", tool_schemas=[tool], tool_choice=forced).tool_choice == forced
    completion = CompletionRequest("Once upon", "m", best_of=2, echo_prompt=True, suffix="!", stream=True)
    assert (completion.best_of, completion.echo_prompt, completion.suffix, completion.stream) == (2, True, "!", True)


def test_accepted_message_formats() -> None:
    image_chat = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is shown in this image?"},
    ]}]
    assert ChatCompletionRequest(image_chat, "m").messages == image_chat
    general = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "b64data"},
                                     {"type": "image_url", "image_url": {"url": "/tmp/x.png", "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "call-1", "name": "f"},
    ]
    assert ChatCompletionRequest(general, "m").messages == general


@pytest.mark.parametrize("kwargs,error,text", [
    (dict(messages=("a", "b")), TypeError, "Expected a string or list of dicts."),
    (dict(messages=["hi"]), TypeError, "Expected a string or list of dicts."),
    (dict(messages=[]), ValueError, "Received an empty prompt."),
    (dict(messages=""), ValueError, "Received an empty prompt."),
    (dict(messages=[{"content": "x"}]), ValueError, "messages[0]"),
    (dict(messages=[{"role": "user", "content": 5}]), TypeError, "messages[0].content"),
    (dict(messages=[{"role": "user", "content": None}]), ValueError, "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), ValueError, "messages[0].tool_calls"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}]), TypeError,
     "messages[0].tool_calls[0].function.name"),
    (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
     ValueError, "messages[0].content[0]"),
    (dict(messages=[{"role": "user", "content": [{"type": "audio", "audio": "a"}]}]), ValueError,
     "messages[0].content[0].type"),
    (dict(messages=[{"role": "user", "content": "x", "name": 3}]), TypeError, "messages[0].name"),
    (dict(model=None), TypeError, "model"),
    (dict(n_choices=0), ValueError, "Number of choices must be greater than 0."),
    (dict(n_choices=0), ValueError, "n_choices"),
    (dict(n_choices=1.5), TypeError, "n_choices"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(min_p=1.0), ValueError, "min_p"),
    (dict(presence_penalty=float("nan")), ValueError, "presence_penalty"),
    (dict(presence_penalty=1e308), ValueError, "presence_penalty must be within +-3.4e38"),
    (dict(frequency_penalty=-1e308), ValueError, "frequency_penalty"),
    (dict(logit_bias={5: 1e39}), ValueError, "logit_bias[5]"),
    (dict(temperature=1e300), ValueError, "temperature"),
    (dict(logit_bias={"x": 1.0}), TypeError, "logit_bias"),
    (dict(logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={1: "a"}), TypeError, "logit_bias"),
    (dict(logit_bias=[1]), TypeError, "logit_bias"),
    (dict(logprobs=1), TypeError, "logprobs"),
    (dict(logprobs=True, top_logprobs=21), ValueError, "top_logprobs"),
    (dict(stream="yes"), TypeError, "stream"),
    (dict(stop_seqs=[1]), TypeError, "stop_seqs[0]"),
    (dict(stop_seqs=[""]), ValueError, "stop_seqs"),
    (dict(grammar="a+"), ValueError, "grammar_type"),
    (dict(grammar_type="regex"), ValueError, "grammar"),
    (dict(grammar="a+", grammar_type="ebnf"), ValueError, "grammar_type"),
    (dict(grammar="{not json", grammar_type="json_schema"), ValueError, "grammar"),
    (dict(adapters="adapter_1"), TypeError, "adapters"),
    (dict(tool_schemas=["{bad json"]), ValueError, "tool_schemas[0]"),
    (dict(tool_schemas=[{"type": "function"}]), ValueError, "tool_schemas[0]"),
    (dict(tool_choice="sometimes"), ValueError, "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "f"}}), ValueError, "tool_choice"),
    (dict(dry_multiplier=-1.0), ValueError, "dry_multiplier"),
    (dict(dry_base=0.0), ValueError, "dry_base"),
    (dict(dry_allowed_length=-1), ValueError, "dry_allowed_length"),
    (dict(dry_sequence_breakers=["\n", 2]), TypeError, "dry_sequence_breakers[1]"),
    (dict(seed="1"), TypeError, "seed"),
])
def test_chat_request_validation_names_field(kwargs: dict, error: type, text: str) -> None:
    arguments = {"messages": "hi", "model": "m", **kwargs}
    with pytest.raises(error) as err:
        ChatCompletionRequest(**arguments)
    assert text in str(err.value)


def test_large_float32_values_stay_accepted() -> None:
    """The reference takes any float32 (OpenAI's ranges apply over HTTP only); only infinite float32s are refused."""
    request = ChatCompletionRequest(messages="hi", model="m", presence_penalty=-3e38, frequency_penalty=5.0,
                                    logit_bias={5: -1e9}, temperature=7.0)
    assert (request.presence_penalty, request.logit_bias, request.temperature) == (-3e38, {5: -1e9}, 7.0)
    assert CompletionRequest(prompt="p", model="m", best_of=1, n_choices=3).best_of == 1   # reference default


@pytest.mark.parametrize("kwargs,error,text", [
    (dict(prompt=""), ValueError, "Received an empty prompt."),
    (dict(prompt=["a"]), TypeError, "prompt"),
    (dict(best_of=0), ValueError, "best_of"),
    (dict(echo_prompt=None), TypeError, "echo_prompt"),
    (dict(suffix=1), TypeError, "suffix"),
    (dict(n_choices=0), ValueError, "Number of choices must be greater than 0."),
    (dict(top_k=1.0), TypeError, "top_k"),
    (dict(stream=1), TypeError, "stream"),
])
def test_completion_request_validation_names_field(kwargs: dict, error: type, text: str) -> None:
    arguments = {"prompt": "Once upon a time", "model": "m", **kwargs}
    with pytest.raises(error) as err:
        CompletionRequest(**arguments)
    assert text in str(err.value)


# ---- Responses -----------------------------------------------------------------------------------------

def test_chat_response_to_dict() -> None:
    call = ToolCallResponse(id="call-1", function=CalledFunction(name="f", arguments="{\"x\": 1}"))
    assert call.tp is ToolCallType.Function and call.type is ToolCallType.Function
    assert ToolCallResponse(function=CalledFunction(name="g", arguments="{}")).id.startswith("call-")
    logprobs = Logprobs(content=[ResponseLogprob(token="Hi", logprob=-0.5, bytes=[72, 105],
                                                 top_logprobs=[TopLogprob(token=17, logprob=-0.5, bytes="Hi")])])
    response = ChatCompletionResponse(
        id="0", model="m", usage=_usage(), created=1700000000,
        choices=[Choice(finish_reason="stop", index=0, logprobs=logprobs,
                        message=ResponseMessage(content=None, tool_calls=[call]))],
    )
    assert response.to_dict() == {
        "id": "0", "created": 1700000000, "model": "m", "system_fingerprint": "local", "object": "chat.completion",
        "usage": {**dataclasses.asdict(_usage()), "prompt_tokens_details": {"cached_tokens": 0}},
        "choices": [{
            "finish_reason": "stop", "index": 0,
            "message": {"content": None, "role": "assistant", "tool_calls": [
                {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                      "top_logprobs": [{"token": 17, "logprob": -0.5, "bytes": "Hi"}]}]},
        }],
    }
    json.dumps(response.to_dict())
    reference_fields = ("completion_tokens, prompt_tokens, total_tokens, avg_tok_per_sec, avg_prompt_tok_per_sec, "
                        "avg_compl_tok_per_sec, total_time_sec, total_prompt_time_sec, total_completion_time_sec")
    assert [f.name for f in dataclasses.fields(Usage)][:9] == reference_fields.split(", ")
    cached = dataclasses.replace(_usage(), cached_prompt_tokens=4).to_dict()
    assert cached["cached_prompt_tokens"] == 4 and cached["prompt_tokens_details"] == {"cached_tokens": 4}


def test_chunk_completion_and_image_responses() -> None:
    chunk = ChatCompletionChunkResponse(id="1", model="m", choices=[
        ChunkChoice(finish_reason=None, index=0, delta=Delta(content="Hel"))])
    assert abs(chunk.created - time.time()) < 24 * 3600  # unix seconds, not milliseconds
    assert chunk.to_dict()["object"] == "chat.completion.chunk" and chunk.usage is None
    assert chunk.to_dict()["choices"] == [{"finish_reason": None, "index": 0, "logprobs": None,
                                           "delta": {"content": "Hel", "role": "assistant", "tool_calls": None}}]
    completion = CompletionResponse(id="2", model="m", usage=_usage(), choices=[
        CompletionChoice(finish_reason="length", index=0, text=" there was")])
    body = completion.to_dict()
    assert body["object"] == "text_completion" and body["system_fingerprint"] == "local"
    assert body["choices"] == [{"finish_reason": "length", "index": 0, "text": " there was", "logprobs": None}]
    image = ImageGenerationResponse(created=5, data=[ImageChoice(url="image-generation-x.png")])
    assert image.choices is image.data
    assert image.to_dict() == {"created": 5, "data": [{"url": "image-generation-x.png", "b64_json": None}]}
