#!/usr/bin/env bash
# Regenerates the speech fixtures in src/callbridge/emulators/audio/*.ulaw.
#
# The committed .ulaw files are the source of truth: this script documents how they were made
# and is not run in CI (espeak-ng and sox output can drift between versions, and the emulator
# tests only need some stable, real speech). Made with eSpeak NG 1.51 and SoX 14.4.2 from
# Debian bookworm:  apt-get install -y espeak-ng sox
#
# Format: raw headerless G.711 mu-law, 8 kHz, mono, exactly what a Twilio Media Stream carries.
# The lines must match SPEECH_LINES in src/callbridge/emulators/speech.py.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=src/callbridge/emulators/audio
# Two clearly different voices, so a listener (or a test looking at pitch) can tell the caller
# from the agent: a US male for the caller (F0 ~100 Hz), a British female variant for the agent
# (F0 ~200 Hz). "en" is the British voice (gmw/en); espeak-ng 1.51 silently ignores a +variant
# on "en-gb", so "en-gb+f3" would sound exactly like the default male "en-gb".
CALLER_VOICE="en-us+m3"
AGENT_VOICE="en+f3"
SPEED=165  # words per minute; a little slower than espeak's 175 default, nearer a phone call

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() {  # say NAME VOICE TEXT
    local name=$1 voice=$2 text=$3
    espeak-ng -v "$voice" -s "$SPEED" -w "$tmp/$name.wav" "$text"
    # -D: no dither, so the files are reproducible and espeak's leading/trailing silence stays
    # digital silence (0xFF). The band-pass keeps the audio telephone-like (300-3400 Hz), gain
    # normalises to -3 dBFS (the -6 dB first leaves the filters headroom), and "silence" trims espeak's padding to at most ~0.1 s each side
    # (leading silence is removed, then a 0.1 s pad added back).
    sox -D "$tmp/$name.wav" -r 8000 -c 1 -e u-law -t raw "$OUT/$name.ulaw" \
        gain -6 highpass 300 lowpass 3400 \
        silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse \
        pad 0.1 0.1 \
        gain -n -3
}

say caller_hello     "$CALLER_VOICE" "Hi, I would like to book an appointment for Monday morning, please."
say caller_confirm   "$CALLER_VOICE" "Yes, ten o'clock is perfect. Thank you."
say caller_interrupt "$CALLER_VOICE" "Sorry, wait, can I change that?"
say agent_greeting   "$AGENT_VOICE"  "Hello! Thanks for calling Bright Smile Dental. How can I help you today?"
say agent_slot       "$AGENT_VOICE"  "Monday at ten o'clock is free. Shall I book it for you?"
say agent_goodbye    "$AGENT_VOICE"  "You're all set for Monday at ten. Goodbye!"

for f in "$OUT"/*.ulaw; do
    bytes=$(stat -c %s "$f")
    printf '%-40s %6d bytes  %5.2f s\n' "$f" "$bytes" "$(awk -v b="$bytes" 'BEGIN { print b / 8000 }')"
done
