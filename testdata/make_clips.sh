#!/usr/bin/env bash
# Regenerates the test audio clips with espeak-ng, festival (festvox-ca-ona-hts, festvox-us-slt-hts, festvox-itapc16k),
# MBROLA's voices for espeak-ng (mbrola-de2, mbrola-fr4, mbrola-br3: Debian's contrib and non-free),
# sox and ffmpeg.
# Usage: ./make_clips.sh [output-dir]   (default: this folder)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$HERE}"
mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

EN_TEXT="Hello, my name is John and I live in London."
CA_TEXT="El meu germà i la meva família viuen a Barcelona."
# Spoken by Festival's Catalan voice (festvox-ca-ona-hts), which sounds far more like a person
# than espeak-ng: the base model's detection ranks it Catalan only just above Spanish, while
# espeak-ng's Catalan is closer to English for it than to Catalan. It tests AUDIOTEXT_LANGUAGES.
CA_GREETING_TEXT="Hola, bona tarda. Com estàs?"
LONG_TEXT="Good morning and welcome to the weekly news. \
Today the weather is sunny and warm in most of the country. \
In the city, the new library opened its doors to the public on Monday. \
Children and parents came to read books and play games. \
The train to the coast will run every hour during the summer. \
Please remember to bring water and a hat if you go to the beach. \
That is all for today. Thank you for listening, and have a nice week."

FF=(ffmpeg -hide_banner -loglevel error -y)
# output options for reproducible container bytes
BX=(-fflags +bitexact -flags +bitexact)

espeak-ng -v en-us -s 140 -w "$TMP/en.raw.wav" "$EN_TEXT"
espeak-ng -v ca    -s 140 -w "$TMP/ca.raw.wav" "$CA_TEXT"
espeak-ng -v en-us -s 140 -w "$TMP/long_en.raw.wav" "$LONG_TEXT"

# text2wave reads Latin-1
printf '%s\n' "$CA_GREETING_TEXT" | iconv -f utf-8 -t iso-8859-1 > "$TMP/ca_greeting.txt"
text2wave -eval '(voice_upc_ca_ona_hts)' "$TMP/ca_greeting.txt" -o "$TMP/ca_greeting.raw.wav"

# 16 kHz mono s16 masters
for n in en ca long_en ca_greeting; do
  "${FF[@]}" -i "$TMP/$n.raw.wav" -ac 1 -ar 16000 -c:a pcm_s16le "${BX[@]}" "$TMP/$n.wav"
done

cp "$TMP/en.wav" "$OUT/en.wav"
cp "$TMP/ca_greeting.wav" "$OUT/ca_greeting.wav"
# ca.wav is 8 kHz s16, so a WAV that needs resampling is covered
"${FF[@]}" -i "$TMP/ca.wav" -ar 8000 -c:a pcm_s16le "${BX[@]}" "$OUT/ca.wav"

"${FF[@]}" -i "$TMP/en.wav" -c:a flac -compression_level 8 "${BX[@]}" "$OUT/en.flac"
"${FF[@]}" -i "$TMP/en.wav" -c:a libmp3lame -b:a 32k "${BX[@]}" "$OUT/en.mp3"
"${FF[@]}" -i "$TMP/en.wav" -c:a libvorbis -q:a 0 "${BX[@]}" "$OUT/en.ogg"
"${FF[@]}" -i "$TMP/en.wav" -c:a aac -b:a 24k "${BX[@]}" "$OUT/en.m4a"
"${FF[@]}" -i "$TMP/en.wav" -c:a libopus -b:a 24k -application voip "${BX[@]}" "$OUT/en.webm"
EN_DUR="$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$TMP/en.wav")"
"${FF[@]}" -i "$TMP/en.wav" -f lavfi -i "color=c=black:s=64x64:r=1" \
  -map 1:v -map 0:a -t "$EN_DUR" \
  -c:v libx264 -preset veryslow -tune stillimage -pix_fmt yuv420p -r 1 \
  -c:a aac -b:a 24k -movflags +faststart "${BX[@]}" "$OUT/en.mp4"

"${FF[@]}" -i "$TMP/ca.wav" -c:a libopus -b:a 24k -application voip "${BX[@]}" "$OUT/ca.webm"
"${FF[@]}" -i "$TMP/long_en.wav" -c:a libopus -b:a 10k -application voip "${BX[@]}" "$OUT/long_en.webm"

"${FF[@]}" -f lavfi -i "anullsrc=r=16000:cl=mono" -t 2 -c:a pcm_s16le "${BX[@]}" "$OUT/silence.wav"

# pauses.flac: sentences with silences of known lengths after each (sox), for the VAD's tests;
# pauses.txt says where each sentence's speech begins and ends, in seconds. The 0.3 s pause is
# shorter than the VAD's 500 ms that end speech; the others are longer.
PAUSE_TEXTS=("The meeting starts at nine in the morning." "Please bring your notes and a pen."
             "We will finish before lunch." "Thank you very much.")
PAUSES_AFTER=(1.5 0.3 3.0 1.0)
LEAD=0.7
SOX16=(-r 16000 -c 1 -b 16)
sox -n "${SOX16[@]}" "$TMP/lead.wav" trim 0 "$LEAD"
parts=("$TMP/lead.wav")
clock="$LEAD"
: > "$OUT/pauses.txt"
for i in "${!PAUSE_TEXTS[@]}"; do
  espeak-ng -v en-us -s 140 -w "$TMP/p$i.raw.wav" "${PAUSE_TEXTS[$i]}"
  # espeak-ng's own silence before and after the sentence goes, so that the speech's edges are known
  sox "$TMP/p$i.raw.wav" "${SOX16[@]}" "$TMP/p$i.wav" silence 1 0.01 1% reverse silence 1 0.01 1% reverse
  sox -n "${SOX16[@]}" "$TMP/gap$i.wav" trim 0 "${PAUSES_AFTER[$i]}"
  length="$(soxi -D "$TMP/p$i.wav")"
  awk -v at="$clock" -v n="$length" 'BEGIN { printf "%.4f %.4f\n", at, at + n }' >> "$OUT/pauses.txt"
  clock="$(awk -v at="$clock" -v n="$length" -v gap="${PAUSES_AFTER[$i]}" 'BEGIN { printf "%.6f", at + n + gap }')"
  parts+=("$TMP/p$i.wav" "$TMP/gap$i.wav")
done
sox "${parts[@]}" "$TMP/pauses.wav"
"${FF[@]}" -i "$TMP/pauses.wav" -c:a flac -compression_level 8 "${BX[@]}" "$OUT/pauses.flac"

# live_en.webm: three sentences with 1.5 s pauses, streamed in real time by the live transcription
# tests (/v1/realtime, Wyoming's transcript-chunk): each pause ends a turn of the daemon's VAD.
LIVE_TEXTS=("Good morning, and welcome to the show." "The children are playing in the garden."
            "Thank you very much for coming today.")
sox -n "${SOX16[@]}" "$TMP/live_lead.wav" trim 0 0.5
sox -n "${SOX16[@]}" "$TMP/live_gap.wav" trim 0 1.5
live_parts=("$TMP/live_lead.wav")
for i in "${!LIVE_TEXTS[@]}"; do
  espeak-ng -v en-us -s 140 -w "$TMP/l$i.raw.wav" "${LIVE_TEXTS[$i]}"
  sox "$TMP/l$i.raw.wav" "${SOX16[@]}" "$TMP/l$i.wav" silence 1 0.01 1% reverse silence 1 0.01 1% reverse
  live_parts+=("$TMP/l$i.wav" "$TMP/live_gap.wav")
done
sox "${live_parts[@]}" "$TMP/live_en.wav"
"${FF[@]}" -i "$TMP/live_en.wav" -c:a libopus -b:a 32k -application voip "${BX[@]}" "$OUT/live_en.webm"

# Pink noise, as a pocket or a street gives, with nobody speaking: seeded, the same every time.
"${FF[@]}" -f lavfi -i "anoisesrc=r=16000:c=pink:a=0.05:seed=7" -t 3 -c:a libopus -b:a 16k -application voip \
  "${BX[@]}" "$OUT/noise.webm"

# zh.webm: Mandarin, which whisper writes without spaces, for subtitle lines cut between
# characters. espeak-ng's Mandarin reads only pinyin here (its character dictionary is not
# installed); the base model hears Chinese in it when told the language.
espeak-ng -v cmn-latn-pinyin -s 130 -w "$TMP/zh.raw.wav" \
  "ni3 hao3. wo3 de ming2 zi4 shi4 wang2 xiao3 ming2. wo3 zhu4 zai4 bei3 jing1."
"${FF[@]}" -i "$TMP/zh.raw.wav" -ac 1 -ar 16000 -c:a libopus -b:a 8k -application voip "${BX[@]}" "$OUT/zh.webm"

# NAME.ref.txt: what is said in NAME.* (empty: nobody speaks), for `audiotext engine build`'s check.
reference() { if [[ -n $2 ]]; then printf '%s\n' "$2" > "$OUT/$1.ref.txt"; else : > "$OUT/$1.ref.txt"; fi; }

# Voice notes, each a voice and a message of bench/eval_voice_notes.py: the encoder window a short
# clip gets is tested on them. Half a second of silence after each, as a phone's recording ends;
# the message is also written as the note's NAME.ref.txt.
voice_note() {  # name, engine (espeak voice or festival voice), message
  if [[ $2 == festival:* ]]; then
    printf '%s\n' "$3" | iconv -f utf-8 -t iso-8859-1 > "$TMP/$1.txt"
    text2wave -eval "(voice_${2#festival:})" "$TMP/$1.txt" -o "$TMP/$1.raw.wav"
  else
    espeak-ng -v "${2%%:*}" -s "${2#*:}" -w "$TMP/$1.raw.wav" "$3"
  fi
  "${FF[@]}" -i "$TMP/$1.raw.wav" -af "apad=pad_dur=0.5" -ac 1 -ar 16000 -c:a libopus -b:a 24k -application voip \
    "${BX[@]}" "$OUT/$1.webm"
  reference "$1" "$3"
}
voice_note voice_en festival:cmu_us_slt_arctic_hts \
  "The package arrived this morning, but the box was damaged and one of the cups is broken."
voice_note voice_de mb-de2:150 \
  "Das Paket ist heute Morgen angekommen, aber der Karton war beschädigt und eine Tasse ist zerbrochen."
voice_note voice_fr mb-fr4:140 "Je suis un peu en retard, alors commencez la réunion sans moi."
voice_note voice_it festival:pc_diphone "Sono un po' in ritardo, quindi iniziate la riunione senza di me."
voice_note voice_pt mb-br3:150 "Estou um pouco atrasado, por isso comecem a reunião sem mim."

reference en "$EN_TEXT"; reference ca "$CA_TEXT"; reference ca_greeting "$CA_GREETING_TEXT"
reference long_en "$LONG_TEXT"; reference pauses "${PAUSE_TEXTS[*]}"; reference silence ""; reference noise ""

ls -l "$OUT"
