//! TAESD: diffusers' `AutoencoderTiny` (madebyollin/taesd layout, diffusers 0.24).
//!
//! The encoder and decoder are plain `nn.Sequential`s of 3×3 convs and `AutoencoderTinyBlock`s
//! (conv–ReLU–conv–ReLU–conv plus a skip, then ReLU), so `VarBuilder` paths are
//! `encoder.layers.N…` / `decoder.layers.N…` with `N` the index in the sequential (ReLU and
//! `Upsample` entries take an index but have no tensors).
//!
//! Scaling conventions (they differ from the KL VAE):
//! * `AutoencoderTiny::encode` takes an image in −1..1 and returns the raw encoder output, like
//!   diffusers' `encode(x).latents` (the encoder maps the input with `(x + 1) / 2` internally).
//! * `AutoencoderTiny::decode` applies `tanh(z / 3) · 3` to the latents first and returns
//!   `2x − 1` (image roughly in −1..1, not clamped), like `decode(z).sample`.
//! * StreamDiffusion multiplies the encoder output by `scaling_factor` and divides the latents by it
//!   before decoding; TAESD's `scaling_factor` is 1.0 so both are no-ops, and the latents are
//!   directly in the U-Net's latent space. `AutoencoderTiny::scaling_factor` exposes the value so
//!   callers can treat TAESD and the KL VAE the same way.

use std::path::Path;

use crate::model::conv::{conv2d, conv2d_no_bias, Conv2d};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::model::config::{self, refuse_if, refuse_unless_positive, ComponentConfig, Unsupported};

/// `config.json` of an `AutoencoderTiny`: the keys of diffusers' `AutoencoderTiny.__init__`
/// (0.24, plus TAESD 1.3's `shift_factor` and `upsample_fn` from diffusers 0.30); absent or `null`
/// = diffusers' default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) encoder_block_out_channels: Vec<usize>,
    pub(crate) decoder_block_out_channels: Vec<usize>,
    pub(crate) act_fn: String,
    pub(crate) latent_channels: usize,
    pub(crate) upsampling_scaling_factor: usize,
    pub(crate) num_encoder_blocks: Vec<usize>,
    pub(crate) num_decoder_blocks: Vec<usize>,
    /// Only used by diffusers' latent byte-quantisation helpers (not needed here).
    pub(crate) latent_magnitude: f64,
    /// Only used by diffusers' latent byte-quantisation helpers (not needed here).
    pub(crate) latent_shift: f64,
    pub(crate) force_upcast: bool,
    pub(crate) scaling_factor: f64,
    /// diffusers 0.30: subtracted from latents by the SD3/Flux pipelines; 0 for TAESD 1.3.
    pub shift_factor: f64,
    /// diffusers 0.30: the decoder's upsampling mode (`nearest` in TAESD and in 0.24).
    pub upsample_fn: String,
}

impl Default for AutoencoderTinyConfig {
    /// diffusers `AutoencoderTiny()` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            act_fn: "relu".into(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            force_upcast: false,
            scaling_factor: 1.0,
            shift_factor: 0.0,
            upsample_fn: "nearest".into(),
        }
    }
}

impl ComponentConfig for AutoencoderTinyConfig {
    const KIND: &'static str = "AutoencoderTiny (TAESD)";

    fn check(&self) -> std::result::Result<(), Unsupported> {
        refuse_if(
            self.act_fn != "relu",
            "act_fn",
            &self.act_fn,
            "only relu is implemented",
        )?;
        refuse_if(
            self.upsample_fn != "nearest",
            "upsample_fn",
            &self.upsample_fn,
            "only nearest is implemented",
        )?;
        refuse_if(
            self.shift_factor != 0.0,
            "shift_factor",
            self.shift_factor,
            "a latent shift is not implemented (only 0.0)",
        )?;
        for (key, channels, blocks, blocks_key) in [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
                &self.num_encoder_blocks,
                "num_encoder_blocks",
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
                &self.num_decoder_blocks,
                "num_decoder_blocks",
            ),
        ] {
            refuse_if(channels.is_empty(), key, channels, "is empty")?;
            refuse_if(
                blocks.len() != channels.len(),
                blocks_key,
                blocks,
                format!("needs one entry per {key} ({})", channels.len()),
            )?;
        }
        refuse_if(
            self.upsampling_scaling_factor == 0,
            "upsampling_scaling_factor",
            0,
            "must be at least 1",
        )?;
        refuse_unless_positive("scaling_factor", self.scaling_factor)
    }
}

impl AutoencoderTinyConfig {
    /// Reads a diffusers `config.json` ([`crate::model::config::load`]).
    pub(crate) fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        config::load(path.as_ref())
    }
}

fn conv3(cin: usize, cout: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    if bias {
        conv2d(cin, cout, 3, cfg, vb)
    } else {
        conv2d_no_bias(cin, cout, 3, cfg, vb)
    }
}

/// `AutoencoderTinyBlock`: `relu(conv(x) + skip(x))`.
#[derive(Debug, Clone)]
struct TinyBlock {
    conv0: Conv2d,
    conv2: Conv2d,
    conv4: Conv2d,
    skip: Option<Conv2d>,
}

impl TinyBlock {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let skip = if cin != cout {
            Some(conv2d_no_bias(
                cin,
                cout,
                1,
                Default::default(),
                vb.pp("skip"),
            )?)
        } else {
            None
        };
        let c = vb.pp("conv");
        Ok(Self {
            conv0: conv3(cin, cout, 1, true, c.pp("0"))?,
            conv2: conv3(cout, cout, 1, true, c.pp("2"))?,
            conv4: conv3(cout, cout, 1, true, c.pp("4"))?,
            skip,
        })
    }
}

impl Module for TinyBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // relu(conv4(…) + skip) with the add and the ReLU in conv4's kernel (`forward_fused`).
        let h = self.conv0.forward_relu(xs)?;
        let h = self.conv2.forward_relu(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(xs)?,
            None => xs.clone(),
        };
        self.conv4.forward_fused(&h, Some(&skip), true)
    }
}

/// One entry of the `layers` sequential.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Block(Box<TinyBlock>),
    Relu,
    Upsample(usize),
}

impl Module for Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(xs),
            Self::Block(b) => b.forward(xs),
            Self::Relu => xs.relu(),
            Self::Upsample(f) => {
                let (_, _, h, w) = xs.dims4()?;
                xs.upsample_nearest2d(h * f, w * f)
            }
        }
    }
}

/// The layers in order; a conv followed by a ReLU runs as one ([`Conv2d::forward_relu`]).
fn run(layers: &[Layer], xs: &Tensor) -> Result<Tensor> {
    let mut x = xs.clone();
    let mut i = 0;
    while i < layers.len() {
        x = match (&layers[i], layers.get(i + 1)) {
            (Layer::Conv(c), Some(Layer::Relu)) => {
                i += 1;
                c.forward_relu(&x)?
            }
            (l, _) => l.forward(&x)?,
        };
        i += 1;
    }
    Ok(x)
}

/// diffusers' `EncoderTiny`.
#[derive(Debug, Clone)]
struct EncoderTiny {
    layers: Vec<Layer>,
}

impl EncoderTiny {
    fn new(cfg: &AutoencoderTinyConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.encoder_block_out_channels;
        if boc.len() != cfg.num_encoder_blocks.len() || boc.is_empty() {
            candle_core::bail!(
                "encoder_block_out_channels and num_encoder_blocks must have the same non-zero length"
            );
        }
        let vb = vb.pp("layers");
        let mut layers = Vec::new();
        for (i, &n) in cfg.num_encoder_blocks.iter().enumerate() {
            let ch = boc[i];
            let idx = layers.len();
            let conv = if i == 0 {
                conv3(cfg.in_channels, ch, 1, true, vb.pp(idx))?
            } else {
                conv3(ch, ch, 2, false, vb.pp(idx))?
            };
            layers.push(Layer::Conv(conv));
            for _ in 0..n {
                let idx = layers.len();
                layers.push(Layer::Block(Box::new(TinyBlock::new(ch, ch, vb.pp(idx))?)));
            }
        }
        let idx = layers.len();
        let last = *boc.last().unwrap_or(&0);
        layers.push(Layer::Conv(conv3(
            last,
            cfg.latent_channels,
            1,
            true,
            vb.pp(idx),
        )?));
        Ok(Self { layers })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // −1..1 → 0..1, the TAESD convention.
        let xs = ((xs + 1.0)? / 2.0)?;
        run(&self.layers, &xs)
    }
}

/// diffusers' `DecoderTiny`.
#[derive(Debug, Clone)]
struct DecoderTiny {
    layers: Vec<Layer>,
}

impl DecoderTiny {
    fn new(cfg: &AutoencoderTinyConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.decoder_block_out_channels;
        if boc.len() != cfg.num_decoder_blocks.len() || boc.is_empty() {
            candle_core::bail!(
                "decoder_block_out_channels and num_decoder_blocks must have the same non-zero length"
            );
        }
        let vb = vb.pp("layers");
        let mut layers = vec![
            Layer::Conv(conv3(cfg.latent_channels, boc[0], 1, true, vb.pp(0))?),
            Layer::Relu,
        ];
        let n_stages = cfg.num_decoder_blocks.len();
        for (i, &n) in cfg.num_decoder_blocks.iter().enumerate() {
            let is_final = i + 1 == n_stages;
            let ch = boc[i];
            for _ in 0..n {
                let idx = layers.len();
                layers.push(Layer::Block(Box::new(TinyBlock::new(ch, ch, vb.pp(idx))?)));
            }
            if !is_final {
                layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
            }
            let cout = if is_final { cfg.out_channels } else { ch };
            let idx = layers.len();
            layers.push(Layer::Conv(conv3(ch, cout, 1, is_final, vb.pp(idx))?));
        }
        Ok(Self { layers })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Soft clamp of the latents to ±3.
        let xs = ((xs / 3.0)?.tanh()? * 3.0)?;
        let xs = run(&self.layers, &xs)?;
        // 0..1 → −1..1, the diffusers convention.
        (xs * 2.0)? - 1.0
    }
}

/// diffusers' `AutoencoderTiny` (TAESD; `models/autoencoder_tiny.py` in diffusers 0.24): images
/// `(b, 3, h, w)` in −1..1 ↔ latents `(b, latent_channels = 4, h/8, w/8)` (see the module docs
/// for the scaling).
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    encoder: EncoderTiny,
    decoder: DecoderTiny,
    scaling_factor: f64,
}

impl AutoencoderTiny {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint root (`encoder.layers.…`,
    /// `decoder.layers.…`).
    ///
    /// # Errors
    /// A config this implementation does not support, or a missing or misshapen tensor.
    pub fn new(vb: VarBuilder, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        cfg.check().map_err(|u| {
            candle_core::Error::Msg(format!("unsupported AutoencoderTiny config: {u}"))
        })?;
        Ok(Self {
            encoder: EncoderTiny::new(cfg, vb.pp("encoder"))?,
            decoder: DecoderTiny::new(cfg, vb.pp("decoder"))?,
            scaling_factor: cfg.scaling_factor,
        })
    }

    /// Image [B, 3, H, W] in −1..1 → raw latents [B, latent_channels, H/8, W/8]
    /// (= diffusers `encode(x).latents`; not multiplied by `scaling_factor`).
    ///
    /// # Errors
    /// A candle error (wrong rank or channel count).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.encoder.forward(image)
    }

    /// Raw latents → image in −1..1 (= diffusers `decode(z).sample`; not clamped, and the
    /// latents are not divided by `scaling_factor` here).
    ///
    /// # Errors
    /// A candle error (wrong rank or channel count).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decoder.forward(latents)
    }

    /// The config's `scaling_factor` (1.0 for TAESD): StreamDiffusion multiplies encoder output by
    /// it and divides latents by it before decoding.
    pub(crate) fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden, target, tol};

    fn load() -> AutoencoderTiny {
        let dir = fixture("models/tiny-taesd");
        let cfg = AutoencoderTinyConfig::from_file(dir.join("config.json")).unwrap();
        let vb = crate::model::hub::load_var_builder(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            target().1,
            &target().0,
        )
        .unwrap();
        AutoencoderTiny::new(vb, &cfg).unwrap()
    }

    #[test]
    fn taesd_matches_golden() {
        let model = load();
        assert_eq!(model.scaling_factor(), 1.0);
        let g = golden("taesd");
        for case in ["enc0", "enc1"] {
            let out = model.encode(&g[&format!("{case}.image")]).unwrap();
            let err = rel_err(&out, &g[&format!("{case}.latents")]).unwrap();
            assert!(err <= tol(1e-4), "{case}: rel err {err}");
        }
        for case in ["dec0", "dec1"] {
            let out = model.decode(&g[&format!("{case}.latents")]).unwrap();
            let err = rel_err(&out, &g[&format!("{case}.sample")]).unwrap();
            assert!(err <= tol(1e-4), "{case}: rel err {err}");
        }
    }
}
