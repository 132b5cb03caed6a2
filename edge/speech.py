"""Speech recognition (Whisper): `edge.load(bundle).transcribe("clip.wav")` -> text.

    audio   16 kHz mono float32 in [-1, 1] (a WAV file of another rate or channel count is mixed down
            and resampled here; no audio library needed)
    chunks  30 s windows (the encoder's fixed input), transcribed one after another: stream()
            yields each window's text as soon as it is decoded
    log-mel per window, as Whisper's feature extractor computes it:
            STFT (periodic Hann window of n_fft, hop_length, reflect-padded, centred) -> power
            -> mel filter bank (stored in the bundle) -> log10(max(., 1e-10)), floored 8 below its
            maximum -> (x + 4) / 4; [n_mels, 3000] for 30 s
    decode  encoder(features) -> states; the decoder runs the prompt (<|startoftranscript|>,
            language, task, <|notimestamps|>) over them and fills the cache; then greedy, one
            token at a time over the cache, with the checkpoint's suppressed tokens, until
            <|endoftext|> or the decoder's positions run out
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from .bundle import Bundle
from .engine import open_session, session_options
from .errors import ConfigError, EdgeError


def read_wav(path) -> tuple[np.ndarray, int]:
    """(samples float32 [n] mono in [-1, 1], sample rate) of a WAV file: PCM 8/16/24/32-bit or
    IEEE float 32/64, any channel count (averaged)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EdgeError(f"{path}: {e.strerror or e}") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise EdgeError(f"{path} is not a WAV file (RIFF/WAVE header missing); convert it, e.g. "
                        "`ffmpeg -i IN -ar 16000 -ac 1 out.wav`")
    fmt, pos, samples = None, 12, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if tag == b"fmt ":
            code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if code == 0xFFFE and len(body) >= 26:              # WAVE_FORMAT_EXTENSIBLE: the subformat's code
                code = struct.unpack("<H", body[24:26])[0]
            fmt = (code, channels, rate, bits)
        elif tag == b"data" and fmt is not None:
            samples = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise EdgeError(f"{path}: WAV file without a fmt and data chunk")
    code, channels, rate, bits = fmt
    width = bits // 8
    usable = len(samples) - len(samples) % (width * channels)
    raw = np.frombuffer(samples[:usable], np.uint8)
    if code == 1 and bits == 8:
        x = (raw.astype(np.float32) - 128) / 128
    elif code == 1 and bits in (16, 32):
        x = raw.view(f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
    elif code == 1 and bits == 24:
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / float(1 << 23)
    elif code == 3 and bits in (32, 64):
        x = raw.view(f"<f{width}").astype(np.float32)
    else:
        raise EdgeError(f"{path}: WAV format {code} with {bits}-bit samples is not supported (PCM 8/16/24/32-bit "
                        "or float 32/64 are)")
    return x.reshape(-1, channels).mean(1).astype(np.float32), rate


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling through the FFT (the spectrum cut or zero-padded to the new rate)."""
    if rate == target or audio.size == 0:
        return audio.astype(np.float32)
    n = int(round(audio.size * target / rate))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    bins = n // 2 + 1
    out = np.zeros(bins, np.complex128)
    out[:min(bins, spectrum.size)] = spectrum[:min(bins, spectrum.size)]
    return (np.fft.irfft(out, n) * (n / audio.size)).astype(np.float32)


def log_mel(audio: np.ndarray, filters: np.ndarray, *, n_fft: int, hop_length: int, frames: int) -> np.ndarray:
    """Whisper's log-mel features [n_mels, frames] of `audio` (zero-padded or cut to fill `frames`)."""
    samples = frames * hop_length
    audio = np.pad(audio[:samples], (0, max(0, samples - audio.size))).astype(np.float64)
    padded = np.pad(audio, n_fft // 2, mode="reflect")                        # centred frames
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)         # periodic Hann
    starts = np.arange(frames + 1) * hop_length
    chunks = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[starts]   # [frames + 1, n_fft]
    power = np.abs(np.fft.rfft(chunks * window, axis=-1)) ** 2                # [frames + 1, n_fft / 2 + 1]
    mel = filters.T.astype(np.float64) @ power[:-1].T                          # [n_mels, frames]: the last frame dropped
    spec = np.log10(np.maximum(mel, 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


class Transcriber:
    def __init__(self, bundle: Bundle, *, threads: int):
        self.manifest = bundle.manifest
        self.spec = s = bundle.manifest.speech
        options = session_options(threads)
        self.encoder = open_session(bundle.path(s.encoder), options)
        self.decoder = open_session(bundle.path(s.decoder), options)
        self.tokenizer = Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer.file)))
        self.filters = np.load(bundle.path(s.mel_filters))                    # [n_fft / 2 + 1, n_mels]
        if self.filters.shape != (s.n_fft // 2 + 1, s.n_mels):
            raise EdgeError(f"{s.mel_filters} has shape {self.filters.shape}, not [{s.n_fft // 2 + 1}, {s.n_mels}]: "
                            "the bundle is corrupt, export it again")
        self.frames = s.chunk_seconds * s.sample_rate // s.hop_length
        self._cache_inputs = [c.input for c in s.cache]
        self._first = [c.first for c in s.cache]
        self._step = [c.step for c in s.cache if c.step]
        # the prompt pass reads no cache: empty tensors of the inputs' ranks ([1, heads, 0, head_dim])
        shapes = {i.name: i.shape for i in self.decoder.get_inputs()}
        self._empty = {c.input: np.zeros([1] + [d if isinstance(d, int) else 0 for d in shapes[c.input][1:]],
                                         np.float32) for c in s.cache}
        self._no_cache, self._with_cache = np.array([False]), np.array([True])

    def features(self, audio: np.ndarray) -> np.ndarray:
        """Log-mel features [1, n_mels, frames] of one window of 16 kHz audio."""
        s = self.spec
        return log_mel(audio, self.filters, n_fft=s.n_fft, hop_length=s.hop_length, frames=self.frames)[None]

    def load_audio(self, audio) -> np.ndarray:
        """A path to a WAV file or float samples at the model's rate -> float32 [n] mono."""
        if isinstance(audio, (str, Path)):
            samples, rate = read_wav(audio)
            return resample(samples, rate, self.spec.sample_rate)
        a = np.asarray(audio, np.float32)
        if a.ndim != 1:
            raise ConfigError(f"audio must be mono samples [n] at {self.spec.sample_rate} Hz, got shape {list(a.shape)}")
        return a

    def transcribe(self, audio, *, language: str | None = None, task: str = "transcribe") -> str:
        """The text of `audio` (a WAV path, or float32 samples at 16 kHz), window by window."""
        return " ".join(t for t in self.stream(audio, language=language, task=task) if t)

    def stream(self, audio, *, language: str | None = None, task: str = "transcribe") -> Iterator[str]:
        """Each 30 s window's text, as soon as it is decoded."""
        a = self.load_audio(audio)
        window = self.spec.chunk_seconds * self.spec.sample_rate
        for start in range(0, max(a.size, 1), window):
            ids = self.generate_ids(self.features(a[start:start + window]), language=language, task=task)
            yield self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def prompt(self, states: np.ndarray, language: str | None, task: str) -> list[int]:
        """<|startoftranscript|> [language] [task] [<|notimestamps|>]; the language detected from the
        first token's logits when not given (multilingual models)."""
        s = self.spec
        ids = [s.start_token]
        if s.languages:
            if language is None:
                logits = self._prompt_pass(ids, states, [s.logits])[0][0, -1]
                language = max(s.languages, key=lambda code: logits[s.languages[code]])
            if language not in s.languages:
                raise ConfigError(f"unknown language {language!r}; this model knows {', '.join(sorted(s.languages))}")
            ids.append(s.languages[language])
        elif language not in (None, "en"):
            raise ConfigError("this model is English-only")
        if s.tasks:
            if task not in s.tasks:
                raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(sorted(s.tasks))}")
            ids.append(s.tasks[task])
        if s.no_timestamps >= 0:
            ids.append(s.no_timestamps)
        return ids

    def _prompt_pass(self, ids: list[int], states: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        s = self.spec
        return self.decoder.run(outputs, {s.input_ids: np.array([ids], np.int64), s.encoder_states: states,
                                          s.use_cache: self._no_cache, **self._empty})

    def generate_ids(self, features: np.ndarray, *, language: str | None = None, task: str = "transcribe",
                     max_new_tokens: int | None = None) -> list[int]:
        """Greedy token ids (prompt and <|endoftext|> left out) for features [1, n_mels, frames]."""
        s = self.spec
        states = self.encoder.run([s.encoder_output], {s.encoder_input: features.astype(np.float32)})[0]
        prompt = self.prompt(states, language, task)
        limit = s.max_tokens - len(prompt) if max_new_tokens is None else min(max_new_tokens, s.max_tokens - len(prompt))
        out = self._prompt_pass(prompt, states, [s.logits, *self._first])
        logits, cache = out[0][0, -1], dict(zip(self._cache_inputs, out[1:]))
        suppress = list(s.suppress_tokens)
        tokens: list[int] = []
        while len(tokens) < limit:
            logits = logits.copy()
            logits[suppress + (list(s.begin_suppress_tokens) if not tokens else [])] = -np.inf
            token = int(np.argmax(logits))
            if token == s.eos_token:
                break
            tokens.append(token)
            if len(tokens) == limit:
                break
            out = self.decoder.run([s.logits, *self._step], {s.input_ids: np.array([[token]], np.int64),
                                                             s.encoder_states: states, s.use_cache: self._with_cache,
                                                             **cache})
            logits = out[0][0, -1]
            for c, value in zip((c for c in s.cache if c.step), out[1:]):
                cache[c.input] = value
        return tokens
