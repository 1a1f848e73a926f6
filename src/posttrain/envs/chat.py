"""Environment tokens as the chat template's delta: the trainer owns tokenization, never the environment.

After a policy turn, the tokens appended to a trajectory are what the template renders *after* the policy's
stop token: the boundary the template adds that the policy never sampled (ChatML's "\\n" after <|im_end|>),
the observation's turns (tool results, user replies) and the next generation prompt. They are found as a
difference of two renders (the conversation with the assistant turn, and with the observation added), as TRL's
``_get_tool_suffix_ids`` and verl's ``render_delta_token_id`` do; only that delta text is encoded, so what the
policy sampled is never decoded and re-encoded.

A template may rewrite history (Qwen3 drops earlier turns' reasoning once a new user turn comes): then the
new render does not extend the old one. ``history`` is the declared policy for that case: "keep" (default)
keeps the buffer append-only -- the context the policy saw, reasoning included, is the one it is trained on --
and counts the rewrite (``rewrites``); "error" stops the run. It is never silently re-rendered.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.tokenize import text_ids

_DUMMY = [{"role": "user", "content": "x"}]


class TemplateRewrite(ValueError):
    """The chat template rewrote earlier turns and the history policy is "error"."""


def _render(tok, messages, tools, gen: bool) -> str:
    return tok.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=gen)


class ChatTrack:
    """One trajectory's conversation as the template sees it: the messages, and the text of the last render
    that the token buffer matches."""

    def __init__(self, tok, messages: list[dict[str, Any]], tools: list[dict[str, Any]], history: str = "keep"):
        if history not in ("keep", "error"):
            raise ValueError(f"history: expected keep | error, got {history!r}")
        self.tok, self.tools, self.history = tok, tools, history
        self.messages = [dict(m) for m in messages]
        self.rendered = _render(tok, self.messages, tools, gen=True)
        self.rewrites = 0

    def prompt_ids(self) -> list[int]:
        return text_ids(self.tok, self.rendered)

    def observe(self, turn_text: str, stop_text: str, observation: list[dict[str, Any]]) -> list[int]:
        """The policy said ``turn_text`` (decoded, its stop token ``stop_text`` excluded; "" when it ended
        without one); the environment answers ``observation``. Returns the environment tokens to append."""
        self.messages.append({"role": "assistant", "content": turn_text})
        with_turn = _render(self.tok, self.messages, self.tools, gen=False)
        self.messages += [dict(m) for m in observation]
        after = _render(self.tok, self.messages, self.tools, gen=True)
        said = self.rendered + turn_text
        self.rendered = after  # the next turn is checked against the template's own render
        if with_turn.startswith(said) and after.startswith(with_turn):
            tail = with_turn[len(said) :]
        else:
            self.rewrites += 1
            if self.history == "error":
                raise TemplateRewrite(
                    "the chat template re-rendered earlier turns differently (e.g. it strips reasoning from "
                    "history), so the next turn's prompt is not an extension of the tokens sampled so far; "
                    "set env.history: keep to train on the append-only context instead"
                )
            with_turn, after, tail = self._dummy_delta(observation)
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text) :]  # the policy sampled the end-of-turn token itself
        return text_ids(self.tok, tail + after[len(with_turn) :])

    def finish(self, turn_text: str) -> None:
        """The policy's last turn (nothing follows it): kept in ``messages``, nothing to append."""
        self.messages.append({"role": "assistant", "content": turn_text})

    def _dummy_delta(self, observation):
        """The delta on a stand-in conversation (history "keep" after a rewrite): the boundary and the
        observation as the template renders them after a plain assistant turn."""
        base = [*_DUMMY, {"role": "assistant", "content": "x"}]
        with_turn = _render(self.tok, base, self.tools, gen=False)
        after = _render(self.tok, base + [dict(m) for m in observation], self.tools, gen=True)
        said = _render(self.tok, _DUMMY, self.tools, gen=True) + "x"
        if not (after.startswith(with_turn) and with_turn.startswith(said)):
            raise TemplateRewrite("the chat template does not render an observation as an append to the conversation")
        return with_turn, after, with_turn[len(said) :]
