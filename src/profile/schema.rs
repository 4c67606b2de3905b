//! The profile schema: every setting of a run, with the defaults a two-line profile relies on.
//!
//! Field docs are the user documentation of each key (see also `profiles/README.md`).

use serde::{Deserialize, Serialize};

use crate::convert::Fit;
pub use crate::model::device::{DeviceName, DtypeName};
pub use crate::pipeline::stream::{CfgType, StreamMode};
pub use crate::sink::LoopbackFormat as OutputFormatName;
pub use crate::source::CameraFormat as CameraFormatName;
pub use crate::transform::TransformKind;

/// A whole profile. Top-level keys hold the prompt; tables hold the stages.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// Optional display name (logs and `stats`).
    pub name: Option<String>,
    /// What the picture should become.
    pub prompt: String,
    /// What to steer away from (used by cfg_type `full` and `initialize`).
    pub negative_prompt: String,
    /// Optional playlist: SIGUSR2 (or the `next` command) advances to the next one, wrapping.
    pub prompts: Vec<String>,
    /// The transform between input and output: `diffusion` (the StreamDiffusion pipeline),
    /// or the cheap built-ins `identity`, `tint` (a prompt-coloured wash) and `posterize`.
    pub transform: TransformKind,
    pub source: SourceConfig,
    pub output: OutputConfig,
    pub model: ModelConfig,
    pub stream: StreamConfig,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            name: None,
            prompt: "a portrait in the style of a studio ghibli anime, soft light".into(),
            negative_prompt: "low quality, blurry, deformed".into(),
            prompts: Vec::new(),
            transform: TransformKind::Tint,
            source: SourceConfig::default(),
            output: OutputConfig::default(),
            model: ModelConfig::default(),
            stream: StreamConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Animated test pattern (no hardware needed).
    Pattern,
    /// A V4L2 camera (`device` = path or name).
    Camera,
    /// The X11 screen or a region of it.
    Screen,
    /// A Y4M video (`-` = stdin) or a still PNG/JPEG image (`path`).
    File,
}

/// A rectangle of the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Camera: a path (`/dev/video0`) or part of its name (`"C920"`, `"vivid"`).
    pub device: String,
    /// File: a `.y4m` video, a PNG/JPEG image, or `-` for Y4M on stdin.
    pub path: Option<String>,
    /// Screen: X display (default `$DISPLAY`).
    pub display: Option<String>,
    /// Screen: region to capture (default: the whole screen).
    pub region: Option<Region>,
    /// Requested capture size (camera and pattern; the camera may offer the nearest size).
    pub width: u32,
    pub height: u32,
    /// Requested capture rate, frames per second.
    pub fps: f64,
    /// Camera pixel format: `auto`, `yuyv`, `mjpeg`, `nv12` or `rgb`.
    pub format: CameraFormatName,
    /// File: start again at the end (default true).
    #[serde(rename = "loop")]
    pub looping: bool,
    /// Flip left-right before the transform (a selfie view).
    pub mirror: bool,
    /// How the source picture is fitted to the stream's aspect ratio, the one place where the
    /// picture is cut or padded: `crop` (fill, cut the overflow equally on both sides), `letterbox`
    /// (all of it, black bars) or `stretch` (all of it, distorted). With the default
    /// `stream.width`/`height = "auto"` the stream has the output's aspect, so this decides how
    /// the source fills the output.
    pub fit: Fit,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: SourceKind::Pattern,
            device: "/dev/video0".into(),
            path: None,
            display: None,
            region: None,
            width: 1280,
            height: 720,
            fps: 30.0,
            format: CameraFormatName::Auto,
            looping: true,
            mirror: false,
            fit: Fit::Crop,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// A v4l2loopback virtual camera (found by `device` or by `label`).
    V4l2loopback,
    /// A Y4M file, or stdout with `path = "-"`.
    Y4m,
    /// PNG files in the folder `path`, every `every`-th frame.
    Png,
    /// Discard (benchmarks).
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pacing {
    /// `realtime` for cameras, screens, patterns and loopback output; `every-frame` for file → file.
    Auto,
    /// Write at the output rate; repeat the last frame when the transform is late, drop stale input.
    Realtime,
    /// Process and write every input frame once, as fast as possible (offline conversion).
    EveryFrame,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub kind: OutputKind,
    /// v4l2loopback: device path (e.g. `/dev/video10`, `/dev/sdcam`); overrides `label`.
    pub device: Option<String>,
    /// v4l2loopback: the module's `card_label` to look for.
    pub label: String,
    /// y4m: file (`-` = stdout); png: folder.
    pub path: String,
    /// v4l2loopback pixel format: `yuyv` (default) or `i420`.
    pub format: OutputFormatName,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    /// How the stream's picture is fitted to the output size when their aspect ratios differ
    /// (`crop`, `letterbox` or `stretch`): only with an explicit `stream.width`/`height` of
    /// another aspect. With an `"auto"` stream size the stream already has the output's aspect
    /// and is only scaled.
    pub fit: Fit,
    /// png: write every Nth frame.
    pub every: u64,
    /// `auto`, `realtime` or `every-frame`.
    pub pacing: Pacing,
    /// v4l2loopback: work only while a program streams from the virtual camera. Idle, the
    /// source is released (camera light off), the model does no work and the device keeps
    /// streaming a hold frame at `idle_fps`, so browsers still list it. Ignored by file sinks.
    pub on_demand: bool,
    /// v4l2loopback, idle: frames per second of the hold frame.
    pub idle_fps: f64,
    /// v4l2loopback, idle: a PNG/JPEG still to show instead of the last output dimmed (`""`).
    pub idle_image: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            kind: OutputKind::V4l2loopback,
            device: None,
            label: "sdcam".into(),
            path: "sdcam.y4m".into(),
            format: OutputFormatName::Yuyv,
            width: 1280,
            height: 720,
            fps: 30.0,
            fit: Fit::Crop,
            every: 1,
            pacing: Pacing::Auto,
            on_demand: true,
            idle_fps: 1.0,
            idle_image: String::new(),
        }
    }
}

/// A LoRA to fuse into the model at load time.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Hugging Face repo id or local `.safetensors` path.
    pub id: String,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

/// The diffusion model (used by `transform = "diffusion"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hugging Face repo id in the diffusers layout, or a local folder.
    pub id: String,
    pub revision: Option<String>,
    /// Tiny autoencoder repo/folder (TAESD); `""` uses the model's full VAE.
    pub tiny_vae: String,
    pub lora: Vec<LoraConfig>,
    pub device: DeviceName,
    pub dtype: DtypeName,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: "stabilityai/sd-turbo".into(),
            revision: None,
            tiny_vae: "madebyollin/taesd".into(),
            lora: Vec::new(),
            device: DeviceName::Auto,
            dtype: DtypeName::Auto,
        }
    }
}

/// One side of the stream size: pixels (a multiple of 8 from 64 to 2048) or `"auto"` (the
/// output's aspect ratio at about the model's native pixel count; see [`super::geometry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamDim {
    #[default]
    Auto,
    Px(u32),
}

impl StreamDim {
    /// The pixels, when given explicitly.
    pub fn px(self) -> Option<u32> {
        match self {
            StreamDim::Auto => None,
            StreamDim::Px(v) => Some(v),
        }
    }
}

impl std::fmt::Display for StreamDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamDim::Auto => f.write_str("auto"),
            StreamDim::Px(v) => write!(f, "{v}"),
        }
    }
}

impl Serialize for StreamDim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StreamDim::Auto => s.serialize_str("auto"),
            StreamDim::Px(v) => s.serialize_u32(*v),
        }
    }
}

impl<'de> Deserialize<'de> for StreamDim {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = StreamDim;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size in pixels (a multiple of 8 from 64 to 2048) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StreamDim, E> {
                u32::try_from(v)
                    .map(StreamDim::Px)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StreamDim, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StreamDim, E> {
                if v == "auto" {
                    Ok(StreamDim::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// StreamDiffusion settings (paper arXiv 2312.12491).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Model input/output size: pixels (multiples of 8 from 64 to 2048) or `"auto"` (default):
    /// the output's aspect ratio at about the model's native pixel count (680×384 for a 16:9
    /// output and a 512² model), so the source is fitted (`source.fit`) once and the output
    /// stage only scales. One side given and the other `"auto"` keeps the output's aspect.
    pub width: StreamDim,
    pub height: StreamDim,
    pub mode: StreamMode,
    /// Indices into the LCM timesteps, one denoising step each (e.g. `[35]` for sd-turbo, `[32, 45]`).
    pub t_index_list: Vec<u32>,
    pub num_inference_steps: u32,
    pub frame_buffer_size: u32,
    pub use_denoising_batch: bool,
    pub do_add_noise: bool,
    /// Residual CFG: `none`, `full`, `self` or `initialize`.
    pub cfg_type: CfgType,
    pub guidance_scale: f64,
    pub delta: f64,
    pub seed: u64,
    /// Stochastic similarity filter: skip the model on nearly unchanged frames.
    pub similarity_filter: bool,
    pub similarity_threshold: f64,
    pub max_skip_frame: u32,
    /// StreamBatch cross-frame self-attention (temporal consistency).
    pub cross_frame_attention: bool,
    /// Blend prompt embeddings over this many frames when the prompt changes (0 = switch at once).
    pub prompt_blend_frames: u32,
    /// Fill the latent buffer from the first frame, so the first output is already an image
    /// (the reference starts from zeros and shows len(t_index_list) − 1 brown frames).
    pub warm_start: bool,
    /// Load the pre-sampled noise (and txt2img latents) from this safetensors file instead of
    /// drawing it from `seed`, to compare runs exactly with the Python reference.
    pub noise_file: Option<String>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            width: StreamDim::Auto,
            height: StreamDim::Auto,
            mode: StreamMode::Img2img,
            t_index_list: vec![35],
            num_inference_steps: 50,
            frame_buffer_size: 1,
            use_denoising_batch: true,
            do_add_noise: true,
            cfg_type: CfgType::None,
            guidance_scale: 1.2,
            delta: 1.0,
            seed: 2,
            similarity_filter: false,
            similarity_threshold: 0.98,
            max_skip_frame: 10,
            cross_frame_attention: false,
            prompt_blend_frames: 0,
            warm_start: true,
            noise_file: None,
        }
    }
}
