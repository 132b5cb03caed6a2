"""Tokenizer, streaming detokenizer, stop strings and chat templates (sandboxed Jinja)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import BundleError, ConfigError
from .manifest import TokenizerSpec


class Text:
    def __init__(self, spec: TokenizerSpec, tokenizer_path: Path, template_path: Path | None):
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"{tokenizer_path.name} could not be read ({e}); the bundle is corrupt") from None
        self.spec = spec
        self.template_source = template_path.read_text() if template_path else ""
        self._template = None

    def encode(self, text: str) -> list[int]:
        """Token ids (special-token text such as <|im_start|> maps to its id; BOS added if the model wants it)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.spec.add_bos_token and self.spec.bos_token_id >= 0 and (not ids or ids[0] != self.spec.bos_token_id):
            ids = [self.spec.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> str:
        """`extra`: more template variables (`tools`, for templates that describe them)."""
        if not self.template_source:
            raise ConfigError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ConfigError("messages must be a list of {'role': str, 'content': str} dicts")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ConfigError(f"chat template: {msg}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.template_source)
            except TemplateError as e:
                raise BundleError(f"the bundle's chat template does not parse: {e}") from None
        special = lambda i: self.tok.id_to_token(i) if i is not None and i >= 0 else ""
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **extra,
                                     bos_token=special(self.spec.bos_token_id),
                                     eos_token=special(self.spec.eos_token_ids[0] if self.spec.eos_token_ids else None))


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character and
    never re-decoding more than a few tokens (the prefix/read offsets of incremental decoding)."""

    def __init__(self, text: Text):
        self.text = text
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.text.decode(self.ids[self.prefix:self.read])
        now = self.text.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


class StopStrings:
    """Holds back text that could be the start of a stop string; reports when one appears."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, stopped)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
