"""Output that follows a grammar: JSON matching a schema, any JSON object, or a tool call.

Each step, llguidance computes which tokens keep the output inside the grammar and the decoder's
logits for every other token become -inf before sampling, so the result parses and validates by
construction (as long as it is not cut off by max_new_tokens). llguidance is the grammar engine
llama.cpp and onnxruntime-genai use: Rust, wheels for x86-64 and aarch64, JSON schema and Lark
grammars; on SmolLM2's 49k vocabulary a mask takes microseconds to a millisecond (docs/benchmarks.md).
It is an optional dependency: `pip install "edge[serve]"`.

Tool calls are one JSON object, {"name": ..., "arguments": {...}}: with tool_choice "required" or a
named function the output must be a call; with "auto" it is either a call or free text that does
not start with "{".
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, EdgeError

# JSON as models write it: compact, one space after ':' and ','; a schema's own "x-guidance" wins
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CHOICES = ("none", "auto", "required")


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise EdgeError('structured output needs llguidance: pip install "edge[serve]"') from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its serialised form) and what it was made from, for messages."""
    source: str
    what: str

    @classmethod
    def json_schema(cls, schema: dict) -> "Grammar":
        if not isinstance(schema, dict):
            raise ConfigError(f"json_schema must be a JSON schema object, not {type(schema).__name__}")
        llg = _llguidance()
        try:
            source = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_STYLE)
        except ValueError as e:
            raise ConfigError(f"json_schema is not usable: {e}") from None
        return cls._checked(source, "json_schema")

    @classmethod
    def json_object(cls) -> "Grammar":
        return cls.json_schema({"type": "object"})

    @classmethod
    def tool_call(cls, tools: list[dict], choice="auto") -> "Grammar":
        """A call of one of `tools` (OpenAI's {"type": "function", "function": {...}} or the bare
        function dicts): `choice` "required", "auto", or {"type": "function", "function": {"name": ...}}."""
        functions = tool_functions(tools)
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in {f["name"] for f in functions}:
                raise ConfigError(f"tool_choice names {name!r}, which is not among the tools "
                                  f"({', '.join(f['name'] for f in functions)})")
            functions = [f for f in functions if f["name"] == name]
            choice = "required"
        elif choice not in ("auto", "required"):
            raise ConfigError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function, not {choice!r}")
        call = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                           "properties": {"name": {"const": f["name"]},
                                          "arguments": f.get("parameters") or {"type": "object"}}}
                          for f in functions]}
        if choice == "required":
            return cls(cls.json_schema(call).source, "tools")
        llg = _llguidance()
        # free text may not open with "{" (nor with whitespace before it): that is how a call starts
        lark = ("start: call | TEXT\n"
                f"call: %json {json.dumps({**call, 'x-guidance': _JSON_STYLE})}\n"
                "TEXT: /[^{\\s][\\s\\S]*/\n")
        return cls._checked(llg.LLMatcher.grammar_from_lark(lark), "tools")

    @classmethod
    def _checked(cls, source: str, what: str) -> "Grammar":
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(source)
        if is_error:
            raise ConfigError(f"{what} is not usable: {'; '.join(messages)}")
        return cls(source, what)


def tool_functions(tools) -> list[dict]:
    """The function dicts of OpenAI-style tools, checked: name (a string) and parameters (an object)."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ConfigError("tools must be a non-empty list of functions")
    out = []
    for t in tools:
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ConfigError(f"each tool needs a function with a name, not {t!r}"[:200])
        if t.get("type", "function") != "function":
            raise ConfigError(f"tool type {t.get('type')!r} is not supported (only 'function')")
        if not isinstance(f.get("parameters", {}), dict):
            raise ConfigError(f"tool {f['name']!r}: parameters must be a JSON schema object")
        out.append(f)
    return out


class TokenizerCache:
    """llguidance's view of a bundle's tokenizer, made once (~0.2 s for a 49k vocabulary)."""

    def __init__(self, tokenizer_json: str, eos_ids: tuple[int, ...]):
        self._json, self._eos = tokenizer_json, list(eos_ids)
        self._tok = None

    def get(self):
        if self._tok is None:
            self._tok = _llguidance().LLTokenizer(self._json, eos_token=self._eos or None)
        return self._tok


class Constraint:
    """One generation's matcher: mask() the logits before sampling, accept() the sampled token."""

    def __init__(self, tokenizer, grammar: Grammar):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.matcher = llg.LLMatcher(tokenizer, grammar.source, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"{grammar.what}: {self.matcher.get_error()}")
        self._words = (tokenizer.vocab_size + 31) // 32
        self._bits = np.zeros(self._words, np.int32)               # one bit per token, 1 = allowed

    def mask(self, logits: np.ndarray) -> None:
        """Set every token the grammar does not allow next to -inf, in place. logits [vocab]."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        n = min(logits.shape[-1], allowed.size)
        logits[:n][allowed[:n] == 0] = -np.inf
        logits[n:] = -np.inf                                       # rows the tokenizer does not have

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise EdgeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more (only the end of the text)."""
        return self.matcher.is_stopped()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""


def parse_tool_call(text: str) -> ToolCall | None:
    """The call in a reply made under Grammar.tool_call, or None where the model answered in text."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None                       # cut off by max_new_tokens: the caller sees finish_reason "length"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments"), dict):
        return None
    return ToolCall(obj["name"], obj["arguments"])


def tools_prompt(functions: list[dict]) -> str:
    """What a chat template without tool support is told in its system message."""
    specs = "\n".join(json.dumps({k: f[k] for k in ("name", "description", "parameters") if k in f})
                      for f in functions)
    return ("You can call these functions:\n" + specs + "\nTo call one, reply with only a JSON object: "
            '{"name": <function name>, "arguments": <arguments object>}.')
