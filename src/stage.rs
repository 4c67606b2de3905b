//! What a stage (a [`crate::source::Source`] or a [`crate::sink::Sink`]) says about itself, and
//! the typed errors it returns.
//!
//! The relay decides how to treat a stage (reconnect it when it is lost, close it before opening
//! another on the same device, count a lost final flush) by asking the stage, not by matching
//! the kind of profile section it was opened from; and it decides what a failure means (the
//! reader went away, the device is gone) by matching [`StageError`], not by looking through an
//! `anyhow` chain for an `io::Error`. This follows GStreamer's elements, which describe
//! themselves (live or not, the caps they take) and return typed flow results.

/// How a stage behaves, as the relay needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageInfo {
    /// Frames arrive (a source) or must leave (a sink) in real time: a camera, a screen, a
    /// virtual camera. A live source paces itself; stale frames are dropped, not queued.
    pub live: bool,
    /// The stage holds a device that takes one user at a time (a V4L2 camera, a v4l2loopback
    /// writer): replacing it with another stage of the same kind may need it closed first.
    pub exclusive_device: bool,
    /// A failed read or write drops the stage and reopens it every second in the background,
    /// instead of ending the run (a camera unplugged, a virtual camera gone).
    pub reconnect_on_loss: bool,
    /// The stage buffers frames that [`crate::sink::Sink::finish`] still has to write: a
    /// failed final flush loses frames already counted as written.
    pub buffers_frames: bool,
}

/// A failure of a source or sink that the relay treats specially; everything else is
/// [`StageError::Other`].
///
/// The end of a source's stream is not an error: it is [`crate::source::Captured::End`].
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The device went away or stopped answering (unplugged, stalled, driver error). A stage
    /// with [`StageInfo::reconnect_on_loss`] is reopened in the background.
    #[error("{0:#}")]
    DeviceGone(anyhow::Error),
    /// The reader of a pipe went away (`sdcam --output - | ffplay -` and the player was
    /// closed): a normal end of the run, not a failure.
    #[error("the reader went away: {0:#}")]
    BrokenPipe(anyhow::Error),
    /// Any other failure, with its context chain.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl StageError {
    /// Classifies an I/O error: `BrokenPipe` becomes [`StageError::BrokenPipe`], the rest
    /// [`StageError::Other`]; `context` is added either way.
    pub fn io(e: std::io::Error, context: impl Into<String>) -> StageError {
        let broken = e.kind() == std::io::ErrorKind::BrokenPipe;
        let e = anyhow::Error::new(e).context(context.into());
        if broken {
            StageError::BrokenPipe(e)
        } else {
            StageError::Other(e)
        }
    }

    /// The error as an `anyhow` chain (for a stage failure that ends the run).
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            StageError::DeviceGone(e) | StageError::BrokenPipe(e) | StageError::Other(e) => e,
        }
    }
}

/// The result of a stage's read or write.
pub type StageResult<T> = std::result::Result<T, StageError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified() {
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(matches!(
            StageError::io(pipe, "writing"),
            StageError::BrokenPipe(_)
        ));
        let full = std::io::Error::other("No space left on device");
        let e = StageError::io(full, "writing Y4M frame");
        assert!(matches!(e, StageError::Other(_)));
        assert_eq!(
            format!("{:#}", e.into_anyhow()),
            "writing Y4M frame: No space left on device"
        );
    }
}
