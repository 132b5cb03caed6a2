"""A conversation made into prompt tokens: OpenAI-style messages (tool calls and tool results
included) rendered with the bundle's chat template, tools described to the model, and the oldest
turns dropped (the system prompt kept) when the conversation outgrows the context."""
from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import ConfigError, ContextError
from .structured import tool_functions, tools_prompt
from .text import Text


@dataclass(frozen=True)
class PreparedChat:
    ids: list[int]                 # the prompt, ending with the assistant's turn opening
    dropped: int                   # oldest messages left out to fit the context
    tools: tuple[dict, ...]        # the functions the model may call (empty: none)


def _content(m: dict) -> str:
    """A message's text: string content, OpenAI's list of text parts, or an assistant's tool calls."""
    c = m.get("content")
    if isinstance(c, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise ConfigError("message content parts must be {'type': 'text', 'text': ...} (images are not supported)")
        c = "".join(p["text"] for p in c)
    calls = m.get("tool_calls")
    if m.get("role") == "assistant" and calls:
        return (c or "") + "".join(json.dumps({"name": t["function"]["name"],
                                               "arguments": _arguments(t["function"].get("arguments"))})
                                   for t in calls)
    if c is None and m.get("role") != "assistant":       # an assistant's may be null (it called a tool)
        raise ConfigError(f"a {m.get('role')} message has no 'content': messages must be "
                          "{'role': ..., 'content': ...} dicts")
    if c is None:
        c = ""
    if not isinstance(c, str):
        raise ConfigError(f"message content must be a string, not {type(c).__name__}")
    return c


def _arguments(a):
    if isinstance(a, str):
        try:
            return json.loads(a)
        except json.JSONDecodeError:
            return a
    return a


def normalise(messages: list[dict], functions: list[dict], *, template_has_tools: bool) -> list[dict]:
    """Messages as the chat template takes them: {"role", "content"} strings; without a template
    of its own for tools, the tools are described in the system message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConfigError("each message must be a dict with a 'role' string")
        role = m["role"] if m["role"] != "developer" else "system"
        out.append({"role": role, "content": _content(m)})
    if functions and not template_has_tools:
        described = tools_prompt(functions)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def prepare(text: Text, messages: list[dict], *, context: int, reserve: int, tools=None) -> PreparedChat:
    """Render and tokenize `messages`; drop the oldest turns after the system prompt until the
    prompt leaves `reserve` tokens for the reply. A conversation that cannot fit even with only
    the system prompt and the last message is a ContextError with the numbers."""
    functions = tool_functions(tools) if tools else []
    has_tools = "tools" in text.template_source
    convo = normalise(messages, functions, template_has_tools=has_tools)
    keep = 1 if convo[0]["role"] == "system" else 0
    dropped = 0
    extra = {"tools": [{"type": "function", "function": f} for f in functions]} if functions and has_tools else {}
    while True:
        ids = text.encode(text.render_chat(convo, add_generation_prompt=True, **extra))
        if len(ids) + reserve <= context:
            return PreparedChat(ids, dropped, tuple(functions))
        if len(convo) - keep <= 1:
            raise ContextError(f"the conversation needs {len(ids)} prompt tokens and {reserve} for the reply, but "
                               f"the context window is {context} tokens"
                               + (f" (after dropping the {dropped} oldest messages)" if dropped else "")
                               + ": shorten the last message or the system prompt, or ask for fewer tokens")
        del convo[keep]
        dropped += 1
        while len(convo) - keep > 1 and convo[keep]["role"] != "user":   # a turn starts with the user
            del convo[keep]
            dropped += 1
