#!/usr/bin/env bash
# The demo on the embedded defaults: a supernode and three users on loopback, in one
# process (see README.md). Needs a Rust toolchain and a cmake binary (the Opus library
# bundled with the media crate is built with it); installs cmake when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cmake >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing cmake (builds the bundled Opus library)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null; }
    elif command -v pip3 >/dev/null 2>&1 || command -v pip >/dev/null 2>&1; then
        echo "installing cmake with pip --user (builds the bundled Opus library)" >&2
        "$(command -v pip3 || command -v pip)" install --user -q cmake
        export PATH="$HOME/.local/bin:$PATH"
    fi
    command -v cmake >/dev/null 2>&1 || {
        echo "cmake is missing and could not be installed: install it (apt-get install cmake or pip install cmake) and run this again" >&2
        exit 1
    }
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/tmp}/.cache/peerline-target}"
exec cargo run --release --locked -p peerline -- demo "$@"
