"""Model cards and pushes to the Hugging Face Hub.

Cards are the Jinja templates in ``model_cards/`` rendered through huggingface_hub's ``ModelCard``
and ``ModelCardData``. Whatever metis-hf writes (``train``, ``merge``, ``compare``) carries a
``metis_card.json`` beside its README.md; ``push`` re-renders the card with the repository id and
uploads a staged copy of the folder. Every check runs before the first network call; the token
comes from huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``) and is never printed
or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from metis_hf.files import write_json, write_text_atomic
from metis_hf.models import hub_identity
from metis_hf.paper import CITATION
from metis_hf.redact import hide_local_paths, redact_data, redact_known, redact_text, register_secret
from metis_hf.round_record import RoundRecord

logger = logging.getLogger(__name__)

CARD_INFO_FILE = "metis_card.json"
CardKind = Literal["adapter", "model", "comparison"]
TEMPLATES = {
    "adapter": "merged_adapter.md.j2",
    "model": "merged_model.md.j2",
    "comparison": "comparison_report.md.j2",
}
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Above this size (or file count) pushes use huggingface_hub's resumable large-folder upload.
LARGE_FOLDER_BYTES = 5 * 1024**3
LARGE_FOLDER_FILES = 500
SKIPPED_DIRS = {"checkpoints", "trainer", "runs"}  # and every hidden folder and checkpoint-N/
# What a push uploads: weights as safetensors, configs, tokenizer files, cards, results and plots.
# Never pickles (optimizer.pt, training_args.bin...) except weights with allow_pickle.
UPLOADED_SUFFIXES = (
    ".safetensors",
    ".json",
    ".jsonl",
    ".md",
    ".txt",
    ".model",
    ".jinja",
    ".png",
    ".csv",
    ".yaml",
)
PICKLED_WEIGHTS = re.compile(r"(pytorch_model|adapter_model|model)(-\d+-of-\d+)?\.(bin|pt|pth)$")
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".yaml")

PROTOCOLS = {
    "many_shot": "many-shot merging: each task's LoRA adapter trained locally from the previous merge, "
    "then all merged, every round",
    "post_hoc": "post-hoc merging: each task's LoRA adapter trained alone, then merged once",
    "merge": "a post-hoc merge of existing adapters or checkpoints (`metis-hf merge`)",
    "compare": "a comparison of merge methods (`metis-hf compare`)",
}


PROJECT_URL = "https://github.com/metis-hf/metis-hf"
ALL_TASKS = "metis-hf/multi-task"  # the dataset of the Avg and Worst over a card's tasks


@dataclass
class CardResult:
    """One evaluation result: a row of the card's results table and one ``model-index`` metric.

    The model-index groups metrics by dataset, so a metric is told apart by its name: "gcd
    exact_match", "Avg exact_match"."""

    task: str  # a task's name, or "Avg" / "Worst" over the tasks (dataset ALL_TASKS)
    metric: str  # exact_match, score, normalized_exact_match, normalized_score, or a harness metric
    value: float
    dataset_type: str  # a Hub dataset id where there is one
    dataset_name: str
    dataset_config: str | None = None
    dataset_split: str | None = None
    dataset_args: dict[str, Any] | None = None

    def eval_result(self) -> EvalResult:
        return EvalResult(
            task_type="text-generation",
            task_name="all tasks" if self.dataset_type == ALL_TASKS else self.task,
            dataset_type=self.dataset_type,
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            dataset_split=self.dataset_split,
            dataset_args=self.dataset_args,
            metric_type=self.metric,
            metric_name=f"{self.task} {self.metric}",
            metric_value=self.value,
            source_name="metis-hf",
            source_url=PROJECT_URL,
        )


def results_table(results: Sequence[CardResult]) -> str:
    """Markdown: the card's results, as its ``model-index`` metadata holds them."""
    lines = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    lines += [f"| {r.task} | {r.dataset_name} | {r.metric} | {r.value:.4f} |" for r in results]
    return "\n".join(lines)


@dataclass
class CardInfo:
    """What a card says; stored as ``metis_card.json`` next to the README it renders."""

    kind: CardKind
    method: str
    protocol: str  # a key of PROTOCOLS
    base_model: str | None = None  # a Hub id where one is known
    sources: list[str] = field(default_factory=list)  # merged adapters / checkpoints (post-hoc)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    tasks: list[str] = field(default_factory=list)
    config_text: str = ""
    config_title: str = "Recipe"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evaluation_table: str | None = None
    results: list[CardResult] = field(default_factory=list)  # the model-index results
    images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # short paragraphs under "Method"

    def __post_init__(self) -> None:
        self.results = [r if isinstance(r, CardResult) else CardResult(**r) for r in self.results]
        if self.kind not in TEMPLATES:
            raise ValueError(f"Card kind must be one of {sorted(TEMPLATES)}, got {self.kind!r}.")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Card protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}.")


def card_info_for(
    kind: CardKind, method: str, protocol: str, base_model: str | None, **fields: Any
) -> CardInfo:
    """A CardInfo whose base model (a built-in name, its cached folder, or a Hub id) is named by
    its Hub id, with the base's license where metis-hf knows it."""
    hub_id, license_name = hub_identity(base_model)
    fields.setdefault("license", license_name)
    return CardInfo(kind=kind, method=method, protocol=protocol, base_model=hub_id, **fields)


def framework_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("metis-hf", "transformers", "peft", "trl", "torch", "huggingface_hub", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def round_table(rounds: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Markdown: per round, each task's merge weight (alpha) and loss gap, the mask density and
    the merged adapter's multi-task validation loss."""
    records = [RoundRecord.from_log(row) for row in rounds]
    if not records:
        return ""
    has_gaps = records[0].loss_gaps is not None
    header = ["round", *[f"alpha {t}" for t in tasks]]
    header += [f"gap {t}" for t in tasks] if has_gaps else []
    header += ["mask density", "multi-task loss"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]

    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) else "-"

    for record in records:
        cells = [str(record.round), *[fmt(record.alphas.get(t)) for t in tasks]]
        cells += [fmt((record.loss_gaps or {}).get(t)) for t in tasks] if has_gaps else []
        cells += [fmt(record.mask_density), fmt(record.multitask_loss)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method_text(name: str) -> str:
    """The registry's sentence on a method, for cards (names outside it, e.g. a compare, get a stub)."""
    from metis_hf.merging import get_merge_method

    try:
        return get_merge_method(name).description
    except ValueError:
        return f"The `{name}` merge method."


def render_card(info: CardInfo, repo_id: str | None = None) -> ModelCard:
    """The card of ``info`` from its template; code snippets load from ``repo_id`` when given."""
    tags = ["metis", "merge", "many-shot-merging", "trl", "sft", "lora", info.method.replace("_", "-")]
    if info.kind == "comparison":
        tags.append("evaluation")
    library = "peft" if info.kind == "adapter" else "transformers"
    base_models = [m for m in [info.base_model, *info.sources] if m]
    relation = None
    if info.kind == "adapter" and not info.sources:
        relation = "adapter"
    elif info.kind != "comparison" and base_models:
        relation = "merge"
    title = {
        "adapter": f"{info.method} merged LoRA adapter",
        "model": f"{info.method} merged model",
        "comparison": "Merge methods compared, post hoc and many-shot",
    }[info.kind]
    data = ModelCardData(
        model_name=title if info.results else None,
        eval_results=[r.eval_result() for r in info.results] or None,
        base_model=base_models or None,
        base_model_relation=relation,
        library_name=library,
        tags=list(dict.fromkeys(tags)),
        datasets=info.datasets or None,
        license=info.license,
    )
    template = resources.files("metis_hf") / "model_cards" / TEMPLATES[info.kind]
    method_text = _method_text(info.method)
    how = PROTOCOLS[info.protocol] + (f", with `{info.method}`." if info.protocol != "compare" else ".")
    base = info.base_model or "the base model"
    return ModelCard.from_template(
        data,
        template_str=template.read_text(),
        title=title,
        how_made=how,
        base_model=base,
        base_model_url=f"https://huggingface.co/{info.base_model}" if info.base_model else "#",
        load_path=repo_id or "path/to/this/folder",
        method_text=method_text,
        round_table=round_table(info.rounds, info.tasks),
        evaluation_table=info.evaluation_table or "",
        results_table=results_table(info.results) if info.results else "",
        config_title=info.config_title,
        config_text=info.config_text.rstrip(),
        versions=framework_versions(),
        citation=CITATION,
        images=info.images,
        notes=info.notes,
    )


def write_card(folder: str | os.PathLike, info: CardInfo, repo_id: str | None = None) -> Path:
    """Write README.md (the rendered card) and metis_card.json into ``folder``."""
    folder = Path(folder)
    write_json(folder / CARD_INFO_FILE, dataclasses.asdict(info))
    write_text_atomic(folder / "README.md", str(render_card(info, repo_id)))
    return folder / "README.md"


def read_card_info(folder: str | os.PathLike) -> CardInfo | None:
    path = Path(folder) / CARD_INFO_FILE
    if not path.is_file():
        return None
    return CardInfo(**json.loads(path.read_text()))


# --- pushing -----------------------------------------------------------------------------------


@dataclass
class PushResult:
    repo_id: str
    staged_dir: Path
    files: list[str]
    dry_run: bool
    url: str | None = None


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid repository id {repo_id!r}: {err}") from None
    if repo_id.count("/") > 1:
        raise ValueError(f"Invalid repository id {repo_id!r}: expected 'name' or 'namespace/name'.")


def _uploadable(folder: Path, include_checkpoints: bool = False) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if not path.is_file() or any(p.startswith(".") or p in SKIPPED_DIRS for p in parts):
            continue
        if not include_checkpoints and any(p.startswith("checkpoint-") for p in parts[:-1]):
            continue
        if path.name.endswith((".tmp", ".lock")) or ".tmp" in "".join(parts[:-1]):
            continue
        if path.suffix in UPLOADED_SUFFIXES or PICKLED_WEIGHTS.search(path.name):
            files.append(path)
    return files


def check_push_folder(
    folder: str | os.PathLike, allow_pickle: bool = False, include_checkpoints: bool = False
) -> tuple[Path, list[Path]]:
    """The folder to upload and its files. A training output's ``merged/`` folder is taken when the
    folder itself holds no weights. Refuses a missing folder, a folder without weights (a compare
    report excepted) and pickle-only weights unless ``allow_pickle``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder {str(folder)!r} does not exist.")
    files = _uploadable(folder, include_checkpoints)
    info = read_card_info(folder)
    safe = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    pickled = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if info is not None and info.kind == "comparison":
        return folder, files
    top_level_weights = [f for f in safe + pickled if f.parent == folder]
    if not top_level_weights and (folder / "merged" / "adapter_config.json").is_file():
        return check_push_folder(folder / "merged", allow_pickle, include_checkpoints)  # a `train` output
    if not safe and not pickled:
        raise ValueError(f"{folder} holds no model weights (*.safetensors); nothing to push.")
    if pickled and not safe and not allow_pickle:
        raise ValueError(
            f"{folder} holds pickle weights only ({pickled[0].name}): loading them can run code. "
            "Convert them to safetensors, or pass --allow-pickle to push them anyway."
        )
    if not allow_pickle:
        files = [f for f in files if f.suffix not in PICKLE_SUFFIXES]
    return folder, files


def stage_folder(
    folder: str | os.PathLike,
    stage_dir: str | os.PathLike,
    repo_id: str | None,
    allow_pickle: bool = False,
    include_checkpoints: bool = False,
) -> list[str]:
    """Copy (hard-link where possible) what would be uploaded into ``stage_dir``: re-render the card
    for ``repo_id``, name the base model by its Hub id in an adapter's config (never by a local
    path), and redact tokens and this machine's absolute paths from every text file."""
    source, files = check_push_folder(folder, allow_pickle, include_checkpoints)
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        target = stage_dir / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    info = read_card_info(source)
    if info is not None:
        _replace(stage_dir / "README.md", str(render_card(info, repo_id)))
    for config_path in stage_dir.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        hub_id = info.base_model if info is not None and info.base_model else hub_identity(base)[0]
        if hub_id != base and (hub_id or base):
            if hub_id is None:
                logger.warning(
                    "%s: the base model %r is a local folder; it is uploaded as null. Load the adapter "
                    "on its base explicitly, or merge from a Hub id.",
                    config_path.relative_to(stage_dir),
                    base,
                )
            config["base_model_name_or_path"] = hub_id
            _replace(config_path, json.dumps(config, indent=2) + "\n")
    for path in stage_dir.rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_text(errors="replace")
            if path.suffix == ".json":  # structured: keys by name, then values
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    clean = redact_known(text)
                else:
                    clean = (
                        text if redact_data(data) == data else json.dumps(redact_data(data), indent=2) + "\n"
                    )
                    clean = redact_known(hide_local_paths(clean))
            else:
                clean = redact_text(hide_local_paths(text))
            if clean != text:
                path.unlink()  # a hard link to the source, which must stay as it is
                path.write_text(clean)
    return sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*") if p.is_file())


def _replace(path: Path, text: str) -> None:
    """Write a staged file anew: it may be a hard link to the source, which must stay as it is."""
    path.unlink(missing_ok=True)
    write_text_atomic(path, text)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    allow_pickle: bool = False,
    commit_message: str | None = None,
    stage_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    include_checkpoints: bool = False,
) -> PushResult:
    """Stage ``folder`` and upload it to ``repo_id`` (created if missing). ``dry_run`` stages and
    lists only. Everything is checked before the first network call."""
    if isinstance(token, str):
        register_secret(token)
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise ValueError("--revision must not be empty.")
    keep = dry_run or stage_dir is not None
    if stage_dir is not None and Path(stage_dir).exists() and any(Path(stage_dir).iterdir()):
        raise FileExistsError(f"Stage folder {str(stage_dir)!r} is not empty.")
    created = stage_dir is None or not Path(stage_dir).exists()
    staged = Path(stage_dir) if stage_dir is not None else Path(tempfile.mkdtemp(prefix="metis-hf-push-"))
    staging = True
    try:
        files = stage_folder(folder, staged, repo_id, allow_pickle, include_checkpoints)
        staging = False
        result = PushResult(repo_id, staged, files, dry_run)
        if dry_run:
            return result
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        total = sum((staged / f).stat().st_size for f in files)
        large = total > LARGE_FOLDER_BYTES or len(files) > LARGE_FOLDER_FILES
        # huggingface_hub 1.x has a resumable large-folder upload; from 2.0 upload_folder itself
        # commits large folders in batches.
        if large and hasattr(api, "upload_large_folder"):
            api.upload_large_folder(repo_id, staged, repo_type="model", revision=revision, private=private)
        else:
            api.upload_folder(
                repo_id=repo_id,
                folder_path=staged,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or "Upload with metis-hf",
            )
        result.url = str(url)
        return result
    finally:
        # A stage that failed half-way is never kept, and a folder made for it is removed.
        if not keep or (staging and created):
            shutil.rmtree(staged, ignore_errors=True)


def describe_push(result: PushResult, folder: str | os.PathLike) -> str:
    sizes = {f: (result.staged_dir / f).stat().st_size for f in result.files} if result.dry_run else {}
    head = (
        f"Dry run: {len(result.files)} files from {folder} staged in {result.staged_dir} for {result.repo_id}:"
        if result.dry_run
        else f"Pushed {len(result.files)} files from {folder} to {result.url or result.repo_id}"
    )
    if not result.dry_run:
        return head
    return "\n".join([head, *[f"  {f}  ({sizes[f]:,} bytes)" for f in result.files]])
