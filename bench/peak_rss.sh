#!/bin/bash
# peak_rss.sh LIMIT_KB LOG COMMAND...
# Runs COMMAND with its output in LOG, samples its resident memory (VmRSS) every 0.2 s, kills it
# if it passes LIMIT_KB (so that a run too big for the machine stops before the kernel's OOM
# killer picks a victim), and appends `rc=.. peak_rss_kb=.. wall_s=..` to LOG.
limit=$1
log=$2
shift 2
start=$(date +%s.%N)
"$@" >"$log" 2>&1 &
pid=$!
peak=0
while kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status" 2>/dev/null)
  if [ -n "$rss" ]; then
    [ "$rss" -gt "$peak" ] && peak=$rss
    if [ "$rss" -gt "$limit" ]; then
      kill -9 "$pid"
      echo "stopped at $rss kB (limit $limit kB)" >>"$log"
    fi
  fi
  sleep 0.2
done
wait "$pid"
rc=$?
end=$(date +%s.%N)
echo "rc=$rc peak_rss_kb=$peak wall_s=$(echo "$end - $start" | bc)" >>"$log"
