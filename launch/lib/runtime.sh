# Sourced by launch/tpu_pod.sh and launch/tpu_queued.sh; not a command of its own.

# default_runtime TYPE: the TPU VM software version for accelerator type TYPE (v5litepod-16,
# v5p-64, ...) on stdout, or status 1 when there is no default for it.
default_runtime() {
  case "$1" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}
