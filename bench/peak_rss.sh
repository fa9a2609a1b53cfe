#!/bin/bash
# peak_rss.sh LIMIT_KB LOG COMMAND...
# Runs COMMAND with its output in LOG, samples its resident memory every 0.2 s, kills it if its
# anonymous memory passes LIMIT_KB (so that a run too big for the machine stops before the
# kernel's OOM killer picks a victim), and appends `rc=.. peak_rss_kb=.. peak_anon_kb=..
# wall_s=..` to LOG. VmRSS counts the pages of memory-mapped files read (a loaded checkpoint's
# safetensors: clean page cache the kernel drops under pressure); RssAnon is the memory the
# process itself allocated (the model, activations).
limit=$1
log=$2
shift 2
start=$(date +%s.%N)
"$@" >"$log" 2>&1 &
pid=$!
peak=0
peak_anon=0
while kill -0 "$pid" 2>/dev/null; do
  read -r rss anon < <(awk '/VmRSS/{r=$2} /RssAnon/{a=$2} END{print r, a}' "/proc/$pid/status" 2>/dev/null)
  if [ -n "$rss" ] && [ -n "$anon" ]; then
    [ "$rss" -gt "$peak" ] && peak=$rss
    [ "$anon" -gt "$peak_anon" ] && peak_anon=$anon
    if [ "$anon" -gt "$limit" ]; then
      kill -9 "$pid"
      echo "stopped at $anon kB anonymous (limit $limit kB)" >>"$log"
    fi
  fi
  sleep 0.2
done
wait "$pid"
rc=$?
end=$(date +%s.%N)
echo "rc=$rc peak_rss_kb=$peak peak_anon_kb=$peak_anon wall_s=$(echo "$end - $start" | bc)" >>"$log"
