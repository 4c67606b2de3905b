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
#   OUT          output folder (default out/soak-YYYYmmdd-HHMMSS): rss.csv, sdcam.log, summary.txt
#   FPS          source/output frame rate (default 0.5: the tiny model idles between frames, so
#                the soak uses little CPU; the stats show how many frames were transformed)
#   PROMPT_EVERY seconds between prompt changes (default 20)
#   STATS_EVERY  seconds between `stats` commands (default 600)
#   WARMUP_PCT   per cent of the run left out of the slope (default 10)
#   MAX_SLOPE    verdict threshold in MB/hour (default 5; the growth reported in issue 11 was
#                about 45 MB/hour). RSS swings by up to 100 MB within each frame (the U-Net's
#                temporaries, which mimalloc returns to the OS between frames), so the slope of
#                2 hours of samples every 5 s has a standard error of about 1-2 MB/hour; it is
#                printed next to the slope.
#   EXTRA_ARGS   more sdcam arguments, e.g. "--set stream.prompt_blend_frames=5"
#
# rss.csv has one row per sample: seconds since start, VmRSS, VmHWM (peak), RssAnon, RssFile
# (kB, from /proc/PID/status). The slope is a least-squares fit of VmRSS against time over the
# samples after the warm-up. Exit status: 0 = sdcam ran the whole time, stopped cleanly and the
# slope is under MAX_SLOPE; 1 = slope over MAX_SLOPE; 2 = sdcam died, failed or did not stop.
# Run it at low priority on a shared machine: `nice -n 10 bash scripts/soak.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The whole script is one function, read by bash before it runs: editing this file while a soak
# is running does not disturb it.
main() {
    DURATION=${1:-7200}
    SAMPLE=${2:-5}
    PROFILE=${3:-profiles/demo.toml}
    SDCAM=${SDCAM:-target/release/sdcam}
    OUT=${OUT:-out/soak-$(date -u +%Y%m%d-%H%M%S)}
    FPS=${FPS:-0.5}
    PROMPT_EVERY=${PROMPT_EVERY:-20}
    STATS_EVERY=${STATS_EVERY:-600}
    WARMUP_PCT=${WARMUP_PCT:-10}
    MAX_SLOPE=${MAX_SLOPE:-5}
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

    applied=$(grep -c 'prompt ".*": applied' "$log" || true)
    transformed=$(grep -E '^transformed ' "$log" | tail -1 | awk '{print $2}')
    done_line=$(grep -E 'INFO done:' "$log" | tail -1 | sed 's/.*INFO //')

    awk -F, -v warm="$WARMUP_PCT" -v max="$MAX_SLOPE" -v win="$((SAMPLE * 60))" \
        -v applied="$applied" -v transformed="${transformed:-?}" -v done_line="$done_line" '
    # Least-squares slope of y against x over points 1..n, in y units per x unit, and its standard
    # error.
    function fit(x, y, n,    i, sx, sy, sxx, sxy, b, a, e, ss) {
        for (i = 1; i <= n; i++) { sx += x[i]; sy += y[i]; sxx += x[i] * x[i]; sxy += x[i] * y[i] }
        b = (n * sxy - sx * sy) / (n * sxx - sx * sx)
        a = (sy - b * sx) / n
        for (i = 1; i <= n; i++) { e = y[i] - a - b * x[i]; ss += e * e }
        fit_se = (n > 2) ? sqrt(ss / (n - 2) / (sxx - sx * sx / n)) : 0
        return b
    }
    NR == 1 { next }
    { t[++n] = $1; r[n] = $2; h[n] = $3 }
    END {
        if (n < 3) { print "too few samples (" n ") for a slope"; exit }
        t0 = t[n] * warm / 100
        for (i = 1; i <= n; i++) if (t[i] >= t0) {
            m++; x[m] = t[i] / 3600; y[m] = r[i] / 1024
            if (!first) first = i
            last = i
            # Per-window maxima and minima: RSS swings by up to 100 MB within a frame (the U-Net'"'"'s
            # temporaries); a leak lifts both envelopes.
            w = int((t[i] - t0) / win) + 1
            if (w > nw) { nw = w; wx[w] = t[i] / 3600; wy[w] = 0; wl[w] = 1e12 }
            if (r[i] / 1024 > wy[w]) wy[w] = r[i] / 1024
            if (r[i] / 1024 < wl[w]) wl[w] = r[i] / 1024
        }
        slope = fit(x, y, m); se = fit_se
        printf "soak: %d s run, %d RSS samples (%d after the %d%% warm-up)\n", t[n], n, m, warm
        printf "RSS at start %.1f MB, after warm-up (%d s) %.1f MB, at end %.1f MB, peak (VmHWM) %.1f MB\n",
            r[1] / 1024, t[first], r[first] / 1024, r[last] / 1024, h[last] / 1024
        printf "RSS slope after warm-up: %+.2f MB/hour (± %.2f standard error; %+.3f MB/min)\n",
            slope, se, slope / 60
        if (nw >= 3) {
            k = 0
            for (i = 1; i <= nw; i++) if (wy[i] > 0) { k++; ex[k] = wx[i]; ey[k] = wy[i]; el[k] = wl[i] }
            printf "slope of the per-%d-s RSS maxima: %+.2f MB/hour (± %.2f), minima: ", win,
                fit(ex, ey, k), fit_se
            printf "%+.2f MB/hour (± %.2f), %d windows\n", fit(ex, el, k), fit_se, k
        }
        printf "prompt changes applied: %s, frames transformed: %s\n", applied, transformed
        if (done_line != "") print done_line
        verdict = (slope <= max) ? "PASS" : "FAIL"
        printf "verdict: %s (RSS slope %+.2f MB/hour, threshold %s MB/hour)\n", verdict, slope, max
    }' "$csv" | tee "$summary"

    if ((died)); then
        echo "verdict: FAIL (sdcam died or did not stop cleanly, exit status $rc)" | tee -a "$summary"
        exit 2
    fi
    grep -q '^verdict: PASS' "$summary" || exit 1
}

main "$@"
