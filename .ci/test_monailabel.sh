#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
# MONAI Label 0.8.5 server test of the built brain MRI bundle (`make test-monailabel`):
#  1. a virtual environment with monailabel and its working pins, cached outside the clone (keyed by the pins);
#  2. the monaibundle sample app (`apps --download` copies it from the installed package: no network), the built bundle (with a tiny random
#     model and its model.json) in the app's model folder;
#  3. `monailabel start_server` on 127.0.0.1 with offline options; /info must list the model as 3D with
#     labels {"anomaly": 1}; /infer on a 4-channel volume must return the uint8 mask and, with
#     binarize_output=false, the float map, both on the input's grid (.ci/monailabel_check.py);
#  4. the server is stopped (also on failure).
# Environment: PYTHON (a python with berdiff installed, default .venv/bin/python), BASE_PYTHON (the interpreter the
# MONAI Label venv is made from, default python3), MONAILABEL_VENV (override the cached venv), PORT (default 18123).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
BASE_PYTHON=${BASE_PYTHON:-python3}
PORT=${PORT:-18123}
BUNDLE=brats_mri_bernoulli_anomaly
PINS="monailabel==0.8.5 pydicom==2.4.4 pynetdicom==2.0.2 torch==2.14.1 torchvision==0.29.1"
KEY=$(printf '%s %s' "$PINS" "$($BASE_PYTHON -c 'import sys; print(sys.version.split()[0])')" | sha256sum | cut -c1-12)
VENV=${MONAILABEL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/berdiff/monailabel-$KEY}

if [ ! -f "$VENV/.installed" ]; then
    echo "creating the MONAI Label environment $VENV ($PINS)"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q $PINS
    touch "$VENV/.installed"
fi

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -- -"$SERVER_PID" 2>/dev/null || kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -9 -- -"$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# the released bundle, a tiny random model for it, and one 4-channel study
"$PYTHON" -m berdiff build_bundle --bundle "$BUNDLE" --out "$WORK/dist" --make_zip False
"$PYTHON" .ci/monailabel_check.py prepare --bundle "$WORK/dist/$BUNDLE" --studies "$WORK/studies"

# the sample app: `apps --download` copies it from <venv>/monailabel/sample-apps (no network)
# the monailabel launcher runs `$MONAILABEL_PYEXE -m monailabel.main`; no PYTHONPATH: berdiff must come from the bundle
ML="env -u PYTHONPATH MONAILABEL_PYEXE=$VENV/bin/python PATH=$VENV/bin:$PATH $VENV/bin/monailabel"
(cd "$WORK" && $ML apps --download --name monaibundle --output apps)
mkdir -p "$WORK/apps/monaibundle/model"
cp -r "$WORK/dist/$BUNDLE" "$WORK/apps/monaibundle/model/$BUNDLE"

# the server, offline: no SAM2 checkpoint download, no zoo look-up, no trainers
(cd "$WORK" && exec setsid $ML start_server --app "$WORK/apps/monaibundle" --studies "$WORK/studies" \
    --host 127.0.0.1 --port "$PORT" \
    --conf models "$BUNDLE" --conf sam2 false --conf zoo_source ngc --conf skip_trainers true \
    --conf preload false > "$WORK/server.log" 2>&1) &
SERVER_PID=$!

if ! "$VENV/bin/python" .ci/monailabel_check.py check --url "http://127.0.0.1:$PORT" --model "$BUNDLE" \
        --studies "$WORK/studies" --server_pid "$SERVER_PID"; then
    echo "---- server log (last 80 lines) ----"; tail -80 "$WORK/server.log"
    exit 1
fi
echo "test-monailabel: passed"
