"""Prompts as the model reads them: the text a row's prompt renders to (the tokenizer's
chat template, with a row's tools and template arguments), and the system message the
config key system_prompt opens every prompt with."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from gft.datafiles import type_name
from gft.errors import DataError, first_line
from gft.types import Example


def render_prompt(example: Example, tokenizer: Any, *,
                  chat_template: bool | None = None) -> str:
    """The exact text the model is conditioned on for `example`.

    Chat messages always go through the tokenizer's chat template (with the generation
    prompt appended, or, after a final assistant turn, that turn left open for the
    response to continue), so a tokenizer without one is an error. A string prompt is wrapped as
    a single user turn only when `chat_template` is True and the tokenizer has a template;
    None ("auto") and False leave string prompts unchanged, since plain-text data sets
    (and base models) are usually written for raw completion.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(example.prompt, str):
        if not (chat_template and has_template):
            return example.prompt
        messages = [{"role": "user", "content": example.prompt}]
    else:
        messages = example.prompt
    if not has_template:
        raise DataError("the prompt is a list of chat messages but the tokenizer has no "
                        "chat template; set one or give a string prompt",
                        path=example.source)
    # A chat prompt that ends with an assistant turn is a prefill that the response
    # continues, as TRL renders it (continue_final_message); a generation prompt after it
    # would close that turn and open another.
    prefill = {"continue_final_message": True} if messages[-1].get("role") == "assistant" \
        else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=not prefill,
                                             **prefill, **_template_arguments(example))
    except DataError:
        raise
    except Exception as exc:  # a template may raise on data it does not accept
        raise DataError(f"the chat template failed: {type(exc).__name__}: "
                        f"{first_line(exc)}", path=example.source) from exc
    if not isinstance(text, str):
        raise DataError(f"apply_chat_template returned {type_name(text)}, not text",
                        path=example.source)
    return text


def _template_arguments(example: Example) -> dict[str, Any]:
    """What a row adds to its chat template, as TRL's SFTTrainer and mlx-lm's chat data
    read it: `tools` (the tool schemas a tool-calling prompt is written against; a JSON
    string as datasets often stores them) and `chat_template_kwargs` (e.g.
    {"enable_thinking": false}). Without them the prompt lacks what the data says."""
    def fail(field: str, message: str) -> DataError:
        return DataError(message, path=example.source, field=field)

    out: dict[str, Any] = {}
    tools = example.columns.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise fail("tools", "a string that is not JSON; give a list of tool schemas") \
                from None
    if tools:  # [] as None: some templates render tool boilerplate for an empty list
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise fail("tools", f"must be a list of tool schemas (objects), got "
                                f"{type_name(tools)}")
        out["tools"] = tools
    kwargs = example.columns.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise fail("chat_template_kwargs", f"must be an object, got {type_name(kwargs)}")
        out.update(kwargs)
    return out


def with_system_prompt(rows: list[Example], system: str | None) -> list[Example]:
    """Each row with `system` as its prompt's first message (config key system_prompt),
    unless its prompt opens with a system message of its own: a string prompt becomes a
    chat of that system message and a user turn. Reward functions then see the prompt
    with it, as Open-R1's (which builds these chats) do."""
    if system is None:
        return rows
    return [replace(ex, prompt=system_first(ex.prompt, system)) for ex in rows]


def system_first(prompt: str | list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """The prompt as chat messages opening with a system message (its own, else `system`)."""
    if isinstance(prompt, str):
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if prompt and prompt[0].get("role") in ("system", "developer"):
        return prompt
    return [{"role": "system", "content": system}, *prompt]
