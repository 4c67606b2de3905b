# The end-to-end checks, run by busybox sh inside the VM (from /init, cwd = the read-only host
# share with `sdcam`, this script and the profile). Results and frames go to /mnt/out.
# Each check prints "PASS|FAIL <name> (<seconds>)"; the first failure stops the run (exit 1).
OUT=/mnt/out
KO=/lib/modules/$(uname -r)/extra
LB=/dev/video10
CAM=/dev/video0
SDCAM=/mnt/host/sdcam
CTL=/tmp/ctl
PROFILE=/tmp/vm.toml
RESULTS=$OUT/results.txt
: > "$RESULTS"
# size and rate of the camera and the virtual camera (run.sh passes them on the kernel command line)
FPS=${SDCAM_VM_FPS:-15}
SIZE=${SDCAM_VM_SIZE:-640x360}
W=${SIZE%x*}; H=${SIZE#*x}
run_no=0
SDCAM_PID=

now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "VMTEST: $*"; }
T_CHECK=$(now)
begin() { CHECK=$1; T_CHECK=$(now); log "--- $1"; }
pass() { r="PASS $CHECK ($(since "$T_CHECK") s)${1:+: $1}"; echo "$r" >> "$RESULTS"; log "$r"; }
fail() {
  r="FAIL $CHECK ($(since "$T_CHECK") s): $*"
  echo "$r" >> "$RESULTS"; log "$r"
  if [ -n "$SDCAM_LOG" ] && [ -f "$SDCAM_LOG" ]; then log "last lines of $SDCAM_LOG:"; tail -n 25 "$SDCAM_LOG" | sed "s/^/VMTEST:   /"; fi
  dmesg > $OUT/dmesg.txt; dmesg | tail -n 15 | sed "s/^/VMTEST: dmesg: /"
  [ -n "$SDCAM_PID" ] && kill -9 "$SDCAM_PID" 2>/dev/null
  exit 1
}

# wait_for SECONDS CMD...: polls CMD every 0.2 s.
wait_for() {
  _t=$1; shift; _s=$(now)
  while ! "$@" >/dev/null 2>&1; do
    [ "$(awk -v a="$_s" -v b="$(now)" -v t="$_t" 'BEGIN{print (b-a>t)}')" = 1 ] && return 1
    sleep 0.2
  done
  return 0
}
is_capture() { v4l2-ctl -d $LB -D 2>/dev/null | grep -A3 "Device Caps" | grep -q "Video Capture"; }
alive() { kill -0 "$SDCAM_PID" 2>/dev/null; }
load_vivid() {
  insmod $KO/vivid.ko n_devs=1 node_types=0x1 || return 1
  wait_for 5 test -e /dev/video0 || return 1
  # moving test pattern: consecutive frames differ everywhere, not just in the clock text
  v4l2-ctl -d /dev/video0 -c horizontal_movement=5 >/dev/null 2>&1 || true
}

start_sdcam() {
  run_no=$((run_no + 1))
  SDCAM_LOG=$OUT/sdcam-$run_no.log
  rm -f $CTL; mkfifo $CTL
  exec 3<>$CTL  # keeps the command pipe open (and non-blocking to open) for the whole run
  RUST_LOG=${SDCAM_RUST_LOG:-info} $SDCAM --profile $PROFILE --status-interval 2 <$CTL >"$SDCAM_LOG" 2>&1 &
  SDCAM_PID=$!
  wait_for 30 grep -q "output: loopback" "$SDCAM_LOG" || { alive || fail "sdcam exited"; fail "sdcam did not open the loopback within 30 s"; }
  wait_for 30 is_capture || { alive || fail "sdcam exited"; fail "the loopback did not turn into a capture device within 30 s"; }
}
stop_sdcam() {  # SIGTERM; checks a graceful exit 0 within 10 s
  kill -TERM "$SDCAM_PID"
  wait_for 10 sh -c "! kill -0 $SDCAM_PID" || fail "sdcam still running 10 s after SIGTERM"
  wait "$SDCAM_PID"; _rc=$?
  SDCAM_PID=
  exec 3>&-
  [ "$_rc" = 0 ] || fail "sdcam exited $_rc after SIGTERM"
  grep -q "frames written" "$SDCAM_LOG" || fail "no final 'frames written' line after SIGTERM"
}
send() { log "stdin: $*"; echo "$*" >&3; }
# a v4l2-ctl client streaming the loopback in the background (a viewer in a call); pid in CLIENT
watch_start() {
  v4l2-ctl -d $LB --stream-mmap --stream-count=100000 --stream-to=/dev/null >/tmp/watch.log 2>&1 &
  CLIENT=$!
}
watched() { tr -cd '<' </tmp/watch.log | wc -c; }  # frames the watching client got so far
# watch_frames WHAT: frames the client gets in the next 3 s into WATCHED, failing if it ended
# during WHAT; then stops it
watch_frames() {
  _w1=$(watched)
  sleep 3
  _w2=$(watched)
  kill -0 $CLIENT 2>/dev/null || { cat /tmp/watch.log; fail "the watching client ended during $1"; }
  kill $CLIENT; wait $CLIENT 2>/dev/null
  WATCHED=$((_w2 - _w1))
}

# grab NAME N: N frames with ffmpeg into $OUT/NAME-XX.png; stats of the last one in STAT_*.
grab() {
  _n=$2
  rm -f /tmp/stats.txt
  ffmpeg -hide_banner -nostdin -loglevel info -f v4l2 -i $LB -frames:v "$_n" \
    -vf "signalstats,metadata=mode=print:file=/tmp/stats.txt" -f image2 "$OUT/$1-%02d.png" \
    >/tmp/ffmpeg.log 2>&1 || { cat /tmp/ffmpeg.log; fail "ffmpeg grab $1 failed"; }
  grep -q "yuyv422, ${W}x${H}" /tmp/ffmpeg.log || { cat /tmp/ffmpeg.log; fail "ffmpeg did not see yuyv422 ${W}x${H}"; }
  [ -f "$OUT/$1-$(printf %02d "$_n").png" ] || fail "ffmpeg wrote fewer than $_n frames for $1"
  eval "$(awk -F'[.=]' '/lavfi.signalstats/{v[$3]=$4} END{for(k in v) printf "STAT_%s=%s\n", k, v[k]}' /tmp/stats.txt)"
  STAT_DESC="Y min/avg/max $STAT_YMIN/$STAT_YAVG/$STAT_YMAX U $STAT_UAVG V $STAT_VAVG sat $STAT_SATAVG"
  log "$1: $STAT_DESC"
}
# the last grab shows a picture: not black, not sdcam's flat placeholder (24,28,36), not flat
check_picture() {
  awk -v a="$STAT_YMAX" 'BEGIN{exit !(a > 60)}' || fail "$1: frame is black ($STAT_DESC)"
  awk -v a="$STAT_YMIN" -v b="$STAT_YMAX" 'BEGIN{exit !(b - a > 60)}' \
    || fail "$1: frame is flat, placeholder or blank ($STAT_DESC)"
}
# stream N frames with v4l2-ctl (mmap); checks all arrived at about $FPS
stream_check() {
  _n=$1; _s=$(now)
  v4l2-ctl -d $LB --stream-mmap --stream-count="$_n" --stream-to=/dev/null >/tmp/v4l2ctl.log 2>&1 \
    || { cat /tmp/v4l2ctl.log; fail "v4l2-ctl --stream-mmap failed"; }
  _got=$(tr -cd '<' </tmp/v4l2ctl.log | wc -c)
  _el=$(since "$_s")
  [ "$_got" -ge "$_n" ] || { cat /tmp/v4l2ctl.log; fail "v4l2-ctl got $_got of $_n frames"; }
  STREAM_FPS=$(awk -v n="$_n" -v t="$_el" 'BEGIN{printf "%.1f", n/t}')
  # lower bound generous: the client's own start-up is inside the measured time under TCG
  awk -v f="$STREAM_FPS" -v want=$FPS 'BEGIN{exit !(f > want*0.6 && f < want*1.25)}' \
    || fail "v4l2-ctl: $_n frames in $_el s = $STREAM_FPS fps, want about $FPS"
}
md5() { md5sum "$1" | cut -d' ' -f1; }

T0=$(now)
log "kernel $(uname -r), $(nproc) cpus; camera and virtual camera ${W}x${H} at $FPS fps"
# the profile with this run's size and rate; vm-half.toml: the same with a half-size output
sed -e "s/^width = 640$/width = $W/" -e "s/^height = 360$/height = $H/" -e "s/^fps = 15$/fps = $FPS/" \
  /mnt/host/vivid-tint.toml > $PROFILE
HW=$((W / 2 / 2 * 2)); HH=$((H / 2 / 2 * 2))
awk -v w=$HW -v h=$HH '/^\[/{sec=$0} sec=="[output]" && /^width =/{$0="width = " w} sec=="[output]" && /^height =/{$0="height = " h} {print}' \
  $PROFILE > /tmp/vm-half.toml

begin modules
load_vivid || fail "insmod vivid"
insmod $KO/v4l2loopback.ko devices=1 video_nr=10 card_label=sdcam exclusive_caps=1 max_buffers=2 || fail "insmod v4l2loopback"
wait_for 5 test -e $LB || fail "$LB did not appear"
v4l2-ctl --list-devices 2>&1
pass

begin sdcam-devices
$SDCAM devices >$OUT/devices.txt 2>&1 || { cat $OUT/devices.txt; fail "sdcam devices exited non-zero"; }
cat $OUT/devices.txt
grep -q vivid $OUT/devices.txt || fail "sdcam devices does not list vivid"
grep -q sdcam $OUT/devices.txt || fail "sdcam devices does not list the loopback labelled sdcam"
pass

begin start
start_sdcam
grep -q "source:.*video0" "$SDCAM_LOG" || fail "the source is not the vivid camera /dev/video0"
pass "loopback streaming $(since "$T_CHECK") s after start"

begin format
v4l2-ctl -d $LB --get-fmt-video >/tmp/fmt.txt 2>&1 || fail "v4l2-ctl --get-fmt-video"
grep -q "Width/Height *: $W/$H" /tmp/fmt.txt && grep -q "Pixel Format *: 'YUYV'" /tmp/fmt.txt \
  || { cat /tmp/fmt.txt; fail "capture format is not YUYV ${W}x${H}"; }
pass

begin grab-content
grab a 5; check_picture a
A_MD5=$(md5 $OUT/a-05.png); A_U=$STAT_UAVG; A_V=$STAT_VAVG
sleep 1
grab b 2; check_picture b
[ "$(md5 $OUT/b-02.png)" != "$A_MD5" ] || fail "two grabs 1 s apart are identical: the camera picture does not move"
pass "$STAT_DESC"

begin stream-rate
stream_check 45
pass "$STREAM_FPS fps"

begin live-prompt-and-reload
# A flat white camera picture makes the tint colour measurable: green for "a sunset over the
# sea", magenta for "a deep blue ocean" (sdcam's prompt_colour hues 140 and 304).
WHITE=$(v4l2-ctl -d $CAM -L 2>/dev/null | sed -n 's/^[[:space:]]*\([0-9]*\): 100% White$/\1/p')
[ -n "$WHITE" ] || fail "vivid has no '100% White' test pattern"
v4l2-ctl -d $CAM -c test_pattern=$WHITE || fail "cannot select vivid's white test pattern"
sleep 1
grab w1 2
uv_is() {  # uv_is low|high NAME: both chroma averages clearly below / above neutral 128
  if [ "$1" = low ]; then awk -v u="$STAT_UAVG" -v v="$STAT_VAVG" 'BEGIN{exit !(u < 120 && v < 120)}'
  else awk -v u="$STAT_UAVG" -v v="$STAT_VAVG" 'BEGIN{exit !(u > 136 && v > 136)}'; fi \
    || fail "$2: expected a ${3} tint, got U/V $STAT_UAVG/$STAT_VAVG"
}
uv_is low w1 green
W1="$STAT_UAVG/$STAT_VAVG"
v4l2-ctl -d $LB --stream-mmap --stream-count=75 --stream-to=/dev/null >/tmp/live.log 2>&1 &
CLIENT=$!
sleep 1.5
send "prompt a neon city at night"
sleep 1.5
sed -i 's/^prompt = .*/prompt = "a deep blue ocean"/' $PROFILE
kill -HUP "$SDCAM_PID"
wait $CLIENT || { cat /tmp/live.log; fail "the streaming client failed during prompt change / reload"; }
got=$(tr -cd '<' </tmp/live.log | wc -c)
[ "$got" -ge 75 ] || fail "the streaming client got $got of 75 frames"
grep -q 'prompt "a neon city at night": applied' "$SDCAM_LOG" || fail "sdcam did not apply the stdin prompt"
grep -q 'reload: applied' "$SDCAM_LOG" || fail "sdcam did not apply the SIGHUP reload"
grab w2 2
uv_is high w2 "magenta (reloaded profile)"
W2="$STAT_UAVG/$STAT_VAVG"
send "prompt a sunset over the sea"
sleep 1
grab w3 2
uv_is low w3 "green (stdin prompt)"
v4l2-ctl -d $CAM -c test_pattern=0
pass "client kept streaming; U/V $W1 -> $W2 -> $STAT_UAVG/$STAT_VAVG"

begin client-reconnect
v4l2-ctl -d $LB --stream-mmap --stream-count=1000 --stream-to=/dev/null >/dev/null 2>&1 &
CLIENT=$!
sleep 2
kill -9 $CLIENT; wait $CLIENT 2>/dev/null
alive || fail "sdcam died when a client was killed"
stream_check 30
grab d 2; check_picture d
pass

begin sigterm-restart
stop_sdcam
start_sdcam
grab e 2; check_picture e
stream_check 30
pass "$STREAM_FPS fps after restart"

begin second-writer
$SDCAM devices >/tmp/dev2.txt 2>&1
grep -q 'card label "sdcam": in use' /tmp/dev2.txt || { cat /tmp/dev2.txt; fail "sdcam devices does not report the loopback in use"; }
if $SDCAM --source pattern --output loopback:sdcam --no-stdin --frames 5 >/tmp/second.log 2>&1; then
  cat /tmp/second.log; fail "a second sdcam writing to the busy loopback succeeded"
fi
grep -q "in use by another writer" /tmp/second.log || { cat /tmp/second.log; fail "the second writer's error does not say the device is in use"; }
alive || fail "the running sdcam died when a second one tried the device"
stream_check 15
pass

begin live-profile-switch
# output size and source change live (`profile` command): the sink and the camera are reopened
send "profile /tmp/vm-half.toml"
wait_for 10 grep -q "profile /tmp/vm-half.toml: applied" "$SDCAM_LOG" \
  || fail "switching to a half-size output was not applied"
wait_for 10 is_capture || fail "the loopback is not streaming after the output was reopened"
W0=$W; H0=$H; W=$HW; H=$HH
grab s 2; check_picture s
send "profile $PROFILE"
wait_for 10 sh -c "[ \$(grep -c 'profile $PROFILE: applied' $SDCAM_LOG) -ge 1 ]" \
  || fail "switching back to the full-size profile was not applied"
W=$W0; H=$H0
wait_for 10 is_capture || fail "the loopback is not streaming after the second reopen"
grab t 2; check_picture t
pass "${HW}x${HH} and back to ${W}x${H} without restarting"

begin resize-with-client
# a client is watching while the profile asks for another output size: v4l2loopback cannot change
# the format under a reader, so sdcam must keep (or restore) the running output and the client
# must keep getting frames
watch_start
sleep 2
n0=$(watched)
send "profile /tmp/vm-half.toml"
sleep 4
kill -0 $CLIENT 2>/dev/null || { cat /tmp/watch.log; fail "the watching client stopped when the output size change was asked for"; }
n1=$(watched)
sleep 2
n2=$(watched)
kill $CLIENT; wait $CLIENT 2>/dev/null
alive || fail "sdcam died"
[ $((n2 - n1)) -ge $((FPS)) ] || fail "the watching client got $((n2 - n1)) frames in the 2 s after the size change (had $n0 before, $n1 at +4 s)"
log "client frames: $n0 before, $n1 at +4 s, $n2 at +6 s"
send "profile $PROFILE"
sleep 2
wait_for 10 is_capture || fail "the loopback is not streaming after switching back"
grab r 2; check_picture r
kept=$(grep 'output kept' "$SDCAM_LOG" | tail -1)
[ -n "$kept" ] || log "note: the size change under a reader was applied (no 'output kept' error)"
# The error must name the real cause (the format is held by the reader), not a phantom writer:
# sdcam's own old writer was still open during its first try (fixed in src/relay/mod.rs, Output::switch).
case "$kept" in *"in use by another writer"*) fail "misleading error for the refused size change: $kept" ;; esac
pass "${kept#*ERROR }"

begin restart-with-client
# SIGTERM and restart while a client keeps the virtual camera open (a video call across a restart)
watch_start
sleep 2
stop_sdcam
start_sdcam
watch_frames "the sdcam restart"
[ "$WATCHED" -ge $((FPS * 2)) ] || fail "the client got $WATCHED frames in 3 s after the restart"
pass "client got $WATCHED frames in 3 s after the restart"

begin camera-unplug
if rmmod vivid 2>/tmp/rmmod.txt; then
  log "rmmod vivid succeeded while sdcam had it open"
else
  log "rmmod vivid: $(cat /tmp/rmmod.txt); simulating a USB disconnect with vivid's Disconnect control"
  v4l2-ctl -d /dev/video0 -c disconnect=1 || fail "cannot press vivid's disconnect control"
  wait_for 10 rmmod vivid || fail "vivid still in use 10 s after the disconnect: sdcam did not close the camera"
fi
T_GONE=$(now)
sleep 1
alive || fail "sdcam exited when the camera went away"
stream_check 30
grab f 3; check_picture f
F_MD5=$(md5 $OUT/f-01.png)
[ "$(md5 $OUT/f-03.png)" = "$F_MD5" ] || log "note: frames differ while the camera is away"
grep -q "source failed, reconnecting" "$SDCAM_LOG" || fail "sdcam did not report the lost camera"
pass "loopback kept streaming at $STREAM_FPS fps without the camera"

begin camera-replug
n_before=$(grep -c "source reconnected" "$SDCAM_LOG")
T_BACK=$(now)
load_vivid || fail "reloading vivid"
wait_for 10 sh -c "[ \$(grep -c 'source reconnected' $SDCAM_LOG) -gt $n_before ]" \
  || fail "sdcam did not reconnect to the camera within 10 s"
RECONNECT=$(since "$T_BACK")
sleep 1
grab g 2; check_picture g
G_MD5=$(md5 $OUT/g-02.png)
sleep 1
grab h 2
[ "$(md5 $OUT/h-02.png)" != "$G_MD5" ] || fail "after the reconnect the picture does not move"
pass "reconnected ${RECONNECT} s after vivid came back"

begin final-stop
stop_sdcam
pass

# ---- second case: the real diffusion pipeline (tiny random-weight fixture model) ----
begin diffusion-start
sed -e "s/^width = 640$/width = $W/" -e "s/^height = 360$/height = $H/" -e "s/^fps = 15$/fps = $FPS/" \
  /mnt/host/vivid-diffusion.toml > $PROFILE
start_sdcam
# the virtual camera streams (placeholder) while the model loads; then the pipeline takes over
wait_for 60 grep -q "transform: diffusion" "$SDCAM_LOG" || { alive || fail "sdcam exited"; fail "the diffusion transform was not installed within 60 s"; }
grep -q "RANDOM WEIGHTS" "$SDCAM_LOG" || fail "the log does not label the fixture model as random weights"
pass "pipeline installed $(since "$T_CHECK") s after start"

begin diffusion-content
# wait for transformed frames, then check the client sees them: not the placeholder, not black,
# moving, and not the camera picture itself
wait_for 60 sh -c "grep -q 'model [1-9][0-9.]* fps\|model 0\.[1-9][0-9]* fps' $SDCAM_LOG" || fail "no model frames in the status within 60 s"
grab d 3; check_picture d
D_MD5=$(md5 $OUT/d-03.png)
sleep 2
grab e 2; check_picture e
[ "$(md5 $OUT/e-02.png)" != "$D_MD5" ] || fail "the diffusion output does not change over time"
pass "$STAT_DESC; $(grep 'status:' "$SDCAM_LOG" | tail -1 | sed 's/.*status: //')"

begin diffusion-live-prompt
watch_start
sleep 1
send "prompt a forest in the morning fog"
wait_for 15 grep -q 'prompt "a forest in the morning fog": applied' "$SDCAM_LOG" || fail "the prompt change was not applied"
send "set stream.t_index_list [20, 40]"
wait_for 15 grep -q "set stream.t_index_list: applied" "$SDCAM_LOG" || fail "the step change was not applied"
watch_frames "the live changes"
[ "$WATCHED" -ge $((FPS * 2)) ] || fail "the client got $WATCHED frames in 3 s after the live changes"
grab p 2; check_picture p
pass "client got $WATCHED frames in 3 s during live prompt/step changes"

begin diffusion-stop
stop_sdcam
grep -q "transform failed" "$SDCAM_LOG" && fail "the pipeline reported errors: $(grep 'transform failed' "$SDCAM_LOG" | head -1)"
pass

# ---- third case: v4l2loopback reloaded with exclusive_caps=0 (the module's default) ----
# The device then always offers capture and output, so "in use" must come from sdcam's own lock
# (another sdcam) or from frames arriving (another program). The first writer shows a flat white
# camera tinted green; the refused second sdcam would write white tinted magenta, so any frame a
# client gets from the second writer shows up as a U/V average above neutral.
# all_first NAME N: grab N frames while a second writer tries; every one must be the first
# writer's (green: U and V averages below 120)
all_first() {
  grab "$1" "$2"
  # per-frame stats from the PNGs (the live grab's stats file can miss frames at the end)
  ffmpeg -hide_banner -nostdin -loglevel info -i "$OUT/$1-%02d.png" -vf "signalstats,metadata=mode=print" \
    -f null - >/tmp/allstats.txt 2>&1 || { cat /tmp/allstats.txt; fail "$1: ffmpeg could not read the grabbed frames"; }
  _bad=$(awk -F= '/signalstats.UAVG=/{u=$2} /signalstats.VAVG=/{n++; if (u >= 120 || $2 >= 120) b++} END{printf "%d/%d", b, n}' /tmp/allstats.txt)
  log "$1: frames not from the first writer: $_bad"
  [ "${_bad%/*}" = 0 ] && [ "${_bad#*/}" = "$2" ] || fail "$1: $_bad grabbed frames came from the second writer (or frames missing)"
}
# second_writer NAME: a second sdcam (white y4m, magenta tint, 3 s of frames if it got the device)
# must fail with "in use by another writer" while a client grabs only the first writer's frames
second_writer() {
  $SDCAM --profile $PROFILE --source /tmp/white.y4m --prompt "a deep blue ocean" --no-stdin \
    --frames $((FPS * 3)) >/tmp/second.log 2>&1 &
  _second=$!
  all_first "$1" $((FPS * 2))
  wait $_second && { cat /tmp/second.log; fail "a second sdcam writing to the busy loopback succeeded"; }
  grep -q "in use by another writer" /tmp/second.log || { cat /tmp/second.log; fail "the second writer's error does not say the device is in use"; }
  SECOND_ERR=$(grep -o "in use by another writer ([^)]*)" /tmp/second.log | head -1)
  log "second writer: $SECOND_ERR"
}
devices_in_use() {
  $SDCAM devices >/tmp/dev3.txt 2>&1
  grep -q 'card label "sdcam": in use' /tmp/dev3.txt || { cat /tmp/dev3.txt; fail "sdcam devices does not report the loopback in use"; }
  DEV_STATE=$(sed -n 's/.*card label "sdcam": //p' /tmp/dev3.txt)
}

begin ec0-start
T_EC0=$(now)
rmmod v4l2loopback || fail "rmmod v4l2loopback"
insmod $KO/v4l2loopback.ko devices=1 video_nr=10 card_label=sdcam exclusive_caps=0 max_buffers=2 \
  || fail "insmod v4l2loopback exclusive_caps=0"
wait_for 5 test -e $LB || fail "$LB did not appear"
v4l2-ctl -d $LB -D 2>/dev/null | grep -A3 "Device Caps" | grep -q "Video Output" || fail "exclusive_caps=0: no output capability"
sed -e "s/^width = 640$/width = $W/" -e "s/^height = 360$/height = $H/" -e "s/^fps = 15$/fps = $FPS/" \
  /mnt/host/vivid-tint.toml > $PROFILE
ffmpeg -hide_banner -nostdin -loglevel error -f lavfi -i "color=c=white:s=${W}x${H}" -frames:v 1 \
  -pix_fmt yuv420p -f yuv4mpegpipe /tmp/white.y4m || fail "cannot make the white y4m"
v4l2-ctl -d $CAM -c test_pattern=$WHITE || fail "cannot select vivid's white test pattern"
start_sdcam
grab k 2; uv_is low k green
pass "sdcam writes (green) with both capabilities advertised"

begin ec0-second-writer
devices_in_use
second_writer m
alive || fail "the running sdcam died when a second one tried the device"
stream_check 15
pass "devices: $DEV_STATE; second sdcam: $SECOND_ERR; all grabbed frames from the first"

begin ec0-foreign-writer
# another program (ffmpeg, write() I/O, no sdcam lock) is the first writer: only the frames tell
stop_sdcam
ffmpeg -hide_banner -nostdin -loglevel error -re -f lavfi -i "color=c=green:s=${W}x${H}:r=$FPS" \
  -pix_fmt yuyv422 -f v4l2 $LB >/tmp/ffwriter.log 2>&1 &
FFW=$!
sleep 1
kill -0 $FFW 2>/dev/null || { cat /tmp/ffwriter.log; fail "the ffmpeg writer did not start"; }
grab n 2; uv_is low n "green (ffmpeg)"
devices_in_use
second_writer o
kill -0 $FFW 2>/dev/null || fail "the ffmpeg writer died"
pass "devices: $DEV_STATE; second sdcam: $SECOND_ERR; all grabbed frames from ffmpeg"

begin ec0-writer-gone
# a viewer keeps the device open while the other writer leaves: the driver keeps its old frames
# (stale state), which must not be taken for a writer: sdcam starts and the viewer gets its frames
watch_start
sleep 1
kill $FFW; wait $FFW 2>/dev/null
T_GONE=$(now)
start_sdcam
STARTED=$(since "$T_GONE")
grep -q "in use" "$SDCAM_LOG" && fail "sdcam took the old frames for another writer"
watch_frames "sdcam's start after the other writer left"
[ "$WATCHED" -ge $((FPS * 2)) ] || fail "the viewer got $WATCHED frames in 3 s from the new sdcam"
grab q 2; uv_is low q green
stop_sdcam
v4l2-ctl -d $CAM -c test_pattern=0
pass "sdcam writing ${STARTED} s after the other writer left; viewer got $WATCHED frames in 3 s; exclusive_caps=0 case took $(since "$T_EC0") s"

# On-demand viewer detection on the real module (src/v4l2/clients.rs, src/relay/demand.rs):
# `sdcam dev watch-clients` writes a pattern and prints "readers=N openers=M source=S mappers=K"
# per change and "demand=live|idle" per state-machine transition, while readers and a probe
# come and go.
WC=$OUT/watch-clients.txt
wc_mark() { wc -l < $WC; }
wc_seen() { tail -n +$(($1 + 1)) $WC | grep -q -E "$2"; }  # wc_seen MARK REGEX: a line after MARK
wc_read_start() {  # an ffmpeg reader (mmap) in the background; pid in FFR
  ffmpeg -hide_banner -nostdin -loglevel error -f v4l2 -i $LB -f null - >/tmp/ffr.log 2>&1 &
  FFR=$!
}

begin clients-start
rmmod v4l2loopback || fail "rmmod v4l2loopback"
insmod $KO/v4l2loopback.ko devices=1 video_nr=10 card_label=sdcam exclusive_caps=1 max_buffers=2 \
  || fail "insmod v4l2loopback"
wait_for 5 test -e $LB || fail "$LB did not appear"
LB_VERSION=$(cat /sys/module/v4l2loopback/version 2>/dev/null || echo "0.12.x (no version file)")
SDCAM_LOG=$OUT/watch-clients.log
RUST_LOG=${SDCAM_RUST_LOG:-info} $SDCAM dev watch-clients --device $LB --size ${W}x${H} --fps $FPS \
  >$WC 2>$SDCAM_LOG &
SDCAM_PID=$!
wait_for 30 grep -q "^readers=" $WC || { alive || fail "watch-clients exited"; fail "no counts within 30 s"; }
wait_for 10 is_capture || fail "the loopback did not turn into a capture device"
grep -q "^readers=0 openers=0 " $WC || { cat $WC; fail "counts before any reader: $(grep '^readers=' $WC | head -1)"; }
WC_HEAD=$(grep "^module=" $WC)
WC_SOURCE=$(sed -n 's/^readers=.* source=\([a-z]*\).*/\1/p' $WC | head -1)
log "v4l2loopback $LB_VERSION: $WC_HEAD; detection: $WC_SOURCE"
pass "v4l2loopback $LB_VERSION, detection path: $WC_SOURCE ($WC_HEAD)"

begin clients-probe
M=$(wc_mark)
for i in 1 2 3; do v4l2-ctl -d $LB --all >/dev/null 2>&1; v4l2-ctl -d $LB --list-formats-ext >/dev/null 2>&1; done
sleep 3
alive || fail "watch-clients exited"
wc_seen $M "^demand=live" && { cat $WC; fail "a probe-only client woke the pipeline"; }
wc_seen $M "^readers=[1-9]" && { cat $WC; fail "a probe was counted as a streaming reader"; }
pass "6 probes: no wake ($(tail -n +$((M + 1)) $WC | grep -c '^readers=') count changes seen, all readers=0)"

begin clients-ffmpeg
M=$(wc_mark); T_R=$(now)
wc_read_start
wait_for 20 wc_seen $M "^readers=1 openers=1 " || { cat $WC /tmp/ffr.log; fail "the ffmpeg reader was not counted"; }
wait_for 5 wc_seen $M "^demand=live" || { cat $WC; fail "the ffmpeg reader did not wake the pipeline"; }
WOKE=$(since "$T_R")
kill -0 $FFR 2>/dev/null || { cat /tmp/ffr.log; fail "the ffmpeg reader ended"; }
M=$(wc_mark); T_Q=$(now)
kill -TERM $FFR; wait $FFR 2>/dev/null
wait_for 10 wc_seen $M "^readers=0 openers=0 " || { cat $WC; fail "the reader's exit was not seen"; }
wait_for 10 wc_seen $M "^demand=idle" || { cat $WC; fail "no return to idle after the reader left"; }
pass "ffmpeg counted and woke within $WOKE s of its start (its own start-up included); idle $(since "$T_Q") s after it quit"

begin clients-two-readers
M=$(wc_mark)
watch_start
wait_for 20 wc_seen $M "^readers=1 openers=1 " || { cat $WC; fail "the v4l2-ctl reader was not counted"; }
wc_read_start
if [ "$WC_SOURCE" = event ]; then
  # 0.13.x lets one reader stream (a second STREAMON is EBUSY) and later versions give the capture
  # stream to one owner: the second reader is an opener, never a second streaming reader
  sleep 4
  wc_seen $M "^readers=2" && { cat $WC; fail "the driver counted two streaming readers"; }
  TWO="a second reader (ffmpeg) is refused by the module; readers stays 1"
else
  wait_for 20 wc_seen $M "^readers=2 openers=2 " || { cat $WC; fail "two readers were not counted"; }
  TWO="v4l2-ctl --stream-mmap and ffmpeg at once: readers=2"
fi
wc_seen $M "^demand=live" || fail "two readers: not live"
pass "$TWO"

begin clients-reader-killed
M=$(wc_mark)
if [ "$WC_SOURCE" = event ]; then
  kill -9 $FFR 2>/dev/null; wait $FFR 2>/dev/null
  M=$(wc_mark); T_K=$(now)
  kill -9 $CLIENT; wait $CLIENT 2>/dev/null
else
  kill -9 $CLIENT; wait $CLIENT 2>/dev/null
  wait_for 10 wc_seen $M "^readers=1 openers=1 " || { cat $WC; fail "a killed reader was still counted"; }
  wc_seen $M "^demand=idle" && fail "went idle with a reader left"
  M=$(wc_mark); T_K=$(now)
  kill -9 $FFR; wait $FFR 2>/dev/null
fi
wait_for 10 wc_seen $M "^readers=0 openers=0 " || { cat $WC; fail "the last killed reader was still counted"; }
wait_for 10 wc_seen $M "^demand=idle" || { cat $WC; fail "no return to idle after the readers were killed"; }
IDLE_AFTER=$(since "$T_K")
kill -TERM $SDCAM_PID; wait $SDCAM_PID 2>/dev/null; SDCAM_PID=
pass "SIGKILLed readers: counts down to 0, idle $IDLE_AFTER s after the last (linger 3 s)"

# ---- the on-demand virtual camera end to end (output.on_demand = true: sdcam's default) ----
# vivid → tint → loopback with readers coming and going: idle, sdcam does not hold the camera
# and barely uses the CPU; a reader wakes it and gets moving content; a probe does not; a killed
# reader returns it to idle; ten wakes give the latency figures (sdcam logs both parts).
sed -e "s/^width = 640/width = $W/" -e "s/^height = 360/height = $H/" -e "s/^fps = 15/fps = $FPS/" \
  /mnt/host/vivid-tint.toml | sed 's/^on_demand = false/on_demand = true/' > $PROFILE
cam_open() { ls -l /proc/$SDCAM_PID/fd 2>/dev/null | grep -q "$CAM\$"; }  # sdcam holds the camera
ticks() { awk '{print $14 + $15}' /proc/$SDCAM_PID/stat; }
woke_count() { grep -c "on-demand: first live frame" "$SDCAM_LOG"; }
idle_count() { grep -c "on-demand: no readers, idle" "$SDCAM_LOG"; }

begin od-idle
start_sdcam
wait_for 15 grep -q "on-demand: no readers, idle" "$SDCAM_LOG" || fail "sdcam did not go idle without readers"
wait_for 5 sh -c "! ls -l /proc/$SDCAM_PID/fd | grep -q '$CAM\$'" || fail "idle, sdcam still holds $CAM"
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
C0=$(ticks); T_I=$(now); sleep 10; C1=$(ticks); EL=$(since "$T_I")
IDLE_CPU=$(awk -v c=$((C1 - C0)) -v hz="$HZ" -v t="$EL" 'BEGIN{printf "%.2f", 100 * c / hz / t}')
cam_open && fail "idle, sdcam opened $CAM"
# TCG emulates every instruction, so the guest's CPU time overstates the host's: a loose bound
awk -v p="$IDLE_CPU" 'BEGIN{exit !(p < 5)}' || fail "idle CPU $IDLE_CPU% of one core"
send stats
wait_for 5 grep -q "on demand     idle (no viewers)" "$SDCAM_LOG" || fail "stats does not say idle (no viewers)"
pass "camera released; sdcam used $IDLE_CPU% of one core over $EL s idle (guest time under TCG)"

begin od-probe
W0=$(woke_count)
for i in 1 2 3; do v4l2-ctl -d $LB --all >/dev/null 2>&1; v4l2-ctl -d $LB --list-formats-ext >/dev/null 2>&1; done
sleep 3
[ "$(woke_count)" = "$W0" ] || fail "a probe-only client woke the pipeline"
grep -q "on-demand: a reader started" "$SDCAM_LOG" && fail "a probe started a wake"
cam_open && fail "a probe made sdcam open the camera"
pass "6 probes: no wake, camera not opened"

begin od-wake
# a reader gets moving content (not the hold frame): two grabbed frames 1 s apart differ
grab od-a 25; check_picture od-a
cam_open || fail "live, sdcam does not hold $CAM"
A=$(md5sum "$OUT/od-a-25.png" | cut -d' ' -f1); B=$(md5sum "$OUT/od-a-20.png" | cut -d' ' -f1)
[ "$A" != "$B" ] || fail "the reader got a still picture, not moving content"
wait_for 15 sh -c "[ \$(grep -c 'on-demand: no readers, idle' $SDCAM_LOG) -ge 2 ]" || fail "not idle again after the reader left"
wait_for 5 sh -c "! ls -l /proc/$SDCAM_PID/fd | grep -q '$CAM\$'" || fail "idle again, sdcam still holds $CAM"
pass "ffmpeg got moving content; idle and camera released after it left"

begin od-two-readers-and-kill
watch_start
wait_for 10 cam_open || fail "the v4l2-ctl reader did not wake sdcam"
ffmpeg -hide_banner -nostdin -loglevel error -f v4l2 -i $LB -f null - >/tmp/ffr2.log 2>&1 &
FFR2=$!
sleep 2
alive || fail "sdcam died with two readers"
kill -9 $CLIENT; wait $CLIENT 2>/dev/null
sleep 1
N_IDLE=$(idle_count)
kill -9 $FFR2 2>/dev/null; wait $FFR2 2>/dev/null
wait_for 15 sh -c "[ \$(grep -c 'on-demand: no readers, idle' $SDCAM_LOG) -gt $N_IDLE ]" \
  || fail "no return to idle after the readers were killed"
# the capture thread releases the camera just after the state change is logged
wait_for 5 sh -c "! ls -l /proc/$SDCAM_PID/fd | grep -q '$CAM\$'" \
  || fail "idle after killed readers, sdcam still holds $CAM"
pass "two readers, SIGKILLed: idle again, camera released"

begin od-read-reader
# a third kind of client: read() I/O (dd), which never maps the buffers; counted as a reader once
# it has held the device for 2 s (src/relay/demand.rs, OPENER_AS_READER_AFTER), so a probe is not
W0=$(woke_count); N_IDLE=$(idle_count)
dd if=$LB of=/tmp/dd.out bs=$((W * H * 2)) count=100000 2>/tmp/dd.log &
DD=$!
wait_for 15 sh -c "[ \$(grep -c 'on-demand: first live frame' $SDCAM_LOG) -gt $W0 ]" \
  || { cat /tmp/dd.log; fail "a read() reader did not wake sdcam"; }
sleep 2
kill -0 $DD 2>/dev/null || { cat /tmp/dd.log; fail "the read() reader ended"; }
DD_BYTES=$(wc -c < /tmp/dd.out)
[ "$DD_BYTES" -ge $((W * H * 2 * 5)) ] || fail "the read() reader got only $DD_BYTES bytes"
kill $DD; wait $DD 2>/dev/null
wait_for 20 sh -c "[ \$(grep -c 'on-demand: no readers, idle' $SDCAM_LOG) -gt $N_IDLE ]" \
  || fail "not idle after the read() reader left"
rm -f /tmp/dd.out
pass "dd (read I/O) woke sdcam and read $((DD_BYTES / (W * H * 2))) frames; idle after it left"

begin od-latency
W0=$(woke_count)
i=0
while [ $i -lt 10 ]; do
  i=$((i + 1))
  N_IDLE=$(idle_count)
  v4l2-ctl -d $LB --stream-mmap --stream-count=1000 --stream-to=/dev/null >/dev/null 2>&1 &
  R=$!
  wait_for 20 sh -c "[ \$(grep -c 'on-demand: first live frame' $SDCAM_LOG) -ge $((W0 + i)) ]" \
    || fail "wake $i: no live frame within 20 s"
  kill $R; wait $R 2>/dev/null
  wait_for 20 sh -c "[ \$(grep -c 'on-demand: no readers, idle' $SDCAM_LOG) -gt $N_IDLE ]" \
    || fail "wake $i: not idle again"
done
grep "on-demand: first live frame" "$SDCAM_LOG" | tail -n 10 \
  | sed 's/.*first live frame \([0-9]*\) ms after the wake (source open and first frame \([0-9]*\) ms, pipeline \([0-9]*\) ms).*/\1 \2 \3/' \
  > $OUT/wake-latency.txt
col() { cut -d' ' -f"$1" $OUT/wake-latency.txt | sort -n | awk '{a[NR]=$1} END{printf "%d/%d/%d", a[1], a[int((NR+1)/2)], a[NR]}'; }
[ "$(wc -l < $OUT/wake-latency.txt)" -ge 10 ] || { cat $OUT/wake-latency.txt; fail "fewer than 10 wake latencies logged"; }
LAT="total $(col 1) ms, source open + first frame $(col 2) ms, pipeline $(col 3) ms (min/median/max)"
# the issue's bound: the first live frame within 500 ms of the wake, plus the camera's own open time
awk '$1 - $2 > 500 {bad = bad " " $1 "-" $2} END {if (bad) {print "over 500 ms after the camera opened:" bad; exit 1}}' \
  $OUT/wake-latency.txt || fail "a wake took longer than 500 ms plus the camera's open time ($LAT)"
stop_sdcam
pass "10 wakes: $LAT"

dmesg > $OUT/dmesg.txt
grep -q -E "WARNING|BUG|Oops" $OUT/dmesg.txt && log "note: the kernel log has warnings (dmesg.txt)"
log "all checks passed in $(since "$T0") s"
exit 0
