#!/usr/bin/env bash
# A bench-only virtual environment with the peers of bench/compare.py: pymilter (over
# Sendmail's libmilter, GPL) and purepythonmilter. Never a dependency of milterapp.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! [ -e /usr/include/libmilter/mfapi.h ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmilter-dev python3-dev >/dev/null
fi
python3 -m venv .venv-peers
.venv-peers/bin/pip install --quiet pymilter purepythonmilter
echo "peers installed in bench/.venv-peers"
