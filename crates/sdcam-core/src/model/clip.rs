//! CLIP text encoder with the semantics of transformers' `CLIPTextModel` (4.35).
//!
//! Used by SD 1.5 (OpenAI ViT-L/14 text tower, 768 wide, `quick_gelu`) and SD 2.x / sd-turbo
//! (OpenCLIP ViT-H/14 text tower, 1024 wide, exact `gelu`). The model applies a causal attention
//! mask only (no padding mask, as diffusers calls it without `attention_mask`) and
//! `ClipTextModel::forward` returns `last_hidden_state`, i.e. the output of the last layer after
//! `final_layer_norm` (what diffusers' `encode_prompt` uses as `prompt_embeds`, SD 2 included).
//!
//! `VarBuilder` paths mirror the transformers tensor names (`text_model.embeddings.…`,
//! `text_model.encoder.layers.N.…`, `text_model.final_layer_norm`).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::model::config::{self, refuse_if, ComponentConfig, Unsupported};

/// MLP activation of the encoder layers (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClipActivation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact erf GELU (OpenCLIP, SD 2.x).
    Gelu,
}

impl ClipActivation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
        }
    }
}

/// `text_encoder/config.json` (the fields of transformers' `CLIPTextConfig` that change the
/// computation; absent or `null` keys take transformers' defaults, the rest is ignored).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub(crate) vocab_size: usize,
    /// Width of the token embeddings and of the output `(b, 77, hidden_size)`: the U-Net's
    /// `cross_attention_dim` (768 for SD 1.x, 1024 for SD 2.x / sd-turbo).
    pub hidden_size: usize,
    pub(crate) intermediate_size: usize,
    /// Encoder layers (12 for SD 1.x's CLIP ViT-L/14, 23 for sd-turbo's OpenCLIP ViT-H).
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`hidden_size` must be a multiple).
    pub num_attention_heads: usize,
    pub(crate) max_position_embeddings: usize,
    pub(crate) hidden_act: ClipActivation,
    pub(crate) layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    /// transformers 4.35 `CLIPTextConfig()` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ComponentConfig for ClipTextConfig {
    const KIND: &'static str = "CLIP text encoder";

    /// A full `CLIPModel` config (`model_type: "clip"`) carries the text tower's settings in
    /// `text_config`, which transformers' `CLIPTextConfig.from_pretrained` takes out.
    fn preprocess(mut object: Map<String, Value>) -> Map<String, Value> {
        if object.get("model_type").and_then(Value::as_str) == Some("clip") {
            if let Some(Value::Object(text)) = object.remove("text_config") {
                return text;
            }
        }
        object
    }

    fn check(&self) -> std::result::Result<(), Unsupported> {
        refuse_if(
            self.num_attention_heads == 0
                || !self.hidden_size.is_multiple_of(self.num_attention_heads),
            "num_attention_heads",
            self.num_attention_heads,
            format!("must divide hidden_size ({})", self.hidden_size),
        )?;
        refuse_if(
            self.max_position_embeddings == 0,
            "max_position_embeddings",
            0,
            "must be at least 1",
        )
    }
}

impl ClipTextConfig {
    /// Reads a transformers `config.json` ([`crate::model::config::load`]).
    pub(crate) fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        config::load(path.as_ref())
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        if !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!(
                "CLIP hidden_size {h} is not a multiple of num_attention_heads {}",
                cfg.num_attention_heads
            );
        }
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `xs`: [B, T, C]; `mask`: [T, T] additive causal mask (f32).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = xs.dims3()?;
        let dtype = xs.dtype();
        let scale = (self.head_dim as f64).powf(-0.5);
        let shape = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = shape((self.q_proj.forward(xs)? * scale)?)?;
        let k = shape(self.k_proj.forward(xs)?)?;
        let v = shape(self.v_proj.forward(xs)?)?;
        let w = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let w = w.broadcast_add(mask)?;
        let w = candle_nn::ops::softmax_last_dim(&w)?.to_dtype(dtype)?;
        let out = w.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: ClipActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: candle_nn::linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            layer_norm2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let residual = xs;
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (residual + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = self.fc2.forward(&self.act.apply(&h)?)?;
        xs + h
    }
}

/// transformers' `CLIPTextModel` (text tower only, no projection).
#[derive(Debug, Clone)]
pub(crate) struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_position_embeddings: usize,
}

impl ClipTextModel {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint root (tensor names start with
    /// `text_model.`).
    pub(crate) fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = candle_nn::layer_norm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            vb.pp("final_layer_norm"),
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
        // transformers fills with finfo(dtype).min; -inf gives the same softmax here since every
        // row keeps its diagonal.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), device)
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = input_ids.dims2()?;
        if t > self.max_position_embeddings {
            candle_core::bail!(
                "CLIP input has {t} tokens, more than max_position_embeddings {}",
                self.max_position_embeddings
            );
        }
        let ids = match input_ids.dtype() {
            DType::U32 | DType::I64 => input_ids.clone(),
            _ => input_ids.to_dtype(DType::U32)?,
        };
        let tok = self.token_embedding.forward(&ids)?;
        let pos_ids = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let pos = self.position_embedding.forward(&pos_ids)?;
        tok.broadcast_add(&pos)
    }

    /// Runs the embeddings and the first `num_layers` encoder layers (no final layer norm).
    fn run_layers(&self, input_ids: &Tensor, num_layers: usize) -> Result<Tensor> {
        let mut xs = self.embed(input_ids)?;
        let mask = Self::causal_mask(xs.dim(1)?, xs.device())?;
        for layer in self.layers.iter().take(num_layers) {
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(xs)
    }

    /// `input_ids` [B, T] (u32 or i64, T ≤ max_position_embeddings) → `last_hidden_state`
    /// [B, T, hidden] after `final_layer_norm`.
    pub(crate) fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let xs = self.run_layers(input_ids, self.layers.len())?;
        self.final_layer_norm.forward(&xs)
    }

    /// `hidden_states[num_layers]` of transformers (output after `num_layers` encoder layers,
    /// 0 = embeddings), without the final layer norm. For `clip_skip = k` diffusers uses
    /// `final_layer_norm(hidden_states[-(k + 1)])`: see [`Self::forward_clip_skip`].
    #[cfg(test)]
    pub(crate) fn forward_hidden(&self, input_ids: &Tensor, num_layers: usize) -> Result<Tensor> {
        if num_layers > self.layers.len() {
            candle_core::bail!(
                "CLIP hidden state {num_layers} requested, the model has {} layers",
                self.layers.len()
            );
        }
        self.run_layers(input_ids, num_layers)
    }

    /// diffusers' `clip_skip` (0 = plain [`Self::forward`]): the output `clip_skip` layers before
    /// the last one, passed through `final_layer_norm`.
    #[cfg(test)]
    pub(crate) fn forward_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if clip_skip >= n {
            candle_core::bail!("clip_skip {clip_skip} must be below the layer count {n}");
        }
        let xs = self.run_layers(input_ids, n - clip_skip)?;
        self.final_layer_norm.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden, target, tol};

    fn check(model_dir: &str, golden_name: &str) {
        let dir = fixture(model_dir).join("text_encoder");
        let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
        let vb = crate::model::hub::load_var_builder(
            &[dir.join("model.safetensors")],
            target().1,
            &target().0,
        )
        .unwrap();
        let model = ClipTextModel::new(vb, &cfg).unwrap();
        let g = golden(golden_name);
        let out = model.forward(&g["input_ids"]).unwrap();
        let err = rel_err(&out, &g["prompt_embeds"]).unwrap();
        assert!(err <= tol(1e-4), "{golden_name}: rel err {err}");
        // u32 ids give the same result.
        let ids32 = g["input_ids"].to_dtype(DType::U32).unwrap();
        let out32 = model.forward(&ids32).unwrap();
        assert_eq!(rel_err(&out32, &out).unwrap(), 0.0);
    }

    #[test]
    fn sd15_text_encoder_matches_golden() {
        check("models/tiny-sd15", "text_sd15");
    }

    #[test]
    fn sd21_text_encoder_matches_golden() {
        let cfg =
            ClipTextConfig::from_file(fixture("models/tiny-sd21").join("text_encoder/config.json"))
                .unwrap();
        assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
        check("models/tiny-sd21", "text_sd21");
    }

    #[test]
    fn clip_skip_zero_is_forward() {
        let dir = fixture("models/tiny-sd15").join("text_encoder");
        let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
        let vb = crate::model::hub::load_var_builder(
            &[dir.join("model.safetensors")],
            target().1,
            &target().0,
        )
        .unwrap();
        let model = ClipTextModel::new(vb, &cfg).unwrap();
        let ids = golden("text_sd15")["input_ids"].clone();
        let a = model.forward(&ids).unwrap();
        let b = model.forward_clip_skip(&ids, 0).unwrap();
        assert_eq!(rel_err(&a, &b).unwrap(), 0.0);
        let h = model.forward_hidden(&ids, 1).unwrap();
        assert_eq!(h.dims(), &[3, 77, 32]);
        assert!(model.forward_clip_skip(&ids, 2).is_err());
    }
}
