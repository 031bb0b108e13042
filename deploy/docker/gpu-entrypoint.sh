#!/bin/sh
# Start a GPU worker: find (or build, once per GPU model) the TensorRT engine, then exec
# `labeler worker` with the container's arguments (e.g. --gpu 0 --hostname labeler-gpu0@%h).
set -eu
if [ "${LABELER_BACKEND:-tensorrt}" = "tensorrt" ]; then
    # The bundle stays read-only: an engine built here goes into a copy in the cache volume.
    LABELER_MODEL="$(python3 /opt/labeler/prepare_engine.py "$@")"
    export LABELER_MODEL
fi
exec labeler worker "$@"
