#!/usr/bin/env bash
# Call quality over real impaired networks: speech calls between real peerline agents in
# the NAT lab's network namespaces, with a router between them that adds a 40 ms base
# delay and, per case, 30 ms of jitter (a user-space NFQUEUE stage: this kernel has no
# netem), 3 % or 10 % random loss (nftables) or 5 % bursty Gilbert-Elliott loss. Each
# direction is scored with PESQ (ITU-T P.862.2 wide band, the `pesq` Python package) as
# MOS-LQO, with the delay Peerline adds (jitter buffer plus codec) and the bitrate.
#
#   sudo scripts/call-quality-lab.sh [--json] [--out DIR] [--cases NAME,..] [--seed N]
#
# Needs root (namespaces, nftables, iptables). Installs what it needs: the system packages
# through install-deps.sh (nftables, iptables, espeak-ng for the speech, cmake for libopus)
# and the pesq, numpy and scipy Python packages through pip. The offline counterpart on
# an emulated channel is scripts/call-quality.sh.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

if [ "$(id -u)" -ne 0 ]; then
    echo "call-quality-lab.sh builds network namespaces and needs root: run it with sudo" >&2
    exit 1
fi
"$here/install-deps.sh"
if ! python3 -c 'import pesq, numpy, scipy' >/dev/null 2>&1; then
    echo "installing the pesq, numpy and scipy Python packages" >&2
    python3 -m pip install -q pesq numpy scipy >&2 || {
        echo "could not install the pesq Python package: python3 -m pip install pesq numpy scipy" >&2
        exit 1
    }
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build -q -p peerline -p peerlined -p peerline-lab
exec "$CARGO_TARGET_DIR/debug/peerline-lab" call-quality "$@"
