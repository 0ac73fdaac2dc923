"""UQFF (REFERENCE §4): the blob codec, the file layout, and files written by the reference wheel.

The fixtures under tests/fixtures/uqff were written by mistralrs 0.5.0 itself (make_reference_uqff.py) from tiny
Phi-3 models that this test rebuilds from the same seeded generator. They are the independent reference: their
blobs must decode and re-encode byte for byte, the models they load must track the full-precision logits, and
our ISQ of the same weights must produce the same blobs where our quantizer follows the reference's arithmetic
(OUR_ISQ_MATCH says where it does not, and why).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mistralrs.api.enums import IsqOrganization, ModelDType
from mistralrs.api.which import Which
from mistralrs.quant.ggml_tensor import GGMLTensor
from mistralrs.quant.isq import isq_layer_names, isq_layer_states
from mistralrs.quant.isq_state import Fp8Params, HqqParams, IsqLayerState
from mistralrs.quant.uqff import (
    GGML_TYPE_CODES,
    STD_DTYPE_CODES,
    UQFF_VERSION,
    deserialize_layer,
    iter_uqff_file,
    serialize_layer,
    write_uqff_file,
)
from mistralrs.worker.forward_batch import ForwardBatch, SeqChunk, allocate_kv_caches
from tests.fixtures.uqff import make_reference_uqff as ref
from tests.loading import load_which
from tests.tiny_models import make_tiny_model_dir

FIXTURES = os.path.dirname(os.path.abspath(ref.__file__))
with open(os.path.join(FIXTURES, "manifest.json")) as _f:
    MANIFEST = json.load(_f)
PROMPT = [5, 17, 33, 2, 60, 71, 9, 44, 12, 80, 3, 27]
CPU = torch.device("cpu")

# Largest relative error ||logits - full|| / ||full|| allowed for each reference file against the full-precision
# model. Measured: Q8_0 0.014, Q4K on 64-wide inputs (all Q4_1) 0.21, HQQ4 0.19, HQQ8 0.014, FP8 0.071, Q4K on
# 256-wide inputs 0.20; the bounds leave 1.5x headroom (a misread blob gives errors near 1).
RELATIVE_ERROR_BOUND = {"small-q8_0.uqff": 0.025, "small-q4k.uqff": 0.32, "small-hqq4.uqff": 0.3,
                        "small-hqq8.uqff": 0.025, "small-fp8.uqff": 0.11, "k256-q4k.uqff": 0.3}
# How our ISQ of the same weights compares with the reference's file: "exact" (the same blobs), "hqq" (the same
# codes and scales; zeros equal to float32 rounding, from the optimizer's reduction order), "quality" (another
# valid encoding: our Q4_K uses llama.cpp's scale search where candle uses its own make_qkx1_quants, and our FP8
# scale is 448 / absmax where the reference's float8 crate uses 416 / absmax).
OUR_ISQ_MATCH = {"small-q8_0.uqff": "exact", "small-q4k.uqff": "exact", "small-hqq4.uqff": "hqq",
                 "small-hqq8.uqff": "hqq", "small-fp8.uqff": "quality", "k256-q4k.uqff": "quality"}


def _fixture_ids() -> list[str]:
    return [entry["uqff"] for entry in MANIFEST["fixtures"]]


def _fixture(uqff: str) -> dict:
    return next(entry for entry in MANIFEST["fixtures"] if entry["uqff"] == uqff)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    """The full-precision fixture models, rebuilt from their seeds (checked against the manifest's digests)."""
    dirs = {}
    for name, spec in ref.MODELS.items():
        path = str(tmp_path_factory.mktemp(f"phi3-{name}"))
        weights = ref.write_model_dir(spec, path)
        assert ref.weights_digest(weights) == MANIFEST["models"][name]["weights_sha256"], \
            "torch's seeded generator no longer reproduces the fixture weights; rerun make_reference_uqff.py"
        dirs[name] = path
    return dirs


def _load(model_id: str, **kwargs):
    in_situ_quant = kwargs.pop("in_situ_quant", None)
    kwargs.setdefault("dtype", ModelDType.F32)
    which = Which.Plain(model_id=model_id, **kwargs)
    return load_which(which, device=CPU, show_progress=False, in_situ_quant=in_situ_quant)


def _logits(loaded) -> torch.Tensor:
    """Logits of every prompt position, `[len(PROMPT), vocab]` (one prefill step over one KV block)."""
    model = loaded.model
    kv_caches = allocate_kv_caches(model.kv_cache_spec(), 2, 16, loaded.dtype, "cpu")
    fb = ForwardBatch.build([SeqChunk(token_ids=PROMPT, start_pos=0, block_ids=[0])], 16, kv_caches, "cpu")
    with torch.inference_mode():
        return model.compute_logits(model(fb.input_ids, fb.positions, fb))


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.fixture(scope="module")
def full_precision_logits(model_dirs) -> dict[str, torch.Tensor]:
    return {name: _logits(_load(path)) for name, path in model_dirs.items()}


# ---- the codec -----------------------------------------------------------------------------------------------


def _std(tensor: torch.Tensor, code: int) -> bytes:
    """A "std tensor" assembled by hand from REFERENCE §4.2."""
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return struct.pack("<III", len(data), code, tensor.dim()) + struct.pack(f"<{tensor.dim()}I", *tensor.shape) + data


def test_layouts_match_the_specification():
    """Each of the four layer kinds, with and without bias, against bytes assembled from the table."""
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(2, generator=gen)
    head = struct.pack("<I", 0x102)
    blocks = torch.randint(0, 256, (2, 34), dtype=torch.uint8, generator=gen)
    ggml = IsqLayerState(bias=bias, ggml=GGMLTensor(blocks, "Q8_0", (2, 32)))
    assert serialize_layer(ggml) == (head + bytes([0]) + struct.pack("<IBIIII", 68, 1, 8, 2, 2, 32)
                                     + blocks.numpy().tobytes() + _std(bias, 6))
    dense = torch.randn(2, 3, generator=gen).to(torch.bfloat16)
    assert serialize_layer(IsqLayerState(dense=dense)) == head + bytes([1, 0]) + _std(dense, 5)
    w_q = torch.randint(0, 256, (32, 2), dtype=torch.uint8, generator=gen)
    scales, zeros = torch.rand(1, 2, generator=gen), torch.rand(1, 2, generator=gen)
    hqq = HqqParams(w_q=w_q, scales=scales, zeros=zeros, shape=(2, 64), bits=4)
    assert serialize_layer(IsqLayerState(bias=bias.half(), hqq=hqq)) == (
        head + bytes([2, 1]) + _std(w_q, 0) + _std(scales, 6) + _std(zeros, 6) + struct.pack("<III", 2, 2, 64)
        + struct.pack("<BIBIBB", 4, 64, 0, 10, 0, 1) + _std(bias.half(), 4))
    weight = torch.randn(2, 4, generator=gen).to(torch.float8_e4m3fn)
    fp8 = Fp8Params(weight=weight, dequant_w_scale=0.25, dequant_x_scale=0.5, quant_scale=4.0,
                    layer_dtype=torch.float8_e4m3fn)
    assert serialize_layer(IsqLayerState(fp8=fp8)) == (head + bytes([3, 0]) + _std(weight, 9)
                                                       + struct.pack("<fffI", 0.25, 0.5, 4.0, 9))
    for state in (ggml, IsqLayerState(dense=dense), IsqLayerState(bias=bias.half(), hqq=hqq), IsqLayerState(fp8=fp8)):
        blob = serialize_layer(state)
        assert serialize_layer(deserialize_layer(blob)) == blob
    # As the reference's layers hold it: float32 beside GGML blocks, the model dtype otherwise.
    assert serialize_layer(ggml, torch.bfloat16).endswith(_std(bias, 6))
    assert serialize_layer(IsqLayerState(bias=bias, hqq=hqq), torch.bfloat16).endswith(_std(bias.bfloat16(), 5))


@pytest.mark.parametrize("uqff", _fixture_ids())
def test_reference_blobs_decode_and_reencode_byte_for_byte(uqff):
    entry = _fixture(uqff)
    path = os.path.join(FIXTURES, entry["model"], uqff)
    with safe_open(path, framework="pt") as f:
        blobs = [f.get_tensor(str(i)) for i in range(len(list(f.keys())))]
    states = list(iter_uqff_file(path, len(blobs)))
    for blob, state in zip(blobs, states):
        assert serialize_layer(state) == blob.numpy().tobytes()
    kinds = {state.kind for state in states}
    isq = entry["in_situ_quant"]
    expected_kind = {"HQQ4": "hqq", "HQQ8": "hqq", "FP8": "fp8"}.get(isq, "ggml")
    assert kinds == {expected_kind}
    if isq == "Q4K":  # widths of 64 fall back to Q4_1 (the reference's rule); 256-wide inputs are Q4_K
        types = [state.ggml.ggml_type for state in states]
        assert types == (["Q4_1"] * len(states) if entry["model"] == "small" else ["Q4_K"] * 4 + ["Q4_1"])


def test_type_codes_are_ggml_and_safetensors_ids():
    """The GGML dtype codes are ggml's type ids (as the `gguf` package numbers them)."""
    from gguf.constants import GGMLQuantizationType

    assert all(GGMLQuantizationType(code).name == name for name, code in GGML_TYPE_CODES.items())
    assert STD_DTYPE_CODES[torch.float8_e4m3fn] == 9 and STD_DTYPE_CODES[torch.int16] == 8
    assert UQFF_VERSION == 0x102


def test_version_minor_and_patch_are_not_checked_but_major_is():
    blob = bytearray(serialize_layer(IsqLayerState(dense=torch.ones(2, 2))))
    blob[0:4] = struct.pack("<I", 0x00_07_09)
    deserialize_layer(bytes(blob))
    blob[0:4] = struct.pack("<I", 0x01_01_02)
    with pytest.raises(ValueError, match="major version 1"):
        deserialize_layer(bytes(blob))


def test_truncated_and_corrupted_blobs_are_errors_naming_file_and_layer(tmp_path):
    states = [IsqLayerState(dense=torch.ones(4, 4)),
              IsqLayerState(bias=torch.ones(2), ggml=GGMLTensor(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0", (2, 32)))]
    good = [serialize_layer(s) for s in states]
    for cut in (3, 5, 20, len(good[1]) - 1):
        with pytest.raises(ValueError, match="truncated"):
            deserialize_layer(good[1][:cut])
    with pytest.raises(ValueError, match="trailing"):
        deserialize_layer(good[1] + b"\0")
    bad_type = good[1][:4] + bytes([7]) + good[1][5:]
    with pytest.raises(ValueError, match="unknown layer type 7"):
        deserialize_layer(bad_type)
    path = str(tmp_path / "bad.uqff")
    save_file({"0": torch.frombuffer(bytearray(good[0]), dtype=torch.uint8),
               "1": torch.frombuffer(bytearray(good[1][:-3]), dtype=torch.uint8)}, path)
    with pytest.raises(ValueError, match=r"bad\.uqff.*layer 1: blob truncated"):
        list(iter_uqff_file(path, 2))
    with pytest.raises(ValueError, match=r"number of artifacts \(2\) does not match the number of ISQ layers \(3\)"):
        list(iter_uqff_file(path, 3))


def test_write_uqff_file_layout(tmp_path):
    states = [IsqLayerState(dense=torch.full((2, 2), float(i))) for i in range(12)]
    path = str(tmp_path / "sub" / "x.uqff")
    write_uqff_file(path, states)
    tensors = load_file(path)
    assert sorted(tensors, key=int) == [str(i) for i in range(12)]
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in tensors.values())
    assert tensors["11"].numpy().tobytes() == serialize_layer(states[11])
    with pytest.raises(ValueError, match=r"extension must be `\.uqff`"):
        write_uqff_file(str(tmp_path / "x.safetensors"), states)


# ---- whole models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uqff", _fixture_ids())
def test_reference_uqff_tracks_full_precision(uqff, full_precision_logits):
    entry = _fixture(uqff)
    loaded = _load(os.path.join(FIXTURES, entry["model"]), from_uqff=uqff)
    assert _relative_error(_logits(loaded), full_precision_logits[entry["model"]]) <= RELATIVE_ERROR_BOUND[uqff]


def _reference_blobs(entry: dict) -> list[bytes]:
    with safe_open(os.path.join(FIXTURES, entry["model"], entry["uqff"]), framework="pt") as f:
        return [f.get_tensor(str(i)).numpy().tobytes() for i in range(len(list(f.keys())))]


@pytest.mark.parametrize("uqff", _fixture_ids())
def test_our_isq_matches_the_reference_uqff(uqff, model_dirs, full_precision_logits, tmp_path):
    """Our ISQ of the same weights, written through `write_uqff`, against the reference's file (OUR_ISQ_MATCH)."""
    entry = _fixture(uqff)
    out = str(tmp_path / "out" / uqff)
    ours = _load(model_dirs[entry["model"]], in_situ_quant=entry["in_situ_quant"], write_uqff=out)
    written = load_file(out)
    ours_blobs = [written[str(i)].numpy().tobytes() for i in range(len(written))]
    assert ours_blobs == [serialize_layer(state) for state in isq_layer_states(ours.model)]
    reference = _reference_blobs(entry)
    assert len(ours_blobs) == len(reference) == len(isq_layer_names(ours.model))
    ours_logits = _logits(ours)
    reference_logits = _logits(_load(os.path.join(FIXTURES, entry["model"]), from_uqff=uqff))
    match = OUR_ISQ_MATCH[uqff]
    if match == "exact":
        names = isq_layer_names(ours.model)
        assert [n for n, a, b in zip(names, ours_blobs, reference) if a != b] == []
        torch.testing.assert_close(ours_logits, reference_logits, atol=0, rtol=0)
    elif match == "hqq":
        for a, b in zip(map(deserialize_layer, ours_blobs), map(deserialize_layer, reference)):
            assert torch.equal(a.hqq.w_q, b.hqq.w_q) and torch.equal(a.hqq.scales, b.hqq.scales)
            torch.testing.assert_close(a.hqq.zeros, b.hqq.zeros, atol=1e-4, rtol=1e-5)
        assert _relative_error(ours_logits, reference_logits) < 1e-5
    else:
        full = full_precision_logits[entry["model"]]
        assert _relative_error(ours_logits, full) <= 1.1 * _relative_error(reference_logits, full)


def test_write_then_read_gives_identical_logits_and_the_reference_layout(model_dirs, tmp_path):
    out = tmp_path / "written" / "small-q8_0.uqff"
    written = _load(model_dirs["small"], in_situ_quant="Q8_0", write_uqff=str(out))
    directory = out.parent
    assert set(os.listdir(directory)) == {out.name, "residual.safetensors", "config.json", "tokenizer.json",
                                          "tokenizer_config.json", "generation_config.json"}
    for name in ("config.json", "tokenizer_config.json"):
        assert (directory / name).read_bytes() == Path(model_dirs["small"], name).read_bytes()
    residual, reference_residual = load_file(directory / "residual.safetensors"), load_file(
        os.path.join(FIXTURES, "small", "residual.safetensors"))
    assert residual.keys() == reference_residual.keys()
    for name, tensor in residual.items():
        assert torch.equal(tensor, reference_residual[name]), name
    reread = _load(str(directory), from_uqff=out.name)
    torch.testing.assert_close(_logits(reread), _logits(written), atol=0, rtol=0)


@pytest.mark.parametrize(("isq", "bias_dtype"), [("Q8_0", torch.float32), ("HQQ8", torch.bfloat16)])
def test_biased_model_in_bfloat16_round_trips(isq, bias_dtype, tmp_path):
    """Qwen2 (q/k/v biases, separate q/k/v checkpoint shards) in bfloat16: the biases travel in the blobs, not in
    residual.safetensors, and the re-read model computes the same logits."""
    make_tiny_model_dir(tmp_path / "qwen2", "qwen2")
    out = tmp_path / "out" / "qwen2.uqff"
    written = _load(str(tmp_path / "qwen2"), dtype=ModelDType.BF16, in_situ_quant=isq, write_uqff=str(out))
    names = isq_layer_names(written.model)
    assert names[:4] == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    blobs = load_file(out)
    assert len(blobs) == len(names)
    assert deserialize_layer(blobs["1"]).bias.dtype == bias_dtype
    residual = load_file(out.parent / "residual.safetensors")
    assert not [name for name in residual if name.endswith(".bias") or "proj" in name]
    assert {t.dtype for t in residual.values()} == {torch.bfloat16}
    reread = _load(str(out.parent), dtype=ModelDType.BF16, from_uqff=out.name)
    torch.testing.assert_close(_logits(reread), _logits(written), atol=0, rtol=0)


@pytest.mark.parametrize(("isq", "organization", "num_blobs"), [("Q8_0", None, 35), ("HQQ8", IsqOrganization.MoQE, 25)])
def test_moe_model_with_tied_head_round_trips(isq, organization, num_blobs, tmp_path):
    """Mixtral (FusedMoE experts, router, tied LM head): 1 + 2 x (4 attention + router + 4 experts x 3) blobs,
    or with MoQE 1 + 2 x 12, the other linears then in residual.safetensors; the re-read model is the same."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=99, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mixtral")
    ref.bytelevel_char_tokenizer().save(str(tmp_path / "mixtral" / "tokenizer.json"))
    out = tmp_path / "out" / "mixtral.uqff"
    extra = {} if organization is None else {"organization": organization}
    written = _load(str(tmp_path / "mixtral"), in_situ_quant=isq, write_uqff=str(out), **extra)
    assert len(load_file(out)) == num_blobs
    residual = load_file(out.parent / "residual.safetensors")
    assert ("model.layers.0.self_attn.q_proj.weight" in residual) == (organization is not None)
    assert "lm_head.weight" not in residual and "model.embed_tokens.weight" in residual
    reread = _load(str(out.parent), from_uqff=out.name, **extra)
    torch.testing.assert_close(_logits(reread), _logits(written), atol=0, rtol=0)


def test_from_uqff_ignores_isq_settings(model_dirs):
    fixture_dir = os.path.join(FIXTURES, "small")
    plain = _load(fixture_dir, from_uqff="small-q8_0.uqff")
    with_isq = _load(fixture_dir, from_uqff="small-q8_0.uqff", in_situ_quant="Q4K")
    assert with_isq.isq is None
    assert {state.ggml.ggml_type for state in isq_layer_states(with_isq.model)} == {"Q8_0"}
    torch.testing.assert_close(_logits(with_isq), _logits(plain), atol=0, rtol=0)


def test_from_uqff_beside_a_full_checkpoint_uses_the_uqff_layers(model_dirs, tmp_path):
    """A repo with the full weights and a UQFF file: the ISQ layers come from the UQFF file."""
    repo = tmp_path / "repo"
    shutil.copytree(model_dirs["small"], repo)
    shutil.copy(os.path.join(FIXTURES, "small", "small-hqq4.uqff"), repo)
    both = _load(str(repo), from_uqff="small-hqq4.uqff")
    only = _load(os.path.join(FIXTURES, "small"), from_uqff="small-hqq4.uqff")
    torch.testing.assert_close(_logits(both), _logits(only), atol=0, rtol=0)


def test_uqff_errors(model_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"extension must be `\.uqff`"):
        _load(model_dirs["small"], in_situ_quant="Q8_0", write_uqff=str(tmp_path / "a.gguf"))
    with pytest.raises(ValueError, match="write_uqff .* needs in-situ quantization"):
        _load(model_dirs["small"], write_uqff=str(tmp_path / "a.uqff"))
    repo = tmp_path / "mismatch"
    shutil.copytree(os.path.join(FIXTURES, "k256"), repo)
    shutil.copy(os.path.join(FIXTURES, "small", "small-q8_0.uqff"), repo)
    with pytest.raises(ValueError, match=r"number of artifacts \(9\) does not match the number of ISQ layers \(5\)"):
        _load(str(repo), from_uqff="small-q8_0.uqff")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(os.path.join(FIXTURES, "small"), corrupted)
    blobs = load_file(corrupted / "small-q8_0.uqff")
    blobs["4"] = blobs["4"][:-10].clone()
    save_file(blobs, corrupted / "small-q8_0.uqff")
    with pytest.raises(ValueError, match=r"small-q8_0\.uqff.*layer 4: blob truncated"):
        _load(str(corrupted), from_uqff="small-q8_0.uqff")


def _reference_python() -> str | None:
    python = os.environ.get("MISTRALRS_REFERENCE_PYTHON", ref.DEFAULT_REFERENCE_PYTHON)
    return python if os.path.exists(python) else None


@pytest.mark.skipif(_reference_python() is None, reason="the reference wheel (mistralrs 0.5.0) is not installed")
@pytest.mark.parametrize("isq", ["Q8_0", "HQQ4"])
def test_the_reference_loads_our_uqff(isq, model_dirs, tmp_path):
    """Our files parse in mistralrs 0.5.0, and it generates from them what it generates from its own file."""
    name = f"small-{isq.lower()}.uqff"
    _load(model_dirs["small"], in_situ_quant=isq, write_uqff=str(tmp_path / name))
    ours = ref.reference_generate(_reference_python(), str(tmp_path), name)
    theirs = ref.reference_generate(_reference_python(), os.path.join(FIXTURES, "small"), name)
    assert ours == theirs
    assert ours["tokens"] > 0


def test_runner_writes_and_reads_uqff(model_dirs, tmp_path):
    """Through the public API: `Runner(Which.Plain(write_uqff=...), in_situ_quant=...)`, then `from_uqff`."""
    from mistralrs import CompletionRequest, Runner

    out = tmp_path / "runner" / "small.uqff"
    request = CompletionRequest(model="x", prompt="hello", max_tokens=6, temperature=0.0)
    writer = Runner(Which.Plain(model_id=model_dirs["small"], write_uqff=str(out), dtype=ModelDType.F32),
                    in_situ_quant="q8_0", show_progress=False)
    try:
        written = writer.send_completion_request(request)
    finally:
        writer.close()
    reader = Runner(Which.Plain(model_id=str(out.parent), from_uqff=out.name, dtype=ModelDType.F32),
                    show_progress=False)
    try:
        reread = reader.send_completion_request(request)
    finally:
        reader.close()
    assert reread.usage.completion_tokens == written.usage.completion_tokens > 0
    assert reread.choices[0].text == written.choices[0].text
