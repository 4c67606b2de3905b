//! LoRA fusion at load time.
//!
//! A LoRA file is parsed into modules ([`LoraFile`]) and fused into a component's weight map
//! before the component's `VarBuilder` is built (`fuse_into`, then
//! `VarBuilder::from_tensors`):
//!
//! `W += scale · (alpha / rank) · up.flatten(1) @ down.flatten(1)`, reshaped to `W`'s shape,
//! computed in f32 and stored back in `W`'s dtype. This covers linear layers, k×k convs
//! (down `[r, in, k, k]`, up `[out, r, 1, 1]`) and the 1×1 `proj_in`/`proj_out` that are convs in
//! SD 1.5 but linears in SD 2 (`use_linear_projection`): only the element count has to agree.
//! Without an `alpha` tensor, alpha = rank (factor 1), as diffusers/peft do.
//!
//! Accepted key formats (one module = a down/up pair plus an optional `.alpha`):
//! * kohya (e.g. `latent-consistency/lcm-lora-sdv1-5`): `lora_unet_<name>` /
//!   `lora_te_<name>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`, where `<name>` is the
//!   diffusers/transformers module path with `.` replaced by `_`. Since module names contain `_`
//!   themselves (`to_q`, `proj_in`, `ff_net_0_proj`), the mapping is resolved against the
//!   component's actual tensor names, never by blind replacement.
//! * diffusers / peft: `unet.<dotted.path>` / `text_encoder.<dotted.path>` +
//!   `.lora.down.weight`/`.lora.up.weight`, `.lora_linear_layer.down.weight`/`.up.weight`, or
//!   `.lora_A.weight`/`.lora_B.weight` (+ optional `.alpha`).
//!
//! Every LoRA module addressed to the target component must land on an existing weight; otherwise
//! `fuse_into` fails (listing a few names) without changing anything, so a LoRA for another
//! architecture (e.g. SDXL `input_blocks` names) is rejected instead of silently ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

/// Which component of the pipeline a LoRA module applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// The U-Net (`lora_unet_…`, `unet.…`).
    Unet,
    /// The CLIP text encoder (`lora_te_…`, `text_encoder.…`).
    TextEncoder,
}

/// How a module names its target weight.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ModuleName {
    /// kohya: full key stem, e.g. `lora_unet_down_blocks_0_resnets_0_conv1`.
    Kohya(String),
    /// diffusers/peft: dotted module path without the component prefix, e.g.
    /// `down_blocks.0.resnets.0.conv1`.
    Dotted(String),
}

/// One LoRA module: the low-rank pair and its optional alpha (the update is
/// `alpha/rank · up @ down`, see the module docs).
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `[rank, in]` or `[rank, in, k, k]`.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub(crate) up: Tensor,
    /// `alpha` (the effective factor is `alpha / rank`); `None` means alpha = rank.
    pub alpha: Option<f32>,
}

impl LoraModule {
    /// The LoRA rank (`down.dim(0)`).
    ///
    /// # Errors
    /// `down` is a scalar (never for a parsed file).
    pub fn rank(&self) -> candle_core::Result<usize> {
        self.down.dim(0)
    }

    /// `scale · alpha/rank · up.flatten(1) @ down.flatten(1)` in f32, shape `[out, in·k·k]`.
    pub(crate) fn delta(&self, scale: f32) -> candle_core::Result<Tensor> {
        let rank = self.rank()?;
        let factor = match self.alpha {
            Some(a) => a as f64 / rank as f64,
            None => 1.0,
        } * scale as f64;
        let up = self.up.to_dtype(DType::F32)?.flatten_from(1)?;
        let down = self.down.to_dtype(DType::F32)?.flatten_from(1)?;
        up.matmul(&down)? * factor
    }
}

/// A parsed LoRA file: modules per target component.
#[derive(Debug, Clone, Default)]
pub struct LoraFile {
    unet: BTreeMap<String, (ModuleName, LoraModule)>,
    text_encoder: BTreeMap<String, (ModuleName, LoraModule)>,
}

/// Suffixes of the down / up / alpha tensors, in the formats accepted.
const DOWN_SUFFIXES: [&str; 4] = [
    ".lora_down.weight",
    ".lora.down.weight",
    ".lora_linear_layer.down.weight",
    ".lora_A.weight",
];
const UP_SUFFIXES: [&str; 4] = [
    ".lora_up.weight",
    ".lora.up.weight",
    ".lora_linear_layer.up.weight",
    ".lora_B.weight",
];

#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<Tensor>,
}

fn classify(stem: &str) -> Option<(LoraTarget, ModuleName)> {
    if stem.starts_with("lora_unet_") {
        Some((LoraTarget::Unet, ModuleName::Kohya(stem.to_string())))
    } else if stem.starts_with("lora_te_") {
        Some((LoraTarget::TextEncoder, ModuleName::Kohya(stem.to_string())))
    } else if let Some(rest) = stem.strip_prefix("unet.") {
        Some((LoraTarget::Unet, ModuleName::Dotted(rest.to_string())))
    } else {
        stem.strip_prefix("text_encoder.").map(|rest| {
            (
                LoraTarget::TextEncoder,
                ModuleName::Dotted(rest.to_string()),
            )
        })
    }
}

impl LoraFile {
    /// Reads a LoRA `.safetensors` file (tensors stay on the CPU until fused), in kohya or
    /// diffusers/PEFT key naming (diffusers' `lora_state_dict` conversions).
    ///
    /// # Errors
    /// The file cannot be read as safetensors, or its keys or shapes are not a LoRA sdcam
    /// understands (a module without `down`/`up`, mismatched ranks, an unknown key layout).
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading LoRA {}", path.display()))?;
        Self::from_tensors(tensors).with_context(|| format!("parsing LoRA {}", path.display()))
    }

    /// Parses LoRA tensors given by name.
    pub(crate) fn from_tensors(tensors: HashMap<String, Tensor>) -> anyhow::Result<Self> {
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, t) in tensors {
            if let Some(stem) = DOWN_SUFFIXES.iter().find_map(|s| key.strip_suffix(s)) {
                parts.entry(stem.to_string()).or_default().down = Some(t);
            } else if let Some(stem) = UP_SUFFIXES.iter().find_map(|s| key.strip_suffix(s)) {
                parts.entry(stem.to_string()).or_default().up = Some(t);
            } else if let Some(stem) = key.strip_suffix(".alpha") {
                parts.entry(stem.to_string()).or_default().alpha = Some(t);
            } else {
                unknown.push(key);
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            bail!(
                "{} tensor(s) in an unsupported LoRA format, e.g. {:?}",
                unknown.len(),
                &unknown[..unknown.len().min(5)]
            );
        }
        let mut out = Self::default();
        let mut unaddressed = Vec::new();
        for (stem, p) in parts {
            let (Some(down), Some(up)) = (p.down, p.up) else {
                bail!("LoRA module {stem} lacks its down or up weight");
            };
            let alpha = match p.alpha {
                Some(a) => Some(
                    a.to_dtype(DType::F32)?
                        .flatten_all()?
                        .get(0)?
                        .to_scalar::<f32>()
                        .with_context(|| format!("LoRA alpha of {stem}"))?,
                ),
                None => None,
            };
            if down.dim(0)? != up.dim(1)? {
                bail!(
                    "LoRA module {stem}: down {:?} and up {:?} have different ranks",
                    down.dims(),
                    up.dims()
                );
            }
            let module = LoraModule { down, up, alpha };
            match classify(&stem) {
                Some((LoraTarget::Unet, name)) => {
                    out.unet.insert(stem, (name, module));
                }
                Some((LoraTarget::TextEncoder, name)) => {
                    out.text_encoder.insert(stem, (name, module));
                }
                None => unaddressed.push(stem),
            }
        }
        if !unaddressed.is_empty() {
            bail!(
                "{} LoRA module(s) for neither the U-Net nor the text encoder (unsupported \
                 architecture?), e.g. {:?}",
                unaddressed.len(),
                &unaddressed[..unaddressed.len().min(5)]
            );
        }
        Ok(out)
    }

    fn modules(&self, target: LoraTarget) -> &BTreeMap<String, (ModuleName, LoraModule)> {
        match target {
            LoraTarget::Unet => &self.unet,
            LoraTarget::TextEncoder => &self.text_encoder,
        }
    }

    /// Number of modules addressed to `target`.
    pub fn num_modules(&self, target: LoraTarget) -> usize {
        self.modules(target).len()
    }

    /// The module stored under `name` (a kohya stem or a prefixed dotted path).
    pub fn module(&self, target: LoraTarget, name: &str) -> Option<&LoraModule> {
        self.modules(target).get(name).map(|(_, m)| m)
    }
}

/// What [`fuse_into`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FuseReport {
    /// Weights changed (= LoRA modules for the target).
    pub(crate) fused: usize,
    /// LoRA modules for the target without a matching weight. Always empty in a report returned by
    /// [`fuse_into`] (it fails instead); filled by [`match_modules`].
    pub(crate) unmatched: Vec<String>,
}

/// The kohya stem of a component weight name: `lora_unet_` / `lora_te_` + the name without
/// `.weight`, `.` → `_`.
fn kohya_stem(target: LoraTarget, weight_name: &str) -> Option<String> {
    let base = weight_name.strip_suffix(".weight")?;
    let prefix = match target {
        LoraTarget::Unet => "lora_unet_",
        LoraTarget::TextEncoder => "lora_te_",
    };
    Some(format!("{prefix}{}", base.replace('.', "_")))
}

/// Resolves the LoRA modules for `target` against a component's tensor names: returns
/// (module key → weight name) for the matched ones and the report (with `unmatched` filled).
pub(crate) fn match_modules<'a>(
    tensor_names: impl IntoIterator<Item = &'a String>,
    lora: &LoraFile,
    target: LoraTarget,
) -> (BTreeMap<String, String>, FuseReport) {
    let names: Vec<&String> = tensor_names.into_iter().collect();
    let mut kohya: HashMap<String, &String> = HashMap::new();
    for n in &names {
        if let Some(stem) = kohya_stem(target, n) {
            kohya.entry(stem).or_insert(n);
        }
    }
    let mut matched = BTreeMap::new();
    let mut unmatched = Vec::new();
    for (key, (name, _)) in lora.modules(target) {
        let weight = match name {
            ModuleName::Kohya(stem) => kohya.get(stem).map(|w| (*w).clone()),
            ModuleName::Dotted(path) => {
                let w = format!("{path}.weight");
                names.iter().any(|n| **n == w).then_some(w)
            }
        };
        match weight {
            Some(w) => {
                matched.insert(key.clone(), w);
            }
            None => unmatched.push(key.clone()),
        }
    }
    let report = FuseReport {
        fused: matched.len(),
        unmatched,
    };
    (matched, report)
}

/// Fuses the LoRA modules for `target` into `tensors` (the component's weights by diffusers /
/// transformers name) with the given `scale`. All-or-nothing: on error `tensors` is unchanged.
pub(crate) fn fuse_into(
    tensors: &mut HashMap<String, Tensor>,
    lora: &LoraFile,
    target: LoraTarget,
    scale: f32,
) -> anyhow::Result<FuseReport> {
    let (matched, report) = match_modules(tensors.keys(), lora, target);
    if !report.unmatched.is_empty() {
        bail!(
            "{} of {} LoRA module(s) for the {target:?} match no weight of the model (LoRA for \
             another architecture?), e.g. {:?}",
            report.unmatched.len(),
            lora.num_modules(target),
            &report.unmatched[..report.unmatched.len().min(5)]
        );
    }
    // Compute every new weight first, then commit.
    let mut updates = Vec::with_capacity(matched.len());
    for (key, weight_name) in &matched {
        let (_, module) = &lora.modules(target)[key];
        let w = &tensors[weight_name];
        let delta = module
            .delta(scale)
            .and_then(|d| d.to_device(w.device()))
            .with_context(|| format!("LoRA module {key}"))?;
        if delta.elem_count() != w.elem_count() {
            bail!(
                "LoRA module {key}: update {:?} does not fit weight {weight_name} {:?}",
                delta.dims(),
                w.dims()
            );
        }
        let fused = (w.to_dtype(DType::F32)? + delta.reshape(w.shape())?)?.to_dtype(w.dtype())?;
        updates.push((weight_name.clone(), fused));
    }
    for (name, t) in updates {
        tensors.insert(name, t);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::clip::{ClipTextConfig, ClipTextModel};
    use crate::model::rel_err;
    use crate::model::testutil::{fixture, golden, target, tol};
    use candle_nn::VarBuilder;

    fn lora() -> LoraFile {
        LoraFile::load(fixture("models/tiny-lora/pytorch_lora_weights.safetensors")).unwrap()
    }

    fn weights(rel: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
    }

    const UNET: &str = "models/tiny-sd15/unet/diffusion_pytorch_model.safetensors";
    const TE: &str = "models/tiny-sd15/text_encoder/model.safetensors";

    #[test]
    fn every_module_maps_onto_a_weight() {
        let lora = lora();
        assert_eq!(lora.num_modules(LoraTarget::Unet), 79);
        assert_eq!(lora.num_modules(LoraTarget::TextEncoder), 12);
        let unet = weights(UNET);
        let (m, r) = match_modules(unet.keys(), &lora, LoraTarget::Unet);
        assert!(r.unmatched.is_empty(), "{:?}", r.unmatched);
        assert_eq!(m.len(), 79);
        assert_eq!(
            m["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"],
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
        );
        let te = weights(TE);
        let (m, r) = match_modules(te.keys(), &lora, LoraTarget::TextEncoder);
        assert!(r.unmatched.is_empty(), "{:?}", r.unmatched);
        assert_eq!(m.len(), 12);
    }

    #[test]
    fn text_encoder_fused_matches_golden() {
        let lora = lora();
        let mut te = weights(TE);
        let report = fuse_into(&mut te, &lora, LoraTarget::TextEncoder, 0.7).unwrap();
        assert_eq!(report.fused, 12);
        let cfg = ClipTextConfig::from_file(fixture("models/tiny-sd15/text_encoder/config.json"))
            .unwrap();
        let vb = VarBuilder::from_tensors(te, target().1, &target().0);
        let model = ClipTextModel::new(vb, &cfg).unwrap();
        let g = golden("lora_sd15");
        let out = model.forward(&g["text.input_ids"]).unwrap();
        let err = rel_err(&out, &g["text.prompt_embeds"]).unwrap();
        assert!(err <= tol(1e-4), "rel err {err}");
    }

    #[test]
    fn unet_fused_matches_golden() {
        use crate::model::unet::{UNet2DConditionModel, UNetConfig};
        let lora = lora();
        let mut unet = weights(UNET);
        let report = fuse_into(&mut unet, &lora, LoraTarget::Unet, 0.7).unwrap();
        assert_eq!(report.fused, 79);
        let text = std::fs::read_to_string(fixture("models/tiny-sd15/unet/config.json")).unwrap();
        let cfg = UNetConfig::from_json(&text).unwrap();
        let vb = VarBuilder::from_tensors(unet, target().1, &target().0);
        let model = UNet2DConditionModel::new(vb, &cfg).unwrap();
        let g = golden("lora_sd15");
        for case in ["case0", "case3"] {
            let out = model
                .forward(
                    &g[&format!("{case}.sample")],
                    &g[&format!("{case}.timestep")],
                    &g[&format!("{case}.encoder_hidden_states")],
                )
                .unwrap();
            let err = rel_err(&out, &g[&format!("{case}.out")]).unwrap();
            assert!(err <= tol(1e-4), "{case}: rel err {err}");
        }
    }

    /// Independent scalar evaluation of W + s·(alpha/r)·up@down for one module.
    fn check_formula(weights_rel: &str, target: LoraTarget, stem: &str, weight_name: &str) {
        let raw: HashMap<String, Tensor> = candle_core::safetensors::load(
            fixture("models/tiny-lora/pytorch_lora_weights.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let f32v = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let down_t = &raw[&format!("{stem}.lora_down.weight")];
        let up_t = &raw[&format!("{stem}.lora_up.weight")];
        let alpha = f32v(&raw[&format!("{stem}.alpha")])[0];
        let (down, up) = (f32v(down_t), f32v(up_t));
        let r = down_t.dim(0).unwrap();
        let out = up_t.dim(0).unwrap();
        let inner = down.len() / r;

        let mut w = weights(weights_rel);
        let orig = f32v(&w[weight_name]);
        let shape = w[weight_name].dims().to_vec();
        let lora = lora();
        fuse_into(&mut w, &lora, target, 0.7).unwrap();
        assert_eq!(w[weight_name].dims(), &shape[..]);
        let fused = f32v(&w[weight_name]);
        assert_eq!(orig.len(), out * inner);
        let mut max_err = 0f32;
        for o in 0..out {
            for i in 0..inner {
                let mut acc = 0f64;
                for k in 0..r {
                    acc += up[o * r + k] as f64 * down[k * inner + i] as f64;
                }
                let expect = orig[o * inner + i] as f64 + 0.7 * (alpha as f64 / r as f64) * acc;
                max_err = max_err.max((expect as f32 - fused[o * inner + i]).abs());
            }
        }
        assert!(max_err < 1e-5, "{stem}: max err {max_err}");
        assert!(
            orig.iter().zip(&fused).any(|(a, b)| a != b),
            "{stem}: weight unchanged"
        );
    }

    #[test]
    fn fused_weight_matches_formula() {
        // Linear (text encoder and U-Net) and 3×3 / 1×1 convs.
        check_formula(
            TE,
            LoraTarget::TextEncoder,
            "lora_te_text_model_encoder_layers_1_mlp_fc2",
            "text_model.encoder.layers.1.mlp.fc2.weight",
        );
        check_formula(
            UNET,
            LoraTarget::Unet,
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        );
        check_formula(
            UNET,
            LoraTarget::Unet,
            "lora_unet_down_blocks_1_resnets_0_conv1",
            "down_blocks.1.resnets.0.conv1.weight",
        );
        check_formula(
            UNET,
            LoraTarget::Unet,
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "down_blocks.0.attentions.0.proj_in.weight",
        );
    }

    #[test]
    fn linear_lora_fits_conv_1x1_and_back() {
        // SD1.5 conv proj_in LoRA onto an SD2-style linear weight: same elements, other shape.
        let lora = lora();
        let stem = "lora_unet_down_blocks_0_attentions_0_proj_in";
        let m = lora.module(LoraTarget::Unet, stem).unwrap();
        let mut w = HashMap::new();
        w.insert(
            "down_blocks.0.attentions.0.proj_in.weight".to_string(),
            Tensor::zeros((16, 16), DType::F16, &Device::Cpu).unwrap(),
        );
        let mut one = LoraFile::default();
        one.unet.insert(
            stem.to_string(),
            (ModuleName::Kohya(stem.to_string()), m.clone()),
        );
        let report = fuse_into(&mut w, &one, LoraTarget::Unet, 1.0).unwrap();
        assert_eq!(report.fused, 1);
        let t = &w["down_blocks.0.attentions.0.proj_in.weight"];
        assert_eq!(t.dims(), &[16, 16]);
        assert_eq!(t.dtype(), DType::F16);
    }

    #[test]
    fn foreign_lora_is_rejected() {
        let mut t = HashMap::new();
        let stem = "lora_unet_input_blocks_1_1_proj_in";
        t.insert(
            format!("{stem}.lora_down.weight"),
            Tensor::ones((2, 16), DType::F16, &Device::Cpu).unwrap(),
        );
        t.insert(
            format!("{stem}.lora_up.weight"),
            Tensor::ones((16, 2), DType::F16, &Device::Cpu).unwrap(),
        );
        let lora = LoraFile::from_tensors(t).unwrap();
        let mut unet = weights(UNET);
        let before = unet["conv_in.weight"].clone();
        let err = fuse_into(&mut unet, &lora, LoraTarget::Unet, 1.0).unwrap_err();
        assert!(err.to_string().contains("input_blocks"), "{err}");
        assert_eq!(rel_err(&unet["conv_in.weight"], &before).unwrap(), 0.0);

        let mut bad = HashMap::new();
        bad.insert(
            "lora_unet_x.hada_w1_a".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(LoraFile::from_tensors(bad).is_err());
    }

    /// Every LoRA key must land on a module: keys for a component sdcam does not have (SDXL's
    /// second text encoder), in no known format, or for a module the model lacks, are errors
    /// that name the key.
    #[test]
    fn a_key_that_matches_no_module_is_an_error_naming_it() {
        let pair = |stem: &str| {
            let mut t = HashMap::new();
            t.insert(
                format!("{stem}.lora_down.weight"),
                Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap(),
            );
            t.insert(
                format!("{stem}.lora_up.weight"),
                Tensor::ones((16, 2), DType::F32, &Device::Cpu).unwrap(),
            );
            t
        };
        for stem in [
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
            "lora_vae_decoder_conv_in",
        ] {
            let e = LoraFile::from_tensors(pair(stem)).unwrap_err();
            assert!(format!("{e:#}").contains(stem), "{stem}: {e:#}");
        }
        let mut junk = pair("lora_unet_down_blocks_0_resnets_0_conv1");
        junk.insert(
            "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale".into(),
            Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = LoraFile::from_tensors(junk).unwrap_err();
        assert!(format!("{e:#}").contains("dora_scale"), "{e:#}");
        // A U-Net module the model does not have (one letter off), next to one it has.
        let mut t = pair("lora_unet_down_blocks_0_attentions_0_proj_inn");
        t.extend(pair("lora_unet_down_blocks_0_attentions_0_proj_in"));
        let lora = LoraFile::from_tensors(t).unwrap();
        let mut unet = weights(UNET);
        let e = fuse_into(&mut unet, &lora, LoraTarget::Unet, 1.0).unwrap_err();
        assert!(
            format!("{e:#}").contains("lora_unet_down_blocks_0_attentions_0_proj_inn"),
            "{e:#}"
        );
    }

    #[test]
    fn peft_format_is_accepted() {
        let mut t = HashMap::new();
        t.insert(
            "unet.down_blocks.0.resnets.0.conv1.lora_A.weight".to_string(),
            Tensor::ones((2, 16, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "unet.down_blocks.0.resnets.0.conv1.lora_B.weight".to_string(),
            Tensor::ones((16, 2, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
        let lora = LoraFile::from_tensors(t).unwrap();
        let mut unet = weights(UNET);
        let before = unet["down_blocks.0.resnets.0.conv1.weight"].clone();
        let r = fuse_into(&mut unet, &lora, LoraTarget::Unet, 0.5).unwrap();
        assert_eq!(r.fused, 1);
        // No alpha: factor 1, so every element grows by 0.5 · rank(2) · 1 · 1 = 1.
        let diff = (&unet["down_blocks.0.resnets.0.conv1.weight"] - &before).unwrap();
        let v: Vec<f32> = diff.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6));
    }
}
