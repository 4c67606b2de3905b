//! Linear layers (`y = x·Wᵀ + b`, diffusers `nn.Linear`) for the U-Net and the VAE: on the
//! CPU, the product of `model::packed_gemm` against the weight packed when the layer is built
//! (the f32 weight is not kept), in bf16 with `model.dtype = "bf16"` (building one on a CPU
//! without AVX512-BF16 is an error) or in f32 on CPUs with AVX-512 or AVX2
//! (`packed_gemm::products_for`); elsewhere candle's `Linear`.
//!
//! With the packed products the bias, and a residual connection ([`Linear::forward_add`], the
//! transformer blocks' `to_out` and `ff.net.2`), are added in one pass on rayon's pool inside
//! the layer's op, not by candle's broadcast add (a pass, an allocation and a wake-up of
//! candle's own thread pool each).
//!
//! Drop-in for `candle_nn::{linear, linear_no_bias, Linear}`: same constructors, same tensor
//! names (`weight` `[out, in]`, `bias` `[out]`).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::model::cpu_f32;
use crate::model::packed_gemm::{self, f32_params, products_for, Kernel, PackedA, PackedB};

/// A linear layer (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// candle's layer, where the products are candle's (`None`: the weight lives only packed).
    inner: Option<candle_nn::Linear>,
    /// `[out]`, for the packed products (added by their op, [`PackedLinear`]).
    bias: Option<Arc<[f32]>>,
    /// For the packed products: `Wᵀ` packed (at build time; the f32 weight is then dropped,
    /// so that the layer holds one copy of it).
    packed: Option<Arc<PackedB>>,
}

/// `candle_nn::linear`: weight `[out, in]` and bias `[out]` from `vb`.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let kernel = products_for(&vb)?;
    let inner = candle_nn::linear(in_dim, out_dim, f32_params(vb))?;
    Linear::wrap(inner, kernel)
}

/// `candle_nn::linear_no_bias`: weight `[out, in]` from `vb`.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let kernel = products_for(&vb)?;
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, f32_params(vb))?;
    Linear::wrap(inner, kernel)
}

impl Linear {
    /// candle's layer as it is, or with `kernel` its weight packed now and dropped.
    fn wrap(inner: candle_nn::Linear, kernel: Option<Kernel>) -> Result<Self> {
        let Some(kernel) = kernel else {
            return Ok(Self {
                inner: Some(inner),
                bias: None,
                packed: None,
            });
        };
        let w = inner.weight();
        let (out, inp) = w.dims2()?;
        let data = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let packed = PackedB::from_transposed(kernel, &data, (out, inp, inp));
        Ok(Self {
            inner: None,
            bias: match inner.bias() {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?.into()),
                None => None,
            },
            packed: Some(Arc::new(packed)),
        })
    }
}

impl Module for Linear {
    /// `x` `[…, in]` → `[…, out]`.
    ///
    /// # Errors
    /// Besides candle's: a layer with packed products given other than an f32 CPU tensor.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.packed_op(xs)? {
            Some(op) => xs.contiguous()?.apply_op1_no_bwd(&op),
            None => match &self.inner {
                Some(inner) => inner.forward(xs),
                None => candle_core::bail!("linear: the layer has no weight"),
            },
        }
    }
}

impl Linear {
    /// `x·Wᵀ + b + residual` (`residual` shaped as the output): a block's residual connection
    /// added by the packed product's op in the same pass as the bias, else after
    /// [`Module::forward`].
    ///
    /// # Errors
    /// As [`Module::forward`]; also a residual of another shape.
    pub(crate) fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.packed_op(xs)? {
            Some(op) => xs
                .contiguous()?
                .apply_op2_no_bwd(&residual.contiguous()?, &op),
            None => self.forward(xs)? + residual,
        }
    }

    /// The packed product's op for `xs`, or `None` for candle's layer.
    fn packed_op(&self, xs: &Tensor) -> Result<Option<PackedLinear>> {
        let Some(w) = &self.packed else {
            return Ok(None);
        };
        if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
            candle_core::bail!(
                "linear: the layer's weight is packed for f32 inputs on the CPU, not {:?} on {:?}",
                xs.dtype(),
                xs.device()
            );
        }
        Ok(Some(PackedLinear {
            weight: w.clone(),
            bias: self.bias.clone(),
        }))
    }
}

/// `x · Wᵀ + b` with the packed products: `[…, in]` f32 contiguous → `[…, out]` f32; as a
/// two-input op, plus a residual `[…, out]` (added with the bias, row by row on rayon's pool
/// after the product).
struct PackedLinear {
    weight: Arc<PackedB>,
    bias: Option<Arc<[f32]>>,
}

/// Output rows per parallel task of the bias / residual pass.
const ADD_ROWS: usize = 32;

impl PackedLinear {
    /// The op on `x` (shaped `dims`) and, for the two-input op, the residual and its shape.
    fn run(
        &self,
        x: &[f32],
        dims: &[usize],
        residual: Option<(&[f32], &[usize])>,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (k, n) = (self.weight.rows(), self.weight.cols());
        if dims.last() != Some(&k) {
            candle_core::bail!("packed linear: input {dims:?} does not end in {k}");
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        let residual = match residual {
            Some((r, rdims)) if rdims == shape.as_slice() => Some(r),
            Some((_, rdims)) => {
                candle_core::bail!("packed linear: residual {rdims:?}, output {shape:?}")
            }
            None => None,
        };
        let mut out = Vec::with_capacity(m * n);
        // SAFETY: `out` holds m × n floats, written by this call alone (all of them: the
        // product overwrites C), so they are initialised before `set_len`.
        unsafe {
            let c = (out.as_mut_ptr(), n);
            packed_gemm::matmul_rows(&mut PackedA::default(), x, (m, k, k), &self.weight, c, true);
            out.set_len(m * n);
        }
        if (self.bias.is_some() || residual.is_some()) && n > 0 {
            let bias = self.bias.as_deref();
            out.par_chunks_mut(n * ADD_ROWS)
                .enumerate()
                .for_each(|(t, rows)| {
                    for (i, row) in rows.chunks_exact_mut(n).enumerate() {
                        if let Some(b) = bias {
                            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                        }
                        if let Some(r) = residual {
                            let r = &r[(t * ADD_ROWS + i) * n..][..n];
                            row.iter_mut().zip(r).for_each(|(y, r)| *y += r);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "sdcam-packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "packed linear")?;
        self.run(x, layout.shape().dims(), None)
    }
}

impl CustomOp2 for PackedLinear {
    fn name(&self) -> &'static str {
        "sdcam-packed-linear-add"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(sx, lx, "packed linear")?;
        let r = cpu_f32(sr, lr, "packed linear residual")?;
        self.run(x, lx.shape().dims(), Some((r, lr.shape().dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// With an f32 `VarBuilder` on a CPU with AVX-512 or AVX2 the layer takes the f32 kernel and
    /// matches candle's `Linear` up to summation order (1e-5 of the output's scale); elsewhere
    /// it is candle's.
    #[test]
    fn f32_products_match_candle() {
        if packed_gemm::Kernel::f32().is_none() {
            eprintln!("skipped: no AVX2 (or SDCAM_F32_KERNEL=0): candle's own layer");
            return;
        }
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let layer = linear(300, 70, vb.pp("l")).unwrap();
        assert_eq!(layer.packed.is_some(), packed_gemm::Kernel::f32().is_some());
        assert_eq!(layer.inner.is_some(), layer.packed.is_none());
        let candle = candle_nn::linear(300, 70, vb.pp("l")).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 33, 300), &dev).unwrap();
        let want = candle.forward(&x).unwrap();
        let got = layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 33, 70]);
        let e = crate::model::rel_err(&got, &want).unwrap();
        assert!(e < 1e-5, "{e}");
        // With a residual added by the op: the output plus it, to the bit.
        let r = Tensor::randn(0f32, 1., (2, 33, 70), &dev).unwrap();
        let sum = layer.forward_add(&x, &r).unwrap();
        assert_eq!(
            crate::model::rel_err(&sum, &(&got + &r).unwrap()).unwrap(),
            0.0
        );
        // A residual of another shape is an error, not a broadcast.
        let wrong = Tensor::zeros((2, 70, 33), DType::F32, &dev).unwrap();
        let err = layer.forward_add(&x, &wrong).unwrap_err().to_string();
        assert!(err.contains("residual"), "{err}");
    }

    /// With a bf16 `VarBuilder` on the CPU the layer reads f32 parameters, multiplies in bf16
    /// and stays within bf16 rounding of candle's f32 `Linear` (1e-2 of the output's scale for
    /// 512 random inputs per output).
    #[test]
    fn bf16_products_stay_close_to_f32() {
        if !packed_gemm::bf16_available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb32 = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let f32_layer = candle_nn::linear(512, 70, vb32.pp("l")).unwrap();
        let vb16 = VarBuilder::from_varmap(&map, DType::BF16, &dev);
        let bf16_layer = linear(512, 70, vb16.pp("l")).unwrap();
        assert_eq!(bf16_layer.bias.as_ref().map(|b| b.len()), Some(70));
        let x = Tensor::randn(0f32, 1., (2, 33, 512), &dev).unwrap();
        let want = f32_layer.forward(&x).unwrap();
        let got = bf16_layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 33, 70]);
        let e = crate::model::rel_err(&got, &want).unwrap();
        assert!(e > 0.0 && e < 1e-2, "{e}");
        // Non-contiguous input.
        let xt = x
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        let e = crate::model::rel_err(&bf16_layer.forward(&xt).unwrap(), &want).unwrap();
        assert!(e < 1e-2, "{e}");
    }
}
