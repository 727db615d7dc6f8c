# nnxai with nnU-Net v2 on a CUDA PyTorch runtime. Build: docker build -t nnxai .
# Usage (README, "Docker"): docker run --gpus all --shm-size=8g -v "$PWD/data":/data nnxai nnxai explain ...
# BASE_IMAGE: any image with python3, pip, torch and torchvision (docker/build-without-hub.sh makes a Debian
# one where Docker Hub is out of reach). Debian's Python refuses pip installs into the system unless told
# (PIP_BREAK_SYSTEM_PACKAGES, build time only); conda's, in the CUDA base, ignores the variable.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# Stage 1: build nnxai's wheel, so the final image holds neither the source tree nor build tools.
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY nnxai/ nnxai/
COPY trainers/ trainers/
COPY dataset_conversion/ dataset_conversion/
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# Stage 2: the runtime image: the base's torch, nnU-Net v2 and nnxai, run as a non-root user.
FROM ${BASE_IMAGE}
# nnU-Net's three folders live under the one mount point /data; nnxai's trainers are found through
# nnUNet_extTrainer (a fixed link to the installed `trainers` package). torch.compile needs a C compiler
# (Triton), which a runtime image lacks: nnU-Net's compile is off.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    nnUNet_raw=/data/nnUNet_raw \
    nnUNet_preprocessed=/data/nnUNet_preprocessed \
    nnUNet_results=/data/nnUNet_results \
    nnUNet_extTrainer=/opt/nnxai/trainers \
    nnUNet_compile=f
COPY --from=build /wheels /tmp/wheels
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir /tmp/wheels/nnxai-*.whl nnunetv2==2.8.1 \
    && rm -rf /tmp/wheels \
    && mkdir -p /opt/nnxai /data \
    && ln -s "$(nnxai trainers-path)" /opt/nnxai/trainers \
    && useradd --create-home --uid 1000 --user-group nnxai \
    && chown nnxai:nnxai /data
COPY docker/entrypoint.sh /usr/local/bin/nnxai-entrypoint
USER 1000:1000
WORKDIR /data
HEALTHCHECK --interval=10m --timeout=60s CMD ["nnxai", "--version"]
ENTRYPOINT ["nnxai-entrypoint"]
CMD ["nnxai", "--help"]
