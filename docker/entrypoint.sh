#!/bin/sh
# Entry point of the nnxai image: `IMAGE nnxai ...` and `IMAGE nnUNetv2_* ...` run those commands;
# `IMAGE --version` (options only) goes to nnxai; no command shows nnxai's help. Other programs
# installed in the image (python, bash) run too, so the image can be inspected.
set -eu

if [ "$#" -eq 0 ]; then
    set -- nnxai --help
fi

# nnU-Net's and nnxai's work writes under the mount point /data: a /data this user cannot write would fail
# only after the work (nnU-Net's preprocessing, a training), so it stops here first. Help and version
# requests write nothing and pass.
check_data_writable() {
    if [ "$#" -le 1 ] || [ ! -d /data ] || [ -w /data ]; then
        return 0
    fi
    for argument in "$@"; do
        case "$argument" in
            -h | --help | --version) return 0 ;;
        esac
    done
    options=$(awk '$2 == "/data" {print $4}' /proc/mounts 2>/dev/null | tail -n 1)
    case "$options" in
        ro | ro,*) reason="is mounted read-only (drop :ro from -v)" ;;
        *) reason="is not writable by user $(id -u) (run as its owner: --user \"\$(id -u):\$(id -g)\")" ;;
    esac
    echo "nnxai image: /data $reason; $1 writes its results there" >&2
    exit 1
}

case "$1" in
    nnxai | nnUNetv2_*)
        check_data_writable "$@"
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
