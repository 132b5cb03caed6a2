"""`edge embed` and `edge transcribe`: the tasks beyond text generation (bundles exported through optimum)."""
from __future__ import annotations

import json
import sys
import time
from typing import List, Optional

import typer

from .errors import EdgeError

COMMANDS = {"text-generation": "edge run / chat / serve / bench / eval", "feature-extraction": "edge embed",
            "automatic-speech-recognition": "edge transcribe"}


def require_task(bundle: str, task: str, command: str):
    """The opened bundle, or a clear error when it is made for another task than `command` runs."""
    from .bundle import open_bundle
    b = open_bundle(bundle)
    if b.manifest.task != task:
        raise EdgeError(f"{bundle} is a {b.manifest.task} bundle; `{command}` runs {task} bundles: "
                        f"use {COMMANDS[b.manifest.task]}")
    return b


def embed_command(bundle: str = typer.Argument(..., help="A feature-extraction bundle."),
                  texts: List[str] = typer.Argument(..., help="Texts to embed ('-' reads one per line from stdin)."),
                  threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
                  as_json: bool = typer.Option(False, "--json", help="Print {\"embeddings\": [[...], ...]}.")):
    """Embed texts: one vector each; with two or more, their cosine similarities."""
    from . import load
    require_task(bundle, "feature-extraction", "edge embed")
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    model = load(bundle, threads=threads)
    t0 = time.perf_counter()
    vectors = model.embed(texts)
    seconds = time.perf_counter() - t0
    if as_json:
        print(json.dumps({"embeddings": vectors.tolist(), "dimensions": int(vectors.shape[1])}))
        return
    print(f"{len(texts)} text(s) -> {vectors.shape[1]} dimensions in {seconds * 1000:.0f} ms "
          f"(pooling {model.spec.pooling}{', normalised' if model.spec.normalize else ''})")
    if len(texts) == 1:
        print(" ".join(f"{v:.4f}" for v in vectors[0][:8]) + (" ..." if vectors.shape[1] > 8 else ""))
        return
    import numpy as np
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    width = max(len(t[:40]) for t in texts)
    print(f"\n{'cosine':<{width}} " + " ".join(f"{i:>6}" for i in range(len(texts))))
    for i, t in enumerate(texts):
        print(f"{t[:40]:<{width}} " + " ".join(f"{sims[i, j]:>6.3f}" for j in range(len(texts))) + f"  [{i}]")


def transcribe_command(bundle: str = typer.Argument(..., help="A speech-recognition bundle (Whisper)."),
                       audio: str = typer.Argument(..., help="A WAV file (any rate and channel count)."),
                       language: Optional[str] = typer.Option(None, "--language", help="Language code, e.g. en "
                                                              "(default: detected)."),
                       task: str = typer.Option("transcribe", "--task", help="transcribe | translate (to English)."),
                       threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
                       stats: bool = typer.Option(False, "--stats", help="Print audio length, time and real-time "
                                                  "factor to stderr."),
                       as_json: bool = typer.Option(False, "--json", help="Print {\"text\", \"audio_s\", \"seconds\", "
                                                    "\"real_time_factor\"}.")):
    """Transcribe speech, 30 s at a time, printing each window's text as it is decoded."""
    from . import load
    require_task(bundle, "automatic-speech-recognition", "edge transcribe")
    model = load(bundle, threads=threads)
    samples = model.load_audio(audio)
    audio_s = samples.size / model.spec.sample_rate
    t0 = time.perf_counter()
    parts = []
    for text in model.stream(samples, language=language, task=task):
        parts.append(text)
        if not as_json:
            print(text, flush=True)
    seconds = time.perf_counter() - t0
    rtf = seconds / audio_s if audio_s else 0.0
    if as_json:
        print(json.dumps({"text": " ".join(p for p in parts if p), "audio_s": round(audio_s, 2),
                          "seconds": round(seconds, 3), "real_time_factor": round(rtf, 4)}))
    elif stats:
        print(f"[{audio_s:.1f} s of audio in {seconds:.2f} s: real-time factor {rtf:.3f}]", file=sys.stderr)
