# One device call's worth of gpu_bench.py points: the set-up, then each point in its own process,
# skipped when it could not end before LIMIT seconds of this job (a ram-optimizer point takes ~150 s
# with its model built). Records go to /tmp/full/results.json. Detached, it outlives the call:
#   (mkdir -p /tmp/full && LIMIT=470 setsid nohup bash bench/points_until.sh POINT... >/tmp/full/log 2>&1 </dev/null &)
. bench/device_setup.sh
export BENCH_RESULTS=/tmp/full/results.json
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
echo "=== set-up done at ${SECONDS} s"
for point in "$@"; do
  if [ $((SECONDS + 150)) -ge "${LIMIT:?seconds this job may take}" ]; then echo "=== skipped $point"; continue; fi
  echo "=== $point at ${SECONDS} s"
  timeout $((LIMIT - SECONDS)) python3 bench/gpu_bench.py "$point"
done
echo "=== ALLDONE at ${SECONDS} s"
