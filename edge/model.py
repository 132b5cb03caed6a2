"""The Python API: `edge.load(path)` -> Model with generate / stream / chat.

One Model serves one generation at a time: calls from several threads are serialised by a lock
(each waits for the previous generation to finish). For parallel generation, load one Model
per thread. Closing a stream iterator early (or breaking out of the loop) ends the generation
and frees the model for the next caller.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .bundle import Bundle, open_bundle
from .engine import PREFILL_CHUNK, Decoder, default_threads
from .errors import ConfigError, ContextError
from .memory import return_freed_memory, status, trim_heap
from .progress import quiet, stderr_bar
from .sampling import Sampler, SamplingParams
from .text import StopStrings, StreamDecoder, Text


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0          # prompt in, first token's logits out
    decode_s: float = 0.0           # wall time from the prompt's logits to the last step's
    decode_steps: int = 0           # one-token forward passes in decode_s
    finish_reason: str = ""         # "eos", "stop", "length", "context", "cancelled"
    cached_tokens: int = 0          # prompt tokens whose KV cache an earlier generation left (not run again)
    dropped_messages: int = 0       # chat: oldest messages left out so that the conversation fits
    drafted: int = 0                # speculative decoding: tokens guessed ...
    accepted: int = 0               # ... and kept

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens the decode forwards produced, per second (a forward keeps its kept guesses too)."""
        return (self.decode_steps + self.accepted) / self.decode_s if self.decode_s else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return (self.decode_steps + self.accepted) / self.decode_steps if self.decode_steps else 0.0


@dataclass(frozen=True)
class Completion:
    """A finished generation, as chat(tools=...) and the server report it."""
    text: str
    tool_calls: tuple = ()          # structured.ToolCall: the function the model called, if it did
    finish_reason: str = "stop"     # OpenAI's: "stop" (end of text, a stop string), "length", "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class PromptCache:
    """Which prompt tokens the decoder's KV cache still holds, so that a generation starting with
    them (the next chat turn, the same long system prompt) runs only the rest. Only whole prefill
    pieces computed from position 0 are reused: the new prompt's remaining pieces then start where a
    cold run's would, and outputs equal a cold run's to the bit (the int8-activation kernels round a
    piece by its length, and a one-token decode step differently again, so decoded tokens are run
    again as part of the next prompt). Anything else that moves the decoder invalidates it."""

    def __init__(self, piece: int):
        self.piece = piece
        self.tokens: list[int] = []     # the cached prompt tokens, a whole number of pieces
        self.writes = -1                # the decoder's write count when they were last known good

    def reusable(self, decoder, ids: list[int]) -> int:
        if decoder.writes != self.writes:
            return 0
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):   # the last prompt token always runs, for its logits
            if a != b:
                break
            n += 1
        return n // self.piece * self.piece

    def keep(self, ids: list[int]) -> None:
        self.tokens = list(ids[:len(ids) // self.piece * self.piece])

    def settle(self, decoder) -> None:
        """After a generation: forget what was decoded, keep the cached prompt."""
        decoder.rewind(min(len(self.tokens), decoder.position))
        self.tokens = self.tokens[:decoder.position]
        self.writes = decoder.writes


class Model:
    def __init__(self, bundle: Bundle, *, threads: int, context_length: int, expert_capacity: int | None = None,
                 memory_budget=None, baseline: int = 0, expert_policy: str = "lfu", prefetch: bool | None = None,
                 expert_slots: bool = True, expert_store=None, progress=quiet):
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.text = Text(m.tokenizer, bundle.path(m.tokenizer.file),
                         bundle.path(m.tokenizer.chat_template) if m.tokenizer.chat_template else None)
        if m.moe is not None and m.moe.fused is not None and memory_budget is None and expert_capacity is None:
            # no memory limit: every expert resident, in one graph where onnxruntime routes (QMoE). Its
            # load folds the expert store's tensors into QMoE's inputs and frees them after prepacking:
            # returned to the OS, not kept in the heap (SmolMoE int4: peak RSS 715 MB, 826 MB without)
            return_freed_memory()
            self.decoder = Decoder(bundle, threads=threads, context_length=context_length, graph=m.moe.fused,
                                   prefill_chunk=PREFILL_CHUNK)
        elif m.moe is not None:
            from .moe import MoEDecoder
            self.decoder = MoEDecoder(bundle, threads=threads, context_length=context_length,
                                      expert_capacity=expert_capacity, memory_budget=memory_budget, baseline=baseline,
                                      policy=expert_policy, prefetch=prefetch, expert_slots=expert_slots,
                                      expert_store=expert_store, progress=progress)
            plan = self.decoder.plan
            if self.decoder.fused_fits:
                # the budget holds every expert, in the fused graph, which runs faster (SmolMoE int4:
                # ~100 tok/s against ~55 for the staged pipeline with every expert cached)
                self.decoder.close()
                self.decoder = None
                trim_heap()
                self.decoder = Decoder(bundle, threads=threads, context_length=context_length, graph=m.moe.fused,
                                       prefill_chunk=PREFILL_CHUNK)
                self.decoder.plan = plan
        else:
            self.decoder = Decoder(bundle, threads=threads, context_length=context_length)
        self.threads = threads
        self.eos = frozenset(m.tokenizer.eos_token_ids)
        self.last_stats = GenerationStats()
        self.prompt_cache = PromptCache(self.decoder.prefill_chunk or PREFILL_CHUNK)
        self._grammar_tokenizer = None
        self.speculation = None         # (guesser, Adaptive) from load(draft=/prompt_lookup=)
        self.on_prefill = None          # progress(done, total) for prompts of more than 8 pieces (the CLI sets it)
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self.decoder.context_length

    def params(self, **sampling) -> SamplingParams:
        """Sampling parameters: the bundle's defaults overridden by `sampling`."""
        g = self.manifest.generation
        base = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, min_p=g.min_p,
                    repetition_penalty=g.repetition_penalty)
        unknown = set(sampling) - {f.name for f in dataclasses.fields(SamplingParams)}
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = (sampling["stop"],)
        elif sampling.get("stop") is not None:
            sampling["stop"] = tuple(sampling["stop"])
        return SamplingParams(**{**base, **{k: v for k, v in sampling.items() if v is not None}})

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt must be a string, not {type(prompt).__name__}")
        if not prompt:
            raise ConfigError("the prompt is empty")
        return self.text.encode(prompt)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt: str, *, cancel: threading.Event | None = None, json_schema: dict | None = None,
                 **sampling) -> str:
        """The completion of `prompt`. `json_schema`: the output is JSON that validates against it
        (enforced token by token; needs `pip install "edge[serve]"`)."""
        return "".join(self.stream(prompt, cancel=cancel, json_schema=json_schema, **sampling))

    def chat(self, messages: list[dict], *, stream: bool = False, cancel: threading.Event | None = None,
             json_schema: dict | None = None, tools: list[dict] | None = None, tool_choice="auto", **sampling):
        """Reply to `messages` ([{"role": "user", "content": "..."}, ...]) with the model's chat
        template. The prompt cache makes each turn run only its new tokens. With `tools` (OpenAI's
        function tools) the reply is a Completion whose tool_calls holds the parsed call, if the
        model made one (tool_choice "auto", "required" or {"type": "function", "function": {"name"}}).
        A conversation longer than the context loses its oldest turns (the system prompt is kept;
        last_stats.dropped_messages says how many)."""
        prepared = self.prepare_chat(messages, tools=tools, reserve=1)
        if tools:
            if stream:
                raise ConfigError("chat(tools=...) returns a Completion; it does not stream")
            from .structured import Grammar
            return self.complete_chat(prepared, cancel=cancel, grammar=Grammar.tool_call(tools, tool_choice),
                                      **sampling)
        it = self._stream(prepared.ids, self.params(**sampling), cancel, self._constraint(json_schema),
                          dropped=prepared.dropped)
        return it if stream else "".join(it)

    def stream(self, prompt: str, *, cancel: threading.Event | None = None, json_schema: dict | None = None,
               **sampling) -> Iterator[str]:
        """Yield text pieces as they decode. Setting `cancel` (from any thread) ends the generation
        before its next step, as closing the iterator does; finish_reason is then "cancelled"."""
        params = self.params(**sampling)
        ids = self.encode(prompt)
        return self._stream(ids, params, cancel, self._constraint(json_schema))

    def prepare_chat(self, messages: list[dict], *, tools=None, reserve: int = 1):
        """The conversation as prompt tokens (chat.PreparedChat), its oldest turns dropped to leave
        `reserve` tokens for the reply."""
        from .chat import prepare
        return prepare(self.text, messages, context=self.context_length, reserve=reserve, tools=tools)

    def complete_chat(self, prepared, *, cancel=None, on_piece=None, grammar=None, **sampling) -> Completion:
        """Run a prepared conversation to its end: the text, the tool call (under a
        structured.Grammar.tool_call `grammar`) and the counts. `on_piece(text)` sees the text as it
        decodes."""
        from .structured import parse_tool_call
        c = self.complete_ids(prepared.ids, cancel=cancel, on_piece=on_piece, grammar=grammar,
                              dropped=prepared.dropped, **sampling)
        call = parse_tool_call(c.text) if grammar is not None and grammar.what == "tools" else None
        if call is None:
            return c
        call = dataclasses.replace(call, id=f"call_{uuid.uuid4().hex[:24]}")
        return dataclasses.replace(c, tool_calls=(call,), finish_reason="tool_calls")

    def complete_ids(self, ids: list[int], *, cancel=None, on_piece=None, json_schema: dict | None = None,
                     grammar=None, dropped: int = 0, **sampling) -> Completion:
        """Token ids in, a Completion out (stop strings and `json_schema` or `grammar` applied)."""
        constraint = self._constraint(json_schema, grammar)
        pieces = []
        for piece in self._stream(list(ids), self.params(**sampling), cancel, constraint, dropped=dropped):
            pieces.append(piece)
            if on_piece is not None:
                on_piece(piece)
        st = self.last_stats
        finish = "length" if st.finish_reason in ("length", "context") else "stop"
        return Completion("".join(pieces), (), finish, st.prompt_tokens, st.generated_tokens, st.cached_tokens)

    def _constraint(self, json_schema: dict | None, grammar=None):
        """A fresh structured.Constraint for `json_schema` or `grammar`, or None for free text."""
        if json_schema is None and grammar is None:
            return None
        from .structured import Constraint, Grammar, TokenizerCache
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = TokenizerCache(self.bundle.path(self.manifest.tokenizer.file).read_text(),
                                                     tuple(sorted(self.eos)))
        return Constraint(self._grammar_tokenizer.get(), grammar or Grammar.json_schema(json_schema))

    def _stream(self, ids: list[int], params: SamplingParams, cancel, constraint=None, *,
                dropped: int = 0) -> Iterator[str]:
        detok = StreamDecoder(self.text)
        stops = StopStrings(params.stop)
        with self._lock:
            stats = GenerationStats(prompt_tokens=len(ids), finish_reason="cancelled", dropped_messages=dropped)
            self.last_stats = stats
            try:
                for token in self._tokens(ids, params, stats, cancel, constraint):
                    piece, stopped = stops.feed(detok.push(token))
                    if piece:
                        yield piece
                    if stopped:
                        stats.finish_reason = "stop"
                        return
                tail = stops.flush()
                if tail:
                    yield tail
            finally:
                self.prompt_cache.settle(self.decoder)

    def generate_ids(self, ids: list[int], *, cancel: threading.Event | None = None, **sampling) -> list[int]:
        """Token ids in, generated token ids out (no detokenisation, no stop strings)."""
        params = self.params(**sampling)
        with self._lock:
            stats = GenerationStats(prompt_tokens=len(ids))
            self.last_stats = stats
            try:
                return list(self._tokens(list(ids), params, stats, cancel))
            finally:
                self.prompt_cache.settle(self.decoder)

    def _tokens(self, ids: list[int], params: SamplingParams, stats: GenerationStats, cancel=None,
                constraint=None) -> Iterator[int]:
        if not ids:
            raise ConfigError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise ContextError(f"the prompt is {len(ids)} tokens but the context window is {self.context_length}: "
                               f"shorten it or load the model with a larger context_length "
                               f"(this model allows up to {self.manifest.model.max_context})")
        sample = Sampler(params)
        history = np.array(ids, np.int64) if params.repetition_penalty != 1.0 else None
        reuse = self.prompt_cache.reusable(self.decoder, ids)
        self.prompt_cache.keep([])                      # until this prompt has run
        self.decoder.rewind(reuse)
        stats.cached_tokens = reuse
        t0 = time.perf_counter()
        todo, piece = ids[reuse:], self.prompt_cache.piece
        if self.on_prefill is not None and len(todo) > 8 * piece:
            self.on_prefill(reuse, len(ids))
            for i in range(0, len(todo), piece):            # the pieces the decoder would cut, one by one
                logits = self.decoder.forward(todo[i:i + piece])[-1]
                self.on_prefill(reuse + min(i + piece, len(todo)), len(ids))
        else:
            logits = self.decoder.forward(todo)[-1]
        self.prompt_cache.keep(ids)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        spec = self.speculation if constraint is None and params.repetition_penalty == 1.0 else None
        if spec is not None:
            from .speculative import check_guesses
            spec[0].start(ids)
            seq = list(ids)                                 # what the guesser looks at: prompt and output
            rng = np.random.default_rng(None if params.seed is None else params.seed + 1)
        kept, forced = [], None                             # guesses the model kept; a refused one's replacement
        for n in range(params.max_new_tokens):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            in_cache = bool(kept)                       # a kept guess: its cache row and the logits after it are there
            if in_cache:
                token = kept.pop(0)
            elif forced is not None:
                token, forced = forced, None
            else:
                if constraint is not None:
                    constraint.mask(logits)             # tokens the grammar does not allow next: -inf
                token = sample(logits, history)
            stats.generated_tokens = n + 1
            if token in self.eos:
                stats.finish_reason = "eos"
                return
            if constraint is not None:
                constraint.accept(token)
            yield token
            if constraint is not None and constraint.finished:
                stats.finish_reason = "eos"             # the grammar is complete: nothing may follow
                return
            if n + 1 == params.max_new_tokens:
                stats.finish_reason = "length"
                return
            if spec is not None:
                seq.append(token)
            if in_cache:
                continue
            if self.decoder.room() == 0:
                stats.finish_reason = "context"
                return
            if history is not None:
                history = np.append(history, token)
            if spec is None:
                logits = self.decoder.forward([token])[-1]
            else:                                       # speculative decoding: edge/speculative.py
                logits, kept, forced, guessed = check_guesses(
                    self.decoder, *spec, token, seq, sampler=sample, rng=rng,
                    most=min(params.max_new_tokens - n - 2, self.decoder.room() - 1))
                stats.drafted += guessed
                stats.accepted += len(kept)
            stats.decode_steps += 1
            stats.decode_s = time.perf_counter() - t1   # wall time of every step after the prompt

    def release_memory(self) -> None:
        """Give back what generations leave resident: the bundle file pages that gathers touched
        (embedding rows) and free heap pages. A few ms; the server calls it after each request, so
        a long-running process stays flat."""
        with self._lock:
            release = getattr(self.decoder, "release_pages", None)
            if release is not None:
                release()
            trim_heap()

    # -- scoring (perplexity, tests) -------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of a fresh sequence (prefill with every position's logits)."""
        return np.concatenate([lg for _, lg in self.logits_pieces(ids)])

    def logits_pieces(self, ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Logits of a fresh sequence piece by piece, as the decoder runs the prompt: (offset of the
        piece's first position, logits [piece, vocab]). A window's logits are 100 MB at 512 tokens and
        a 49k vocabulary; a 64-token piece's are 12.6 MB, so scoring stays inside a memory budget."""
        ids = np.asarray(ids, np.int64)
        size = self.decoder.prefill_chunk or max(1, len(ids))
        with self._lock:
            self.prompt_cache.keep([])
            self.decoder.reset()
            try:
                for i in range(0, max(1, len(ids)), size):        # no ids: forward() says so
                    yield i, self.decoder.forward(ids[i:i + size], all_logits=True)
            finally:
                self.prompt_cache.settle(self.decoder)


def load(path, *, threads: int | None = None, context_length: int | None = None,
         memory_budget=None, expert_capacity: int | None = None, expert_policy: str = "lfu",
         prefetch: bool | None = None, expert_slots: bool = True, expert_store=None, progress=True,
         draft=None, draft_tokens: int = 4, prompt_lookup: int | None = None) -> Model:
    """Open a bundle made by `edge export`.

    threads: CPU threads for onnxruntime (default: the cores this process may use). onnxruntime's
        thread pool is process-wide: the first model loaded in a process sets it for all.
    context_length: tokens the KV cache holds, prompt included (default: min(model max, 4096));
        memory for it is committed only as it fills.
    memory_budget: Mixture-of-Experts bundles: the most memory this model may use ("300MB", "1.5GB" or
        bytes), counted from the process's footprint when load() starts, so what the process already
        holds (a vision model, ROS, another model) is not charged to it; the expert cache is sized from
        what is left after the dense part and the KV cache. To bound the whole process instead (as
        `edge run --memory-budget` and a memory cgroup do), pass `edge.process_budget("450MB")` (the
        total minus what the process holds now). A budget that cannot hold the model raises
        BudgetError naming the minimum. On Linux the load restarts the process's peak RSS (VmHWM) to
        measure its own packing peak.
    expert_capacity: instead of a budget, how many experts stay resident at once (default: all,
        loaded as the router first picks them).
    expert_policy: "lfu" (frequency-aware, across layers; default) or "lru" (the baseline).
    prefetch: with a limited expert cache, read experts ahead in the background: a layer's misses and
        the experts the next layers' routers pick on the current hidden state. Default (None): on with
        expert slots; on the session path (which builds them too, on a core of its own) when the cache
        holds less than half the experts and threads >= 2. The guesses' precision and recall are
        counted either way (model.decoder.guesser.stats).
    expert_slots: with a limited expert cache, keep experts in slots filled from a packed store of
        onnxruntime's prepacked weights (a miss is one read); made on first use when missing (see
        expert_store) and checked by a self-test at load, which falls back to building a session per
        miss, with one logged line, where slots cannot work. False: that session path, for comparison.
    expert_store: folder of the packed expert store (default: BUNDLE/packed when the bundle folder is
        writable, else ~/.cache/edge/packed/<bundle id>); `edge prepare` makes it ahead of time.
    progress: show progress on stderr while the packed store is made (True), not at all (False), or
        call progress(done, total).
    draft: speculative decoding with a smaller model that shares the tokenizer (a bundle path or a
        loaded Model): it guesses up to `draft_tokens` tokens, the model checks them in one forward.
    prompt_lookup: speculative decoding whose guesses are what followed the last n tokens (n up to
        this, e.g. 3) earlier in the prompt or output: repeated JSON, code being edited. Up to
        `draft_tokens` guesses (a good setting here: 8). Neither applies with json_schema, tools
        or a repetition penalty (those decode token by token).
    """
    baseline = status().get("VmRSS", 0)
    bundle = open_bundle(path)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer, not {threads!r}")
    if threads is not None and threads > default_threads():
        logging.getLogger("edge").warning(f"threads={threads} is more than the {default_threads()} cores this process "
                                          "may use: the extra threads only wait for each other")
    task = bundle.manifest.task
    if task != "text-generation":         # embeddings (edge/embed.py), speech recognition (edge/speech.py)
        given = [k for k, v in dict(context_length=context_length, memory_budget=memory_budget, draft=draft,
                                    expert_capacity=expert_capacity, prompt_lookup=prompt_lookup).items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: options of text generation; this bundle is {task}")
        if task == "feature-extraction":
            from .embed import Embedder
            return Embedder(bundle, threads=threads or default_threads())
        from .speech import Transcriber
        return Transcriber(bundle, threads=threads or default_threads())
    ctx = context_length or min(bundle.manifest.model.max_context, 4096)
    if expert_capacity is not None and bundle.manifest.moe is not None and expert_capacity < bundle.manifest.moe.top_k:
        raise ConfigError(f"expert_capacity must hold at least one token's experts ({bundle.manifest.moe.top_k})")
    from .experts import POLICIES
    if expert_policy not in POLICIES:
        raise ConfigError(f"unknown expert policy {expert_policy!r}; choose one of {', '.join(POLICIES)}")
    if memory_budget is not None and bundle.manifest.moe is None:
        raise ConfigError("memory_budget applies to Mixture-of-Experts bundles; a dense model is loaded whole")
    if draft is not None and prompt_lookup is not None:
        raise ConfigError("choose one of draft= and prompt_lookup=")
    show = progress if callable(progress) else stderr_bar("packing experts for this machine") if progress else quiet
    model = Model(bundle, threads=threads or default_threads(), context_length=ctx, expert_capacity=expert_capacity,
                  memory_budget=memory_budget, baseline=baseline, expert_policy=expert_policy, prefetch=prefetch,
                  expert_slots=expert_slots, expert_store=expert_store, progress=show)
    from .speculative import Adaptive, DraftModel, PromptLookup
    if prompt_lookup is not None:
        model.speculation = (PromptLookup(prompt_lookup, draft_tokens), Adaptive(draft_tokens))
    elif draft is not None:
        if not isinstance(draft, Model):
            draft = load(draft, threads=threads, context_length=ctx, progress=False)
        model.speculation = (DraftModel(draft, model.text, max_tokens=draft_tokens), Adaptive(draft_tokens))
    return model


def prepare(path, *, expert_store=None, force: bool = False, progress=True):
    """Make the packed expert store of a Mixture-of-Experts bundle for this machine (what a budgeted
    load() otherwise does on first use): onnxruntime's prepacked bytes of every expert, one record
    each, so that a cache miss is one read. A no-op when a matching store is there (force: make it
    again). Returns edge.store.PrepareReport (store, built, reason, seconds, bytes)."""
    from .engine import use_global_pool
    from .store import prepare as make
    bundle = open_bundle(path)
    use_global_pool(default_threads())
    show = progress if callable(progress) else stderr_bar("packing experts for this machine") if progress else quiet
    return make(bundle, expert_store, force=force, progress=show)
