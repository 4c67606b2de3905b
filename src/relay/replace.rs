//! Replacing a running stage (the capture stage's source, the output stage's sink) live, in one
//! place for both.
//!
//! The new stage is opened while the old one still runs, so that a failure changes nothing. A
//! stage that holds an exclusive device ([`crate::stage::StageInfo::exclusive_device`]: a V4L2
//! camera, a v4l2loopback writer) may be the very reason the new one fails to open (the same
//! device, or a device of the same kind that takes one user): then the old one is closed, the
//! new one is tried again, and if that fails too the old one is reopened (or, if it cannot be,
//! left to the stage's background reconnect).

use crate::Result;

/// A stage slot whose occupant can be replaced live.
pub(super) trait Slot {
    /// What the slot holds (a boxed source or sink).
    type Stage;
    /// What a stage is opened from.
    type Config;
    /// The slot's name for logs ("source", "output").
    const WHAT: &'static str;

    /// Opens a stage from `cfg` (the slot's occupant is left alone).
    fn open(&self, cfg: &Self::Config) -> Result<Self::Stage>;
    /// Whether the running stage holds an exclusive device that a stage opened from `cfg` may
    /// need too.
    fn holds_device_for(&self, cfg: &Self::Config) -> bool;
    /// Closes the running stage, freeing its device.
    fn close_current(&mut self);
    /// Reopens the stage closed by [`Slot::close_current`] from the slot's current config.
    fn reopen_current(&mut self);
}

/// Opens the stage that replaces `slot`'s running one. On success the caller installs it (the
/// old one may already be closed); on failure the slot runs its old stage as before.
///
/// # Errors
/// The reason the new stage cannot be opened: when the old one was closed for a second try,
/// the second try's error (the first one failed only because the device was still held).
pub(super) fn open_replacement<S: Slot>(slot: &mut S, cfg: &S::Config) -> Result<S::Stage> {
    match slot.open(cfg) {
        Ok(new) => Ok(new),
        Err(first) if slot.holds_device_for(cfg) => {
            slot.close_current();
            match slot.open(cfg) {
                Ok(new) => Ok(new),
                Err(second) => {
                    tracing::debug!("opening the new {} beside the old one: {first:#}", S::WHAT);
                    slot.reopen_current();
                    Err(second)
                }
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot over one exclusive device: opening succeeds only while it is free.
    struct Device {
        running: Option<&'static str>,
        exclusive: bool,
        /// Configs that fail even on a free device.
        broken: &'static [&'static str],
        log: Vec<String>,
    }

    impl Slot for Device {
        type Stage = &'static str;
        type Config = &'static str;
        const WHAT: &'static str = "device";

        fn open(&self, cfg: &&'static str) -> Result<&'static str> {
            anyhow::ensure!(!self.broken.contains(cfg), "{cfg} is broken");
            anyhow::ensure!(self.running.is_none() || !self.exclusive, "busy");
            Ok(cfg)
        }
        fn holds_device_for(&self, _cfg: &&'static str) -> bool {
            self.running.is_some() && self.exclusive
        }
        fn close_current(&mut self) {
            self.log.push(format!("close {:?}", self.running.take()));
        }
        fn reopen_current(&mut self) {
            self.running = Some("old");
            self.log.push("reopen".into());
        }
    }

    fn device(exclusive: bool, broken: &'static [&'static str]) -> Device {
        Device {
            running: Some("old"),
            exclusive,
            broken,
            log: Vec::new(),
        }
    }

    #[test]
    fn a_shared_stage_is_opened_beside_the_old_one() {
        let mut d = device(false, &[]);
        assert_eq!(open_replacement(&mut d, &"new").unwrap(), "new");
        assert!(d.log.is_empty());
        assert_eq!(d.running, Some("old"));
    }

    #[test]
    fn an_exclusive_device_is_freed_for_the_second_try() {
        let mut d = device(true, &[]);
        assert_eq!(open_replacement(&mut d, &"new").unwrap(), "new");
        assert_eq!(d.log, ["close Some(\"old\")"]);
        assert_eq!(d.running, None);
    }

    #[test]
    fn a_failed_second_try_reopens_the_old_stage_with_the_real_reason() {
        let mut d = device(true, &["new"]);
        let e = open_replacement(&mut d, &"new").unwrap_err();
        assert_eq!(e.to_string(), "new is broken");
        assert_eq!(d.log, ["close Some(\"old\")", "reopen"]);
        assert_eq!(d.running, Some("old"));
    }
}
