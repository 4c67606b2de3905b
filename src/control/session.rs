//! The live-control state machine of a run: applies profile changes (stdin commands, signals,
//! reloads) stage by stage to a running [`Relay`], builds new transforms in the background, and
//! keeps one owner for each piece of state.
//!
//! The transform is built by an injected [`Builder`] (the run passes [`transform::build`]), so
//! the state machine is tested without a model (see the tests below).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver};

use crate::config;
use crate::control::{self, Command, Event, Work};
use crate::profile::geometry::{self, StreamSize};
use crate::profile::{LoadedProfile, Profile};
use crate::relay::{PreprocessConfig, Relay};
use crate::transform::{self, Transform, TransformOptions};
use crate::Result;

/// Builds the transform the options of a (resolved) profile ask for
/// ([`config::transform_options`]); runs on a loader thread.
pub type Builder = Arc<dyn Fn(&TransformOptions) -> Result<Box<dyn Transform>> + Send + Sync>;

/// The builder of a real run: [`transform::build`].
pub fn default_builder() -> Builder {
    Arc::new(transform::build)
}

/// The top-level profile parts the transform runs (the others belong to the source and output).
const TRANSFORM_PARTS: &[&str] = &["transform", "model", "prompt", "negative_prompt", "stream"];

/// A transform being built on a background thread (a model load can take minutes); the relay
/// keeps streaming the current transform's output meanwhile.
struct PendingBuild {
    rx: Receiver<Result<Box<dyn Transform>>>,
    /// The profile whose transform parts ([`TRANSFORM_PARTS`]) the running transform runs:
    /// what the session goes back to if the build fails.
    runs: LoadedProfile,
    /// The first build of the run: failing it ends the run.
    initial: bool,
    /// The change that started it (`set model.lora`), logged as applied once installed.
    what: String,
}

fn spawn_build(build: &Builder, p: &Profile) -> Receiver<Result<Box<dyn Transform>>> {
    let (tx, rx) = bounded(1);
    let p = config::transform_options(p);
    let build = build.clone();
    let spawned = std::thread::Builder::new()
        .name("sdcam-load".into())
        .spawn(move || {
            let _ = tx.send(build(&p));
        });
    if let Err(e) = spawned {
        let (tx, rx2) = bounded(1);
        let _ = tx.send(Err(anyhow::anyhow!("cannot start the loader thread: {e}")));
        return rx2;
    }
    rx
}

/// The live state of a run: the relay and the profile its stages run.
pub struct Session {
    relay: Relay,
    build: Builder,
    /// The profile as written (stream sizes may be `"auto"`).
    current: LoadedProfile,
    /// What the stages run: `current` resolved by [`geometry::running`] (sizes in pixels).
    running: Profile,
    /// How the running stream size came about (for the log and `get`).
    stream_size: StreamSize,
    /// The pre-processing the capture stage has.
    pre: PreprocessConfig,
    playlist_pos: usize,
    pending: Option<PendingBuild>,
}

impl Session {
    /// Takes over a started relay (running `profile`, no transform yet) and starts building the
    /// first transform in the background.
    pub fn new(relay: Relay, profile: LoadedProfile, build: Builder) -> Session {
        let (running, stream_size) = geometry::running(&profile.profile);
        let pending = PendingBuild {
            rx: spawn_build(&build, &running),
            runs: profile.clone(),
            initial: true,
            what: "start".into(),
        };
        Session {
            pre: crate::config::preprocess(&running),
            relay,
            build,
            current: profile,
            running,
            stream_size,
            playlist_pos: 0,
            pending: Some(pending),
        }
    }

    /// The relay the session controls.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Gives the relay back (to stop and join it).
    pub fn into_relay(self) -> Relay {
        self.relay
    }

    /// Where the background build's result arrives, while one runs.
    pub fn pending_build(&self) -> Option<&Receiver<Result<Box<dyn Transform>>>> {
        self.pending.as_ref().map(|p| &p.rx)
    }

    /// The answer to `get KEY`: the value as written, and what runs where that differs.
    ///
    /// # Errors
    /// An unknown or ambiguous key.
    pub fn get(&self, key: &str) -> Result<String> {
        self.current
            .get(key)
            .map(|v| format!("{v}{}", self.running_note(key)))
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// Makes `run` the running profile, logging the stream size when it changes.
    fn set_running(&mut self, run: Profile, size: StreamSize) {
        if size != self.stream_size {
            tracing::info!("stream {size}");
        }
        self.running = run;
        self.stream_size = size;
    }

    /// Sends the running profile's pre-processing to the capture stage. A new size waits while
    /// a transform is loading (`loading`): the transform that runs meanwhile was prepared for
    /// the old one; [`Session::finish_build`] sends it once the new transform is in.
    fn sync_preprocess(&mut self, loading: bool) -> Result<()> {
        let pre = crate::config::preprocess(&self.running);
        if pre == self.pre
            || (loading && (pre.width, pre.height) != (self.pre.width, self.pre.height))
        {
            return Ok(());
        }
        self.relay.set_preprocess(pre)?;
        self.pre = pre;
        Ok(())
    }

    /// Applies a new profile stage by stage; a stage that fails keeps its old settings, and
    /// the session's profile takes that stage's parts back from what runs (raw table included,
    /// so the next edit does not revive them). The stages get the profile resolved
    /// ([`geometry::running`]): with an auto stream size, an output size change prepares the
    /// stream again at the output's new aspect ratio. The capture stage gets a new stream size
    /// only once the transform took it: the transform owns the stream size.
    fn apply(&mut self, mut next: LoadedProfile, what: &str) {
        let old = self.current.clone();
        let old_run = self.running.clone();
        let old_size = self.stream_size.clone();
        let mut failed = Vec::new();
        let (mut loading, mut deferred) = (false, false);
        if next.profile.source != old.profile.source {
            if let Err(e) = self
                .relay
                .set_source(crate::config::source_options(&next.profile.source))
            {
                failed.push(format!("source kept: {e:#}"));
                next = next.with_parts_of(&old, &["source"]);
            }
        }
        let new = &next.profile;
        let rebuild = new.transform != old.profile.transform || new.model != old.profile.model;
        let (new_run, size) = geometry::running(new);
        self.set_running(new_run.clone(), size);
        if rebuild {
            // Built in the background; a newer change supersedes one still loading.
            tracing::info!(
                "{what}: building the {:?} transform in the background; the output keeps the \
                 current one until it is ready",
                new.transform
            );
            // A build that supersedes the first one is the first one: nothing runs yet to
            // fall back on, so its failure ends the run (else the relay would wait forever).
            let initial = self.pending.as_ref().is_some_and(|p| p.initial);
            if let Some(p) = self.pending.as_ref().filter(|p| !p.initial) {
                tracing::info!("{}: superseded by {what}", p.what);
            }
            // What the running transform runs: the profile before the first of the builds.
            let runs = match self.pending.take() {
                Some(p) if !p.initial => p.runs,
                _ => old.clone(),
            };
            self.pending = Some(PendingBuild {
                rx: spawn_build(&self.build, &new_run),
                runs,
                initial,
                what: what.to_string(),
            });
            loading = true;
        } else if self.pending.is_some() {
            // The transform that is loading picks these settings up when it is ready.
            deferred = true;
        } else if new_run.prompt != old_run.prompt
            || new_run.negative_prompt != old_run.negative_prompt
            || new_run.stream != old_run.stream
        {
            if let Err(e) = self.apply_settings(&new_run) {
                failed.push(format!("transform settings kept: {e:#}"));
                let mut parts = vec!["prompt", "negative_prompt", "stream"];
                if new_run.stream.width != old_run.stream.width
                    || new_run.stream.height != old_run.stream.height
                {
                    // The new size may have come from the output's (auto stream size): the
                    // output stays with the stream it was sized for.
                    parts.push("output");
                }
                next = next.with_parts_of(&old, &parts);
            }
        }
        let run_now = geometry::running(&next.profile).0;
        if run_now.output != old_run.output {
            if config::every_frame(&next.profile) != config::every_frame(&old.profile) {
                tracing::warn!("output.pacing changes take effect when sdcam is restarted");
            }
            if let Err(e) = self
                .relay
                .set_output(crate::config::output_options(&run_now.output))
            {
                failed.push(format!("output kept: {e:#}"));
                next = next.with_parts_of(&old, &["output"]);
            }
        }
        // A stage that kept its settings may leave the stream sized for settings that did not
        // apply (an output that failed to open): bring the others back in line.
        let (final_run, size) = geometry::running(&next.profile);
        if final_run != self.running {
            let stream_changed = final_run.stream != self.running.stream;
            self.set_running(final_run, size);
            if stream_changed && self.pending.is_none() {
                if let Err(e) = self.apply_settings(&self.running) {
                    failed.push(format!("transform settings kept: {e:#}"));
                }
            }
        }
        // Last: the capture stage follows the size the transform took.
        if let Err(e) = self.sync_preprocess(self.pending.is_some()) {
            failed.push(format!("pre-processing kept: {e:#}"));
        }
        if next.profile.prompts != old.profile.prompts {
            self.playlist_pos = 0;
        }
        if let Some(w) = geometry::unused_output_fit(&next.profile, &self.stream_size) {
            if geometry::unused_output_fit(&old.profile, &old_size).is_none() {
                tracing::warn!("{w}");
            }
        }
        if loading {
            // Not applied yet: `finish_build` says so once the new transform is installed.
            tracing::info!("{what}: loading; applied when the new transform is ready");
        } else if deferred {
            tracing::info!("{what}: takes effect when the transform that is loading is ready");
        } else if failed.is_empty() {
            tracing::info!("{what}: applied");
        }
        for f in &failed {
            tracing::error!("{what}: {f}");
        }
        self.current = next;
    }

    /// The one place the running transform gets new settings (prompt, stream keys, size); on
    /// error it keeps running with its previous ones.
    fn apply_settings(&self, run: &Profile) -> Result<()> {
        self.relay.apply_transform(&config::transform_options(run))
    }

    /// A background build finished: install it (with the latest settings), or keep the
    /// running transform and give it the settings that changed while the other one loaded.
    ///
    /// # Errors
    /// Only a failed initial build (nothing runs to fall back on: the run ends).
    pub fn finish_build(&mut self, r: Result<Box<dyn Transform>>) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        // Resolved again: the model's config may have just been downloaded (its native size).
        let (run, size) = geometry::running(&self.current.profile);
        let installed = r.and_then(|mut t| {
            // Settings changed while it loaded (prompt, stream keys, size) apply now.
            t.apply(&config::transform_options(&run))?;
            self.relay.replace_transform(t)
        });
        match installed {
            Ok(()) => {
                self.set_running(run, size);
                if let Err(e) = self.sync_preprocess(false) {
                    tracing::error!("pre-processing kept: {e:#}");
                }
                if !p.initial {
                    tracing::info!("{}: applied", p.what);
                }
                Ok(())
            }
            Err(e) if p.initial => Err(e.context("building the transform")),
            Err(e) => {
                tracing::error!(
                    "{}: transform kept (the new one failed to build): {e:#}",
                    p.what
                );
                // What runs: the old transform with the settings it had, everything else as
                // the session has it. What is wanted: the latest profile with the old
                // transform and model. Applying one onto the other gives the running
                // transform what changed while the other one loaded, or keeps (and puts
                // back) what it refuses.
                let wanted = self.current.with_parts_of(&p.runs, &["transform", "model"]);
                self.current = self.current.with_parts_of(&p.runs, TRANSFORM_PARTS);
                self.running = geometry::running(&self.current.profile).0;
                if wanted.profile != self.current.profile {
                    self.apply(wanted, &format!("settings changed while {} loaded", p.what));
                } else {
                    let (run, size) = geometry::running(&self.current.profile);
                    self.set_running(run, size);
                    if let Err(e) = self.sync_preprocess(false) {
                        tracing::error!("pre-processing kept: {e:#}");
                    }
                }
                Ok(())
            }
        }
    }

    /// Advances the prompt playlist by `n` positions and applies the prompt there once.
    fn next(&mut self, n: usize) -> Result<()> {
        let list = &self.current.profile.prompts;
        if list.is_empty() {
            anyhow::bail!("the profile has no `prompts` playlist");
        }
        self.playlist_pos = (self.playlist_pos + n % list.len()) % list.len();
        let p = list[self.playlist_pos].clone();
        let next = self
            .current
            .with_value("prompt", toml::Value::String(p.clone()), "<next>")
            .map_err(|e| anyhow::anyhow!("{e}; nothing changed"))?;
        self.apply(next, &format!("prompt {p:?}"));
        Ok(())
    }

    /// Does a batch of queued events ([`control::coalesce`]); returns false when the run should
    /// stop. A stop asked for meanwhile (a signal while a change was applied) preempts the
    /// rest of the batch.
    pub fn handle_batch(&mut self, batch: Vec<Event>, stop: &AtomicBool) -> bool {
        for work in control::coalesce(batch) {
            if stop.load(Relaxed) {
                return false;
            }
            let go_on = match work {
                Work::Stop => false,
                Work::Next(n) => {
                    if let Err(e) = self.next(n) {
                        tracing::error!("{e:#}");
                    }
                    true
                }
                Work::Event(ev) => self.handle(ev),
            };
            if !go_on {
                return false;
            }
        }
        !stop.load(Relaxed)
    }

    /// For `get`: what runs, where it differs from what is written (an auto stream size, the
    /// output fit it implies).
    fn running_note(&self, key: &str) -> String {
        match crate::profile::resolve_key(key).as_deref() {
            Ok("stream.width" | "stream.height") => format!(" (running: {})", self.stream_size),
            Ok("output.fit") if self.running.output.fit != self.current.profile.output.fit => {
                format!(
                    " (running: stretch, the stream has the output's aspect: {})",
                    self.stream_size
                )
            }
            _ => String::new(),
        }
    }

    /// Handles one event; returns false when the run should stop.
    fn handle(&mut self, ev: Event) -> bool {
        let cmd = match ev {
            Event::Command(c) => c,
            Event::Invalid(msg) => {
                tracing::error!("{msg}");
                return true;
            }
            Event::InputClosed => {
                tracing::debug!("stdin closed; signals still work");
                return true;
            }
            Event::Stop => return false,
        };
        let text = |s: &str| toml::Value::String(s.to_string());
        let edit = |r: Result<LoadedProfile, crate::profile::ProfileError>| {
            r.map_err(|e| anyhow::anyhow!("{e}; nothing changed"))
        };
        let result: Result<()> = match cmd {
            Command::Prompt(p) => edit(self.current.with_value("prompt", text(&p), "<prompt>"))
                .map(|n| {
                    self.apply(n, &format!("prompt {p:?}"));
                }),
            Command::Negative(p) => edit(self.current.with_value(
                "negative_prompt",
                text(&p),
                "<negative>",
            ))
            .map(|n| self.apply(n, &format!("negative prompt {p:?}"))),
            Command::Set { key, value } => edit(self.current.with_set(&key, &value))
                .map(|n| self.apply(n, &format!("set {key}"))),
            Command::Get(key) => self.get(&key).map(|v| crate::term::eprintln(&v)),
            Command::Profile(path) => self
                .current
                .reload(Some(&path))
                .map(|n| self.apply(n, &format!("profile {}", path.display())))
                .map_err(|e| e.context("profile switch failed; the running settings stay")),
            Command::Reload => self
                .current
                .reload(None)
                .map(|n| self.apply(n, "reload"))
                .map_err(|e| e.context("reload failed; the running settings stay")),
            Command::Next => self.next(1),
            Command::Pause => {
                self.relay.set_paused(true);
                tracing::info!("paused: the output holds the current frame");
                Ok(())
            }
            Command::Resume => {
                self.relay.set_paused(false);
                tracing::info!("resumed");
                Ok(())
            }
            Command::Demand(c) => self
                .relay
                .demand(c)
                .map(|()| tracing::info!("on-demand: {c:?} applied")),
            Command::Snapshot(path) => self
                .relay
                .snapshot(path)
                .map(|p| tracing::info!("snapshot written to {}", p.display())),
            Command::Stats => {
                crate::term::eprintln(&self.relay.stats().snapshot().to_string());
                Ok(())
            }
            Command::Help => {
                crate::term::eprintln(control::HELP);
                Ok(())
            }
            Command::Quit => return false,
        };
        if let Err(e) = result {
            tracing::error!("{e:#}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    //! The state machine with a probe transform built by an injected builder: a builder that
    //! fails for `model.id = "/bad"`, and a transform that refuses one stream width.

    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::frame::Frame;
    use crate::relay::{DeviceOpener, Opener, RelayStart};

    /// What the probe transforms saw: builds asked for, and the settings last accepted.
    #[derive(Default)]
    struct ProbeLog {
        builds: usize,
        /// (prompt, stream width) of the last accepted `apply`.
        applied: Option<(String, u32)>,
        /// `apply` with this stream width fails (a re-prepare that cannot be done).
        refuse_width: Option<u32>,
    }

    struct Probe(Arc<Mutex<ProbeLog>>);

    /// The stream width the options carry (resolved from the profile by `geometry`).
    fn options_width(o: &TransformOptions) -> u32 {
        o.stream.width as u32
    }

    impl Transform for Probe {
        fn name(&self) -> String {
            "probe".into()
        }
        fn process(&mut self, input: &Frame) -> Result<Frame> {
            Ok(input.clone())
        }
        fn apply(&mut self, o: &TransformOptions) -> Result<()> {
            let mut log = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            anyhow::ensure!(
                log.refuse_width != Some(options_width(o)),
                "cannot prepare the stream at width {}",
                options_width(o)
            );
            log.applied = Some((o.prompt.clone(), options_width(o)));
            Ok(())
        }
    }

    fn builder(log: &Arc<Mutex<ProbeLog>>) -> Builder {
        let log = log.clone();
        Arc::new(move |o: &TransformOptions| {
            log.lock().unwrap().builds += 1;
            anyhow::ensure!(o.model.id != "/bad", "no model at /bad");
            let mut t: Box<dyn Transform> = Box::new(Probe(log.clone()));
            t.apply(o)?;
            Ok(t)
        })
    }

    /// A session on a 64x64 stream (pattern source, null output) whose first build is in.
    fn session(log: &Arc<Mutex<ProbeLog>>) -> Session {
        let s = |v: &str| toml::Value::String(v.into());
        let lp = LoadedProfile::default()
            .with_values(
                &[
                    ("source.kind".into(), s("pattern")),
                    ("output.kind".into(), s("null")),
                    ("stream.width".into(), toml::Value::Integer(64)),
                    ("stream.height".into(), toml::Value::Integer(64)),
                    ("prompt".into(), s("start")),
                ],
                "<test>",
            )
            .unwrap();
        let p = &lp.profile;
        let (running, _) = geometry::running(p);
        let opener = Arc::new(DeviceOpener);
        let relay = Relay::start(RelayStart {
            source: opener
                .source(&crate::config::source_options(&p.source))
                .unwrap(),
            source_cfg: crate::config::source_options(&p.source),
            transform: None,
            sink: opener
                .sink(&crate::config::output_options(&p.output))
                .unwrap(),
            output_cfg: crate::config::output_options(&running.output),
            preprocess: crate::config::preprocess(&running),
            every_frame: false,
            max_frames: None,
            opener,
        })
        .unwrap();
        let mut s = Session::new(relay, lp, builder(log));
        settle(&mut s).unwrap();
        s
    }

    /// Waits for the background build and hands its result to the session.
    fn settle(s: &mut Session) -> Result<()> {
        let r = s
            .pending_build()
            .expect("a build is pending")
            .recv_timeout(Duration::from_secs(20))
            .expect("the build finished");
        s.finish_build(r)
    }

    fn send(s: &mut Session, c: Command) {
        assert!(s.handle(Event::Command(c)));
    }

    fn set(s: &mut Session, key: &str, value: &str) {
        send(
            s,
            Command::Set {
                key: key.into(),
                value: value.into(),
            },
        );
    }

    fn applied(log: &Arc<Mutex<ProbeLog>>) -> (String, u32) {
        log.lock().unwrap().applied.clone().unwrap()
    }

    fn stop(s: Session) {
        let relay = s.into_relay();
        relay.request_stop();
        relay.join().unwrap();
    }

    #[test]
    fn a_prompt_reaches_the_running_transform() {
        let log = Arc::default();
        let mut s = session(&log);
        assert_eq!(applied(&log), ("start".into(), 64));
        send(&mut s, Command::Prompt("a fox".into()));
        assert_eq!(applied(&log), ("a fox".into(), 64));
        assert!(s.get("prompt").unwrap().contains("a fox"));
        stop(s);
    }

    /// A failed build restores the model everywhere (the raw table too): the next edit does
    /// not bring the failed model back and start another build.
    #[test]
    fn a_failed_build_is_not_brought_back_by_the_next_edit() {
        let log: Arc<Mutex<ProbeLog>> = Arc::default();
        let mut s = session(&log);
        set(&mut s, "model.id", "/bad");
        assert!(
            settle(&mut s).is_ok(),
            "a failed rebuild keeps the run going"
        );
        assert!(!s.get("model.id").unwrap().contains("/bad"));
        send(&mut s, Command::Prompt("a fox".into()));
        assert!(s.pending_build().is_none(), "the prompt started a build");
        assert_eq!(log.lock().unwrap().builds, 2);
        assert_eq!(applied(&log), ("a fox".into(), 64));
        assert!(!s.get("model.id").unwrap().contains("/bad"));
        stop(s);
    }

    /// Settings changed while a build loads reach the running transform when the build fails.
    #[test]
    fn settings_changed_while_loading_apply_when_the_load_fails() {
        let log: Arc<Mutex<ProbeLog>> = Arc::default();
        let mut s = session(&log);
        set(&mut s, "model.id", "/bad");
        send(&mut s, Command::Prompt("a fox".into()));
        set(&mut s, "stream.width", "96");
        settle(&mut s).unwrap();
        assert_eq!(applied(&log), ("a fox".into(), 96));
        assert_eq!(s.pre.width, 96, "capture follows the transform");
        assert!(s
            .get("stream.width")
            .unwrap()
            .starts_with("stream.width = 96"));
        stop(s);
    }

    /// A size changed while a build loads, which the running transform then refuses when the
    /// build fails: capture, transform and the profile all stay at the size that runs.
    #[test]
    fn a_size_refused_after_a_failed_load_keeps_capture_transform_and_profile_together() {
        let log: Arc<Mutex<ProbeLog>> = Arc::default();
        let mut s = session(&log);
        log.lock().unwrap().refuse_width = Some(96);
        set(&mut s, "model.id", "/bad");
        set(&mut s, "stream.width", "96");
        settle(&mut s).unwrap();
        assert_eq!(applied(&log).1, 64);
        assert_eq!(s.pre.width, 64, "capture at the size the transform runs");
        let got = s.get("stream.width").unwrap();
        assert!(got.starts_with("stream.width = 64"), "{got}");
        // And the next edit does not bring the refused size back.
        send(&mut s, Command::Prompt("a fox".into()));
        assert_eq!(applied(&log), ("a fox".into(), 64));
        assert_eq!(s.pre.width, 64);
        stop(s);
    }

    /// A stream size the transform cannot prepare is kept out of the profile, so the next edit
    /// (a prompt) applies instead of failing on the refused size again.
    #[test]
    fn a_refused_stream_size_is_not_brought_back_by_the_next_edit() {
        let log: Arc<Mutex<ProbeLog>> = Arc::default();
        let mut s = session(&log);
        log.lock().unwrap().refuse_width = Some(96);
        set(&mut s, "stream.width", "96");
        assert_eq!(applied(&log).1, 64);
        assert_eq!(s.pre.width, 64);
        send(&mut s, Command::Prompt("a fox".into()));
        assert_eq!(applied(&log), ("a fox".into(), 64));
        assert_eq!(s.pre.width, 64, "capture at the size the transform runs");
        let got = s.get("stream.width").unwrap();
        assert!(got.starts_with("stream.width = 64"), "{got}");
        stop(s);
    }
}
