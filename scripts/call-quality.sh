#!/usr/bin/env bash
# Call quality benchmark: speech through Peerline's media engine over an emulated path
# (peerline-media-sim, virtual time), scored with PESQ (ITU-T P.862.2 wide band, the `pesq`
# Python package) as MOS-LQO, with the delay Peerline adds and the bitrate.
#
#   scripts/call-quality.sh [--json] [--seeds "1 2 3"] [--out DIR] [--sim-args "..."]
#
# --sim-args passes extra flags to every harness run (for example "--bandwidth full").
#
# Cases: clean path; 0 %, 3 % and 10 % random loss each with 30 ms jitter; 5 % bursty loss
# (mean burst 3 packets) with 30 ms jitter. Every case uses a 40 ms one-way base delay.
# To run the same cases over a real path later, replace run_case's harness call with one
# that plays IN.wav through two agents and records OUT.wav: the scoring below only needs
# the two WAV files and a JSON report with the same fields.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
json=0
seeds="1 2 3"
out=""
extra=""
while [ $# -gt 0 ]; do
    case "$1" in
        --json) json=1 ;;
        --seeds) seeds="$2"; shift ;;
        --out) out="$2"; shift ;;
        --sim-args) extra="$2"; shift ;;
        *) echo "usage: $0 [--json] [--seeds \"1 2 3\"] [--out DIR] [--sim-args \"...\"]" >&2; exit 2 ;;
    esac
    shift
done

"$here/install-deps.sh"
if ! python3 -c 'import pesq, numpy, scipy' >/dev/null 2>&1; then
    echo "installing the pesq, numpy and scipy Python packages" >&2
    python3 -m pip install -q pesq numpy scipy >&2 || {
        echo "could not install the pesq Python package: python3 -m pip install pesq numpy scipy" >&2
        exit 1
    }
fi

work="${out:-$(mktemp -d)}"
mkdir -p "$work"
[ -n "$out" ] || trap 'rm -rf "$work"' EXIT

# Harvard sentences (IEEE 1969), lists 1 and 2: phonetically balanced speech, about 50 s.
speech="$work/speech.wav"
espeak-ng -v en-us -s 150 -w "$speech" \
"The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. \
It is easy to tell the depth of a well. These days a chicken leg is a rare dish. \
Rice is often served in round bowls. The juice of lemons makes fine punch. \
The box was thrown beside the parked truck. The hogs were fed chopped corn and garbage. \
Four hours of steady work faced us. A large size in stockings is hard to sell. \
The boy was there when the sun rose. A rod is used to catch pink salmon. \
The source of the huge river is the clear spring. Kick the ball straight and follow through. \
Help the woman get back to her feet. A pot of tea helps to pass the evening. \
Smoky fires lack flame and heat. The soft cushion broke the man's fall. \
The salt breeze came across from the sea. The girl at the booth sold fifty bonds."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build -q -p peerline-media --bin peerline-media-sim
sim="$CARGO_TARGET_DIR/debug/peerline-media-sim"

# name|harness flags
cases=(
    "clean|--loss 0"
    "0% loss, 30 ms jitter|--loss 0 --jitter-ms 30"
    "3% loss, 30 ms jitter|--loss 3 --jitter-ms 30"
    "10% loss, 30 ms jitter|--loss 10 --jitter-ms 30"
    "5% bursty loss, 30 ms jitter|--loss 5 --burst --jitter-ms 30"
)

results="$work/results.jsonl"
: > "$results"
i=0
for c in "${cases[@]}"; do
    name="${c%%|*}"
    flags="${c#*|}"
    for seed in $seeds; do
        i=$((i + 1))
        deg="$work/out-$i.wav"
        # shellcheck disable=SC2086
        "$sim" "$speech" "$deg" $flags $extra --seed "$seed" --json > "$work/report-$i.json"
        python3 - "$speech" "$deg" "$work/report-$i.json" "$name" "$seed" >> "$results" <<'EOF'
import json, sys
import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly
from pesq import pesq

def load16k(path):
    rate, x = wavfile.read(path)
    x = x.astype(np.float64)
    if x.ndim > 1:
        x = x.mean(axis=1)
    g = np.gcd(rate, 16000)
    return resample_poly(x, 16000 // g, rate // g)

ref, deg = load16k(sys.argv[1]), load16k(sys.argv[2])
r = json.load(open(sys.argv[3]))
l, t = r["listener"], r["talker"]
print(json.dumps({
    "case": sys.argv[4], "seed": int(sys.argv[5]),
    "mos_lqo": round(float(pesq(16000, ref, deg, "wb")), 3),
    "added_delay_ms": round(r["added_delay_ms"], 1),
    "mouth_to_ear_ms": round(r["mouth_to_ear_ms"], 1),
    "mean_playout_delay_ms": round(l["mean_playout_delay_ms"], 1),
    "send_kbps": round(t["send_kbps"], 1),
    "opus_kbps": round(t["opus_kbps"], 1),
    "loss_before": round(l["loss_before_recovery"], 4),
    "loss_after": round(l["loss_after_recovery"], 4),
    "recovered_red": l["receive"]["frames_recovered_red"],
    "recovered_fec": l["receive"]["frames_recovered_fec"],
    "concealed": l["receive"]["frames_concealed"],
}))
EOF
    done
done

python3 - "$results" "$json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
summary = []
for c in cases:
    rs = [r for r in rows if r["case"] == c]
    mean = lambda k: sum(r[k] for r in rs) / len(rs)
    summary.append({
        "case": c, "runs": len(rs),
        "mos_lqo_mean": round(mean("mos_lqo"), 2), "mos_lqo_min": round(min(r["mos_lqo"] for r in rs), 2),
        "added_delay_ms": round(mean("added_delay_ms"), 1),
        "send_kbps": round(mean("send_kbps"), 1), "opus_kbps": round(mean("opus_kbps"), 1),
        "loss_before_pct": round(100 * mean("loss_before"), 2), "loss_after_pct": round(100 * mean("loss_after"), 2),
    })
if sys.argv[2] == "1":
    print(json.dumps({"summary": summary, "runs": rows}, indent=2))
else:
    print(f"{'case':34} {'MOS-LQO mean (min)':>19} {'added delay':>12} {'sent kb/s':>10} {'Opus kb/s':>10} {'loss before/after %':>20}")
    for s in summary:
        print(f"{s['case']:34} {s['mos_lqo_mean']:>12.2f} ({s['mos_lqo_min']:.2f}) {s['added_delay_ms']:>9.1f} ms {s['send_kbps']:>10.1f} {s['opus_kbps']:>10.1f} {s['loss_before_pct']:>11.2f} / {s['loss_after_pct']:.2f}")
EOF
