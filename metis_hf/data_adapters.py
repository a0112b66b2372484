"""Schema adapters for the paper's training datasets: a raw row in, ``(instruction, response)`` out,
or None to leave the row out (wrong language, unsafe response, empty text).

Each function follows the dataset's published schema on the Hub; tests run them on small local
files with the same columns. A recipe names one with ``adapter:`` (and ``adapter_options:``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Pair = tuple[str, str]
Adapter = Callable[[Mapping[str, Any], Mapping[str, Any]], Pair | None]

# The paper's multilingual task: French, Spanish, German and Russian rows of Aya.
AYA_LANGUAGES = ("French", "Spanish", "German", "Russian")
AYA_CODES = {"French": "fra", "Spanish": "spa", "German": "deu", "Russian": "rus"}


def _clean(instruction: Any, response: Any) -> Pair | None:
    instruction, response = str(instruction or "").strip(), str(response or "").strip()
    return (instruction, response) if instruction and response else None


def tulu3_personas_if(row: Mapping[str, Any], options: Mapping[str, Any]) -> Pair | None:
    """allenai/tulu-3-sft-personas-instruction-following: ``messages`` (user, then assistant);
    ``prompt`` holds the user turn as well."""
    messages = row.get("messages") or []
    user = next((m["content"] for m in messages if m.get("role") == "user"), row.get("prompt"))
    assistant = next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), None)
    return _clean(user, assistant)


def numina_math_tir(row: Mapping[str, Any], options: Mapping[str, Any]) -> Pair | None:
    """AI-MO/NuminaMath-TIR: ``problem`` and ``solution`` (tool-integrated reasoning in text)."""
    return _clean(row.get("problem"), row.get("solution"))


def aya(row: Mapping[str, Any], options: Mapping[str, Any]) -> Pair | None:
    """CohereForAI/aya_dataset: ``inputs``, ``targets``, ``language`` (a name) and
    ``language_code`` (ISO 639-3); rows outside ``options["languages"]`` are left out."""
    languages = set(options.get("languages", AYA_LANGUAGES))
    codes = {AYA_CODES.get(name, name) for name in languages}
    if row.get("language") not in languages and row.get("language_code") not in codes:
        return None
    return _clean(row.get("inputs"), row.get("targets"))


def wildguardmix(row: Mapping[str, Any], options: Mapping[str, Any]) -> Pair | None:
    """allenai/wildguardmix (``wildguardtrain``): ``prompt``, ``response`` and harm labels. Only
    responses labelled ``unharmful`` are trained on (refusals of harmful prompts, help on benign
    ones); rows without a response are left out."""
    if row.get("response_harm_label") != options.get("keep_response_label", "unharmful"):
        return None
    return _clean(row.get("prompt"), row.get("response"))


def wildjailbreak(row: Mapping[str, Any], options: Mapping[str, Any]) -> Pair | None:
    """allenai/wildjailbreak (``train``): ``vanilla`` and ``adversarial`` prompts, ``completion``,
    ``data_type``. The adversarial prompt is used when there is one."""
    kinds = options.get("data_types")
    if kinds and row.get("data_type") not in kinds:
        return None
    prompt = row.get("adversarial") or row.get("vanilla")
    return _clean(prompt, row.get("completion"))


ADAPTERS: dict[str, Adapter] = {
    "tulu3_personas_if": tulu3_personas_if,
    "numina_math_tir": numina_math_tir,
    "aya": aya,
    "wildguardmix": wildguardmix,
    "wildjailbreak": wildjailbreak,
}


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise ValueError(f"Unknown dataset adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}.")
    return ADAPTERS[name]
