#!/bin/sh
# Entry point of the nnxai image: `IMAGE nnxai ...` and `IMAGE nnUNetv2_* ...` run those commands;
# `IMAGE --version` (options only) goes to nnxai; no command shows nnxai's help. Other programs
# installed in the image (python, bash) run too, so the image can be inspected.
set -eu

if [ "$#" -eq 0 ]; then
    set -- nnxai --help
fi

case "$1" in
    nnxai | nnUNetv2_*)
        exec "$@"
        ;;
    -*)
        exec nnxai "$@"
        ;;
esac

if ! command -v "$1" >/dev/null 2>&1; then
    echo "nnxai image: unknown command '$1' (use 'nnxai ...' or an nnU-Net command such as 'nnUNetv2_train ...')" >&2
    exit 127
fi
exec "$@"
