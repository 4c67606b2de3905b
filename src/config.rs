//! The one configuration boundary: a validated [`Profile`] turned into the typed options each
//! stage takes. Only this module (and the live-control session that owns the running profile)
//! reads the TOML schema; the stages below it — transform, stream core, model — see only their
//! own option structs, so a schema change touches this file and the schema, not the stages.
//!
//! (The same shape as ripgrep's flags → `HiArgs`: parse once, convert once, build the workers
//! from the converted options.)

use crate::pipeline::{FilterSettings, LiveParams, StreamParams};
use crate::profile::{
    geometry, ModelConfig, OutputConfig, OutputKind, Pacing, Profile, SourceConfig, SourceKind,
};
use crate::relay::{OnDemand, OutputOptions, PreprocessConfig};
use crate::sink::{LoopbackOptions, SinkOptions};
use crate::source::{CameraOptions, ScreenOptions, SourceOptions};
use crate::transform::diffusion::ModelOptions;
use crate::transform::TransformOptions;

/// The model section of a profile as the diffusion transform loads it (`""` tiny VAE = the
/// model's full VAE).
pub fn model_options(m: &ModelConfig) -> ModelOptions {
    ModelOptions {
        id: m.id.clone(),
        revision: m.revision.clone(),
        tiny_vae: (!m.tiny_vae.is_empty()).then(|| m.tiny_vae.clone()),
        loras: m
            .lora
            .iter()
            .map(|l| (l.id.clone(), l.scale as f32))
            .collect(),
        device: m.device,
        dtype: m.dtype,
    }
}

/// The stream settings of a profile that need a new stream when they change (the size from
/// [`geometry::resolve`]).
pub fn stream_params(p: &Profile) -> StreamParams {
    let s = &p.stream;
    let size = geometry::resolve(p);
    StreamParams {
        width: size.width as usize,
        height: size.height as usize,
        mode: s.mode,
        t_index_list: s.t_index_list.iter().map(|&i| i as usize).collect(),
        num_inference_steps: s.num_inference_steps as usize,
        frame_buffer_size: s.frame_buffer_size as usize,
        use_denoising_batch: s.use_denoising_batch,
        do_add_noise: s.do_add_noise,
        cfg_type: s.cfg_type,
        seed: s.seed,
        warm_start: s.warm_start,
    }
}

/// The stream settings that change without preparing again.
pub fn live_params(p: &Profile) -> LiveParams {
    LiveParams {
        guidance_scale: p.stream.guidance_scale,
        delta: p.stream.delta,
        cross_frame_attention: p.stream.cross_frame_attention,
    }
}

/// The similarity filter's settings, `None` when it is off.
pub fn filter_settings(p: &Profile) -> Option<FilterSettings> {
    p.stream.similarity_filter.then_some(FilterSettings {
        threshold: p.stream.similarity_threshold,
        max_skip_frame: p.stream.max_skip_frame,
    })
}

/// Everything the transform stage takes from a profile.
pub fn transform_options(p: &Profile) -> TransformOptions {
    TransformOptions {
        kind: p.transform,
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
        model: model_options(&p.model),
        stream: stream_params(p),
        live: live_params(p),
        filter: filter_settings(p),
        noise_file: p.stream.noise_file.clone(),
        prompt_blend_frames: p.stream.prompt_blend_frames,
    }
}

/// The source a profile's `[source]` table describes.
pub fn source_options(s: &SourceConfig) -> SourceOptions {
    match s.kind {
        SourceKind::Pattern => SourceOptions::Pattern {
            width: s.width,
            height: s.height,
            fps: s.fps,
        },
        SourceKind::Camera => SourceOptions::Camera(CameraOptions {
            device: s.device.clone(),
            width: s.width,
            height: s.height,
            fps: s.fps,
            format: s.format,
        }),
        SourceKind::Screen => SourceOptions::Screen(ScreenOptions {
            display: s.display.clone(),
            region: s.region.map(|r| (r.x, r.y, r.width, r.height)),
            fps: s.fps,
        }),
        SourceKind::File => SourceOptions::File {
            path: s.path.clone(),
            fps: s.fps,
            looping: s.looping,
        },
    }
}

/// The output a profile's `[output]` table describes.
pub fn output_options(o: &OutputConfig) -> OutputOptions {
    let sink = match o.kind {
        OutputKind::V4l2loopback => SinkOptions::V4l2loopback(LoopbackOptions {
            device: o.device.as_ref().map(std::path::PathBuf::from),
            label: Some(o.label.clone()),
            format: o.format,
            width: o.width,
            height: o.height,
            fps: o.fps,
        }),
        OutputKind::Y4m => SinkOptions::Y4m {
            path: o.path.clone(),
            width: o.width,
            height: o.height,
            fps: o.fps,
        },
        OutputKind::Png => SinkOptions::Png {
            dir: std::path::PathBuf::from(&o.path),
            every: o.every,
        },
        OutputKind::Null => SinkOptions::Null,
    };
    OutputOptions {
        sink,
        width: o.width,
        height: o.height,
        fps: o.fps,
        fit: o.fit,
        on_demand: (o.kind == OutputKind::V4l2loopback && o.on_demand).then(|| OnDemand {
            idle_fps: o.idle_fps,
            idle_image: (!o.idle_image.is_empty()).then(|| std::path::PathBuf::from(&o.idle_image)),
        }),
    }
}

/// How captured frames are pre-processed for the stream: the stream size
/// ([`geometry::resolve`]), `source.fit` and the mirror.
pub fn preprocess(p: &Profile) -> PreprocessConfig {
    let size = geometry::resolve(p);
    PreprocessConfig {
        width: size.width,
        height: size.height,
        fit: p.source.fit,
        mirror: p.source.mirror,
    }
}

/// Whether a profile runs in every-frame (offline) mode rather than real time.
///
/// `pacing = "auto"`: a file sink (Y4M or PNG files, the null sink) gets every frame
/// transformed, whatever the source (a live source still delivers at its own rate; a file is
/// read as fast as the transform goes); stdout does when the source is a file (a conversion
/// through a pipe) and is paced otherwise (a player); the virtual camera is always paced.
pub fn every_frame(p: &Profile) -> bool {
    match p.output.pacing {
        Pacing::Realtime => false,
        Pacing::EveryFrame => true,
        Pacing::Auto => match p.output.kind {
            OutputKind::V4l2loopback => false,
            OutputKind::Y4m if p.output.path == "-" => p.source.kind == SourceKind::File,
            OutputKind::Y4m | OutputKind::Png | OutputKind::Null => true,
        },
    }
}

/// Whether the source reads standard input (`source.path = "-"`): the control channel then
/// cannot.
pub fn reads_stdin(p: &Profile) -> bool {
    p.source.kind == SourceKind::File && p.source.path.as_deref() == Some("-")
}
