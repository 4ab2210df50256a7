#!/usr/bin/env python3
"""Regenerates the diarization test dialogues: dialogue_2.webm, dialogue_3.webm and one_voice.webm,
each with its truth beside it (NAME.json: who speaks when, and the words of each turn), and
the reference clips ref_*.webm for known_speaker_references.

Voices: espeak-ng (en-us, low pitch, slow), Festival's US English HTS voice (cmu_us_slt_arctic_hts,
festvox-us-slt-hts) and MBROLA's British voice through espeak-ng (mb-en1, mbrola-en1), each clearly
unlike the others. Needs espeak-ng, festival, sox and ffmpeg.
Usage: python3 make_dialogues.py [output-dir]   (default: this folder)
"""

import json
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

RATE = 16_000
GAP_SECONDS = (0.45, 0.7, 0.55, 0.8)  # between turns, taken in turn

VOICES = {
    "espeak": lambda text, out: subprocess.run(
        ["espeak-ng", "-v", "en-us", "-p", "25", "-s", "150", "-w", str(out), text], check=True),
    "festival": lambda text, out: subprocess.run(
        ["text2wave", "-eval", "(voice_cmu_us_slt_arctic_hts)", "-o", str(out)], input=text.encode("latin-1"),
        check=True),
    "mbrola": lambda text, out: subprocess.run(
        ["espeak-ng", "-v", "mb-en1", "-p", "60", "-s", "165", "-w", str(out), text], check=True),
}

DIALOGUES = {
    "dialogue_2": [
        ("espeak", "Good morning. Did you bring the report for the meeting?"),
        ("festival", "Yes, I printed three copies last night."),
        ("espeak", "Great."),
        ("festival", "The numbers for the second quarter look much better than we expected."),
        ("espeak", "Really? Show me the page about the new customers."),
        ("festival", "It is on page four, next to the chart."),
        ("espeak", "Thanks."),
        ("festival", "We should send it to the whole team before lunch."),
    ],
    "dialogue_3": [
        ("espeak", "Welcome everyone. Let us start with the garden project."),
        ("festival", "The new trees arrive on Tuesday morning."),
        ("mbrola", "I can help to plant them after work."),
        ("espeak", "Perfect."),
        ("festival", "We still need more water for the summer months."),
        ("mbrola", "My brother has a big tank he does not use."),
        ("espeak", "Can you ask him this week?"),
        ("mbrola", "Sure, I will call him tonight."),
        ("festival", "Then we are ready."),
    ],
    "one_voice": [
        ("festival", "This is a short note about the shopping list."),
        ("festival", "We need bread, milk and some apples for the weekend."),
        ("festival", "Please also buy coffee if the shop has it."),
    ],
}
REFERENCES = {"ref_espeak": ("espeak", "Hello, this is my voice. I am speaking for a few seconds now."),
              "ref_festival": ("festival", "Hello, this is my voice. I am speaking for a few seconds now.")}


def speak(voice: str, text: str, tmp: Path) -> np.ndarray:
    raw, resampled = tmp / "raw.wav", tmp / "16k.wav"
    VOICES[voice](text, raw)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(resampled), "silence", "1",
                    "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"], check=True)
    with wave.open(str(resampled)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), np.int16)


def encode(samples: np.ndarray, out: Path) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "s16le", "-ar", str(RATE), "-ac", "1",
                    "-i", "-", "-c:a", "libopus", "-b:a", "24k", "-application", "voip", "-fflags", "+bitexact",
                    "-flags", "+bitexact", str(out)], input=samples.tobytes(), check=True)


def build(turns: list[tuple[str, str]], tmp: Path) -> tuple[np.ndarray, list[dict]]:
    pieces, truth, at = [np.zeros(int(0.5 * RATE), np.int16)], [], 0.5
    for n, (voice, text) in enumerate(turns):
        speech = speak(voice, text, tmp)
        truth.append({"speaker": voice, "start": round(at, 3), "end": round(at + len(speech) / RATE, 3), "text": text})
        gap = np.zeros(int(GAP_SECONDS[n % len(GAP_SECONDS)] * RATE), np.int16)
        pieces += [speech, gap]
        at += (len(speech) + len(gap)) / RATE
    return np.concatenate(pieces), truth


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for clip, turns in DIALOGUES.items():
            samples, truth = build(turns, tmp)
            encode(samples, out / f"{clip}.webm")
            (out / f"{clip}.json").write_text(json.dumps({"turns": truth}, indent=1) + "\n")
        for clip, (voice, text) in REFERENCES.items():
            encode(speak(voice, text, tmp), out / f"{clip}.webm")


if __name__ == "__main__":
    main()
