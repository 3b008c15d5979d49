#!/usr/bin/env bash
# Installs what deem needs to build and run, idempotently:
# a project-local virtualenv (.venv) holding torch==2.13.0 from PyPI, the libtorch that tch 0.26 links, and
# Debian's libgloo-dev (Gloo's headers, which the c10d bridge compiles against; the wheel ships none).
# It skips every step whose result is already present. Python >= 3.9 with venv and pip is required.
# --nccl also installs the CUDA C++ library headers (nvidia-cuda-cccl) that `--features nccl` compiles with.
# --test also installs what the tests drive deem with: the official `openai` Python client (into .venv)
# and headless Chromium + ChromeDriver (Debian packages, when apt-get is usable).
set -euo pipefail

TORCH_VERSION="2.13.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

die() { echo "deem setup: error: $*" >&2; exit 1; }
say() { echo "deem setup: $*" >&2; }

WITH_TEST=0
WITH_NCCL=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        --test) WITH_TEST=1 ;;
        --nccl) WITH_NCCL=1 ;;
        *) die "unknown argument '$arg' (setup.sh takes --test and --nccl)" ;;
    esac
done

command -v cargo >/dev/null 2>&1 || die "cargo was not found on PATH; install Rust (https://rustup.rs) first"

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PY" >/dev/null 2>&1 \
        || die "'$PY' was not found on PATH; install Python 3 (>= 3.9) with venv and pip, or set PYTHON=/path/to/python3"
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
        || die "'$PY' is $("$PY" --version 2>&1); deem needs Python >= 3.9 (set PYTHON=/path/to/python3)"
    "$PY" -c 'import venv, ensurepip' 2>/dev/null \
        || die "'$PY' lacks the venv/ensurepip modules; install them (Debian: apt-get install python3-venv)"
    say "creating virtualenv $VENV"
    "$PY" -m venv "$VENV" || { rm -rf "$VENV"; die "'$PY -m venv' failed"; }
fi
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
    || die "pip is not available in $VENV; remove $VENV and install pip for '$PY' (Debian: apt-get install python3-pip)"

have_torch="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have_torch" != "$TORCH_VERSION" ]; then
    say "installing torch==$TORCH_VERSION into $VENV (about 5 GB, a few minutes)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "torch==$TORCH_VERSION" \
        || die "pip could not install torch==$TORCH_VERSION (is PyPI reachable?)"
else
    say "torch $TORCH_VERSION already in $VENV"
fi

if [ ! -f /usr/include/gloo/config.h ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "installing libgloo-dev (Gloo headers for the c10d bridge)"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgloo-dev) >/dev/null \
            || die "apt-get could not install libgloo-dev"
    else
        die "Gloo's headers (/usr/include/gloo) are missing and apt-get is not usable here; install Debian's libgloo-dev"
    fi
else
    say "libgloo-dev already installed"
fi

# The CUDA 13 headers of torch's own nvidia-* wheels lack CCCL's <nv/target>; its wheel matches torch's
# CUDA (13.0).
CCCL_VERSION="13.0.85"
if [ "$WITH_NCCL" = 1 ]; then
    if ! "$VENV/bin/python" -m pip show nvidia-cuda-cccl >/dev/null 2>&1; then
        say "installing nvidia-cuda-cccl==$CCCL_VERSION (headers for --features nccl) into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "nvidia-cuda-cccl==$CCCL_VERSION" \
            || die "pip could not install nvidia-cuda-cccl==$CCCL_VERSION (is PyPI reachable?)"
    fi
fi

OPENAI_MIN="1.40"
if [ "$WITH_TEST" = 1 ]; then
    if ! "$VENV/bin/python" -c 'import openai' 2>/dev/null; then
        say "installing the openai client (tests) into $VENV"
        "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "openai>=$OPENAI_MIN" \
            || die "pip could not install openai (is PyPI reachable?)"
    fi
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            say "installing chromium and chromium-driver (playground test)"
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null \
                || die "apt-get could not install chromium chromium-driver"
        else
            say "warning: /usr/bin/chromium or /usr/bin/chromedriver is missing and apt-get is not usable here; the playground test will fail until they are installed"
        fi
    fi
fi

say "ready: run 'source scripts/env.sh' before hand-run cargo commands"
