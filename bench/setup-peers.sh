#!/usr/bin/env bash
# A bench-only virtual environment with the peers of bench/compare.py: pymilter (over
# Sendmail's libmilter, GPL), purepythonmilter, and the reference milter in C over libmilter
# itself (peers/libmilter_ref.c, linked against Debian's libmilter-dev). Never a dependency
# of milterapp.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! [ -e /usr/include/libmilter/mfapi.h ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmilter-dev python3-dev >/dev/null
fi
python3 -m venv .venv-peers
.venv-peers/bin/pip install --quiet pymilter purepythonmilter
cc -O2 -Wall -o .venv-peers/bin/libmilter_ref peers/libmilter_ref.c -lmilter -lpthread
echo "peers installed in bench/.venv-peers"
