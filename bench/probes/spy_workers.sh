#!/usr/bin/env bash
# Probe: where a running `curate run`'s workers spend their time, once the GPU worker is busy.
# Waits for a process to hold 2 GiB of the GPU (nvidia-smi), then DELAY more seconds (compiling), then for
# SECONDS samples at once: py-spy (--idle, raw collapsed stacks, 50 Hz) of the GPU worker and of
# the busiest other Python process (a CPU worker), the GPU's utilization every 0.5 s, and a `top`
# of the processes. Output in OUT_DIR. Run it in the background beside the run:
#     bench/probes/spy_workers.sh OUT_DIR [DELAY=90] [SECONDS=20] &
# GPU_MIB (default 2048) is the GPU memory that marks the GPU worker: lower it (e.g. 300) to start
# sampling as soon as a small model is loaded, before its first batch (to see a run's start-up).
# SPY_FLAGS (default --idle) replaces py-spy's sampling flag: --gil samples only the thread holding the GIL.
set -u
out=$1; delay=${2:-90}; seconds=${3:-20}
spy=${PY_SPY:-py-spy}
mkdir -p "$out"
for _ in $(seq 600); do
    # The process holding the most GPU memory, once it holds GPU_MIB: the GPU worker with its model
    # (a benchmark's own process may hold a small CUDA context of its own).
    gpu=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits \
          | sort -t, -k2 -n -r | awk -F, -v mib="${GPU_MIB:-2048}" '$2 >= mib {print $1; exit}' | tr -d ' ')
    [ -n "$gpu" ] && break
    sleep 1
done
[ -z "$gpu" ] && { echo "spy_workers: no process opened the GPU" > "$out/spy.txt"; exit 0; }
sleep "$delay"
cpu=$(ps -eo pid,pcpu,comm --sort=-pcpu | awk -v g="$gpu" '$3 ~ /python/ && $1 != g {print $1; exit}')
echo "gpu worker $gpu, cpu process $cpu" > "$out/spy.txt"
top -b -n 1 -w 200 | head -30 >> "$out/spy.txt"
timeout $((seconds + 2)) nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$out/gpu_util.csv" &
"$spy" record ${SPY_FLAGS:---idle} --threads --format raw -r 50 -d "$seconds" -p "$gpu" -o "$out/gpu_worker.txt" > /dev/null 2>&1 &
[ -n "$cpu" ] && "$spy" record ${SPY_FLAGS:---idle} --threads --format raw -r 50 -d "$seconds" -p "$cpu" -o "$out/cpu_process.txt" > /dev/null 2>&1 &
wait
echo "done" >> "$out/spy.txt"
