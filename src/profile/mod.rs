//! TOML profiles: loading, validation with file/line/column/key errors, and live edits (`set`).
//!
//! A profile is a TOML file with the schema in [`schema`]. Every key has a default, so a two-line
//! profile works. Errors name the file, the line and column (from toml's spans) and the key.
//!
//! Over 700 lines for a reason: loading, the one `validate` with its ranges, the key list and the
//! live `set` edits all work on the same raw TOML table with its spans; split apart they would
//! pass that table and its line index between files. The schema ([`schema`]) and the stream
//! geometry ([`geometry`]) are already their own files, the tests are in `tests.rs`.

pub mod geometry;
pub mod schema;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
pub use schema::*;

/// One problem found in a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line and column where the problem is, when it can be located in the text.
    pub at: Option<(usize, usize)>,
    /// Dotted key path (`stream.guidance_scale`), or empty when the problem is not about one key.
    pub key: String,
    pub message: String,
}

/// A profile that failed to load or validate: every problem, with where it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ProfileError {
    /// The file name (or `<set>` / `<command line>` for edits not coming from a file).
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some((line, col)) = p.at {
                write!(f, ":{line}:{col}")?;
            }
            let message = elide_long_words(&p.message);
            if p.key.is_empty() {
                write!(f, ": {message}")?;
            } else {
                write!(f, ": key `{}`: {message}", p.key)?;
            }
        }
        Ok(())
    }
}

/// The longest run of non-space characters an error message shows whole: a value of a
/// megabyte quoted back by the parser is cut to its start and end.
const MAX_WORD: usize = 80;

/// Shortens every run of non-space characters longer than [`MAX_WORD`] in `message` to its
/// first 48 and last 8 characters around `…(N more bytes)…`.
fn elide_long_words(message: &str) -> std::borrow::Cow<'_, str> {
    if !message
        .split(char::is_whitespace)
        .any(|w| w.chars().count() > MAX_WORD)
    {
        return message.into();
    }
    let mut out = String::new();
    let mut rest = message;
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        if word.chars().count() > MAX_WORD {
            let head: String = word.chars().take(48).collect();
            let last: String = {
                let mut l: Vec<char> = word.chars().rev().take(8).collect();
                l.reverse();
                l.into_iter().collect()
            };
            let cut = word.len() - head.len() - last.len();
            out.push_str(&format!("{head}…({cut} more bytes)…{last}"));
        } else {
            out.push_str(word);
        }
        let space = tail.len() - tail.trim_start().len();
        out.push_str(&tail[..space]);
        rest = &tail[space..];
    }
    out.into()
}

/// A profile as loaded: the validated settings, the raw table (for `set`), and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    pub path: Option<PathBuf>,
    pub profile: Profile,
    raw: toml::Table,
    /// `key = value` edits from the command line, re-applied after every reload.
    overrides: Vec<(String, toml::Value)>,
}

impl Default for LoadedProfile {
    fn default() -> Self {
        LoadedProfile {
            path: None,
            profile: Profile::default(),
            raw: toml::Table::new(),
            overrides: Vec::new(),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted path of the innermost key whose key or value contains `offset`.
fn path_at(table: &dyn toml_edit::TableLike, offset: usize, prefix: &str) -> Option<String> {
    for (k, item) in table.iter() {
        let path = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        let in_key = table
            .key(k)
            .and_then(|key| key.span())
            .is_some_and(|s| s.contains(&offset));
        let in_val = item
            .span()
            .is_some_and(|s| s.contains(&offset) || s.end == offset);
        if let Some(t) = item.as_table_like() {
            if let Some(deeper) = path_at(t, offset, &path) {
                return Some(deeper);
            }
        }
        if let Some(arr) = item.as_array_of_tables() {
            for (i, t) in arr.iter().enumerate() {
                if let Some(deeper) = path_at(t, offset, &format!("{path}[{i}]")) {
                    return Some(deeper);
                }
            }
        }
        if in_key || in_val {
            return Some(path);
        }
    }
    None
}

/// Byte span of the value (or key) at a dotted path, if the key is in the text.
fn span_of(doc: &toml_edit::Document<String>, path: &str) -> Option<std::ops::Range<usize>> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let item = table.get(part)?;
        if parts.peek().is_none() {
            return item
                .span()
                .or_else(|| table.key(part).and_then(|k| k.span()));
        }
        table = item.as_table_like()?;
    }
    None
}

/// The slowest frame rate a source or output may have (one frame every 10 s).
pub const MIN_FPS: f64 = 0.1;
/// The fastest frame rate a source or output may have.
pub const MAX_FPS: f64 = 240.0;

/// The range (inclusive) of every numeric key, where the code that uses it works: a frame period
/// must be a usable `Duration` and short enough that stop and source changes stay prompt; sizes
/// bound the frame allocations; X11 coordinates are 16-bit; the schedule tables, the latent batch
/// (`len(t_index_list) × frame_buffer_size` rows) and the blend stay bounded. NaN, infinities,
/// negative and huge values are refused alike. [`validate`] enforces it for profile files, `set`
/// and command-line overrides with the same message (`V is out of range (LO to HI)`);
/// `t_index_list` entries must also lie below `num_inference_steps`.
pub const RANGES: &[(&str, f64, f64)] = &[
    ("source.width", 16.0, 7680.0),
    ("source.height", 16.0, 4320.0),
    ("source.fps", MIN_FPS, MAX_FPS),
    ("source.region.x", 0.0, 32767.0),
    ("source.region.y", 0.0, 32767.0),
    ("source.region.width", 1.0, 32767.0),
    ("source.region.height", 1.0, 32767.0),
    ("output.width", 16.0, 7680.0),
    ("output.height", 16.0, 4320.0),
    ("output.fps", MIN_FPS, MAX_FPS),
    ("output.every", 1.0, 100_000.0),
    ("output.idle_fps", MIN_FPS, 30.0),
    ("model.lora.scale", -10.0, 10.0),
    ("stream.width", 64.0, 2048.0),
    ("stream.height", 64.0, 2048.0),
    ("stream.t_index_list", 0.0, 999.0),
    ("stream.num_inference_steps", 1.0, 1000.0),
    ("stream.frame_buffer_size", 1.0, 16.0),
    ("stream.guidance_scale", 0.0, 30.0),
    ("stream.delta", 0.0, 10.0),
    // Any TOML integer that is not negative.
    ("stream.seed", 0.0, i64::MAX as f64),
    ("stream.similarity_threshold", 0.001, 0.999),
    ("stream.max_skip_frame", 0.0, 1000.0),
    ("stream.prompt_blend_frames", 0.0, 600.0),
];

/// The range [`RANGES`] gives `key` (`model.lora[2].scale` is `model.lora.scale`).
pub fn range_of(key: &str) -> Option<(f64, f64)> {
    let base: String = {
        let mut out = String::new();
        let mut skip = false;
        for c in key.chars() {
            match c {
                '[' => skip = true,
                ']' => skip = false,
                _ if !skip => out.push(c),
                _ => {}
            }
        }
        out
    };
    RANGES
        .iter()
        .find(|(k, _, _)| *k == base)
        .map(|&(_, lo, hi)| (lo, hi))
}

/// The message for a value outside its key's range, or `None` when it is inside.
fn out_of_range(key: &str, v: f64) -> Option<String> {
    let (lo, hi) = range_of(key).unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
    if v.is_finite() && (lo..=hi).contains(&v) {
        return None;
    }
    let unit = if key.ends_with(".fps") {
        " frames per second"
    } else {
        ""
    };
    Some(format!("{v} is out of range ({lo} to {hi}{unit})"))
}

/// Validates value ranges and cross-key rules; returns (key, message) pairs.
pub fn validate(p: &Profile) -> Vec<(String, String)> {
    let mut errs = Vec::new();
    let mut err = |k: &str, m: String| errs.push((k.to_string(), m));
    let num = |k: &str, v: f64, err: &mut dyn FnMut(&str, String)| {
        if let Some(m) = out_of_range(k, v) {
            err(k, m);
        }
    };
    let s = &p.source;
    num("source.width", s.width.into(), &mut err);
    num("source.height", s.height.into(), &mut err);
    num("source.fps", s.fps, &mut err);
    if s.kind == SourceKind::File && s.path.as_deref().unwrap_or("").is_empty() {
        err(
            "source.path",
            "a file source needs `path` (a .y4m, .png or .jpg file, or \"-\" for stdin)".into(),
        );
    }
    if s.kind == SourceKind::Camera && s.device.trim().is_empty() {
        err(
            "source.device",
            "a camera source needs a device path or name".into(),
        );
    }
    if let Some(r) = &s.region {
        num("source.region.x", r.x.into(), &mut err);
        num("source.region.y", r.y.into(), &mut err);
        num("source.region.width", r.width.into(), &mut err);
        num("source.region.height", r.height.into(), &mut err);
    }
    let o = &p.output;
    num("output.width", o.width.into(), &mut err);
    num("output.height", o.height.into(), &mut err);
    num("output.fps", o.fps, &mut err);
    if o.kind == OutputKind::V4l2loopback {
        if !o.width.is_multiple_of(2) {
            err(
                "output.width",
                format!("{} is odd; v4l2loopback needs an even width", o.width),
            );
        }
        if o.format == OutputFormatName::I420 && !o.height.is_multiple_of(2) {
            err(
                "output.height",
                format!("{} is odd; i420 needs an even height", o.height),
            );
        }
        if o.device.is_none() && o.label.trim().is_empty() {
            err(
                "output.label",
                "give the loopback's card label or a device path".into(),
            );
        }
    }
    if matches!(o.kind, OutputKind::Y4m | OutputKind::Png) && o.path.trim().is_empty() {
        err("output.path", "a file output needs a path".into());
    }
    num("output.every", o.every as f64, &mut err);
    num("output.idle_fps", o.idle_fps, &mut err);
    let st = &p.stream;
    for (k, v) in [("stream.width", st.width), ("stream.height", st.height)] {
        if let Some(v) = v.px() {
            if let Some(m) = out_of_range(k, v.into()) {
                err(k, format!("{m}, or \"auto\""));
            } else if v % 8 != 0 {
                err(
                    k,
                    format!("{v} must be a multiple of 8 (from 64 to 2048), or \"auto\""),
                );
            }
        }
    }
    num(
        "stream.num_inference_steps",
        st.num_inference_steps.into(),
        &mut err,
    );
    if st.t_index_list.is_empty() {
        err(
            "stream.t_index_list",
            "needs at least one step, e.g. [35]".into(),
        );
    } else if st.t_index_list.len() > 16 {
        err("stream.t_index_list", "at most 16 steps".into());
    }
    if st.t_index_list.windows(2).any(|w| w[0] >= w[1]) {
        err(
            "stream.t_index_list",
            format!("{:?} must be strictly increasing", st.t_index_list),
        );
    }
    if let Some(&t) = st
        .t_index_list
        .iter()
        .find(|&&t| t >= st.num_inference_steps)
    {
        err(
            "stream.t_index_list",
            format!(
                "index {t} is not below num_inference_steps ({})",
                st.num_inference_steps
            ),
        );
    }
    num(
        "stream.frame_buffer_size",
        st.frame_buffer_size.into(),
        &mut err,
    );
    num("stream.guidance_scale", st.guidance_scale, &mut err);
    num("stream.delta", st.delta, &mut err);
    num("stream.seed", st.seed as f64, &mut err);
    num(
        "stream.similarity_threshold",
        st.similarity_threshold,
        &mut err,
    );
    num("stream.max_skip_frame", st.max_skip_frame.into(), &mut err);
    num(
        "stream.prompt_blend_frames",
        st.prompt_blend_frames.into(),
        &mut err,
    );
    if p.transform == TransformKind::Diffusion && p.model.id.trim().is_empty() {
        err(
            "model.id",
            "the diffusion transform needs a model id or folder".into(),
        );
    }
    for (i, l) in p.model.lora.iter().enumerate() {
        num(&format!("model.lora[{i}].scale"), l.scale, &mut err);
    }
    errs
}

/// Parses profile text. `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<(Profile, toml::Table), ProfileError> {
    let fail = |problems| ProfileError {
        file: file.to_string(),
        problems,
    };
    let doc = toml_edit::Document::parse(text.to_string()).map_err(|e| {
        let at = e.span().map(|s| line_col(text, s.start));
        fail(vec![Problem {
            at,
            key: String::new(),
            message: format!("TOML syntax error: {}", e.message().trim()),
        }])
    })?;
    let profile: Profile = toml::from_str(text).map_err(|e| {
        let (at, key) = match e.span() {
            Some(s) => (
                Some(line_col(text, s.start)),
                path_at(doc.as_table(), s.start, "").unwrap_or_default(),
            ),
            None => (None, String::new()),
        };
        fail(vec![Problem {
            at,
            key,
            message: e.message().trim().to_string(),
        }])
    })?;
    let problems: Vec<Problem> = validate(&profile)
        .into_iter()
        .map(|(key, message)| {
            let base = key.split('[').next().unwrap_or(&key).to_string();
            let at = span_of(&doc, &key)
                .or_else(|| span_of(&doc, &base))
                .map(|s| line_col(text, s.start));
            Problem { at, key, message }
        })
        .collect();
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    let raw: toml::Table = toml::from_str(text).map_err(|e| {
        fail(vec![Problem {
            at: None,
            key: String::new(),
            message: e.message().to_string(),
        }])
    })?;
    Ok((profile, raw))
}

/// Every settable key (dotted), from the schema's defaults.
pub fn known_keys() -> Vec<String> {
    let mut keys = Vec::new();
    let Ok(toml::Value::Table(t)) = toml::Value::try_from(Profile::default()) else {
        return keys;
    };
    fn walk(t: &toml::Table, prefix: &str, keys: &mut Vec<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(inner, &path, keys),
                _ => keys.push(path),
            }
        }
    }
    walk(&t, "", &mut keys);
    // Optional keys that serialise to nothing by default.
    for k in [
        "name",
        "source.path",
        "source.display",
        "source.region",
        "output.device",
        "model.revision",
    ] {
        keys.push(k.to_string());
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Model, noise and idle-image paths written `./…` or `../…` in a profile file are relative to the file's
/// folder (so a profile can ship next to its model); everything else stays as written. Returns
/// whether anything changed.
fn resolve_relative_paths(raw: &mut toml::Table, dir: &Path) -> bool {
    fn fix(v: &mut toml::Value, dir: &Path) -> bool {
        match v {
            toml::Value::String(s) if s.starts_with("./") || s.starts_with("../") => {
                *s = dir.join(&*s).display().to_string();
                true
            }
            _ => false,
        }
    }
    let mut changed = false;
    if let Some(toml::Value::Table(m)) = raw.get_mut("model") {
        for key in ["id", "tiny_vae"] {
            if let Some(v) = m.get_mut(key) {
                changed |= fix(v, dir);
            }
        }
        if let Some(toml::Value::Array(loras)) = m.get_mut("lora") {
            for l in loras {
                if let Some(v) = l.get_mut("id") {
                    changed |= fix(v, dir);
                }
            }
        }
    }
    if let Some(toml::Value::Table(s)) = raw.get_mut("stream") {
        if let Some(v) = s.get_mut("noise_file") {
            changed |= fix(v, dir);
        }
    }
    if let Some(toml::Value::Table(o)) = raw.get_mut("output") {
        if let Some(v) = o.get_mut("idle_image") {
            changed |= fix(v, dir);
        }
    }
    changed
}

/// Resolves a short key (`guidance_scale`) to its full path (`stream.guidance_scale`) when unique.
pub fn resolve_key(key: &str) -> Result<String, String> {
    let keys = known_keys();
    if keys.iter().any(|k| k == key) {
        return Ok(key.to_string());
    }
    let matches: Vec<&String> = keys
        .iter()
        .filter(|k| k.rsplit('.').next() == Some(key))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "unknown key `{key}` (see `sdcam keys` for the list)"
        )),
        many => Err(format!(
            "key `{key}` is ambiguous: {}",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Parses a value typed on the command line: TOML syntax if it parses (`1.5`, `[32, 45]`, `true`,
/// `"text"`), otherwise the raw text as a string (so `prompt a cat` needs no quotes).
pub fn parse_value(text: &str) -> toml::Value {
    let text = text.trim();
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn insert_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().ok_or("empty key")?;
    let mut t = table;
    for part in parts {
        let entry = t
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

impl LoadedProfile {
    /// The current value of a (possibly short) key, as TOML text.
    pub fn get(&self, key: &str) -> Result<String, String> {
        let full = resolve_key(key)?;
        let value = toml::Value::try_from(&self.profile).map_err(|e| e.to_string())?;
        let mut v = &value;
        for part in full.split('.') {
            match v.get(part) {
                Some(inner) => v = inner,
                None => return Ok(format!("{full} is not set")),
            }
        }
        Ok(format!("{full} = {v}"))
    }

    /// Reads and validates a profile file (a regular file of at most [`MAX_PROFILE_BYTES`]).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = read_profile_bytes(path)?;
        Self::from_bytes(&bytes, path)
    }

    /// A profile from the bytes of the file `path` (which is not read): the size cap, the UTF-8
    /// check, parsing, validation and `./` paths made relative to `path`'s folder, as
    /// [`LoadedProfile::load`] does (also used by [`crate::fuzzing::profile`]).
    pub(crate) fn from_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<Self> {
        let text = profile_text(bytes, path)?;
        let (mut profile, mut raw) = parse(text, &path.display().to_string())?;
        if let Some(dir) = path.parent() {
            if resolve_relative_paths(&mut raw, dir) {
                profile = toml::Value::Table(raw.clone())
                    .try_into()
                    .with_context(|| format!("profile {}", path.display()))?;
            }
        }
        Ok(LoadedProfile {
            path: Some(path.to_path_buf()),
            profile,
            raw,
            overrides: Vec::new(),
        })
    }

    /// A copy with `key` set to `value` (TOML syntax or bare text), validated. `self` is unchanged.
    pub fn with_set(&self, key: &str, value: &str) -> Result<LoadedProfile, ProfileError> {
        self.with_value(key, parse_value(value), "<set>")
    }

    /// A copy with `key` set to an already-typed value, validated; `origin` names it in errors.
    pub fn with_value(
        &self,
        key: &str,
        value: toml::Value,
        origin: &str,
    ) -> Result<LoadedProfile, ProfileError> {
        self.with_values(&[(key.to_string(), value)], origin)
    }

    /// A copy with several keys set at once and validated together (so that, e.g., a source
    /// kind and the path it needs can change in one step).
    pub fn with_values(
        &self,
        edits: &[(String, toml::Value)],
        origin: &str,
    ) -> Result<LoadedProfile, ProfileError> {
        let fail = |key: &str, message: String| ProfileError {
            file: origin.to_string(),
            problems: vec![Problem {
                at: None,
                key: key.to_string(),
                message,
            }],
        };
        let mut raw = self.raw.clone();
        let mut last = String::new();
        for (key, value) in edits {
            let full = resolve_key(key).map_err(|m| fail(key, m))?;
            insert_path(&mut raw, &full, value.clone()).map_err(|m| fail(&full, m))?;
            last = full;
        }
        let profile: Profile = toml::Value::Table(raw.clone())
            .try_into()
            .map_err(|e: toml::de::Error| fail(&last, e.message().trim().to_string()))?;
        let problems: Vec<Problem> = validate(&profile)
            .into_iter()
            .map(|(key, message)| Problem {
                at: None,
                key,
                message,
            })
            .collect();
        if !problems.is_empty() {
            return Err(ProfileError {
                file: origin.to_string(),
                problems,
            });
        }
        Ok(LoadedProfile {
            path: self.path.clone(),
            profile,
            raw,
            overrides: self.overrides.clone(),
        })
    }

    /// A copy with the top-level `parts` (`"stream"`, `"output"`, `"prompt"`, …) as `other` has
    /// them, in the raw table and the settings alike: how a stage that kept its settings puts
    /// them back, so a later `set` (which starts from the raw table) does not revive the
    /// refused ones. Parts validate on their own, so the copy needs no new validation.
    pub fn with_parts_of(&self, other: &LoadedProfile, parts: &[&str]) -> LoadedProfile {
        let mut next = self.clone();
        for &part in parts {
            match other.raw.get(part) {
                Some(v) => next.raw.insert(part.to_string(), v.clone()),
                None => next.raw.remove(part),
            };
            let (p, o) = (&mut next.profile, &other.profile);
            match part {
                "prompt" => p.prompt.clone_from(&o.prompt),
                "negative_prompt" => p.negative_prompt.clone_from(&o.negative_prompt),
                "prompts" => p.prompts.clone_from(&o.prompts),
                "transform" => p.transform = o.transform,
                "source" => p.source.clone_from(&o.source),
                "output" => p.output.clone_from(&o.output),
                "model" => p.model.clone_from(&o.model),
                "stream" => p.stream.clone_from(&o.stream),
                other => debug_assert!(false, "with_parts_of: no part {other:?}"),
            }
        }
        next
    }

    /// Applies command-line overrides together and remembers them for reloads.
    pub fn with_overrides(
        &self,
        edits: &[(String, toml::Value)],
    ) -> Result<LoadedProfile, ProfileError> {
        let mut next = self.with_values(edits, "<command line>")?;
        next.overrides
            .extend(edits.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(next)
    }

    /// Applies a command-line override and remembers it for reloads.
    pub fn with_override(
        &self,
        key: &str,
        value: toml::Value,
    ) -> Result<LoadedProfile, ProfileError> {
        self.with_overrides(&[(key.to_string(), value)])
    }

    /// Re-reads the file (or switches to `path`) and re-applies the command-line overrides.
    /// On any error `self` stays as it was.
    pub fn reload(&self, path: Option<&Path>) -> anyhow::Result<LoadedProfile> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| self.path.clone())
            .context("this run has no profile file to reload (started without --profile)")?;
        let next = LoadedProfile::load(&path)?;
        Ok(next.with_overrides(&self.overrides)?)
    }
}

/// The largest profile file read (real ones are a few KiB).
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The bytes of a profile file: refuses what is not a regular file (`/dev/zero`, a FIFO that
/// would block the control loop, a directory) before reading, and reads at most one byte more
/// than [`MAX_PROFILE_BYTES`] (refused by [`profile_text`]); names the file in every error.
fn read_profile_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read profile {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!(
            "profile {} is not a regular file (a device, FIFO or folder)",
            path.display()
        );
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read profile {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read profile {}", path.display()))?;
    Ok(bytes)
}

/// The text of the profile file `path` from its bytes: refuses more than
/// [`MAX_PROFILE_BYTES`] and what is not UTF-8, naming the file.
fn profile_text<'a>(bytes: &'a [u8], path: &Path) -> anyhow::Result<&'a str> {
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        anyhow::bail!(
            "profile {} is larger than {} KiB: not a profile",
            path.display(),
            MAX_PROFILE_BYTES / 1024
        );
    }
    std::str::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "profile {} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests;
