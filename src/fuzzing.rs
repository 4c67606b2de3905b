//! Fuzz harnesses: one function per untrusted-input parser, taking arbitrary bytes. Each runs the
//! same entry points sdcam runs on real input and panics only when an invariant breaks (a panic
//! inside sdcam, a frame larger than the stream, an error that does not name its file, …);
//! errors returned for bad input are the expected outcome.
//!
//! The `fuzz/` crate (cargo-fuzz, libFuzzer, nightly) calls these from its targets, and
//! `tests/fuzz_regressions.rs` replays the seed corpus and every input a fuzzer ever broke
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through them on stable in CI: one
//! implementation for both.

use std::path::Path;

use crate::control::{self, Command, Event};
use crate::frame::{PixelFormat, MAX_PIXELS};
use crate::profile::{self, LoadedProfile, ProfileError};
use crate::source::y4m::{Y4mInput, Y4mSource};
use crate::source::{Captured, Source};

/// A harness: arbitrary bytes in, a panic only when an invariant breaks.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by the names used for `fuzz/fuzz_targets/<name>.rs` and the corpus folders.
pub const TARGETS: [(&str, Harness); 4] = [
    ("y4m", y4m),
    ("profile", profile),
    ("command", command),
    ("image", image),
];

/// Frames read at most from one input: enough to cross frame boundaries several times, while an
/// input of many tiny frames stays fast.
const MAX_FRAMES: usize = 16;

/// The Y4M reader (`--source file.y4m`, `--source -`): header, then up to [`MAX_FRAMES`] frames,
/// each converted to RGB as the relay does. A stream never yields more frame bytes than it has,
/// and every frame has the header's size and a buffer that fits its format.
pub fn y4m(data: &[u8]) {
    let reader = Box::new(std::io::Cursor::new(data.to_vec()));
    let Ok(mut src) = Y4mSource::from_reader(Y4mInput::Stdin, reader, false) else {
        return;
    };
    let h = src.header().clone();
    assert!(h.width > 0 && h.height > 0, "{h:?}");
    assert!(h.width as u64 * h.height as u64 <= MAX_PIXELS, "{h:?}");
    assert!(
        h.rate.0 > 0 && h.rate.1 > 0 && src.fps().is_finite(),
        "{h:?}"
    );
    let _ = src.describe();
    let mut frame_bytes = 0usize;
    for _ in 0..MAX_FRAMES {
        let f = match src.next_frame() {
            Ok(Captured::Frame(f)) => f,
            Ok(Captured::End | Captured::Interrupted) | Err(_) => break,
        };
        frame_bytes += h.frame_len();
        assert!(
            frame_bytes <= data.len(),
            "{frame_bytes} frame bytes from a {}-byte stream",
            data.len()
        );
        assert_eq!((f.width, f.height), (h.width, h.height));
        let want = f.format.frame_len(f.width, f.height);
        assert_eq!(Some(f.data.len()), want, "{} {h:?}", f.format);
        let rgb = crate::convert::to_rgb(&f).expect("a frame the reader made converts to RGB");
        assert_eq!(rgb.format, PixelFormat::Rgb24);
        assert_eq!(rgb.data.len(), h.width as usize * h.height as usize * 3);
    }
}

/// The file name profile errors must carry (its folder exercises `./` path resolution).
const PROFILE_FILE: &str = "fuzz/p.toml";

/// The profile loader (`--profile`, `check-profile`, `profile <path>`, SIGHUP) and live `set`.
///
/// The bytes up to the first NUL are the file, read as [`LoadedProfile::load`] reads one (size
/// cap, UTF-8, TOML, schema, validation, relative paths); after the NUL, each line is a
/// `key value` edit applied with [`LoadedProfile::with_set`] to the loaded profile (or the
/// default one when the file is refused), each accepted edit becoming the base of the next, as
/// live `set` commands do. Every error names its origin, positions point into the text, and
/// every accepted profile passes validation and answers `get` for every key.
pub fn profile(data: &[u8]) {
    let (file, edits) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut current = match LoadedProfile::from_bytes(file, Path::new(PROFILE_FILE)) {
        Ok(lp) => {
            check_profile(&lp, &CHECKED_KEYS);
            lp
        }
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains(PROFILE_FILE), "error without the file: {msg}");
            if let Some(pe) = e.downcast_ref::<ProfileError>() {
                let lines = String::from_utf8_lossy(file).lines().count().max(1);
                check_profile_error(pe, PROFILE_FILE, lines);
            }
            LoadedProfile::default()
        }
    };
    for line in edits.split(|&b| b == b'\n' || b == 0) {
        let line = String::from_utf8_lossy(line);
        let (key, value) = line.split_once(' ').unwrap_or((&*line, ""));
        current = edit(&current, current.with_set(key, value), "<set>", key);
    }
}

/// Keys read back from every loaded profile: one of each kind of value (`get` of every key
/// would dominate the run time).
const CHECKED_KEYS: [&str; 6] = [
    "prompt",
    "stream.t_index_list",
    "stream.guidance_scale",
    "source.region",
    "model.lora",
    "output.device",
];

/// An accepted profile is valid and `keys` read back.
fn check_profile<S: AsRef<str>>(lp: &LoadedProfile, keys: &[S]) {
    let problems = profile::validate(&lp.profile);
    assert!(problems.is_empty(), "accepted but invalid: {problems:?}");
    for key in keys {
        if let Err(e) = lp.get(key.as_ref()) {
            panic!("get {}: {e}", key.as_ref());
        }
    }
}

/// A refused profile or edit names its origin and has problems, each located inside the text.
fn check_profile_error(e: &ProfileError, origin: &str, lines: usize) {
    assert_eq!(e.file, origin);
    assert!(!e.problems.is_empty(), "an error without problems");
    for p in &e.problems {
        if let Some((line, col)) = p.at {
            assert!(line >= 1 && line <= lines + 1 && col >= 1, "{e}");
        }
    }
    let _ = e.to_string();
}

/// The result of an edit of `key` in `base`: the new profile when accepted (checked, and `key`
/// reads back), else `base`.
fn edit(
    base: &LoadedProfile,
    result: Result<LoadedProfile, ProfileError>,
    origin: &str,
    key: &str,
) -> LoadedProfile {
    match result {
        Ok(next) => {
            check_profile(&next, &[key]);
            next
        }
        Err(e) => {
            check_profile_error(&e, origin, 1);
            base.clone()
        }
    }
}

/// A line limit small enough for short inputs to reach the over-long-line path.
const SHORT_LINE: usize = 40;

/// The stdin command channel: [`control::read_commands`] over the bytes (and again with a short
/// line limit), checked line by line against [`control::parse`], then the profile edits the run
/// loop makes for `prompt`, `negative`, `set`, `get` and `next` applied to a default profile.
pub fn command(data: &[u8]) {
    let events = read_all(data, control::MAX_LINE);
    let lines: Vec<&[u8]> = {
        let mut l: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        if data.ends_with(b"\n") || data.is_empty() {
            l.pop();
        }
        l
    };
    assert!(events.len() <= lines.len(), "{events:?}");
    if lines.iter().all(|l| l.len() < control::MAX_LINE) {
        let mut want = Vec::new();
        for l in &lines {
            let mut l = *l;
            while let [rest @ .., b'\r'] = l {
                l = rest;
            }
            match std::str::from_utf8(l) {
                Err(_) => want.push(None),
                Ok(s) => match control::parse(s) {
                    Ok(None) => {}
                    Ok(Some(c)) => want.push(Some(Event::Command(c))),
                    Err(m) => want.push(Some(Event::Invalid(m))),
                },
            }
        }
        assert_eq!(events.len(), want.len(), "{events:?} vs {want:?}");
        for (got, want) in events.iter().zip(&want) {
            match want {
                Some(w) => assert_eq!(got, w),
                None => assert!(matches!(got, Event::Invalid(m) if m.contains("not UTF-8"))),
            }
        }
    }
    let short = read_all(data, SHORT_LINE);
    assert!(short.len() <= lines.len(), "{short:?}");
    let mut current = LoadedProfile::default();
    let mut playlist = 0usize;
    for ev in events.into_iter().chain(short) {
        let Event::Command(c) = ev else { continue };
        check_command(&c);
        let text = |s: &str| toml::Value::String(s.to_string());
        current = match c {
            Command::Prompt(p) => {
                let r = current.with_value("prompt", text(&p), "<prompt>");
                edit(&current, r, "<prompt>", "prompt")
            }
            Command::Negative(p) => {
                let r = current.with_value("negative_prompt", text(&p), "<negative>");
                edit(&current, r, "<negative>", "negative_prompt")
            }
            Command::Set { key, value } => {
                let r = current.with_set(&key, &value);
                edit(&current, r, "<set>", &key)
            }
            Command::Get(key) => {
                let _ = current.get(&key);
                current
            }
            Command::Next if !current.profile.prompts.is_empty() => {
                playlist = (playlist + 1) % current.profile.prompts.len();
                let p = current.profile.prompts[playlist].clone();
                let r = current.with_value("prompt", text(&p), "<next>");
                edit(&current, r, "<next>", "prompt")
            }
            _ => current,
        };
    }
}

/// Every event [`control::read_commands`] makes of `data` with the line limit `max_line`.
fn read_all(data: &[u8], max_line: usize) -> Vec<Event> {
    let (tx, rx) = crossbeam_channel::unbounded();
    assert!(control::read_commands_limited(
        std::io::Cursor::new(data),
        &tx,
        max_line
    ));
    drop(tx);
    let events: Vec<Event> = rx.try_iter().collect();
    for ev in &events {
        assert!(
            matches!(ev, Event::Command(_) | Event::Invalid(_)),
            "{ev:?}"
        );
    }
    events
}

/// What the parser promises about a command's arguments.
fn check_command(c: &Command) {
    match c {
        Command::Prompt(t) | Command::Negative(t) => assert_eq!(t, t.trim(), "{c:?}"),
        Command::Set { key, value } => {
            assert!(
                !key.is_empty() && !key.contains(char::is_whitespace),
                "{c:?}"
            );
            assert!(!value.is_empty() && value == value.trim(), "{c:?}");
        }
        Command::Get(k) => assert!(!k.is_empty() && k == k.trim(), "{c:?}"),
        Command::Profile(p) | Command::Snapshot(p) => assert!(!p.as_os_str().is_empty()),
        _ => {}
    }
}

/// Still images (`--source photo.jpg`) through `decode_image`, and the same bytes as an MJPEG
/// camera frame through `convert::decode_jpeg`: a decoded picture is within the pixel limit and
/// its buffer is exactly width × height × 3.
pub fn image(data: &[u8]) {
    if let Ok((w, h, px)) = crate::source::image::decode_image(data, "fuzz.img") {
        check_rgb(w, h, &px);
    }
    if let Ok((w, h, px)) = crate::convert::decode_jpeg(data) {
        check_rgb(w, h, &px);
    }
}

fn check_rgb(w: u32, h: u32, px: &[u8]) {
    assert!(
        w > 0 && h > 0 && w as u64 * h as u64 <= MAX_PIXELS,
        "{w}x{h}"
    );
    assert_eq!(px.len(), w as usize * h as usize * 3, "{w}x{h}");
}
