//! U-Net stages: `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` and `UpBlock2D` (diffusers names `resnets.{j}`, `attentions.{j}`,
//! `downsamplers.0`, `upsamplers.0`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Cond, KvPair, SelfAttnMode, Transformer2DConfig, Transformer2DModel};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// Settings shared by the blocks of one U-Net.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockCommon {
    pub(crate) temb_channels: usize,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) cross_attention_dim: usize,
    pub(crate) use_linear_projection: bool,
    pub(crate) upcast_attention: bool,
}

/// Attention settings of one stage (`None` for blocks without attention).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageAttn {
    pub(crate) heads: usize,
    pub(crate) transformer_layers: usize,
    pub(crate) only_cross_attention: bool,
}

fn transformer(
    vb: VarBuilder,
    channels: usize,
    a: &StageAttn,
    c: &BlockCommon,
) -> Result<Transformer2DModel> {
    if a.heads == 0 || !channels.is_multiple_of(a.heads) {
        candle_core::bail!(
            "{channels} channels cannot be split into {} attention heads",
            a.heads
        );
    }
    Transformer2DModel::new(
        vb,
        &Transformer2DConfig {
            heads: a.heads,
            head_dim: channels / a.heads,
            in_channels: channels,
            num_layers: a.transformer_layers,
            cross_attention_dim: c.cross_attention_dim,
            norm_num_groups: c.groups,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: a.only_cross_attention,
            upcast_attention: c.upcast_attention,
        },
    )
}

fn resnet(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    c: &BlockCommon,
    scale: f64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        &ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(c.temb_channels),
            groups: c.groups,
            eps: c.eps,
            output_scale_factor: scale,
        },
    )
}

/// `DownBlock2D` (`attn == None`) or `CrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        attn: Option<&StageAttn>,
        c: &BlockCommon,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for j in 0..num_layers {
            let cin = if j == 0 { in_channels } else { out_channels };
            resnets.push(resnet(
                vb.pp("resnets").pp(j.to_string()),
                cin,
                out_channels,
                c,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(transformer(
                    vb.pp("attentions").pp(j.to_string()),
                    out_channels,
                    a,
                    c,
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp("0"),
                out_channels,
                out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub(crate) fn collect_kv(&self, ehs: &Tensor, out: &mut Vec<KvPair>) -> Result<()> {
        for a in &self.attentions {
            a.collect_kv(ehs, out)?;
        }
        Ok(())
    }

    /// Returns the block output and appends its skip connections to `skips`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        cond: Cond,
        mode: SelfAttnMode,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, cond, mode)?;
            }
            skips.push(xs.clone());
        }
        if let Some(d) = &self.downsampler {
            xs = d.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then (`attentions.i`, `resnets.{i+1}`) pairs.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        num_layers: usize,
        output_scale_factor: f64,
        attn: &StageAttn,
        c: &BlockCommon,
    ) -> Result<Self> {
        let mut resnets = vec![resnet(
            vb.pp("resnets").pp("0"),
            channels,
            channels,
            c,
            output_scale_factor,
        )?];
        let mut attentions = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            attentions.push(transformer(
                vb.pp("attentions").pp(i.to_string()),
                channels,
                attn,
                c,
            )?);
            resnets.push(resnet(
                vb.pp("resnets").pp((i + 1).to_string()),
                channels,
                channels,
                c,
                output_scale_factor,
            )?);
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub(crate) fn collect_kv(&self, ehs: &Tensor, out: &mut Vec<KvPair>) -> Result<()> {
        for a in &self.attentions {
            a.collect_kv(ehs, out)?;
        }
        Ok(())
    }

    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        cond: Cond,
        mode: SelfAttnMode,
    ) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = a.forward(&xs, cond, mode)?;
            xs = r.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

/// `UpBlock2D` (`attn == None`) or `CrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_upsample: bool,
        attn: Option<&StageAttn>,
        c: &BlockCommon,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for j in 0..num_layers {
            let skip = if j == num_layers - 1 {
                in_channels
            } else {
                out_channels
            };
            let cin = if j == 0 {
                prev_output_channels
            } else {
                out_channels
            };
            resnets.push(resnet(
                vb.pp("resnets").pp(j.to_string()),
                cin + skip,
                out_channels,
                c,
                1.0,
            )?);
            if let Some(a) = attn {
                attentions.push(transformer(
                    vb.pp("attentions").pp(j.to_string()),
                    out_channels,
                    a,
                    c,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                vb.pp("upsamplers").pp("0"),
                out_channels,
                out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip connections this block consumes.
    pub(crate) fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    pub(crate) fn collect_kv(&self, ehs: &Tensor, out: &mut Vec<KvPair>) -> Result<()> {
        for a in &self.attentions {
            a.collect_kv(ehs, out)?;
        }
        Ok(())
    }

    /// Consumes `skips` (last first, as diffusers pops them); upsamples to `upsample_size`
    /// when given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        cond: Cond,
        mode: SelfAttnMode,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, (r, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            xs = Tensor::cat(&[&xs, skip], 1)?;
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, cond, mode)?;
            }
        }
        if let Some(u) = &self.upsampler {
            xs = u.forward(&xs, upsample_size)?;
        }
        Ok(xs)
    }
}
