//! Linear layers (`y = x·Wᵀ + b`, diffusers `nn.Linear`) for the U-Net and the VAE: candle's
//! `Linear`, or on the CPU with `model.dtype = "bf16"` the bf16 product of `model::bf16_gemm`
//! against the weight packed once (see `bf16_gemm::bf16_products`; building one on a CPU
//! without AVX512-BF16 is an error).
//!
//! Drop-in for `candle_nn::{linear, linear_no_bias, Linear}`: same constructors, same tensor
//! names (`weight` `[out, in]`, `bias` `[out]`).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::model::bf16_gemm::{self, f32_params, products_for, PackedA, PackedB};
use crate::model::cpu_f32;

/// A linear layer (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    inner: candle_nn::Linear,
    /// For bf16 products: `Wᵀ` packed on first use (`None`: candle's f32 product).
    bf16: Option<Arc<OnceLock<Arc<PackedB>>>>,
}

/// `candle_nn::linear`: weight `[out, in]` and bias `[out]` from `vb`.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bf16 = products_for(&vb)?;
    let inner = candle_nn::linear(in_dim, out_dim, f32_params(vb))?;
    Ok(Linear::wrap(inner, bf16))
}

/// `candle_nn::linear_no_bias`: weight `[out, in]` from `vb`.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bf16 = products_for(&vb)?;
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, f32_params(vb))?;
    Ok(Linear::wrap(inner, bf16))
}

impl Linear {
    fn wrap(inner: candle_nn::Linear, bf16: bool) -> Self {
        Self {
            inner,
            bf16: bf16.then(|| Arc::new(OnceLock::new())),
        }
    }

    /// The weight packed for bf16 products (made on first use; two threads may both make it,
    /// with the same result).
    fn packed(&self, cell: &OnceLock<Arc<PackedB>>) -> Result<Arc<PackedB>> {
        if let Some(p) = cell.get() {
            return Ok(p.clone());
        }
        let w = self.inner.weight();
        let (out, inp) = w.dims2()?;
        let data = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let p = Arc::new(PackedB::from_transposed(&data, out, inp, inp));
        Ok(cell.get_or_init(|| p).clone())
    }
}

impl Module for Linear {
    /// `x` `[…, in]` → `[…, out]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Some(cell) = &self.bf16 else {
            return self.inner.forward(xs);
        };
        if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
            return self.inner.forward(xs);
        }
        let w = self.packed(cell)?;
        let ys = xs.contiguous()?.apply_op1_no_bwd(&Bf16Linear(w))?;
        match self.inner.bias() {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// `x · Wᵀ` in bf16 products (no bias): `[…, in]` f32 contiguous → `[…, out]` f32.
struct Bf16Linear(Arc<PackedB>);

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "sdcam-bf16-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "bf16 linear")?;
        let dims = layout.shape().dims();
        let (k, n) = (self.0.rows(), self.0.cols());
        if dims.last() != Some(&k) {
            candle_core::bail!("bf16 linear: input {dims:?} does not end in {k}");
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let a = PackedA::from_rows(x, m, k, k, true);
        let mut out = vec![0f32; m * n];
        // SAFETY: `out` is m × n, written by this call alone.
        unsafe { bf16_gemm::matmul(&a, &self.0, out.as_mut_ptr(), n, true) };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// With a bf16 `VarBuilder` on the CPU the layer reads f32 parameters, multiplies in bf16
    /// and stays within bf16 rounding of candle's f32 `Linear` (1e-2 of the output's scale for
    /// 512 random inputs per output); with an f32 one it is candle's.
    #[test]
    fn bf16_products_stay_close_to_f32() {
        if !bf16_gemm::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb32 = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let f32_layer = linear(512, 70, vb32.pp("l")).unwrap();
        assert!(f32_layer.bf16.is_none());
        let vb16 = VarBuilder::from_varmap(&map, DType::BF16, &dev);
        let bf16_layer = linear(512, 70, vb16.pp("l")).unwrap();
        assert_eq!(bf16_layer.inner.weight().dtype(), DType::F32);
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
