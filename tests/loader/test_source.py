"""token_source forms, local model directories and the hub cache in offline mode (a fake cache, no network)."""

from __future__ import annotations

import logging

import pytest

from mistralrs.loader.source import ModelSource, resolve_token

TOKEN_VARS = ("HF_HOME", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No test sees the machine's own Hugging Face home, token or cache."""
    for var in TOKEN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def test_literal_and_none():
    assert resolve_token("literal:hf_abc") == "hf_abc"
    assert resolve_token("literal:a:b") == "a:b"
    assert resolve_token("none") is None


def test_env_token(monkeypatch, caplog):
    monkeypatch.setenv("MY_HF_TOKEN", "hf_env")
    assert resolve_token("env:MY_HF_TOKEN") == "hf_env"
    monkeypatch.delenv("MY_HF_TOKEN")
    with caplog.at_level(logging.WARNING):
        assert resolve_token("env:MY_HF_TOKEN") is None
    assert "MY_HF_TOKEN" in caplog.text


def test_path_token(tmp_path, caplog):
    token_file = tmp_path / "tok.txt"
    token_file.write_text("  hf_file\n")
    assert resolve_token(f"path:{token_file}") == "hf_file"
    with caplog.at_level(logging.WARNING):
        assert resolve_token(f"path:{tmp_path / 'missing.txt'}") is None
    assert "missing.txt" in caplog.text


def test_cache_token_honours_hf_home_and_token_path(monkeypatch, tmp_path):
    assert resolve_token("cache") is None  # no token file: no token, no error
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text("hf_home_token\n")
    assert resolve_token("cache") == "hf_home_token"
    other = tmp_path / "elsewhere"
    other.write_text("hf_token_path")
    monkeypatch.setenv("HF_TOKEN_PATH", str(other))
    assert resolve_token("cache") == "hf_token_path"


@pytest.mark.parametrize("bad", ["", "literal", "env", "file:/x", "Cache", "token"])
def test_bad_token_source_lists_forms(bad):
    with pytest.raises(ValueError, match="literal:<token>.*env:<VAR>.*path:<file>.*cache.*none"):
        resolve_token(bad)


def test_local_directory(tmp_path):
    model_dir = tmp_path / "my-model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref")
    (model_dir / "config.json").write_text("{}")
    (model_dir / "sub" / "adapter.safetensors").write_bytes(b"x")
    source = ModelSource(str(model_dir), token=None)
    assert source.get("config.json") == str(model_dir / "config.json")
    assert source.maybe_get("sub/adapter.safetensors") == str(model_dir / "sub" / "adapter.safetensors")
    assert source.maybe_get("tokenizer.json") is None
    assert source.list_files() == ["config.json", "sub/adapter.safetensors"]
    with pytest.raises(ValueError, match="my-model.*tokenizer.json") as err:
        source.get("tokenizer.json")
    assert isinstance(err.value, FileNotFoundError)


def fake_hub_cache(root, repo_id="org/tiny-model", files=("config.json", "sub/weights.gguf"),
                   commit="0123456789abcdef0123456789abcdef01234567"):
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo_dir = root / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(f"content of {name}")
    return snapshot


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    cache = tmp_path / "hub_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_reads_the_hub_cache(offline_cache):
    snapshot = fake_hub_cache(offline_cache)
    source = ModelSource("org/tiny-model", token="hf_unused")
    path = source.get("config.json")
    assert path == str(snapshot / "config.json")
    assert open(path).read() == "content of config.json"
    assert source.get("sub/weights.gguf").endswith("sub/weights.gguf")
    assert source.maybe_get("tokenizer.json") is None
    assert source.list_files() == ["config.json", "sub/weights.gguf"]
    with pytest.raises(ValueError, match="org/tiny-model.*tokenizer.json"):
        source.get("tokenizer.json")


def test_offline_revision_by_commit(offline_cache):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = fake_hub_cache(offline_cache, commit=commit)
    assert ModelSource("org/tiny-model", token=None, revision=commit).get("config.json") == str(
        snapshot / "config.json")


def test_offline_model_not_in_cache_is_a_clear_error(offline_cache):
    fake_hub_cache(offline_cache)
    source = ModelSource("org/other-model", token=None)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE.*hub cache") as err:
        source.get("config.json")
    assert "org/other-model" in str(err.value)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        source.maybe_get("config.json")
    with pytest.raises(ValueError, match="org/other-model"):
        source.list_files()


def test_invalid_repo_id_that_is_no_directory(offline_cache, tmp_path):
    with pytest.raises(ValueError, match="neither a local directory nor a valid hub repo id"):
        ModelSource(str(tmp_path / "no" / "such" / "dir"), token=None).get("config.json")
