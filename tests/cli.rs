//! End-to-end tests of the `sdcam` binary: runs it as a user would (flags, profiles, stdin
//! commands, signals) and checks the Y4M/PNG files it writes and what it logs on stderr.
//!
//! Every child process is bounded: [`Proc`] waits with a deadline, kills the child when it is
//! exceeded (or when the test panics) and fails with the captured stderr. Live-control tests
//! synchronise on the `stats` command's frame count instead of sleeping, and use a still-image
//! source (file → file runs in every-frame mode, paced at the image's fps), so which frame sees
//! which setting is known exactly.
//!
//! One file on purpose (1,700+ lines): every file under `tests/` is a separate test binary that
//! links the whole crate, so splitting this one would add a link of the candle-sized crate to CI
//! per part; the shared child-process harness ([`Proc`]) lives here once.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest any single `sdcam` run may take before the test kills it and fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// Longest a wait for a log line or a stats answer may take.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------------------------

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `sdcam` with plain (uncoloured) info logs, run from the crate root.
fn sdcam() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdcam"));
    c.current_dir(manifest_dir())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Removes ANSI escape sequences (in case the logger colours its output anyway).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads a pipe to the end on a thread, into a shared buffer.
fn collect(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, t)
}

/// A running `sdcam`, killed when dropped.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stdout: Option<Arc<Mutex<Vec<u8>>>>,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

/// How a finished run ended.
struct Finished {
    status: ExitStatus,
    stderr: String,
    stdout: Vec<u8>,
    elapsed: Duration,
}

impl Proc {
    /// Spawns `cmd` (stderr must be piped). stdin is piped when `stdin` is true, else null.
    fn spawn(cmd: &mut Command, stdin: bool) -> Proc {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        let what = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (stderr, t) = collect(child.stderr.take().expect("stderr is piped"));
        let mut readers = vec![t];
        let stdout = child.stdout.take().map(|o| {
            let (buf, t) = collect(o);
            readers.push(t);
            buf
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            stderr,
            stdout,
            readers,
            what,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// stderr so far, without colour codes.
    fn stderr(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.stderr.lock().unwrap()))
    }

    /// Kills the child and fails the test with its stderr.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "{why}\ncommand: {}\n--- stderr ---\n{}",
            self.what,
            self.stderr()
        );
    }

    /// Writes one command line to stdin.
    fn send(&mut self, line: &str) {
        let r = match self.stdin.as_mut() {
            Some(s) => writeln!(s, "{line}").and_then(|_| s.flush()),
            None => Ok(()),
        };
        if let Err(e) = r {
            self.fail(&format!("cannot send {line:?} to sdcam: {e}"));
        }
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        let r = unsafe { libc::kill(self.pid(), sig) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            self.fail(&format!("kill({sig}) failed: {e}"));
        }
    }

    /// Waits until stderr contains `needle` at least `n` times; returns stderr.
    fn wait_for_n(&mut self, needle: &str, n: usize) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.stderr();
            if s.matches(needle).count() >= n {
                return s;
            }
            if t0.elapsed() > WAIT {
                self.fail(&format!(
                    "timed out waiting for {needle:?} (x{n}) on stderr"
                ));
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Give the reader a moment to pick up the last lines, then look once more.
                std::thread::sleep(Duration::from_millis(100));
                if self.stderr().matches(needle).count() >= n {
                    return self.stderr();
                }
                self.fail(&format!("sdcam exited ({st}) before logging {needle:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_n(needle, 1)
    }

    /// Asks for `stats` on stdin and returns the `written` count it prints.
    fn written(&mut self) -> u64 {
        let before = written_counts(&self.stderr()).len();
        self.send("stats");
        let t0 = Instant::now();
        loop {
            let counts = written_counts(&self.stderr());
            if counts.len() > before {
                return *counts.last().unwrap();
            }
            if t0.elapsed() > WAIT {
                self.fail("no answer to `stats`");
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(&n) = written_counts(&self.stderr()).get(before) {
                    return n;
                }
                self.fail(&format!("sdcam exited ({st}) before answering `stats`"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `stats` until at least `n` frames are written; returns the count seen.
    fn wait_written(&mut self, n: u64) -> u64 {
        let t0 = Instant::now();
        loop {
            let w = self.written();
            if w >= n {
                return w;
            }
            if t0.elapsed() > WAIT {
                self.fail(&format!("fewer than {n} frames written after {WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Closes stdin and waits for the exit, at most `deadline` from now (then kills and fails).
    fn finish(mut self, deadline: Duration) -> Finished {
        drop(self.stdin.take());
        let t0 = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if t0.elapsed() > deadline => {
                    self.fail(&format!("sdcam still running after {deadline:?}; killed"))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => self.fail(&format!("waiting for sdcam: {e}")),
            }
        };
        let elapsed = t0.elapsed();
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
        Finished {
            status,
            stderr: self.stderr(),
            stdout: self
                .stdout
                .as_ref()
                .map(|b| b.lock().unwrap().clone())
                .unwrap_or_default(),
            elapsed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every complete `written       N (…)` line of `stats` output, in order.
fn written_counts(stderr: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut lines = stderr.split('\n').peekable();
    while let Some(line) = lines.next() {
        if lines.peek().is_none() {
            break; // an incomplete last line
        }
        if let Some(rest) = line.strip_prefix("written ") {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                out.push(n);
            }
        }
    }
    out
}

/// The N of the final `done: N frames written` log line.
fn done_count(stderr: &str) -> u64 {
    let i = stderr
        .find("done: ")
        .unwrap_or_else(|| panic!("no `done:` line in stderr:\n{stderr}"));
    stderr[i + 6..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad `done:` line in stderr:\n{stderr}"))
}

/// Runs `cmd` to the end (stdin null, stdout captured), bounded by [`DEADLINE`].
fn run_to_end(cmd: &mut Command) -> Finished {
    cmd.stdout(Stdio::piped());
    Proc::spawn(cmd, false).finish(DEADLINE)
}

/// Like [`run_to_end`] but fails unless the exit status is 0.
fn run_ok(cmd: &mut Command) -> Finished {
    let f = run_to_end(cmd);
    assert!(
        f.status.success(),
        "sdcam failed ({}):\n{}",
        f.status,
        f.stderr
    );
    f
}

// ---------------------------------------------------------------------------------------------
// Y4M and picture helpers
// ---------------------------------------------------------------------------------------------

/// A parsed 4:2:0 Y4M stream.
#[derive(Debug)]
struct Y4m {
    width: usize,
    height: usize,
    rate: (u32, u32),
    frames: Vec<Vec<u8>>,
}

impl Y4m {
    fn frame_len(w: usize, h: usize) -> usize {
        w * h + 2 * w.div_ceil(2) * h.div_ceil(2)
    }

    /// Parses a whole stream strictly: a `YUV4MPEG2` header with W, H and a 4:2:0 `C` tag (or
    /// none), then only complete `FRAME` records; trailing or truncated data is an error.
    fn parse(bytes: &[u8]) -> Result<Y4m, String> {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|e| e.to_string())?;
        let mut tags = header.split(' ');
        if tags.next() != Some("YUV4MPEG2") {
            return Err(format!("bad signature in header {header:?}"));
        }
        let (mut w, mut h, mut rate) = (None, None, (0, 0));
        for t in tags {
            let (tag, val) = t.split_at(1);
            match tag {
                "W" => w = val.parse().ok(),
                "H" => h = val.parse().ok(),
                "F" => {
                    let (n, d) = val.split_once(':').ok_or("bad F tag")?;
                    rate = (
                        n.parse().map_err(|_| "bad F")?,
                        d.parse().map_err(|_| "bad F")?,
                    );
                }
                "C" if !val.starts_with("420") => {
                    return Err(format!("chroma C{val} is not 4:2:0"))
                }
                _ => {}
            }
        }
        let (width, height): (usize, usize) = match (w, h) {
            (Some(w), Some(h)) => (w, h),
            _ => return Err(format!("no W/H in header {header:?}")),
        };
        let len = Self::frame_len(width, height);
        let mut frames = Vec::new();
        let mut pos = nl + 1;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            let nl = rest
                .iter()
                .take(256)
                .position(|&b| b == b'\n')
                .ok_or_else(|| format!("frame {}: no FRAME line at byte {pos}", frames.len()))?;
            if !rest[..nl].starts_with(b"FRAME") {
                return Err(format!(
                    "frame {}: expected FRAME at byte {pos}, found {:?}",
                    frames.len(),
                    String::from_utf8_lossy(&rest[..nl.min(16)])
                ));
            }
            let data = &rest[nl + 1..];
            if data.len() < len {
                return Err(format!(
                    "frame {} truncated: {} of {len} bytes",
                    frames.len(),
                    data.len()
                ));
            }
            frames.push(data[..len].to_vec());
            pos += nl + 1 + len;
        }
        Ok(Y4m {
            width,
            height,
            rate,
            frames,
        })
    }

    fn read(path: &Path) -> Y4m {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Y4m::parse(&bytes).unwrap_or_else(|e| panic!("{}: invalid Y4M: {e}", path.display()))
    }

    /// The Y, U and V planes of frame `i`.
    fn planes(&self, i: usize) -> [&[u8]; 3] {
        let f = &self.frames[i];
        let ys = self.width * self.height;
        let cs = self.width.div_ceil(2) * self.height.div_ceil(2);
        [&f[..ys], &f[ys..ys + cs], &f[ys + cs..ys + 2 * cs]]
    }

    /// Mean Y, U, V of frame `i`.
    fn mean_yuv(&self, i: usize) -> [f64; 3] {
        self.planes(i)
            .map(|p| p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64)
    }

    /// (min, max) of every plane of frame `i`.
    fn plane_ranges(&self, i: usize) -> [(u8, u8); 3] {
        self.planes(i)
            .map(|p| (*p.iter().min().unwrap(), *p.iter().max().unwrap()))
    }
}

/// Writes a 4:2:0 limited-range Y4M stream.
fn write_y4m(path: &Path, w: usize, h: usize, frames: &[Vec<u8>]) {
    let mut bytes =
        format!("YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg XYSCSS=420JPEG\n").into_bytes();
    for f in frames {
        assert_eq!(f.len(), Y4m::frame_len(w, h));
        bytes.extend_from_slice(b"FRAME\n");
        bytes.extend_from_slice(f);
    }
    std::fs::write(path, bytes).unwrap();
}

/// BT.601 limited-range Y, U, V of an RGB colour (floating point, independent of sdcam's code).
fn bt601(rgb: [u8; 3]) -> [f64; 3] {
    let [r, g, b] = rgb.map(|v| v as f64);
    [
        16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0,
        128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0,
        128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0,
    ]
}

/// Largest per-plane distance between two mean YUV colours.
fn yuv_dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|i| (a[i] - b[i]).abs()).fold(0.0, f64::max)
}

/// What the `tint` transform makes of a grey pixel, with its documented formula: the prompt's
/// colour (`prompt_colour`) mixed in with strength `guidance_scale / 3` (in 1/256 steps).
fn tinted(grey: u8, prompt: &str, guidance_scale: f64) -> [u8; 3] {
    let c = sdcam::transform::prompt_colour(prompt);
    let k = ((guidance_scale / 3.0).clamp(0.0, 1.0) * 256.0) as u32;
    let g = grey as u32;
    c.map(|c| ((g * (256 - k) + c as u32 * k) >> 8) as u8)
}

/// Writes a solid RGB PNG.
fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().unwrap();
    let data: Vec<u8> = rgb
        .iter()
        .copied()
        .cycle()
        .take((w * h * 3) as usize)
        .collect();
    wr.write_image_data(&data).unwrap();
    wr.finish().unwrap();
}

/// Reads a PNG as (width, height, RGB8 pixels).
fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(
        info.color_type,
        png::ColorType::Rgb,
        "snapshot should be RGB"
    );
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn s(p: &Path) -> String {
    p.to_str().expect("temporary paths are UTF-8").to_string()
}

/// Grey level of the still image the live-control tests stream.
const GREY: u8 = 128;

/// Classifies each frame's mean colour as the closest of `colours` (index), failing if a frame
/// is further than `tol` from all of them.
fn classify(y: &Y4m, colours: &[(&str, [f64; 3])], tol: f64) -> Vec<usize> {
    (0..y.frames.len())
        .map(|i| {
            let m = y.mean_yuv(i);
            let (best, d) = colours
                .iter()
                .enumerate()
                .map(|(k, (_, c))| (k, yuv_dist(m, *c)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert!(
                d <= tol,
                "frame {i}: mean YUV {m:?} matches none of {colours:?} (closest {} at {d:.2})",
                colours[best].0
            );
            best
        })
        .collect()
}

/// Asserts frames `range` all have colour `want` (an index into the classification).
fn assert_span(classes: &[usize], range: std::ops::Range<usize>, want: usize, names: &[&str]) {
    for i in range.clone() {
        assert_eq!(
            classes[i], want,
            "frame {i} should show {:?} (frames {range:?}); classes: {classes:?} ({names:?})",
            names[want]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The demo profile, end to end
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_profile_writes_60_valid_frames() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.y4m");
    // Every-frame pacing and a small model size: each of the 60 frames goes through the real
    // pipeline whatever the machine's load (in real time a slow debug build would repeat frames).
    let f = run_ok(sdcam().args([
        "--profile",
        "profiles/demo.toml",
        "--frames",
        "60",
        "--set",
        &format!("output.path={}", s(&out)),
        "--set",
        "output.pacing=\"every-frame\"",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
    ]));
    let y = Y4m::read(&out);
    assert_eq!((y.width, y.height), (640, 480));
    assert_eq!(y.rate, (30, 1));
    assert_eq!(y.frames.len(), 60, "stderr:\n{}", f.stderr);
    assert!(y.frames.iter().all(|fr| fr.len() == 640 * 480 * 3 / 2));
    let size = std::fs::metadata(&out).unwrap().len() as usize;
    let header = std::fs::read(&out)
        .unwrap()
        .iter()
        .position(|&b| b == b'\n')
        .unwrap()
        + 1;
    assert_eq!(
        size,
        header + 60 * (6 + 640 * 480 * 3 / 2),
        "nothing may trail the frames"
    );
    // The pattern is animated: the last frame is a real, changing picture.
    assert_ne!(y.frames[30], y.frames[59], "the output does not move");
    let [(ylo, yhi), ..] = y.plane_ranges(59);
    assert!(yhi - ylo > 60, "last frame is flat (Y {ylo}..{yhi})");
    assert_eq!(done_count(&f.stderr), 60, "{}", f.stderr);
    assert!(f.stderr.contains("0 placeholders"), "{}", f.stderr);
    assert!(f.stderr.contains("RANDOM WEIGHTS"), "{}", f.stderr);
}

/// The real pipeline on every frame of a file: each input frame is transformed once (no
/// placeholders, no repeats), the run is reproducible from its seed, and the log says the demo
/// model has random weights.
#[test]
fn diffusion_transforms_every_frame_of_a_file_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.y4m");
    let (w, h) = (64usize, 48usize);
    let frames: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            let mut f = vec![128u8; Y4m::frame_len(w, h)];
            for y in 0..h {
                for x in 0..w {
                    f[y * w + x] = (16 + (x * 3 + y * 2 + i * 7) % 220) as u8;
                }
            }
            f
        })
        .collect();
    write_y4m(&input, w, h, &frames);
    let run = |out: &Path, seed: u64| {
        run_ok(sdcam().args([
            "--profile",
            "profiles/demo.toml",
            "--source",
            &s(&input),
            "--output",
            &s(out),
            "--no-stdin",
            "--set",
            "source.loop=false",
            "--set",
            &format!("output.width={w}"),
            "--set",
            &format!("output.height={h}"),
            "--set",
            "stream.width=64",
            "--set",
            "stream.height=64",
            "--set",
            "stream.similarity_filter=false",
            "--set",
            &format!("stream.seed={seed}"),
        ]))
    };
    let a = dir.path().join("a.y4m");
    let f = run(&a, 2);
    assert!(f.stderr.contains("RANDOM WEIGHTS"), "{}", f.stderr);
    let ya = Y4m::read(&a);
    assert_eq!(ya.frames.len(), 10, "{}", f.stderr);
    for (i, fr) in ya.frames.iter().enumerate() {
        assert_ne!(fr, &frames[i], "frame {i} is the untransformed input");
        let [(lo, hi), ..] = ya.plane_ranges(i);
        assert!(hi - lo > 10, "frame {i} is flat (placeholder?)");
    }
    let b = dir.path().join("b.y4m");
    run(&b, 2);
    assert_eq!(Y4m::read(&b).frames, ya.frames, "same seed, same output");
    let c = dir.path().join("c.y4m");
    run(&c, 3);
    assert_ne!(Y4m::read(&c).frames, ya.frames, "another seed, other noise");
}

/// N frames in, N frames out, output i made from input i (issue 11 §1), through the binary:
/// a source that ends before the model is loaded, the Stream Batch lag (k steps keep k − 1
/// frames in flight), an unpaired `frame_buffer_size` frame, stdin, warm start on and off.
/// Row-independent settings (no CFG, no cross-frame attention, no similarity filter) make each
/// output depend on its own input only, so changing the last input frame must change exactly
/// the last output frame.
#[test]
fn every_input_frame_of_a_short_file_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (64usize, 64usize);
    let frame = |i: usize| -> Vec<u8> {
        let mut f = vec![128u8; Y4m::frame_len(w, h)];
        for y in 0..h {
            for x in 0..w {
                f[y * w + x] = (16 + (x * (3 + i) + y * (2 + 2 * i) + i * 37) % 220) as u8;
            }
        }
        f
    };
    // (frames, t_index_list, frame_buffer_size, warm_start, through stdin)
    let cases: &[(usize, &str, u32, bool, bool)] = &[
        (1, "[35]", 1, true, false),
        (2, "[20, 35]", 1, true, false),
        (2, "[20, 35]", 1, true, true),
        (6, "[10, 20, 30, 40]", 1, true, false),
        (6, "[10, 20, 30, 40]", 1, false, false),
        (5, "[20, 35]", 2, true, false),
        (1, "[10, 20, 30, 40]", 3, true, true),
    ];
    for &(n, t_index, fbs, warm, stdin) in cases {
        let what = format!("{n} frames, t_index_list {t_index}, fbs {fbs}, warm {warm}");
        let run = |frames: &[Vec<u8>], name: &str| -> (Y4m, Finished) {
            let input = dir.path().join(format!("{name}-in.y4m"));
            let out = dir.path().join(format!("{name}-out.y4m"));
            write_y4m(&input, w, h, frames);
            let mut cmd = sdcam();
            cmd.args(["--profile", "profiles/demo.toml", "--output", &s(&out)]);
            let source = if stdin { "-".to_string() } else { s(&input) };
            cmd.args(["--source", &source]);
            if !stdin {
                cmd.arg("--no-stdin");
            }
            for set in [
                "source.loop=false".to_string(),
                format!("output.width={w}"),
                format!("output.height={h}"),
                format!("stream.width={w}"),
                format!("stream.height={h}"),
                format!("stream.t_index_list={t_index}"),
                format!("stream.frame_buffer_size={fbs}"),
                format!("stream.warm_start={warm}"),
                "stream.cfg_type=\"none\"".into(),
                "stream.similarity_filter=false".into(),
            ] {
                cmd.args(["--set", &set]);
            }
            let f = if stdin {
                cmd.stdout(Stdio::piped());
                let mut p = Proc::spawn(&mut cmd, true);
                let mut feed = p.stdin.take().unwrap();
                let bytes = std::fs::read(&input).unwrap();
                let feeder = std::thread::spawn(move || feed.write_all(&bytes));
                let f = p.finish(DEADLINE);
                feeder.join().unwrap().expect("feeding stdin");
                f
            } else {
                run_to_end(&mut cmd)
            };
            assert!(
                f.status.success(),
                "{what}: exit {}:\n{}",
                f.status,
                f.stderr
            );
            (Y4m::read(&out), f)
        };
        let frames: Vec<Vec<u8>> = (0..n).map(frame).collect();
        let (a, f) = run(&frames, "a");
        assert_eq!(a.frames.len(), n, "{what}:\n{}", f.stderr);
        assert_eq!(done_count(&f.stderr), n as u64, "{what}:\n{}", f.stderr);
        assert!(
            f.stderr.contains("(0 repeated, 0 placeholders)") && f.stderr.contains(" 0 dropped"),
            "{what}:\n{}",
            f.stderr
        );
        let mut changed = frames.clone();
        changed[n - 1] = frame(n + 7);
        let (b, _) = run(&changed, "b");
        assert_eq!(b.frames.len(), n, "{what}");
        for i in 0..n - 1 {
            assert_eq!(
                a.frames[i], b.frames[i],
                "{what}: output {i} depends on the last input"
            );
        }
        assert_ne!(
            a.frames[n - 1],
            b.frames[n - 1],
            "{what}: the last input frame never reached the output"
        );
    }
}

/// A still image with `source.loop = false` is one frame: it is written once (two denoising
/// steps keep it in the batch until the end-of-stream flush).
#[test]
fn a_still_image_without_loop_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("still.png");
    write_png(&img, 80, 60, [200, 120, 40]);
    let out = dir.path().join("still.y4m");
    let f = run_ok(sdcam().args([
        "--profile",
        "profiles/demo.toml",
        "--source",
        &s(&img),
        "--output",
        &s(&out),
        "--no-stdin",
        "--set",
        "source.loop=false",
        "--set",
        "output.width=64",
        "--set",
        "output.height=64",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
    ]));
    assert_eq!(Y4m::read(&out).frames.len(), 1, "{}", f.stderr);
    assert!(
        f.stderr
            .contains("1 frames written (0 repeated, 0 placeholders), 1 captured, 0 dropped"),
        "{}",
        f.stderr
    );
}

/// With a file sink, `pacing = "auto"` transforms every frame whatever the source, and
/// `--frames N` counts transformed frames: the demo's pattern → file run writes only
/// pipeline output, no placeholders and no repeats.
#[test]
fn pattern_to_a_file_transforms_every_frame_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.y4m");
    let f = run_ok(sdcam().args([
        "--profile",
        "profiles/demo.toml",
        "--frames",
        "12",
        "--no-stdin",
        "--set",
        &format!("output.path={}", s(&out)),
        "--set",
        "output.width=64",
        "--set",
        "output.height=48",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
    ]));
    assert_eq!(Y4m::read(&out).frames.len(), 12, "{}", f.stderr);
    assert_eq!(done_count(&f.stderr), 12, "{}", f.stderr);
    assert!(
        f.stderr
            .contains("(0 repeated, 0 placeholders), 12 captured, 0 dropped"),
        "{}",
        f.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Pattern → Y4M from flags only
// ---------------------------------------------------------------------------------------------

/// A write error at the final flush (a full disk while the last frames are still buffered) is
/// an error exit, not a warning with exit 0 and a truncated file.
#[test]
fn a_failed_final_flush_is_an_error_exit() {
    let f = run_to_end(sdcam().args([
        "--source",
        "pattern",
        "--transform",
        "identity",
        "--frames",
        "2",
        "--no-stdin",
        "--set",
        "output.kind=y4m",
        "--set",
        "output.path=/dev/full",
        "--set",
        "output.width=64",
        "--set",
        "output.height=48",
    ]));
    assert!(
        !f.status.success(),
        "exit {} with lost frames:\n{}",
        f.status,
        f.stderr
    );
    assert!(
        f.stderr.contains("lost") || f.stderr.contains("No space"),
        "{}",
        f.stderr
    );
}

#[test]
fn pattern_to_y4m_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.y4m");
    let f = run_ok(sdcam().args([
        "--source",
        "pattern",
        "--output",
        &s(&out),
        "--frames",
        "10",
        "--transform",
        "identity",
        "--set",
        "output.width=320",
        "--set",
        "output.height=240",
        "--no-stdin",
    ]));
    let y = Y4m::read(&out);
    assert_eq!(
        (y.width, y.height, y.frames.len()),
        (320, 240, 10),
        "{}",
        f.stderr
    );
    assert!(y.frames.iter().all(|fr| fr.len() == 320 * 240 * 3 / 2));
    // Identity: colour bars (bright and saturated) are in the last frame, not a placeholder.
    let [(ylo, yhi), (ulo, uhi), _] = y.plane_ranges(9);
    assert!(yhi > 150 && ylo < 80, "luma range {ylo}..{yhi}");
    assert!(uhi - ulo > 100, "no saturated colours (U {ulo}..{uhi})");
    assert!(f.stderr.contains("transform: identity"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// 3. Y4M in → Y4M out, from a file and from stdin
// ---------------------------------------------------------------------------------------------

/// Frame `f` of a smooth, moderately saturated test clip: luma and chroma gradients that shift
/// with the frame number, plus an 8×8 brighter block (aligned to the chroma grid) that moves.
/// Y stays in 60..=180 and U, V in 116..=140, so every pixel is inside the RGB gamut and the
/// YUV → RGB → YUV round trip loses nothing but rounding.
fn clip_frame(w: usize, h: usize, f: usize) -> Vec<u8> {
    let (cw, ch) = (w / 2, h / 2);
    let mut data = vec![0u8; Y4m::frame_len(w, h)];
    let (bx, by) = ((f * 8) % (w - 8), 8 + (f * 2) % (h - 16));
    for y in 0..h {
        for x in 0..w {
            let mut v = 60 + x / 2 + y / 2 + 2 * f;
            if (bx..bx + 8).contains(&x) && (by..by + 8).contains(&y) {
                v += 20;
            }
            data[y * w + x] = v as u8;
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            data[w * h + cy * cw + cx] = (116 + cx / 3 + f / 2) as u8;
            data[w * h + cw * ch + cy * cw + cx] = (140 - cy / 2 - f / 2) as u8;
        }
    }
    data
}

#[test]
fn y4m_round_trip_file_and_stdin() {
    // Stream sizes must be multiples of 8 from 64, so the clip is 96x64: no resizing anywhere,
    // and a non-square size catches swapped width/height.
    let (w, h, n) = (96, 64, 12);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.y4m");
    let frames: Vec<_> = (0..n).map(|f| clip_frame(w, h, f)).collect();
    write_y4m(&input, w, h, &frames);
    let sizes = [
        "--set",
        "stream.width=96",
        "--set",
        "stream.height=64",
        "--set",
        "output.width=96",
        "--set",
        "output.height=64",
        "--set",
        "source.loop=false",
        "--transform",
        "identity",
    ];

    let out = dir.path().join("out.y4m");
    let t0 = Instant::now();
    let f = run_ok(
        sdcam()
            .args(["--source", &s(&input), "--output", &s(&out), "--no-stdin"])
            .args(sizes),
    );
    let took = t0.elapsed();
    assert!(
        f.stderr.contains("every frame"),
        "file → file must run every-frame:\n{}",
        f.stderr
    );
    let y = Y4m::read(&out);
    assert_eq!((y.width, y.height), (w, h));
    assert_eq!(
        y.frames.len(),
        n,
        "every input frame exactly once:\n{}",
        f.stderr
    );
    // I420 → RGB → I420 in limited range: each sample comes back within 3 codes, ~exact on
    // average (smooth content, no clipping).
    let input_clip = Y4m::read(&input);
    for i in 0..n {
        for (p, (a, b)) in input_clip.planes(i).iter().zip(y.planes(i)).enumerate() {
            let diffs: Vec<i32> = a
                .iter()
                .zip(b)
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .collect();
            let max = *diffs.iter().max().unwrap();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            assert!(
                max <= 3 && mean <= 1.0,
                "frame {i} plane {p}: max diff {max}, mean {mean:.3} (tolerance 3 / 1.0)"
            );
        }
    }
    // Not paced in real time: 12 frames at 30 fps would take 0.4 s at least.
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // The same clip on stdin (`--source -`) gives the same bytes.
    let out2 = dir.path().join("out2.y4m");
    let mut cmd = sdcam();
    cmd.args(["--source", "-", "--output", &s(&out2)])
        .args(sizes);
    let mut p = Proc::spawn(&mut cmd, true);
    let clip = std::fs::read(&input).unwrap();
    let mut stdin = p.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(&clip));
    let f2 = p.finish(DEADLINE);
    feeder.join().unwrap().expect("feeding the clip to stdin");
    assert!(f2.status.success(), "{}", f2.stderr);
    assert!(f2.stderr.contains("Y4M stdin"), "{}", f2.stderr);
    assert_eq!(Y4m::read(&out2).frames.len(), n);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(),
        "stdin and file input give different output"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Live control over stdin
// ---------------------------------------------------------------------------------------------

#[test]
fn live_prompt_and_settings_over_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let grey = dir.path().join("grey.png");
    write_png(&grey, 64, 48, [GREY; 3]);
    let out = dir.path().join("live.y4m");
    let total = 120;
    let mut cmd = sdcam();
    cmd.args([
        "--source",
        &s(&grey),
        "--output",
        &s(&out),
        "--transform",
        "tint",
        "--prompt",
        "a red fox",
        "--fps",
        "30",
        "--frames",
        &total.to_string(),
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
        "--set",
        "output.width=64",
        "--set",
        "output.height=48",
    ]);
    let colours = [
        ("a red fox", bt601(tinted(GREY, "a red fox", 1.2))),
        ("a blue whale", bt601(tinted(GREY, "a blue whale", 1.2))),
        ("untinted", bt601([GREY; 3])),
    ];
    // The test needs three clearly different pictures.
    for a in 0..3 {
        for b in a + 1..3 {
            assert!(
                yuv_dist(colours[a].1, colours[b].1) > 10.0,
                "{colours:?} are too close to tell apart"
            );
        }
    }
    let mut p = Proc::spawn(&mut cmd, true);
    let before_prompt = p.wait_written(10) as usize;
    p.send("prompt a blue whale");
    p.wait_for("prompt \"a blue whale\": applied");
    let whale_from = p.written() as usize + 4; // at most 4 frames were already past the transform

    // Malformed and invalid commands change nothing and do not stop the run.
    p.send("fly away");
    p.send("set guidance_scale");
    p.send("set guidance_scale 99");
    p.wait_for("unknown command `fly`");
    p.wait_for("needs a value");
    let err = p.wait_for("nothing changed");
    assert!(
        err.contains("key `stream.guidance_scale`: 99 is out of range"),
        "{err}"
    );
    let before_zero = p.wait_written(whale_from as u64 + 10) as usize;
    p.send("set guidance_scale 0");
    p.wait_for("set guidance_scale: applied");
    let grey_from = p.written() as usize + 4;
    assert!(grey_from + 10 < total, "the run is too short for the test");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);

    let y = Y4m::read(&out);
    assert_eq!(y.frames.len(), total, "{}", f.stderr);
    let classes = classify(&y, &colours, 2.0);
    let names = colours.map(|c| c.0);
    assert_span(&classes, 0..before_prompt, 0, &names);
    assert_span(&classes, whale_from..before_zero, 1, &names);
    assert_span(&classes, grey_from..total, 2, &names);
    // Changes happen once and in order: fox → whale → grey.
    assert!(classes.windows(2).all(|w| w[0] <= w[1]), "{classes:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. SIGHUP reload
// ---------------------------------------------------------------------------------------------

fn live_profile(prompt_line: &str, grey: &Path, out: &Path, extra: &str) -> String {
    format!(
        "{prompt_line}\ntransform = \"tint\"\n\n[source]\nkind = \"file\"\npath = {:?}\nfps = 30\n\n\
         [output]\nkind = \"y4m\"\npath = {:?}\nwidth = 64\nheight = 48\nfps = 30\n\n\
         [stream]\nwidth = 64\nheight = 64\n{extra}",
        s(grey),
        s(out)
    )
}

#[test]
fn sighup_reload_keeps_settings_on_bad_file_and_applies_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let grey = dir.path().join("grey.png");
    write_png(&grey, 64, 48, [GREY; 3]);
    let out = dir.path().join("hup.y4m");
    let prof = dir.path().join("live.toml");
    std::fs::write(&prof, live_profile("prompt = \"one\"", &grey, &out, "")).unwrap();
    let total = 120;
    let mut p = Proc::spawn(
        sdcam().args(["--profile", &s(&prof), "--frames", &total.to_string()]),
        true,
    );
    p.wait_written(10);

    // A wrong type on line 1.
    std::fs::write(&prof, live_profile("prompt = 3", &grey, &out, "")).unwrap();
    p.signal(libc::SIGHUP);
    let err = p.wait_for("reload failed; the running settings stay");
    let want = format!("{}:1:10: key `prompt`", prof.display());
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
    // An unknown key on line 19.
    std::fs::write(
        &prof,
        live_profile("prompt = \"one\"", &grey, &out, "guidanc = 2.0\n"),
    )
    .unwrap();
    p.signal(libc::SIGHUP);
    let err = p.wait_for_n("reload failed; the running settings stay", 2);
    let want = format!("{}:19:1: key `stream.guidanc`", prof.display());
    assert!(err.contains(&want), "expected {want:?} in:\n{err}");
    assert!(!err.contains("reload: applied"), "{err}");
    let now = p.written();
    let still_one = p.wait_written(now + 5) as usize;

    // A good file with another prompt.
    std::fs::write(&prof, live_profile("prompt = \"two\"", &grey, &out, "")).unwrap();
    p.signal(libc::SIGHUP);
    p.wait_for("reload: applied");
    let two_from = p.written() as usize + 4;
    assert!(two_from + 10 < total, "the run is too short for the test");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);
    assert_eq!(done_count(&f.stderr), total as u64);

    let y = Y4m::read(&out);
    assert_eq!(y.frames.len(), total);
    let colours = [
        ("one", bt601(tinted(GREY, "one", 1.2))),
        ("two", bt601(tinted(GREY, "two", 1.2))),
    ];
    assert!(yuv_dist(colours[0].1, colours[1].1) > 10.0, "{colours:?}");
    let classes = classify(&y, &colours, 2.0);
    assert_span(&classes, 0..still_one, 0, &["one", "two"]);
    assert_span(&classes, two_from..total, 1, &["one", "two"]);
    assert!(classes.windows(2).all(|w| w[0] <= w[1]), "{classes:?}");
}

// ---------------------------------------------------------------------------------------------
// 6. Graceful stop
// ---------------------------------------------------------------------------------------------

fn endless_pattern(out: &Path) -> Command {
    let mut c = sdcam();
    c.args([
        "--source",
        "pattern",
        "--output",
        &s(out),
        "--transform",
        "identity",
        "--set",
        "source.width=320",
        "--set",
        "source.height=240",
        "--set",
        "stream.width=128",
        "--set",
        "stream.height=96",
        "--set",
        "output.width=160",
        "--set",
        "output.height=120",
    ]);
    c
}

fn assert_stopped_cleanly(f: &Finished, out: &Path, min_frames: usize) {
    assert!(f.status.success(), "exit {}:\n{}", f.status, f.stderr);
    assert!(
        f.elapsed < Duration::from_secs(5),
        "stop took {:?}",
        f.elapsed
    );
    assert!(
        f.stderr.contains("stopping: draining queues"),
        "{}",
        f.stderr
    );
    let y = Y4m::read(out); // whole frames only, nothing trailing
    assert_eq!((y.width, y.height), (160, 120));
    assert!(y.frames.len() >= min_frames, "{} frames", y.frames.len());
    assert_eq!(
        y.frames.len() as u64,
        done_count(&f.stderr),
        "file and log disagree:\n{}",
        f.stderr
    );
}

#[test]
fn sigterm_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("term.y4m");
    let mut p = Proc::spawn(&mut endless_pattern(&out), true);
    p.wait_written(30);
    p.signal(libc::SIGTERM);
    let f = p.finish(DEADLINE);
    assert_stopped_cleanly(&f, &out, 30);
}

#[test]
fn quit_command_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("quit.y4m");
    let mut p = Proc::spawn(&mut endless_pattern(&out), true);
    p.wait_written(15);
    p.send("quit");
    let t0 = Instant::now();
    while let Ok(None) = p.child.try_wait() {
        if t0.elapsed() > Duration::from_secs(5) {
            p.fail("`quit` did not stop sdcam within 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let f = p.finish(DEADLINE);
    assert_stopped_cleanly(&f, &out, 15);
}

// ---------------------------------------------------------------------------------------------
// 7. Profile errors through the binary
// ---------------------------------------------------------------------------------------------

#[test]
fn check_profile_reports_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("bad_key.toml");
    std::fs::write(&unknown, "prompt = \"x\"\n\n[stream]\nguidanc = 2.0\n").unwrap();
    let range = dir.path().join("bad_range.toml");
    std::fs::write(
        &range,
        "prompt = \"x\"\n[stream]\nguidance_scale = 99.0\n[output]\nfps = 0\n",
    )
    .unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "prompt = \"a cat\"\n").unwrap();

    let f = run_to_end(sdcam().arg("check-profile").args([&unknown, &good, &range]));
    assert!(!f.status.success(), "bad profiles must fail");
    let e = &f.stderr;
    for want in [
        format!(
            "{}:4:1: key `stream.guidanc`: unknown field `guidanc`",
            unknown.display()
        ),
        format!(
            "{}:3:18: key `stream.guidance_scale`: 99 is out of range",
            range.display()
        ),
        format!(
            "{}:5:7: key `output.fps`: 0 is out of range",
            range.display()
        ),
        "2 of 3 profiles have problems".to_string(),
    ] {
        assert!(e.contains(&want), "expected {want:?} in:\n{e}");
    }
    let stdout = String::from_utf8_lossy(&f.stdout);
    assert!(
        stdout.contains(&format!("{}: ok", good.display())),
        "{stdout}"
    );

    // Every shipped profile is valid.
    let mut shipped: Vec<PathBuf> = std::fs::read_dir(manifest_dir().join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    shipped.sort();
    assert!(shipped.len() >= 4);
    let f = run_ok(sdcam().arg("check-profile").args(&shipped));
    let stdout = String::from_utf8_lossy(&f.stdout);
    assert_eq!(stdout.matches(": ok").count(), shipped.len(), "{stdout}");
}

#[test]
fn run_rejects_missing_profile_and_bad_overrides() {
    let f = run_to_end(sdcam().args(["--profile", "no/such/missing.toml", "--frames", "1"]));
    assert!(!f.status.success());
    assert!(
        f.stderr
            .contains("cannot read profile no/such/missing.toml"),
        "{}",
        f.stderr
    );

    let f = run_to_end(sdcam().args([
        "--set",
        "nonsense_key=1",
        "--frames",
        "1",
        "--output",
        "null",
    ]));
    assert!(!f.status.success());
    assert!(
        f.stderr.contains("unknown key `nonsense_key`"),
        "{}",
        f.stderr
    );

    let f = run_to_end(sdcam().args([
        "--set",
        "stream.guidance_scale=99",
        "--frames",
        "1",
        "--output",
        "null",
    ]));
    assert!(!f.status.success());
    assert!(
        f.stderr
            .contains("<command line>: key `stream.guidance_scale`: 99 is out of range"),
        "{}",
        f.stderr
    );

    let f = run_to_end(sdcam().args(["--set", "oops", "--output", "null"]));
    assert!(!f.status.success());
    assert!(f.stderr.contains("expected KEY=VALUE"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// 8. snapshot and stats
// ---------------------------------------------------------------------------------------------

#[test]
fn snapshot_and_stats_commands() {
    let dir = tempfile::tempdir().unwrap();
    let grey = dir.path().join("grey.png");
    write_png(&grey, 64, 48, [GREY; 3]);
    let out = dir.path().join("snap.y4m");
    let snap = dir.path().join("shots/s.png");
    let mut p = Proc::spawn(
        sdcam().args([
            "--source",
            &s(&grey),
            "--output",
            &s(&out),
            "--transform",
            "identity",
            "--set",
            "stream.width=64",
            "--set",
            "stream.height=64",
            "--set",
            "output.width=96",
            "--set",
            "output.height=64",
        ]),
        true,
    );
    p.wait_written(3);
    p.send(&format!("snapshot {}", s(&snap)));
    p.wait_for(&format!("snapshot written to {}", s(&snap)));
    let polls = p.stderr().matches("\nwritten ").count();
    p.send("stats");
    let err = p.wait_for_n("\nwritten ", polls + 1);
    for want in ["uptime", "captured", "source errors"] {
        assert!(err.contains(want), "stats block lacks {want:?}:\n{err}");
    }
    p.send("quit");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);

    let (w, h, px) = read_png(&snap);
    assert_eq!((w, h), (96, 64));
    for c in px.chunks_exact(3) {
        for &v in c {
            assert!(
                v.abs_diff(GREY) <= 3,
                "snapshot pixel {c:?}, want grey {GREY}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `sdcam bench`: the pipeline table and its comparison suite
// ---------------------------------------------------------------------------------------------

/// `sdcam bench` on the demo profile, small and quick.
const BENCH_DEMO: [&str; 9] = [
    "bench",
    "--profile",
    "profiles/demo.toml",
    "--size",
    "64x64",
    "--frames",
    "1",
    "--warmup",
    "0",
];

#[test]
fn bench_prints_stage_table_and_comparisons() {
    let f = run_ok(sdcam().args(BENCH_DEMO));
    let out = String::from_utf8_lossy(&f.stdout).to_string();
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
    // Header + profile + 3×(batch, sequential) + 4 cfg types.
    assert_eq!(rows.len(), 1 + 1 + 6 + 4, "{out}");
    assert!(out.contains("| 4 step(s), cfg none, sequential |"), "{out}");
    assert!(out.contains("× 4 step(s) Stream Batch"), "{out}");
    assert!(
        out.contains("| 2 steps, cfg full, Stream Batch | 4 |"),
        "{out}"
    );
    // JSON for machines.
    let j = run_ok(sdcam().args(BENCH_DEMO).args(["--no-compare", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    let row = &v["rows"][0];
    assert_eq!(row["label"], "profile");
    assert!(row["ms"]["unet"].as_f64().unwrap() > 0.0);
    assert!(row["fps"].as_f64().unwrap() > 0.0);
}

// ---------------------------------------------------------------------------------------------
// Live diffusion changes through the binary: prompt, a model switch loading in the background,
// and a model that cannot load (the running one stays)
// ---------------------------------------------------------------------------------------------

/// The demo profile (tiny diffusion model) live on stdin at a small size, writing `out`.
fn demo_live(out: &Path) -> Command {
    let mut cmd = sdcam();
    cmd.args([
        "--profile",
        "profiles/demo.toml",
        "--output",
        &s(out),
        "--set",
        "output.width=160",
        "--set",
        "output.height=120",
        "--set",
        "stream.width=64",
        "--set",
        "stream.height=64",
    ]);
    cmd
}

#[test]
fn diffusion_live_prompt_and_model_switch_keep_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("live.y4m");
    let mut cmd = demo_live(&out);
    let mut p = Proc::spawn(&mut cmd, true);
    p.wait_for("transform: diffusion");
    let w0 = p.wait_written(10);
    p.send("prompt a forest in the morning fog");
    p.wait_for("prompt \"a forest in the morning fog\": applied");
    p.send("negative grainy");
    p.wait_for("negative prompt \"grainy\": applied");
    // Another VAE is another model: it loads in the background, then replaces the pipeline.
    p.send("set model.tiny_vae \"\"");
    p.wait_for("building the Diffusion transform in the background");
    p.wait_for("with its own VAE [RANDOM WEIGHTS], Img2img");
    // A model that does not exist: reported, and the running pipeline stays.
    p.send("set model.id \"/nonexistent/model\"");
    p.wait_for("transform kept (the new one failed to build)");
    p.send("get model.id");
    p.wait_for("model.id = \"profiles/../tests/fixtures/models/tiny-sd15\"");
    let w1 = p.wait_written(w0 + 20);
    assert!(w1 >= w0 + 20);
    p.send("quit");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(!f.stderr.contains("transform failed"), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// 8. Stop signals during start-up and behind queued work; "applied" only once it is
// ---------------------------------------------------------------------------------------------

/// Whether the process has a handler for SIGTERM installed (`SigCgt` in /proc), or `None` once
/// it has gone.
fn catches_sigterm(pid: i32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())?;
    Some(mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Polls until sdcam catches SIGTERM; fails the test if that takes seconds.
fn wait_for_handlers(p: &mut Proc) {
    let t0 = Instant::now();
    loop {
        match catches_sigterm(p.pid()) {
            Some(true) => return,
            None => p.fail("sdcam went away before installing its signal handlers"),
            Some(false) if t0.elapsed() > WAIT => p.fail("SIGTERM is never caught"),
            Some(false) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// SIGTERM in the first milliseconds: the handlers are installed before anything slow (here
/// the output, a FIFO whose open blocks until a reader comes), the stop waits in the control
/// channel and the run ends cleanly with exit 0 instead of dying by the default action; and a
/// SIGTERM at a range of delays after start-up also stops cleanly.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.y4m");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut p = Proc::spawn(&mut endless_pattern(&fifo), true);
    // Caught while sdcam is still blocked opening its output.
    wait_for_handlers(&mut p);
    p.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = std::fs::File::open(&fifo).and_then(|mut f| f.read_to_end(&mut all));
        all
    });
    let f = p.finish(DEADLINE);
    let _ = reader.join();
    assert!(f.status.success(), "exit {}:\n{}", f.status, f.stderr);
    assert!(
        f.stderr.contains("stopping: draining queues"),
        "{}",
        f.stderr
    );

    for delay_ms in [0, 1, 3, 6, 10, 20, 35, 50] {
        let out = dir.path().join(format!("early-{delay_ms}.y4m"));
        let mut p = Proc::spawn(&mut endless_pattern(&out), true);
        wait_for_handlers(&mut p);
        std::thread::sleep(Duration::from_millis(delay_ms));
        p.signal(libc::SIGTERM);
        let f = p.finish(DEADLINE);
        assert!(
            f.status.success(),
            "SIGTERM {delay_ms} ms after start-up: exit {}:\n{}",
            f.status,
            f.stderr
        );
        assert!(f.elapsed < Duration::from_secs(5), "{:?}", f.elapsed);
    }
}

/// A burst of `next` and `reload` queued behind a running diffusion pipeline, then SIGTERM: the
/// `next`s advance the playlist once by their number, the reloads coalesce, and the stop
/// preempts whatever is still queued.
#[test]
fn a_burst_of_next_and_reload_coalesces_and_sigterm_preempts_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("burst.y4m");
    let mut cmd = demo_live(&out);
    let mut p = Proc::spawn(&mut cmd, true);
    p.wait_for("transform: diffusion");
    p.wait_written(5);
    let mut burst = String::new();
    for _ in 0..30 {
        burst.push_str("next\n");
    }
    for _ in 0..30 {
        burst.push_str("reload\n");
    }
    p.send(burst.trim_end());
    // The burst is handled (in a batch or two), then the stop.
    p.wait_for("reload: applied");
    std::thread::sleep(Duration::from_millis(300));
    let err = p.stderr();
    let applies = err.matches(": applied").count();
    assert!(applies <= 6, "{applies} applies for a burst of 60:\n{err}");
    // 30 positions on a playlist of 3 is where it started (+1 per batch split at most).
    let mut more = String::new();
    for _ in 0..40 {
        more.push_str("next\nreload\n");
    }
    p.send(more.trim_end());
    p.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "exit {}:\n{}", f.status, f.stderr);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let applied_after = f.stderr.matches(": applied").count() - applies;
    assert!(
        applied_after < 40,
        "{applied_after} queued changes applied after the stop:\n{}",
        f.stderr
    );
}

/// A LoRA that fails to load is never reported as applied: the change says it is loading, and
/// then that the running transform stays.
#[test]
fn a_failing_lora_is_not_reported_applied() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.y4m");
    let mut cmd = demo_live(&out);
    let mut p = Proc::spawn(&mut cmd, true);
    p.wait_for("transform: diffusion");
    // A change that loads and succeeds says so once it is installed.
    p.send("set model.tiny_vae \"\"");
    p.wait_for("set model.tiny_vae: loading; applied when the new transform is ready");
    p.wait_for("set model.tiny_vae: applied");
    p.send("set model.lora [{ id = \"/nonexistent/lora.safetensors\" }]");
    let err = p.wait_for("set model.lora: transform kept (the new one failed to build)");
    assert!(
        err.contains("set model.lora: loading; applied when the new transform is ready"),
        "{err}"
    );
    assert!(!err.contains("set model.lora: applied"), "{err}");
    p.send("quit");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);
}

// ---------------------------------------------------------------------------------------------
// Geometry: the default (auto) stream size fits the source once
// ---------------------------------------------------------------------------------------------

/// Frames whose luma says the row (60 → 180 down the picture) and whose U says the column
/// (108 → 148 across), inside the RGB gamut so the round trip through RGB keeps both.
fn ruler_y4m(path: &Path, w: usize, h: usize) {
    let (cw, ch) = (w / 2, h / 2);
    let mut f = vec![128u8; Y4m::frame_len(w, h)];
    for y in 0..h {
        for x in 0..w {
            f[y * w + x] = (60.0 + 120.0 * (y as f64 + 0.5) / h as f64).round() as u8;
        }
    }
    for cy in 0..ch {
        for cx in 0..cw {
            f[w * h + cy * cw + cx] = (108.0 + 40.0 * (cx as f64 + 0.5) / cw as f64).round() as u8;
        }
    }
    // Four frames: a file source of at most two (the queue's depth) can end before the
    // transform is built, and the run then stops with nothing written.
    write_y4m(path, w, h, &[f.clone(), f.clone(), f.clone(), f]);
}

/// What the first frame shows of a [`ruler_y4m`] source: the fraction of its height (luma span
/// down the middle column) and of its width (U span along the middle row), read 4 pixels in
/// from the picture's edges, and the first and last columns of the picture (not a bar).
fn ruler_view(y: &Y4m) -> (f64, f64, usize, usize) {
    let [luma, u, _] = y.planes(0);
    let (w, h, cw) = (y.width, y.height, y.width.div_ceil(2));
    let cols: Vec<usize> = (0..w).filter(|&x| luma[h / 2 * w + x] > 40).collect();
    let (x0, x1) = (cols[0], *cols.last().unwrap());
    let l = |r: usize| luma[r * w + (x0 + x1) / 2] as f64;
    let fy = (l(h - 5) - l(4)) / 120.0 * h as f64 / (h - 9) as f64;
    let crow = h / 4;
    let uu = |c: usize| u[crow * cw + c] as f64;
    let (c0, c1) = (x0 / 2 + 2, x1 / 2 - 2);
    let fx = (uu(c1) - uu(c0)) / 40.0 * (x1 - x0 + 1) as f64 / (2 * (c1 - c0)) as f64;
    (fy, fx, x0, x1)
}

#[test]
fn default_stream_size_fits_a_4_3_source_once_into_a_16_9_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("four3.y4m");
    ruler_y4m(&input, 160, 120);
    let run = |fit: &str| {
        let out = dir.path().join(format!("{fit}.y4m"));
        let f = run_ok(sdcam().args([
            "--source",
            &s(&input),
            "--output",
            &s(&out),
            "--transform",
            "identity",
            "--no-stdin",
            "--set",
            "source.loop=false",
            "--set",
            &format!("source.fit={fit:?}"),
            "--set",
            "output.width=320",
            "--set",
            "output.height=180",
        ]));
        (Y4m::read(&out), f.stderr)
    };
    // crop: the 4:3 picture is cut once, to 16:9 (~75 % of its height, all of its width), not
    // twice through a 512² square (56 % of the height, 75 % of the width: 42 % of the picture).
    let (y, log) = run("crop");
    assert!(
        log.contains("stream 320x184 (auto: 16:9 output at the output's pixel count)"),
        "{log}"
    );
    let (fy, fx, x0, x1) = ruler_view(&y);
    assert!((0.72..0.82).contains(&fy), "visible height {fy:.3}\n{log}");
    assert!(fx > 0.93, "visible width {fx:.3}\n{log}");
    assert_eq!((x0, x1), (0, 319), "no bars");
    // letterbox: all of the source, with bars left and right (240 of 320 columns).
    let (y, log) = run("letterbox");
    let (fy, fx, x0, x1) = ruler_view(&y);
    assert!(fy > 0.95 && fx > 0.93, "visible {fy:.3} x {fx:.3}\n{log}");
    assert!(
        (35..45).contains(&x0) && (275..285).contains(&x1),
        "{x0}..{x1}\n{log}"
    );
}

#[test]
fn live_output_size_change_resizes_an_auto_stream_through_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("live.y4m");
    let mut p = Proc::spawn(
        sdcam().args([
            "--profile",
            "profiles/demo.toml",
            "--output",
            &s(&out),
            "--set",
            "stream.width=\"auto\"",
            "--set",
            "stream.height=\"auto\"",
            "--set",
            "output.width=128",
            "--set",
            "output.height=96",
        ]),
        true,
    );
    // The tiny model's native size is 64² (sample_size 8 × 8): a 4:3 output gets 88x64.
    p.wait_for("stream 88x64 (auto: 4:3 output at ~64² pixels, the model's native size)");
    p.wait_for("transform: diffusion");
    let w0 = p.wait_written(3);
    p.send("get stream.width");
    p.wait_for("stream.width = \"auto\" (running: 88x64 (auto: 4:3 output");
    p.send("set output.width 192");
    p.wait_for("stream 128x64 (auto: 2:1 output");
    p.wait_for("stream prepared again");
    p.send("set stream.height 96");
    p.wait_for("stream 192x96 (width auto: 2:1 output, height 96 given)");
    p.wait_for_n("stream prepared again", 2);
    p.send("get output.fit");
    p.wait_for("output.fit = \"crop\" (running: stretch");
    p.send("set stream.height auto");
    p.wait_for_n("stream 128x64 (auto: 2:1 output at ~64² pixels", 2);
    p.wait_for_n("stream prepared again", 3);
    p.wait_written(w0 + 10);
    p.send("quit");
    let f = p.finish(DEADLINE);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(!f.stderr.contains("transform failed"), "{}", f.stderr);
}
