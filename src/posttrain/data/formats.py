"""The column conventions the ecosystem already uses, and validation before training starts.

    lm          `text`, or `messages` (role/content list)
    sft         `prompt` + `completion`, or `messages`
    preference  `prompt` + `chosen` + `rejected`
    unpaired    `prompt` + `completion` + `label` (bool: desirable or not; KTO)
    prompt      `prompt` plus any extra columns (handed to reward functions: `answer`, `tests`, ...)

`prompt`, `completion`, `chosen` and `rejected` are strings (standard) or lists of messages
(conversational). Every error names the row's location and the column.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.io import DataError, Rows

KINDS = ("lm", "sft", "preference", "unpaired", "prompt")
ROLES = ("system", "user", "assistant", "tool")


def _check_messages(value: Any, where: str, column: str, *, need_assistant: bool) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: column {column!r}, message {i}: needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: column {column!r}, message {i}: unknown role {m['role']!r} ({', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: column {column!r}, message {i}: content must be a string")
        for j, call in enumerate(m.get("tool_calls") or []):
            # TRL's convention: {"type": "function", "function": {"name": ..., "arguments": {...}}}
            f = call.get("function", call) if isinstance(call, dict) else None
            if not (
                isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), (dict, str))
            ):
                raise DataError(
                    f"{where}: column {column!r}, message {i}, tool_calls[{j}]: expected "
                    '{"type": "function", "function": {"name": str, "arguments": {...}}}'
                )
    if need_assistant and not any(
        m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in value
    ):
        raise DataError(f"{where}: column {column!r} has no non-empty assistant message to train on")


def _check_text(row: dict, where: str, column: str, *, allow_messages: bool, nonempty: bool) -> None:
    if column not in row or row[column] is None:
        raise DataError(f"{where}: missing column {column!r} (row has: {', '.join(map(str, row)) or 'nothing'})")
    value = row[column]
    if isinstance(value, list) and allow_messages:
        _check_messages(value, where, column, need_assistant=False)
        return
    if not isinstance(value, str):
        kind = "a string or a list of messages" if allow_messages else "a string"
        raise DataError(f"{where}: column {column!r} must be {kind}, got {type(value).__name__} {value!r:.60}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: column {column!r} is empty")


def validate(rows: Rows, kind: str) -> None:
    """Raise DataError naming the first bad row and column; accept a dataset fit for ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} not in {KINDS}")
    if len(rows) == 0:
        raise DataError(f"{rows.source}: the dataset is empty")
    for row, where in zip(rows.rows, rows.where):
        if kind == "lm":
            if "messages" in row:
                _check_messages(row["messages"], where, "messages", need_assistant=False)
            else:
                if "text" not in row:
                    raise DataError(f"{where}: missing column 'text' (or 'messages') for language modeling")
                _check_text(row, where, "text", allow_messages=False, nonempty=True)
        elif kind == "sft":
            if "messages" in row:
                _check_messages(row["messages"], where, "messages", need_assistant=True)
            else:
                _check_text(row, where, "prompt", allow_messages=True, nonempty=False)
                _check_text(row, where, "completion", allow_messages=True, nonempty=True)
        elif kind == "preference":
            _check_text(row, where, "prompt", allow_messages=True, nonempty=False)
            _check_text(row, where, "chosen", allow_messages=True, nonempty=True)
            _check_text(row, where, "rejected", allow_messages=True, nonempty=True)
        elif kind == "unpaired":
            _check_text(row, where, "prompt", allow_messages=True, nonempty=False)
            _check_text(row, where, "completion", allow_messages=True, nonempty=True)
            if not isinstance(row.get("label"), bool):
                raise DataError(f"{where}: column 'label' must be true or false, got {row.get('label')!r}")
        elif kind == "prompt":
            _check_text(row, where, "prompt", allow_messages=True, nonempty=True)


# Not handed to verifiers: the prompt goes separately, and a reference `completion` column would
# collide with the completion being scored.
NOT_REWARD_COLUMNS = ("prompt", "completion")


def reward_columns(row: dict) -> dict:
    """The row's columns a verifier receives as keyword arguments (e.g. answer, tests)."""
    return {k: v for k, v in row.items() if k not in NOT_REWARD_COLUMNS}
