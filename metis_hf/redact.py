"""Tokens never reach a file, a card, an upload or a log line.

Two nets, both applied to every text metis-hf writes (``metis_hf.files``) and stages for upload:

* values of keys that name a secret (``hub_token: ...``, ``--set training.hub_token=...``) are
  replaced, wherever the text comes from (a recipe copied into a card, overrides in results);
* every token metis-hf knows of is replaced by value: the environment's (``HF_TOKEN``,
  ``HUGGING_FACE_HUB_TOKEN``), huggingface_hub's stored login, and any token the user handed to
  metis-hf (a config field, a push argument), which the code registers with ``register_secret``.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
ENV_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")
# hub_token, token, training.hub_token, api_key, use_auth_token, push_to_hub_token, hubToken,
# hub-token, wandb_api_key...; not pad_token or max_new_tokens.
_SECRET_KEY = (
    r"(?:[\w-]+\.)*(?:(?:use[_-]?auth|push[_-]?to[_-]?hub|hub|hf|api|access|auth|wandb(?:[_-]?api)?)[_-]?)?"
    r"(?:token|secret|password|api[_-]?key)"
)
# `key: value` (YAML, with an optional quote) and `key=value` (overrides), value up to the line's
# or the flow mapping's end.
_KEY_VALUE = re.compile(
    rf"(?i)(?<![\w.-])(?P<key>{_SECRET_KEY})(?P<sep>['\"]?\s*[:=]\s*)(?P<value>[^\s,}}\]#]+)"
)
# A YAML block value (`hub_token: >-` or `|`, the value on the indented lines below).
_BLOCK_VALUE = re.compile(
    rf"(?im)^(?P<head>(?P<indent>[ \t]*)(?:- )?['\"]?{_SECRET_KEY}['\"]?[ \t]*:[ \t]*[|>][-+0-9]*[ \t]*(?:#.*)?\n)"
    r"(?P<body>(?:(?:(?P=indent)[ \t]+\S.*|[ \t]*)(?:\n|$))+)"
)
# Tokens by their format, wherever they appear (comments and prose included): Hugging Face
# tokens (hf_ and 30-odd letters and digits) and HTTP bearer credentials.
_TOKEN_FORMATS = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}|(?i:(?<=bearer )[A-Za-z0-9._~+/=-]{8,})")
_MIN_SECRET_LENGTH = 6  # shorter strings would redact ordinary words
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a token handed to metis-hf, so that no later write can contain it."""
    if isinstance(value, str) and len(value) >= _MIN_SECRET_LENGTH:
        _registered.add(value)


def known_secrets() -> set[str]:
    found = set(_registered)
    found.update(os.environ[name] for name in ENV_TOKENS if os.environ.get(name))
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # no login, or an unreadable token file: nothing to hide
        stored = None
    if stored:
        found.add(stored)
    return {s for s in found if len(s) >= _MIN_SECRET_LENGTH}


def is_secret_key(key: str) -> bool:
    return re.fullmatch(f"(?i){_SECRET_KEY}", key.rsplit(".", 1)[-1]) is not None


def redact_known(text: str) -> str:
    """``text`` with every known token, and anything in a token's format, replaced (safe inside
    any format: JSON stays valid)."""
    for secret in sorted(known_secrets(), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _TOKEN_FORMATS.sub(REDACTED, text)


def redact_text(text: str) -> str:
    """Plain text (YAML, overrides, a card): secret-named keys' values and known tokens replaced."""

    def hide(match: re.Match) -> str:
        value = match.group("value")
        if value.lower() in ("null", "none", "~", "''", '""', "true", "false") or value[0] in "|>":
            return match.group(0)  # nothing to hide, or a block value (hidden line by line above)
        return f"{match.group('key')}{match.group('sep')}{REDACTED}"

    def hide_block(match: re.Match) -> str:
        return f"{match.group('head')}{match.group('indent')}  {REDACTED}\n"

    text = _BLOCK_VALUE.sub(hide_block, text)
    return redact_known(_TOKEN_FORMATS.sub(REDACTED, _KEY_VALUE.sub(hide, text)))


def redact_data(data: Any) -> Any:
    """A copy of JSON-like ``data`` with secret-named keys' values and known tokens replaced."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v else redact_data(v))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact_data(v) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data


LOCAL_PATH = "<local path>"
# Not inside a URL (`https://host/path`, `file:///x`): no `/` right before or after the first one.
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~-])~?/(?!/)(?:[\w.@+-]+/)*[\w.@+-]+/?")


def hide_local_paths(text: str) -> str:
    """Absolute paths of this machine (their first component exists here, or ``~``) replaced, for
    what leaves it: a pushed card says nothing about the uploader's folders."""

    def hide(match: re.Match) -> str:
        path = match.group(0)
        if path.startswith("~"):
            return LOCAL_PATH
        top = path.split("/")[1]
        return LOCAL_PATH if top and os.path.exists("/" + top) else path

    return _ABSOLUTE_PATH.sub(hide, text)
