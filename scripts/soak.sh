#!/usr/bin/env bash
# Memory soak test (not part of CI): runs sdcam's diffusion pipeline for hours with a prompt
# change every few seconds and reports whether its resident memory grows.
#
#   bash scripts/soak.sh [DURATION_S] [SAMPLE_S] [PROFILE]
#     DURATION_S  how long sdcam runs (default 7200 = 2 h)
#     SAMPLE_S    seconds between RSS samples (default 5)
#     PROFILE     profile to run (default profiles/demo.toml: the tiny random-weight model,
#                 test pattern, StreamDiffusion with 2 steps, self-negative R-CFG, TAESD)
#
# What runs: test pattern → real-time pacing → the profile's transform → `null` output (nothing
# is written to disk but the log and the CSV). On stdin sdcam gets `prompt …` every
# PROMPT_EVERY seconds (every prompt is a new string, so a cache keyed by prompt would show up)
# and `stats` every STATS_EVERY seconds; at the end `stats` and `quit`.
#
# Environment:
#   SDCAM        binary (default target/release/sdcam, built with `cargo build --release`
#                when missing)
#   OUT          output folder (default out/soak-YYYYmmdd-HHMMSS): rss.csv, heap.csv, sdcam.log,
#                summary.txt
#   FPS          source/output frame rate (default 0.5: the tiny model idles between frames, so
#                the soak uses little CPU; the stats show how many frames were transformed)
#   PROMPT_EVERY seconds between prompt changes (default 20)
#   STATS_EVERY  seconds between `stats` commands (default 60; their live-heap line goes to
#                heap.csv)
#   WARMUP_PCT   per cent of the run left out of the slope (default 10)
#   MAX_SLOPE    verdict threshold in MiB/hour (default 5; the growth reported in issue 11 was
#                about 45 MB/hour) for the slope of the per-window RSS maxima (see below)
#   EXTRA_ARGS   more sdcam arguments, e.g. "--set stream.prompt_blend_frames=5"
#   MIMALLOC_PURGE_DELAY=-1 (passed through to sdcam's allocator) keeps freed pages instead of
#                returning them to the OS: RSS then stays at the allocator's high-water mark
#                without the per-frame swings, so any growth (leak or fragmentation) shows
#                plainly in a shorter run; sdcam itself sets 10 s (src/main.rs).
#
# rss.csv has one row per sample: seconds since start, VmRSS, VmHWM (peak), RssAnon, RssFile
# (kB, from /proc/PID/status). Printed: the least-squares slope of VmRSS against time over the
# samples after the warm-up, with its standard error, and the slopes of the RSS maxima and minima
# of each window of 60 samples. RSS swings by up to 100 MiB within each frame (the U-Net's
# temporaries, which mimalloc returns to the OS 10 s after they are last used: between frames
# only when frames are slower than that), so the
# plain slope also follows the share of time spent inside frames, i.e. how busy the machine is;
# the verdict uses the maxima (the peak of a frame, which a leak lifts and machine load does
# not). The live heap (`heap live` in `stats`) is the leak test proper: it is flat when nothing
# leaks, whatever the allocator keeps. Exit status: 0 = sdcam ran the whole time, stopped
# cleanly and the slope of the maxima is under MAX_SLOPE; 1 = over MAX_SLOPE (or a run too short
# for 3 windows); 2 = sdcam died, failed or did not stop.
#
# `bash scripts/soak.sh --report OUT [SAMPLE_S]` prints the summary of a soak folder, also while
# that soak is still running.
# Run it at low priority on a shared machine: `nice -n 10 bash scripts/soak.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
WARMUP_PCT=${WARMUP_PCT:-10}
MAX_SLOPE=${MAX_SLOPE:-5}

# Prints the summary of a soak's folder (rss.csv, sdcam.log), finished or still running.
report() {
    local OUT=$1 SAMPLE=${2:-5} csv=$1/rss.csv log=$1/sdcam.log
    local applied transformed done_line heapcsv
    applied=$(grep -c 'prompt ".*": applied' "$log" || true)
    transformed=$(grep -E '^transformed ' "$log" | tail -1 | awk '{print $2}' || true)
    done_line=$(grep -E 'INFO done:' "$log" | tail -1 | sed 's/.*INFO //' || true)

    # Live heap bytes, from the `stats` outputs of a binary that counts them (src/alloc.rs).
    heapcsv=$OUT/heap.csv
    echo "seconds,live_mib,peak_mib" >"$heapcsv"
    awk '/^uptime / {u = $2} /^heap live / {p = $5; sub(/^\(/, "", p); print u "," $3 "," p}' \
        "$log" >>"$heapcsv"

    # Least-squares slope of y against x over points 1..n, and its standard error (fit_se).
    local fit='
    function fit(x, y, n,    i, sx, sy, sxx, sxy, b, a, e, ss) {
        sx = sy = sxx = sxy = ss = 0
        for (i = 1; i <= n; i++) { sx += x[i]; sy += y[i]; sxx += x[i] * x[i]; sxy += x[i] * y[i] }
        b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
        a = (sy - b * sx) / n
        for (i = 1; i <= n; i++) { e = y[i] - a - b * x[i]; ss += e * e }
        fit_se = (n > 2) ? sqrt(ss / (n - 2) / (sxx - sx * sx / n)) : 0
        return b
    }'
    {
        awk -F, -v warm="$WARMUP_PCT" -v max="$MAX_SLOPE" -v win="$((SAMPLE * 60))" "$fit"'
        NR == 1 { next }
        { t[++n] = $1; r[n] = $2 / 1024; h[n] = $3 / 1024 }
        END {
            if (n < 3) { print "too few RSS samples (" n ") for a slope"; exit }
            t0 = t[n] * warm / 100
            for (i = 1; i <= n; i++) if (t[i] >= t0) {
                m++; x[m] = t[i] / 3600; y[m] = r[i]
                if (!first) first = i
                last = i
                # Per-window maxima and minima: RSS swings by up to 100 MiB within a frame (the
                # U-Net temporaries); a leak lifts both envelopes.
                w = int((t[i] - t0) / win) + 1
                if (w > nw) { nw = w; wx[w] = t[i] / 3600; wy[w] = 0; wl[w] = 1e12 }
                if (r[i] > wy[w]) wy[w] = r[i]
                if (r[i] < wl[w]) wl[w] = r[i]
            }
            slope = fit(x, y, m); se = fit_se
            printf "soak: %d s run, %d RSS samples (%d after the %d%% warm-up)\n", t[n], n, m, warm
            printf "RSS at start %.1f MiB, after warm-up (%d s) %.1f MiB, at end %.1f MiB, " \
                "peak (VmHWM) %.1f MiB\n", r[1], t[first], r[first], r[last], h[last]
            printf "RSS slope after warm-up: %+.2f MiB/hour (± %.2f standard error; %+.3f MiB/min)\n",
                slope, se, slope / 60
            if (nw < 3) {
                print "verdict: none (fewer than 3 windows of " win " s after the warm-up)"
                exit
            }
            for (i = 1; i <= nw; i++) { ex[i] = wx[i]; ey[i] = wy[i]; el[i] = wl[i] }
            lo = fit(ex, el, nw); lo_se = fit_se
            hi = fit(ex, ey, nw); hi_se = fit_se
            printf "slope of the per-%d-s RSS maxima: %+.2f MiB/hour (± %.2f), ", win, hi, hi_se
            printf "minima: %+.2f MiB/hour (± %.2f), %d windows\n", lo, lo_se, nw
            verdict = (hi <= max) ? "PASS" : "FAIL"
            printf "verdict: %s (slope of the RSS maxima %+.2f MiB/hour, threshold %s MiB/hour)\n",
                verdict, hi, max
        }' "$csv"
        awk -F, -v warm="$WARMUP_PCT" "$fit"'
        NR == 1 { next }
        { t[++n] = $1; l[n] = $2; p[n] = $3 }
        END {
            if (n == 0) { print "live heap: not reported (a binary without src/alloc.rs)"; exit }
            t0 = t[n] * warm / 100
            for (i = 1; i <= n; i++) if (t[i] >= t0) {
                m++; x[m] = t[i] / 3600; y[m] = l[i]
                if (!first) first = i
            }
            printf "live heap after warm-up (%d s) %.2f MiB, at end %.2f MiB, peak %.2f MiB", t[first],
                l[first], l[n], p[n]
            if (m >= 3) printf "; slope %+.3f MiB/hour (± %.3f, %d stats)", fit(x, y, m), fit_se, m
            printf "\n"
        }' "$heapcsv"
        echo "prompt changes applied: $applied, frames transformed: ${transformed:-?}"
        if [[ -n $done_line ]]; then echo "$done_line"; fi
    }
}

# The whole run is one function, read by bash before it runs: editing this file while a soak is
# running does not disturb it.
main() {
    DURATION=${1:-7200}
    SAMPLE=${2:-5}
    PROFILE=${3:-profiles/demo.toml}
    SDCAM=${SDCAM:-target/release/sdcam}
    OUT=${OUT:-out/soak-$(date -u +%Y%m%d-%H%M%S)}
    FPS=${FPS:-0.5}
    PROMPT_EVERY=${PROMPT_EVERY:-20}
    STATS_EVERY=${STATS_EVERY:-60}
    EXTRA_ARGS=${EXTRA_ARGS:-}

    if [[ ! -x $SDCAM ]]; then
        cargo build --release --locked
    fi
    mkdir -p "$OUT"
    csv=$OUT/rss.csv
    log=$OUT/sdcam.log
    summary=$OUT/summary.txt
    fifo=$OUT/stdin.fifo
    rm -f "$fifo"
    mkfifo "$fifo"
    # Opened read-write so that neither side blocks and sdcam never sees end-of-file early.
    exec 3<>"$fifo"

    # shellcheck disable=SC2086 # EXTRA_ARGS is split on purpose
    "$SDCAM" --profile "$PROFILE" --source pattern --output null --fps "$FPS" \
        --set output.pacing=realtime --status-interval 60 $EXTRA_ARGS <"$fifo" >"$log" 2>&1 &
    pid=$!
    start=$(date +%s)
    echo "soak: sdcam pid $pid, $DURATION s, RSS every $SAMPLE s, prompt every $PROMPT_EVERY s," \
        "profile $PROFILE, $FPS fps, output in $OUT"

    prompts=(
        "a sunset over the sea, vivid colours"
        "a forest in the morning fog"
        "a neon city at night"
        "a watercolor painting of a harbour"
        "an oil painting of mountains in winter"
    )

    # Prompt changes and periodic stats, in the background.
    (
        n=0
        next_stats=$STATS_EVERY
        while sleep "$PROMPT_EVERY"; do
            n=$((n + 1))
            echo "prompt ${prompts[n % ${#prompts[@]}]}, take $n" >&3
            if ((n * PROMPT_EVERY >= next_stats)); then
                echo stats >&3
                next_stats=$((next_stats + STATS_EVERY))
            fi
        done
    ) &
    feeder=$!
    trap 'kill "$feeder" 2>/dev/null || true; kill "$pid" 2>/dev/null || true' EXIT

    echo "seconds,vmrss_kb,vmhwm_kb,rssanon_kb,rssfile_kb" >"$csv"
    died=0
    while :; do
        now=$(date +%s)
        t=$((now - start))
        if ! row=$(awk -v t="$t" '
            /^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} /^RssAnon:/ {a = $2} /^RssFile:/ {f = $2}
            END {if (r == "") exit 1; print t "," r "," h "," a "," f}' "/proc/$pid/status" 2>/dev/null); then
            died=1
            break
        fi
        echo "$row" >>"$csv"
        ((t >= DURATION)) && break
        sleep "$SAMPLE"
    done

    kill "$feeder" 2>/dev/null || true
    wait "$feeder" 2>/dev/null || true
    rc=0
    if ((died)); then
        wait "$pid" || rc=$?
        echo "soak: sdcam DIED after $(($(date +%s) - start)) s (exit status $rc); last log lines:" >&2
        tail -20 "$log" >&2
    else
        echo stats >&3
        sleep 2
        echo quit >&3
        # A clean stop drains the queues; give it 60 s.
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "soak: sdcam did not stop within 60 s of quit" >&2
            kill -9 "$pid" 2>/dev/null || true
            died=1
        fi
        wait "$pid" || rc=$?
        ((rc != 0)) && died=1
    fi
    trap - EXIT
    exec 3>&-
    rm -f "$fifo"

    report "$OUT" "$SAMPLE" | tee "$summary"

    if ((died)); then
        echo "verdict: FAIL (sdcam died or did not stop cleanly, exit status $rc)" | tee -a "$summary"
        exit 2
    fi
    grep -q '^verdict: PASS' "$summary" || exit 1
}

# One compound command, parsed whole before it runs, that ends in `exit`: bash reads nothing more
# of this file once a soak has started.
if [[ ${1:-} == --report ]]; then
    report "$2" "${3:-5}"
    exit
else
    main "$@"
    exit
fi
