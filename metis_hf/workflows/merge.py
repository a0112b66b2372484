"""``metis-hf merge CONFIG.yaml OUTPUT_DIR``: merge PEFT adapters or full checkpoints from files.

The YAML follows mergekit's shape::

    merge_method: metis
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct   # required for full checkpoints
    models:
      - model: ./adapters/math          # local folder or Hub id
        parameters: {loss_gap: 0.41}    # per-model: weight, loss_gap, alpha, seed
      - model: ./adapters/code
        parameters: {loss_gap: 0.12}
    parameters: {temperature: 2.0, delta: 0.3, k: 2}   # shared
    dtype: bfloat16       # output dtype (default: the inputs')
    space: lora           # adapters: "lora" (the paper's), "dense" (scaling * B @ A, SVD back to rank r)
                          # or "core" (the same updates in the adapters' own bases: exact, any ranks);
                          # default: lora, core for the methods on layer matrices (iso_c, iso_cts, tsv_m)
    rank: 16              # dense/core output rank (default: dense the first adapter's, core the sum: exact)

Only safetensors are read (pickle weights are refused). Tensors are merged one key at a time, the
output is written as sharded safetensors into a temporary folder that is renamed into place, so a
failed merge leaves no output directory behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import Field, ValidationInfo, field_validator
from safetensors import safe_open
from tqdm.auto import tqdm

from metis_hf.files import replace_dir
from metis_hf.merging import get_merge_method
from metis_hf.merging.checks import check_task_vectors
from metis_hf.merging.spec import MergeSpec
from metis_hf.merging.task_vectors import (
    check_same_keys,
    check_space,
    key_seed,
    lora_config_at_rank,
    lora_scaling,
    merge_lora_states,
)
from metis_hf.schema import Count, Integer, RecipeError, config_dataclass, parse

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


@config_dataclass
class ModelEntry:
    model: str = field(metadata={"help": "Local folder or Hub id of an adapter or checkpoint."})
    parameters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "weight, loss_gap, alpha, seed"}
    )


@config_dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    space: str | None = Field(default=None, validate_default=True)
    rank: Count | None = None  # output rank in the dense and core spaces
    granularity: Literal["tensor", "global"] = "tensor"
    max_shard_size_mb: Annotated[Integer, Field(ge=0)] = 2048  # 0: one tensor per shard

    @field_validator("merge_method")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_merge_method(name)  # unknown method: fail before reading any weights
        return name

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[ModelEntry], info: ValidationInfo) -> list[ModelEntry]:
        if not models:
            raise ValueError("at least one model is needed")
        if "merge_method" not in info.data:
            return models
        keys = list(get_merge_method(info.data["merge_method"]).per_task.values())
        for i, entry in enumerate(models):
            unknown = sorted(set(entry.parameters) - set(keys))
            if unknown:
                raise ValueError(
                    f"[{i}].parameters.{unknown[0]}: unknown per-model parameter "
                    f"(allowed for {info.data['merge_method']}: {', '.join(keys) or 'none'})"
                )
        return models

    @field_validator("space")
    @classmethod
    def _space(cls, space: str | None, info: ValidationInfo) -> str:
        method = info.data.get("merge_method")
        if space is None:
            return MergeSpec(method).default_space if method is not None else "lora"
        return check_space(space)

    @field_validator("rank")
    @classmethod
    def _rank_in_its_space(cls, rank: int | None, info: ValidationInfo) -> int | None:
        if rank is not None and info.data.get("space") == "lora":
            raise ValueError(
                "sets the output rank of the dense and core spaces; in the lora space the merged "
                "adapter keeps its inputs' rank (remove rank, or set space: core)"
            )
        return rank

    @property
    def per_model_keys(self) -> list[str]:
        """Per-model YAML keys: the singular of each per-task parameter the method takes."""
        return list(get_merge_method(self.merge_method).per_task.values())

    def method_params(self) -> dict[str, Any]:
        params = dict(self.parameters)
        for param, yaml_name in get_merge_method(self.merge_method).per_task.items():
            values = [entry.parameters.get(yaml_name) for entry in self.models]
            if any(v is not None for v in values):
                if any(v is None for v in values):
                    missing = values.index(None)
                    raise ValueError(
                        f"models[{missing}].parameters.{yaml_name} is missing; give it for every model."
                    )
                params[param] = values
        return params


def load_merge_config(path: str | os.PathLike) -> tuple[MergeConfig, str]:
    """The validated config and its text (kept verbatim for the card)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Merge config {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    return parse(MergeConfig, data), text


# --- locating and reading weights -------------------------------------------------------------


def resolve_folder(name_or_path: str) -> Path:
    """A local folder as is; otherwise a Hub repo downloaded (safetensors and configs only)."""
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from metis_hf.models import is_builtin, resolve_model_path

    if is_builtin(name_or_path):
        return Path(resolve_model_path(name_or_path))
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]
            )
        )
    except Exception as err:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local folder nor a reachable Hub repo ({err})."
        ) from err


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickles:
            raise ValueError(
                f"{folder} has only pickle weights ({pickles[0]}); metis-hf reads safetensors only. "
                "Convert them first (load with torch and save with safetensors)."
            )
        raise ValueError(f"{folder} has no .safetensors weights.")
    return files


class TensorSource:
    """Every tensor of a folder's safetensors files, read one at a time. Each read opens and closes
    its file: a memory map held open would keep every page read so far resident, so a streaming
    merge would end up holding all of its inputs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[list[int], str]] = {}
        for path in safetensors_files(folder):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        tensor_slice = handle.get_slice(key)
                        self.where[key] = path
                        self.shapes[key] = (tensor_slice.get_shape(), tensor_slice.get_dtype())
            except Exception as err:  # safetensors' own errors do not name the file
                raise ValueError(f"{path}: not a readable safetensors file ({err}).") from err

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        try:
            with safe_open(str(self.where[key]), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as err:
            raise ValueError(f"{self.where[key]}: tensor {key!r} cannot be read ({err}).") from err


# --- writing ----------------------------------------------------------------------------------

# safetensors' names of torch dtypes, and the dtypes of names read from input headers.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class StreamingShardWriter:
    """Writes ``<prefix>.safetensors`` (or ``<prefix>-0000i-of-0000n.safetensors`` plus an index)
    tensor by tensor as they are produced. The output's layout (key, shape, dtype, in writing
    order) is known before the first tensor, so each shard's header is written first and each
    tensor goes to disk as it comes: no shard is ever held in memory."""

    def __init__(
        self,
        folder: Path,
        prefix: str,
        layout: list[tuple[str, list[int], torch.dtype]],
        max_shard_bytes: int,
    ):
        self.folder = folder
        self.layout = layout
        shards: list[list[int]] = [[]]
        size = 0
        for index, (_, shape, dtype) in enumerate(layout):
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(index)
            size += nbytes
        total = len(shards)
        self.names = [
            f"{prefix}.safetensors" if total == 1 else f"{prefix}-{i + 1:05d}-of-{total:05d}.safetensors"
            for i in range(total)
        ]
        self.shard_of = {i: shard for shard, members in enumerate(shards) for i in members}
        self.shards = shards
        self.index_name = f"{prefix}.safetensors.index.json"
        self.written = 0
        self.handle = None

    def _open_shard(self, shard: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for index in self.shards[shard]:
            key, shape, dtype = self.layout[index]
            end = offset + math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.handle = open(self.folder / self.names[shard], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.layout):
            raise RuntimeError(f"{key!r}: the output layout has only {len(self.layout)} tensors.")
        expected_key, shape, dtype = self.layout[self.written]
        if (key, list(tensor.shape), tensor.dtype) != (expected_key, list(shape), dtype):
            raise RuntimeError(
                f"Tensor {key!r} {list(tensor.shape)} {tensor.dtype} is not the planned next output "
                f"{expected_key!r} {list(shape)} {dtype}."
            )
        shard = self.shard_of[self.written]
        if self.handle is None:
            self._open_shard(shard)
        self.handle.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.written += 1
        if self.written == len(self.layout) or self.shard_of[self.written] != shard:
            self.handle.close()
            self.handle = None

    def close(self) -> None:
        if self.written != len(self.layout):
            raise RuntimeError(f"Only {self.written} of the {len(self.layout)} planned tensors were written.")
        if len(self.names) > 1:
            weight_map = {key: self.names[self.shard_of[i]] for i, (key, _, _) in enumerate(self.layout)}
            index = {"metadata": {}, "weight_map": weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2))


def check_output_dir(output_dir: Path, inputs: list[Path]) -> None:
    """Refuse an output folder whose replacement would delete an input, the current folder, or
    that is a file; before any work."""
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder; choose another output folder.")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(
            f"Output folder {str(output_dir)!r} is the current folder or contains it; replacing it would "
            "delete what is there. Choose a new folder."
        )
    for path in inputs:
        resolved = path.resolve()
        if resolved == out or out in resolved.parents:
            raise ValueError(
                f"Output folder {str(output_dir)!r} is or contains the input {str(path)!r}; replacing it "
                "would delete that input. Choose another folder."
            )


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from err


OWNER_FILE = ".metis-hf-owner"  # the pid of the merge writing a temporary output folder


def _atomic_output(output_dir: Path, overwrite: bool):
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_outputs(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    (tmp / OWNER_FILE).write_text(str(os.getpid()))
    return tmp


def _remove_stale_outputs(output_dir: Path) -> None:
    """Temporary folders of earlier merges into ``output_dir`` whose process is gone (killed before
    it could clean up) are removed; a running merge's folder is left alone."""
    for folder in output_dir.parent.glob(f".{output_dir.name}-*"):
        owner = folder / OWNER_FILE
        if not owner.is_file():
            continue
        try:
            os.kill(int(owner.read_text()), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


# --- the merge ---------------------------------------------------------------------------------


@dataclass
class MergeSummary:
    kind: Literal["adapter", "checkpoint"]
    tensors: int
    output_dir: Path
    truncation_error: float | None = None  # dense and core spaces: the share of the norm dropped
    rank: int | None = None  # the output adapter's rank


def run_merge(
    config: MergeConfig,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    config_text: str | None = None,
    progress: bool = True,
    config_path: str | os.PathLike | None = None,
) -> MergeSummary:
    output_dir = Path(output_dir)
    local = [entry.model for entry in config.models] + [config.base_model or "", str(config_path or "")]
    check_output_dir(output_dir, [Path(p) for p in local if p and os.path.exists(p)])
    params = config.method_params()
    folders = [resolve_folder(entry.model) for entry in config.models]
    adapters = [is_adapter(f) for f in folders]
    if any(adapters) and not all(adapters):
        raise ValueError("models mixes PEFT adapters and full checkpoints; merge one kind at a time.")
    tmp = _atomic_output(output_dir, overwrite)
    try:
        if all(adapters):
            summary = _merge_adapters(config, folders, params, tmp, progress)
        else:
            summary = _merge_checkpoints(config, folders, params, tmp, progress)
        _write_card(tmp, config, summary, config_text)
        (tmp / OWNER_FILE).unlink()
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.output_dir = output_dir
    return summary


def _adapter_configs(folders: list[Path], space: str) -> list[dict[str, Any]]:
    configs = [read_json(f / "adapter_config.json") for f in folders]
    for folder, cfg in zip(folders, configs):
        where = folder / "adapter_config.json"
        if not isinstance(cfg, dict):
            raise ValueError(f"{where} holds a JSON {type(cfg).__name__}, not an object of LoRA settings.")
        for key in ("r", "lora_alpha"):
            value = cfg.get(key)
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            if key not in cfg or not valid or (key == "r" and not isinstance(value, int)):
                kind = "a positive integer" if key == "r" else "a positive number"
                found = "is missing" if key not in cfg else f"is {value!r}"
                raise ValueError(f"{where}: {key} {found}; it must be {kind}.")
    # The core and dense spaces merge each module's update scaling * B @ A: ranks and alphas may differ.
    keys = ("peft_type", "target_modules") + (() if space in ("core", "dense") else ("r", "lora_alpha"))
    for folder, cfg in zip(folders, configs):
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"Adapter {folder} has a per-module rank_pattern/alpha_pattern; not supported.")
    for folder, cfg in zip(folders[1:], configs[1:]):
        for key in (*keys, "use_rslora"):
            a, b = configs[0].get(key), cfg.get(key)
            if isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            if a != b:
                raise ValueError(
                    f"Adapter {folder} has {key}={cfg.get(key)!r}, {folders[0]} has {configs[0].get(key)!r}."
                )
    if configs[0].get("peft_type") != "LORA":
        raise ValueError(
            f"{folders[0]} is a {configs[0].get('peft_type')} adapter; only LoRA adapters can be merged."
        )
    bases = {cfg.get("base_model_name_or_path") for cfg in configs}
    if len(bases) > 1:
        logger.warning(
            "The adapters were trained on different base models (%s); their merge fits none of them exactly.",
            ", ".join(
                f"{folder}: {cfg.get('base_model_name_or_path')}" for folder, cfg in zip(folders, configs)
            ),
        )
    for folder, cfg in zip(folders, configs):
        if cfg.get("use_dora") or cfg.get("modules_to_save"):
            what = "use_dora" if cfg.get("use_dora") else f"modules_to_save={cfg['modules_to_save']}"
            raise ValueError(
                f"Adapter {folder} has {what}: its extra tensors are not LoRA factors, and merging them "
                "like factors would corrupt them. metis-hf merges plain LoRA adapters only."
            )
    return configs


def _merge_adapters(config, folders, params, out: Path, progress: bool) -> MergeSummary:
    configs = _adapter_configs(folders, config.space)
    states = []
    for folder in folders:
        source = TensorSource(folder)
        states.append({k: source.get(k) for k in sorted(source.keys())})
    names = [str(f) for f in folders]
    _check_factor_ranks(folders, configs, states, config.rank)
    dtype = DTYPES.get(config.dtype) if config.dtype else states[0][next(iter(states[0]))].dtype
    scalings = [lora_scaling(c["r"], c["lora_alpha"], c.get("use_rslora", False)) for c in configs]
    # Output rank: the core space's default keeps every direction (exactly the merge); the dense
    # space's returns to the first adapter's rank.
    rank = config.rank or (sum(c["r"] for c in configs) if config.space == "core" else configs[0]["r"])
    merged, truncation = merge_lora_states(
        config.merge_method,
        states,
        space=config.space,
        rank=rank,
        scaling=scalings,
        output_scaling=scalings[0],
        names=names,
        granularity=config.granularity,
        dtype=torch.float32,  # the factors are cast to the output dtype when written
        **params,
    )
    # the first adapter's scaling at the output rank
    write_adapter(
        out, merged, lora_config_at_rank(configs[0], rank), dtype, config.max_shard_size_mb << 20, progress
    )
    return MergeSummary("adapter", len(merged), out, truncation, rank)


def write_adapter(
    out: Path,
    factors: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 << 30,
    progress: bool = False,
) -> None:
    """A LoRA adapter in PEFT's layout in the folder ``out``: the factors (in ``dtype``, or each in
    its own) as safetensors, in shards past ``max_shard_bytes``, and ``adapter_config.json``."""
    layout = [(key, list(factors[key].shape), dtype or factors[key].dtype) for key in sorted(factors)]
    writer = StreamingShardWriter(out, "adapter_model", layout, max_shard_bytes)
    for key, _, key_dtype in tqdm(layout, desc="writing", disable=not progress):
        writer.add(key, factors[key].to(key_dtype))
    writer.close()
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def _check_factor_ranks(
    folders: list[Path],
    configs: list[dict[str, Any]],
    states: list[dict[str, torch.Tensor]],
    rank: int | None,
) -> None:
    """Each adapter's factors have the rank its config says, and an output ``rank`` fits a layer:
    a wrong r would rescale the merge silently, a rank past every layer's width pads with zeros."""
    widest = 0
    for folder, cfg, state in zip(folders, configs, states):
        for key, tensor in state.items():
            if tensor.dim() != 2:
                continue
            r = tensor.shape[0] if ".lora_A." in key else tensor.shape[1] if ".lora_B." in key else None
            if r is not None and r != cfg["r"]:
                raise ValueError(
                    f"{folder}: tensor {key!r} has rank {r}, but adapter_config.json says r={cfg['r']}."
                )
            if ".lora_A." in key:
                out_features = state[key.replace(".lora_A.", ".lora_B.")].shape[0]
                widest = max(widest, min(tensor.shape[1], out_features))
    if rank is not None and rank > widest:
        raise ValueError(
            f"rank {rank} exceeds what any adapted layer can hold (at most {widest}: the smaller side "
            "of the widest layer); lower rank or leave it unset."
        )


def _merge_checkpoints(config, folders, params, out: Path, progress: bool) -> MergeSummary:
    if not config.base_model:
        raise ValueError(
            "base_model is required to merge full checkpoints (task vectors are fine-tuned - base)."
        )
    if config.granularity != "tensor":
        raise ValueError(
            f"granularity: {config.granularity!r} applies to adapters only; full checkpoints are merged "
            "tensor by tensor while streaming (granularity: tensor)."
        )
    base_folder = resolve_folder(config.base_model)
    base = TensorSource(base_folder)
    sources = [TensorSource(f) for f in folders]
    keys = check_same_keys(
        [base.where, *[s.where for s in sources]], names=[str(base_folder), *map(str, folders)]
    )
    method = get_merge_method(config.merge_method)
    seed = params.pop("seed", None)

    def output_dtype(key: str) -> torch.dtype:
        name = base.shapes[key][1]
        if name not in TORCH_DTYPES:
            raise ValueError(
                f"{base.where[key]}: tensor {key!r} has dtype {name}, which metis-hf does not merge."
            )
        dtype = TORCH_DTYPES[name]
        return DTYPES[config.dtype] if config.dtype and dtype.is_floating_point else dtype

    layout = [(key, base.shapes[key][0], output_dtype(key)) for key in keys]
    writer = StreamingShardWriter(out, "model", layout, config.max_shard_size_mb << 20)
    for index, (key, _, dtype) in enumerate(tqdm(layout, desc="merging", disable=not progress)):
        base_tensor = base.get(key)
        if not base_tensor.is_floating_point():
            writer.add(key, base_tensor)
            continue
        vectors = check_task_vectors([s.get(key).float() - base_tensor.float() for s in sources], name=key)
        merged = method(vectors, **params, **key_seed(seed, index))
        writer.add(key, (base_tensor.float() + merged).to(dtype))
    writer.close()
    for name in _COPIED_FILES:
        if (base_folder / name).is_file():
            shutil.copy(base_folder / name, out / name)
    return MergeSummary("checkpoint", len(keys), out)


def _write_card(out: Path, config: MergeConfig, summary: MergeSummary, config_text: str | None) -> None:
    from metis_hf.hub import card_info_for, write_card

    text = config_text if config_text is not None else yaml.safe_dump(asdict(config), sort_keys=False)
    base = config.base_model
    if base is None and summary.kind == "adapter":
        base = json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path")
    info = card_info_for(
        "adapter" if summary.kind == "adapter" else "model",
        config.merge_method,
        "merge",
        base,
        sources=[entry.model for entry in config.models if not Path(entry.model).exists()],
        config_text=text,
        config_title="Merge configuration",
    )
    if summary.truncation_error is not None:
        info.notes.append(
            f"Merged in the {config.space} space; the rank-{summary.rank} adapter keeps all but "
            f"{summary.truncation_error:.2%} of the merged update's Frobenius norm."
        )
    write_card(out, info)
