//! A sink that discards frames (after converting them to the chosen format), for benchmarks and
//! for measuring the relay's own overhead.

use super::Sink;
use crate::frame::{Frame, PixelFormat};
use crate::stage::{StageInfo, StageResult};

#[derive(Debug)]
pub struct NullSink {
    format: PixelFormat,
    pub frames: u64,
}

impl NullSink {
    pub fn new(format: PixelFormat) -> Self {
        NullSink { format, frames: 0 }
    }
}

impl Sink for NullSink {
    fn write(&mut self, frame: &Frame) -> StageResult<()> {
        std::hint::black_box(&frame.data);
        self.frames += 1;
        Ok(())
    }

    fn wants(&self) -> PixelFormat {
        self.format
    }

    fn describe(&self) -> String {
        format!("null ({})", self.format)
    }

    fn info(&self) -> StageInfo {
        StageInfo {
            live: false,
            exclusive_device: false,
            reconnect_on_loss: false,
            buffers_frames: false,
        }
    }
}
