"""The reference's TOML model selector (REFERENCE §2.1, mistralrs/api/toml_selector.py): every selector kind of
v0.5.0 read into the right `Which`, `[speculative]` and `[anymoe]` into the Runner's arguments, the bad inputs as
errors naming the file and the field, and tiny models loaded and chatted with through `mistralrs toml -f FILE` and
`mistralrs-server -i toml -f FILE`."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

from mistralrs import AnyMoeExpertType, Architecture, IsqOrganization, ModelDType, VisionArchitecture, Which
from mistralrs.api.enums import TextAutoMapParams, VisionAutoMapParams
from mistralrs.api.toml_selector import parse_toml_selector, read_toml_selector
from mistralrs.cli import build_server_parser, main, server_main, which_from_args
from tests.terminal import prompts_shown
from tests.tiny_models import make_tiny_model_dir

GGUF_FIELDS = 'quantized_model_id = "Q"\nquantized_filename = "m.gguf"\n'


@pytest.mark.parametrize("model, expected", [
    ('model_id = "M"\narch = "mistral"', Which.Plain(model_id="M", arch=Architecture.Mistral)),
    ('model_id = "M"\ndtype = "bf16"\ntopology = "t.yml"\norganization = "moqe"\nfrom_uqff = "q.uqff"\n'
     'imatrix = "i.imatrix"', Which.Plain(model_id="M", dtype=ModelDType.BF16, topology="t.yml",
                                           organization=IsqOrganization.MoQE, from_uqff="q.uqff", imatrix="i.imatrix")),
    ('xlora_model_id = "X"\norder = "o.json"\narch = "mistral"',
     Which.XLora(xlora_model_id="X", order="o.json", arch=Architecture.Mistral)),
    ('model_id = "M"\nxlora_model_id = "X"\norder = "o.json"\ntgt_non_granular_index = 2',
     Which.XLora(xlora_model_id="X", order="o.json", model_id="M", tgt_non_granular_index=2)),
    ('adapters_model_id = "A"\norder = "o.json"\narch = "llama"',
     Which.Lora(adapters_model_id="A", order="o.json", arch=Architecture.Llama)),
    (GGUF_FIELDS + 'tok_model_id = "T"', Which.GGUF(quantized_model_id="Q", quantized_filename="m.gguf",
                                                     tok_model_id="T")),
    (GGUF_FIELDS, Which.GGUF(quantized_model_id="Q", quantized_filename="m.gguf")),
    ('tok_model_id = "T"\nquantized_model_id = "Q"\nquantized_filename = "a.gguf b.gguf"',
     Which.GGUF(quantized_model_id="Q", quantized_filename=["a.gguf", "b.gguf"], tok_model_id="T")),
    (GGUF_FIELDS + 'xlora_model_id = "X"\norder = "o.json"',
     Which.XLoraGGUF(quantized_model_id="Q", quantized_filename="m.gguf", xlora_model_id="X", order="o.json")),
    (GGUF_FIELDS + 'adapters_model_id = "A"\norder = "o.json"\ntok_model_id = "T"',
     Which.LoraGGUF(quantized_model_id="Q", quantized_filename="m.gguf", adapters_model_id="A", order="o.json",
                    tok_model_id="T")),
    (GGUF_FIELDS + 'tok_model_id = "T"\ngqa = 8', Which.GGML(quantized_model_id="Q", quantized_filename="m.gguf",
                                                             tok_model_id="T", gqa=8)),
    (GGUF_FIELDS + 'tok_model_id = "T"\nkind = "ggml"',
     Which.GGML(quantized_model_id="Q", quantized_filename="m.gguf", tok_model_id="T")),
    (GGUF_FIELDS + 'xlora_model_id = "X"\norder = "o.json"\ngqa = 1',
     Which.XLoraGGML(quantized_model_id="Q", quantized_filename="m.gguf", xlora_model_id="X", order="o.json",
                     gqa=1)),
    (GGUF_FIELDS + 'adapters_model_id = "A"\norder = "o.json"\ngqa = 1',
     Which.LoraGGML(quantized_model_id="Q", quantized_filename="m.gguf", adapters_model_id="A", order="o.json",
                    gqa=1)),
    ('model_id = "V"\narch = "idefics2"\nmax_edge = 512',
     Which.VisionPlain(model_id="V", arch=VisionArchitecture.Idefics2, max_edge=512)),
    ('model_id = "M"\nmax_seq_len = 1024\nmax_batch_size = 4',
     Which.Plain(model_id="M", auto_map_params=TextAutoMapParams(max_seq_len=1024, max_batch_size=4))),
    ('model_id = "V"\narch = "phi3v"\nmax_num_images = 2', Which.VisionPlain(
        model_id="V", arch=VisionArchitecture.Phi3V, auto_map_params=VisionAutoMapParams(max_num_images=2))),
])
def test_each_selector_kind_reads_into_its_which(model, expected):
    selection = parse_toml_selector(f"[model]\n{model}\n")
    assert selection.which == expected
    assert selection.runner_kwargs() == {}


def test_the_top_level_tokenizer_json_goes_to_the_models_that_take_one(caplog):
    selection = parse_toml_selector('tokenizer_json = "tok.json"\n[model]\nmodel_id = "M"\n')
    assert selection.which == Which.Plain(model_id="M", tokenizer_json="tok.json")
    with caplog.at_level(logging.WARNING, logger="mistralrs.api.toml_selector"):
        selection = parse_toml_selector(f'tokenizer_json = "tok.json"\n[model]\n{GGUF_FIELDS}tok_model_id = "T"\n')
    assert selection.which == Which.GGUF(quantized_model_id="Q", quantized_filename="m.gguf", tok_model_id="T")
    assert "[model]: tokenizer_json 'tok.json' is not used by Which.GGUF" in caplog.text


def test_speculative_sets_the_draft_model_and_gamma():
    selection = parse_toml_selector(f'[model]\nmodel_id = "M"\narch = "mistral"\n[speculative]\ngamma = 16\n'
                                    f'[speculative.draft_model]\ntok_model_id = "M"\n{GGUF_FIELDS}')
    draft = Which.GGUF(quantized_model_id="Q", quantized_filename="m.gguf", tok_model_id="M")
    assert selection.runner_kwargs() == {"which_draft": draft, "speculative_gamma": 16}
    assert selection.which == Which.Plain(model_id="M", arch=Architecture.Mistral)


def test_anymoe_with_fine_tuned_experts():
    selection = parse_toml_selector(
        '[model]\nmodel_id = "M"\n[anymoe]\ndataset_json = "amoe.json"\nprefix = "model.layers"\nmlp = "mlp"\n'
        'model_ids = ["E"]\nlayers = [0, 1]\n[anymoe.config]\nhidden_size = 4096\nepochs = 25\n'
        'expert_type = "fine_tuned"\ngate_model_id = "saved_gate"\nloss_csv_path = "loss.csv"\n')
    config = selection.runner_kwargs()["anymoe_config"]
    assert (config.dataset_json, config.prefix, config.mlp, config.model_ids, config.layers) == (
        "amoe.json", "model.layers", "mlp", ["E"], [0, 1])
    assert (config.hidden_size, config.epochs, config.gate_model_id, config.loss_csv_path, config.training) == (
        4096, 25, "saved_gate", "loss.csv", True)
    assert config.expert_type == AnyMoeExpertType.FineTuned()


def test_anymoe_with_lora_adapter_experts():
    selection = parse_toml_selector(
        '[model]\nmodel_id = "M"\n[anymoe]\ndataset_json = "d.json"\nprefix = "model.layers"\nmlp = "mlp"\n'
        'model_ids = ["A"]\n[anymoe.config]\nhidden_size = 64\n[anymoe.config.expert_type.lora_adapter]\n'
        'rank = 16\nalpha = 16\ntarget_modules = ["gate_proj"]\n')
    config = selection.anymoe_config
    assert config.expert_type == AnyMoeExpertType.LoraAdapter(16, 16.0, ["gate_proj"]) and config.layers == []


@pytest.mark.parametrize("text, message", [
    ('[model]\nmodel_id = "M"\narch = \nx = 1\n', r"malformed TOML: .*\(at line 3, column 8\)"),
    ('[model]\nmodel_id = "M"\nmodel_idd = "N"\n', r"\[model\]\.model_idd: unknown field \(a model selector takes"),
    ('[model]\nmodel_id = "M"\n[server]\nport = 1\n', r"server: unknown field \(known: tokenizer_json, model"),
    ('[speculative]\ngamma = 4\n', r"the file: missing field 'model'"),
    ('model = "M"\n', r"\[model\] must be a table"),
    ('[model]\nxlora_model_id = "X"\n', r"\[model\]: missing field 'order' \(its other fields select a x-lora model\)"),
    ('[model]\nmodel_id = "M"\ngqa = 2\n', r"\[model\]: no model kind takes all of the fields gqa, model_id"),
    ('[model]\nmodel_id = "M"\nkind = "onnx"\n', r"\[model\]\.kind: unknown model kind 'onnx' \(known: plain"),
    (f'[model]\n{GGUF_FIELDS}kind = "ggml"\n', r"\[model\]: missing field 'tok_model_id'"),
    ('[model]\nquantized_model_id = "Q"\n', r"\[model\]: missing field 'quantized_filename' \(its other fields "
                                           r"select a gguf model\)"),
    ('[model]\nmodel_id = "M"\narch = "gpt5"\n', r"\[model\] \(plain selector\): Which.Plain.arch: .*'gpt5'"),
    ('[model]\nmodel_id = 7\n', r"\[model\] \(plain selector\): Which.Plain.model_id must be a str"),
    ('[model]\nmodel_id = "M"\nmax_seq_len = 0\n', r"\[model\] \(plain selector\): TextAutoMapParams.max_seq_len must be >= 1"),
    ('[model]\nmodel_id = "M"\n[speculative]\ngamma = 0\n[speculative.draft_model]\nmodel_id = "D"\n',
     r"\[speculative\]\.gamma must be an int >= 1"),
    ('[model]\nmodel_id = "M"\n[speculative]\ngamma = 2\n', r"\[speculative\]: missing field 'draft_model'"),
    ('[model]\nmodel_id = "M"\n[speculative]\ngamma = 2\n[speculative.draft_model]\nmodel_idd = "D"\n',
     r"\[speculative.draft_model\]\.model_idd: unknown field"),
    ('[model]\nmodel_id = "M"\n[anymoe]\ndataset_csv = "d.csv"\n', r"\[anymoe\]\.dataset_csv: unknown field"),
    ('[model]\nmodel_id = "M"\n[anymoe]\ndataset_json = "d"\nprefix = "p"\nmlp = "m"\nmodel_ids = ["E"]\n'
     '[anymoe.config]\nhidden_size = 8\nexpert_type = "lora"\n', r"\[anymoe.config\]\.expert_type must be"),
    ('[model]\nmodel_id = "M"\n[anymoe]\ndataset_json = "d"\nprefix = "p"\nmlp = "m"\nmodel_ids = []\n'
     '[anymoe.config]\nhidden_size = 8\nexpert_type = "fine_tuned"\n', r"\[anymoe\]: AnyMoeConfig.model_ids must"),
    ('[model]\nmodel_id = "M"\n[anymoe]\ndataset_json = "d"\nprefix = "p"\nmlp = "m"\nmodel_ids = ["E"]\n'
     '[anymoe.config]\nhidden_size = 8\n[anymoe.config.expert_type.lora_adapter]\nrank = 4\n',
     r"\[anymoe.config.expert_type.lora_adapter\]: missing field 'alpha', 'target_modules'"),
])
def test_bad_selectors_name_the_file_and_the_field(text, message):
    with pytest.raises(ValueError, match=r"^sel\.toml: " + message):
        parse_toml_selector(text, "sel.toml")


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"toml selector '.*nothing\.toml': cannot read it"):
        read_toml_selector(tmp_path / "nothing.toml")


# ---- through the command line ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("toml-tiny")
    return path, make_tiny_model_dir(path / "model", "llama")


def test_the_toml_subcommand_selects_the_files_model(tiny):
    (tiny[0] / "plain.toml").write_text(f'[model]\nmodel_id = "{tiny[0] / "model"}"\ndtype = "f32"\n')
    args = build_server_parser().parse_args(["--port", "1", "toml", "-f", str(tiny[0] / "plain.toml")])
    assert which_from_args(args) == Which.Plain(model_id=str(tiny[0] / "model"), dtype=ModelDType.F32)


def test_mistralrs_toml_chats_with_a_plain_model(tiny, monkeypatch, capsys):
    selector = tiny[0] / "plain.toml"
    selector.write_text(f'[model]\nmodel_id = "{tiny[0] / "model"}"\ndtype = "f32"\nmax_seq_len = 256\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    main(["toml", "-f", str(selector)])
    out = capsys.readouterr().out
    assert "Chatting with" in out and prompts_shown(out) == 2


def test_mistralrs_server_toml_serves_a_gguf_model_in_the_terminal(tiny, monkeypatch, capsys):
    import transformers

    from tests.loader.gguf_fixtures import write_tiny_gguf
    from tests.tiny_models import hf_config
    config = hf_config("llama", 320)   # the GGUF fixture's byte-level vocabulary needs at least 259 tokens
    torch.manual_seed(1)
    write_tiny_gguf(transformers.AutoModelForCausalLM.from_config(config).eval(), config, tiny[0] / "tiny.gguf",
                    arch="llama", ggml_type="Q8_0")
    selector = tiny[0] / "gguf.toml"
    selector.write_text(f'[model]\nquantized_model_id = "{tiny[0]}"\nquantized_filename = "tiny.gguf"\n'
                        'dtype = "f32"\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\\exit\n"))
    server_main(["-i", "toml", "-f", str(selector)])
    out = capsys.readouterr().out
    assert "Chatting with tiny.gguf" in out and prompts_shown(out) == 2


def test_a_bad_selector_file_stops_the_command_naming_the_field(tmp_path):
    (tmp_path / "bad.toml").write_text('[model]\nmodel_idd = "M"\n')
    with pytest.raises(SystemExit) as caught:
        server_main(["--port", "1", "toml", "-f", str(tmp_path / "bad.toml")])
    assert "bad.toml: [model].model_idd: unknown field" in str(caught.value.code)
