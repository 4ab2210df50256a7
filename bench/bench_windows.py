"""One long recording on two workers: its windows side by side, against one worker with all the
threads, as ratios measured in one alternated run (absolute times on a shared machine mean little).

    python bench/bench_windows.py [--models-dir DIR] [--model cpu-tiny] [--minutes 4] [--runs 3]

The recording is testdata/long_en.webm (about 30 s of speech) over and over, cut into 60 s windows
(AUDIOTEXT_WINDOW_SECONDS=60), the language set to English, through the engine as a job runs it.
Three set-ups, each with the threads of the machine (--threads, default all cores):
- one:    one worker with every thread (AUDIOTEXT_WORKERS=1), one window after another;
- beside: two workers with half the threads each, the next window on the idle worker;
- before: two workers as above, one window after another (what two workers did before).
It prints each set-up's median wall time, its ratio to `one`, and its word error rate against the
spoken text (the clip cut short at the end of the recording costs each set-up the same words).
Without --models-dir, tiny.en and base are imported from the installed packages into a temp dir.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import audiotext  # noqa: E402
from bench_engine import import_models  # noqa: E402
from bench_peers import wer  # noqa: E402

CLIP = ROOT / "testdata" / "long_en.webm"
# What the clip says (testdata/make_clips.sh speaks it).
SPOKEN = ("Good morning and welcome to the weekly news. Today the weather is sunny and warm in most of the "
          "country. In the city, the new library opened its doors to the public on Monday. Children and parents "
          "came to read books and play games. The train to the coast will run every hour during the summer. "
          "Please remember to bring water and a hat if you go to the beach. That is all for today. Thank you "
          "for listening, and have a nice week.")
WINDOW_SECONDS = 60


class SetUp:
    """A scheduler, its workers' contexts of the model, and an engine that may use them."""

    def __init__(self, models_dir: Path, model: str, *, workers: int, threads: int, beside: bool) -> None:
        self.model = model
        self.workers = workers
        self.scheduler = audiotext.Scheduler(workers)
        self.scheduler.start()
        self.store = audiotext.ModelStore(models_dir, default=model, threads=max(1, threads // workers),
                                          contexts=workers)
        self.engine = audiotext.Engine(self.store, max_audio_seconds=86400, window_seconds=WINDOW_SECONDS,
                                       beside=self.scheduler.run_beside if beside else None)

    def warm_up(self, audio: np.ndarray) -> None:
        """Load every context now, so that no run pays for a load: one short clip per worker at once."""
        short = audio[:5 * audiotext.SAMPLE_RATE]
        works = [self.scheduler.submit(lambda abort: self._hold_a_context(short, abort), priority=0)
                 for _ in range(self.workers)]
        for work in works:
            work.future.result()

    def _hold_a_context(self, audio: np.ndarray, abort: threading.Event) -> Any:
        return self.engine.transcribe(audio, self.model, audiotext.TranscribeOptions(language="en"), abort)

    def run(self, audio: np.ndarray) -> tuple[float, str]:
        started = time.perf_counter()
        work = self.scheduler.submit(lambda abort: self.engine.transcribe(
            audio, self.model, audiotext.TranscribeOptions(language="en"), abort), priority=1)
        text = work.future.result().text
        return time.perf_counter() - started, text

    def close(self) -> None:
        self.scheduler.stop(grace=0)
        self.store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--model", default="cpu-tiny")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    speech = audiotext.decode_audio(CLIP, max_seconds=3600)
    audio = np.tile(speech, int(np.ceil(args.minutes * 60 * audiotext.SAMPLE_RATE / len(speech))))
    repeats = int(np.ceil(args.minutes * 60 * audiotext.SAMPLE_RATE / len(speech)))
    audio = audio[:int(args.minutes * 60 * audiotext.SAMPLE_RATE)]
    spoken = " ".join([SPOKEN] * repeats)
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        if args.models_dir is None:
            import_models(models_dir)
        set_ups = {"one": SetUp(models_dir, args.model, workers=1, threads=args.threads, beside=True),
                   "beside": SetUp(models_dir, args.model, workers=2, threads=args.threads, beside=True),
                   "before": SetUp(models_dir, args.model, workers=2, threads=args.threads, beside=False)}
        try:
            for set_up in set_ups.values():
                set_up.warm_up(audio)
            times: dict[str, list[float]] = {name: [] for name in set_ups}
            texts: dict[str, str] = {}
            for _ in range(args.runs):  # alternated, so that the box's changing load falls on all alike
                for name, set_up in set_ups.items():
                    seconds, texts[name] = set_up.run(audio)
                    times[name].append(seconds)
        finally:
            for set_up in set_ups.values():
                set_up.close()
    one = statistics.median(times["one"])
    print(f"{len(audio) / audiotext.SAMPLE_RATE:.0f} s of speech in {WINDOW_SECONDS} s windows, {args.model}, "
          f"{args.threads} thread(s) in all, median of {args.runs} alternated runs; load average before: "
          f"{os.getloadavg()[0]:.1f}")
    for name, spent in times.items():
        median = statistics.median(spent)
        print(f"{name:<7} {median:7.1f} s   ratio to one {median / one:5.2f}   WER {wer(spoken, texts[name]):6.1%}")


if __name__ == "__main__":
    main()
