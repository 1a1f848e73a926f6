"""Rows -> token ids with a loss mask. Only completion / assistant tokens count for SFT.

An ``Example`` holds ``input_ids`` and ``loss_mask`` where ``loss_mask[i] == 1`` means token i is
a training target (predicted from tokens < i). ``loss_mask[0]`` is always 0: nothing in the
document predicts its first token, which is also what makes packing safe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from posttrain.data.io import DataError, Rows

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EncodeStats:
    total: int
    overlong: int
    dropped: int
    truncated: int


def is_conversational(value: Any) -> bool:
    return isinstance(value, list)


def render_prompt(tokenizer, prompt: Any) -> str:
    """A prompt as text; conversational prompts go through the chat template."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def text_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` as it stands (no special tokens added: a rendered template has its own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _completion_text(tokenizer, prompt: Any, completion: Any) -> str:
    if not is_conversational(completion):
        return completion
    if not is_conversational(prompt):
        raise DataError("a conversational completion needs a conversational prompt")
    prompt_text = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template does not render the prompt as a prefix of prompt + completion")
    return full[len(prompt_text) :]


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    return text_ids(tokenizer, render_prompt(tokenizer, prompt))


def completion_ids(tokenizer, prompt: Any, completion: Any) -> list[int]:
    """Completion tokens, ending with EOS (the policy must learn to stop)."""
    ids = text_ids(tokenizer, _completion_text(tokenizer, prompt, completion))
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def join(prompt: list[int], completion: list[int], *, completion_only: bool = True) -> Example:
    mask = [0 if completion_only else 1] * len(prompt) + [1] * len(completion)
    mask[0] = 0
    return Example(tuple(prompt) + tuple(completion), tuple(mask))


def encode_prompt_completion(tokenizer, prompt: Any, completion: Any, *, completion_only: bool = True) -> Example:
    """Prompt tokens (masked out) + completion tokens + EOS (trained)."""
    return join(
        prompt_ids(tokenizer, prompt), completion_ids(tokenizer, prompt, completion), completion_only=completion_only
    )


def encode_messages(
    tokenizer, messages: list[dict], *, assistant_only: bool = True, tools: list | None = None
) -> Example:
    """A conversation through the chat template; with ``assistant_only`` only assistant turns train (their
    tool calls included; tool results and user turns are context). ``tools``: the JSON schemas the
    template is given (a row's ``tools`` column, TRL's convention), as the environment gives them in RL.

    Assistant spans are found by rendering prefixes of the conversation (works with any chat
    template, with or without `{% generation %}` markers) and mapped to tokens by offsets.
    """

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=gen)

    text = render(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], gen=True)) if i else 0
        end = len(render(messages[: i + 1]))
        spans.append((start, end))
    if assistant_only:
        mask = [int(any(s <= off[0] < e for s, e in spans)) for off in enc["offset_mapping"]]
    else:
        mask = [1] * len(ids)
    if ids and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    mask[0] = 0
    return Example(tuple(ids), tuple(mask))


def encode_text(tokenizer, text: str) -> Example:
    ids = text_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return Example(tuple(ids), tuple([0] + [1] * (len(ids) - 1)))


def encode_row(tokenizer, row: dict, kind: str, *, completion_only: bool = True) -> Example:
    if "messages" in row:
        return encode_messages(
            tokenizer, row["messages"], assistant_only=(kind == "sft" and completion_only), tools=row.get("tools")
        )
    if kind == "lm":
        return encode_text(tokenizer, row["text"])
    return encode_prompt_completion(tokenizer, row["prompt"], row["completion"], completion_only=completion_only)


def encode_rows(
    tokenizer,
    rows: Rows,
    kind: str,
    *,
    max_length: int,
    overlong: str,
    completion_only: bool = True,
    truncate_ok: bool = False,
) -> tuple[list[Example], EncodeStats]:
    """Encode every row; rows over ``max_length`` are counted, reported, then dropped or truncated.

    ``truncate_ok`` (language modeling with packing) splits long documents into chunks instead.
    """
    out: list[Example] = []
    overlong_n = dropped = truncated = 0
    for row, where in zip(rows.rows, rows.where):
        try:
            ex = encode_row(tokenizer, row, kind, completion_only=completion_only)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ex) > max_length:
            overlong_n += 1
            if truncate_ok:
                for s in range(0, len(ex), max_length):
                    chunk = Example(ex.input_ids[s : s + max_length], (0,) + ex.loss_mask[s + 1 : s + max_length])
                    if len(chunk) > 1:
                        out.append(chunk)
                truncated += 1
                continue
            if overlong == "drop":
                dropped += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
            truncated += 1
        if sum(ex.loss_mask) == 0:
            if overlong == "truncate" and len(ex) == max_length:
                dropped += 1  # truncation removed every target token; nothing left to learn from
                continue
            raise DataError(f"{where}: no tokens to train on (empty completion / assistant turn)")
        out.append(ex)
    stats = EncodeStats(len(rows), overlong_n, dropped, truncated)
    if overlong_n:
        log.warning(
            "%s: %d of %d rows are longer than max_length=%d: %d dropped, %d truncated",
            rows.source,
            overlong_n,
            len(rows),
            max_length,
            dropped,
            truncated,
        )
    if not out:
        raise DataError(f"{rows.source}: no rows left after length filtering (max_length={max_length})")
    return out, stats
