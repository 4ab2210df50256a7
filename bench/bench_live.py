"""Live transcription's latencies over GET /v1/realtime: from the start of speech to the first
partial text (`...transcription.delta`), and from the end of speech to the turn's whole text
(`...transcription.completed`), median and 90th percentile.

    python bench/bench_live.py --url http://127.0.0.1:8791 [--model cpu-lite] [--runs 3] [--hogs 2] [--language auto]

Run it with the project's venv python (it has `websockets` and audiotext's own VAD) against a
running daemon; AUDIOTEXT_API_TOKEN is the token. testdata/live_en.webm (three sentences, a 1.5 s
pause after each) is streamed as a microphone would send it: 24 kHz 16-bit PCM in 100 ms appends,
in real time, server VAD on. Where each sentence's speech begins and ends is read from the clip
itself (the first and last 10 ms over -40 dBFS of each stretch the daemon's VAD finds), so the
latencies count from what was said, not from the VAD's padding. --hogs N runs N busy loops beside
it, as other work on the box would. Prints the CPU model, then one line per turn and the summary.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import audiotext  # noqa: E402

CLIP = ROOT / "testdata" / "live_en.webm"
RATE = 24_000
CHUNK_SECONDS = 0.1
LOUD = 10 ** (-40 / 20)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "unknown CPU"


def speech_edges(audio: np.ndarray) -> list[tuple[float, float]]:
    """Each sentence's first and last loud 10 ms, in seconds."""
    edges = []
    frame = audiotext.SAMPLE_RATE // 100
    for start, end in audiotext.find_speech(audio):
        frames = audio[start:end - (end - start) % frame].reshape(-1, frame)
        loud = np.flatnonzero(np.abs(frames).max(axis=1) > LOUD)
        edges.append(((start + loud[0] * frame) / audiotext.SAMPLE_RATE,
                      (start + (loud[-1] + 1) * frame) / audiotext.SAMPLE_RATE))
    return edges


def as_24k_pcm(audio: np.ndarray) -> bytes:
    count = int(len(audio) * RATE / audiotext.SAMPLE_RATE)
    resampled = np.interp(np.arange(count) * audiotext.SAMPLE_RATE / RATE, np.arange(len(audio)), audio)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def one_run(url: str, token: str, model: str | None, language: str | None, pcm: bytes,
            turns: int) -> list[tuple[float | None, float]]:
    """(first delta, completed) of each turn, in seconds since the audio began."""
    from websockets.sync.client import connect

    events: list[tuple[float, dict]] = []
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/realtime?intent=transcription"
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws:
        ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": model, "language": language}, "turn_detection": {"type": "server_vad"}}}}}))
        started = time.monotonic()

        def read() -> None:
            for message in ws:
                events.append((time.monotonic() - started, json.loads(message)))
                if sum(e["type"].endswith(".completed") for _, e in events) >= turns:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        step = int(RATE * CHUNK_SECONDS) * 2
        for index, at in enumerate(range(0, len(pcm), step)):
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[at:at + step]).decode()}))
            time.sleep(max(0.0, started + (index + 1) * CHUNK_SECONDS - time.monotonic()))
        reader.join(120)
    results = []
    for at, event in events:
        if event["type"] != "conversation.item.input_audio_transcription.completed":
            continue
        deltas = [t for t, e in events if e["type"].endswith(".delta") and e["item_id"] == event["item_id"]]
        results.append((deltas[0] if deltas else None, at))
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8791")
    parser.add_argument("--model", default=None, help="a model of the daemon (default: its default model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=0, help="busy loops run beside it")
    parser.add_argument("--language", default="en", help="the session's language (default en); auto: none, "
                        "so that the daemon detects it")
    args = parser.parse_args()
    language = None if args.language == "auto" else args.language
    token = os.environ.get("AUDIOTEXT_API_TOKEN", "")
    audio = audiotext.decode_audio(CLIP, max_seconds=60)
    edges = speech_edges(audio)
    pcm = as_24k_pcm(audio)
    print(f"CPU: {cpu_model()}; model {args.model or '(the default)'}; language {args.language}; {args.runs} run(s) "
          f"of {len(edges)} turns; {args.hogs} hog(s)")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    first_deltas, completions = [], []
    try:
        for run in range(args.runs):
            for turn, ((delta, done), (begin, end)) in enumerate(zip(one_run(args.url, token, args.model, language,
                                                                             pcm, len(edges)), edges), 1):
                if delta is not None:
                    first_deltas.append(delta - begin)
                completions.append(done - end)
                shown = f"{delta - begin:5.2f} s" if delta is not None else "  none "
                print(f"run {run + 1} turn {turn}: speech {begin:5.2f}-{end:5.2f} s, first delta after {shown}, "
                      f"completed {done - end:5.2f} s after its end")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for name, values in (("speech start -> first delta", first_deltas), ("speech end -> completed", completions)):
        print(f"{name}: median {statistics.median(values):.2f} s, p90 {percentile(values, 0.9):.2f} s "
              f"({len(values)} turns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
