//! Linear layers (`y = x·Wᵀ + b`, diffusers `nn.Linear`) for the U-Net and the VAE: on the
//! CPU, the product of `model::packed_gemm` against the weight packed once, in bf16 with
//! `model.dtype = "bf16"` (building one on a CPU without AVX512-BF16 is an error) or in f32 on
//! CPUs with AVX-512 (`packed_gemm::products_for`); elsewhere candle's `Linear`.
//!
//! Drop-in for `candle_nn::{linear, linear_no_bias, Linear}`: same constructors, same tensor
//! names (`weight` `[out, in]`, `bias` `[out]`).

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::model::cpu_f32;
use crate::model::packed_gemm::{self, f32_params, products_for, Kernel, PackedA, PackedB};

/// A linear layer (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    inner: candle_nn::Linear,
    /// For the packed products: their kernel and `Wᵀ` packed on first use (`None`: candle's
    /// product).
    packed: Option<(Kernel, Arc<OnceLock<Arc<PackedB>>>)>,
}

/// `candle_nn::linear`: weight `[out, in]` and bias `[out]` from `vb`.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let kernel = products_for(&vb)?;
    let inner = candle_nn::linear(in_dim, out_dim, f32_params(vb))?;
    Ok(Linear::wrap(inner, kernel))
}

/// `candle_nn::linear_no_bias`: weight `[out, in]` from `vb`.
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let kernel = products_for(&vb)?;
    let inner = candle_nn::linear_no_bias(in_dim, out_dim, f32_params(vb))?;
    Ok(Linear::wrap(inner, kernel))
}

impl Linear {
    fn wrap(inner: candle_nn::Linear, kernel: Option<Kernel>) -> Self {
        Self {
            inner,
            packed: kernel.map(|k| (k, Arc::new(OnceLock::new()))),
        }
    }

    /// The weight packed for `kernel` (made on first use; two threads may both make it, with
    /// the same result).
    fn packed(&self, kernel: Kernel, cell: &OnceLock<Arc<PackedB>>) -> Result<Arc<PackedB>> {
        if let Some(p) = cell.get() {
            return Ok(p.clone());
        }
        let w = self.inner.weight();
        let (out, inp) = w.dims2()?;
        let data = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let p = Arc::new(PackedB::from_transposed(kernel, &data, (out, inp, inp)));
        Ok(cell.get_or_init(|| p).clone())
    }
}

impl Module for Linear {
    /// `x` `[…, in]` → `[…, out]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let Some((kernel, cell)) = &self.packed else {
            return self.inner.forward(xs);
        };
        if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
            return self.inner.forward(xs);
        }
        let w = self.packed(*kernel, cell)?;
        let ys = xs.contiguous()?.apply_op1_no_bwd(&PackedLinear(w))?;
        match self.inner.bias() {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// `x · Wᵀ` with the packed products (no bias): `[…, in]` f32 contiguous → `[…, out]` f32.
struct PackedLinear(Arc<PackedB>);

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "sdcam-packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, "packed linear")?;
        let dims = layout.shape().dims();
        let (k, n) = (self.0.rows(), self.0.cols());
        if dims.last() != Some(&k) {
            candle_core::bail!("packed linear: input {dims:?} does not end in {k}");
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut out = Vec::with_capacity(m * n);
        // SAFETY: `out` holds m × n floats, written by this call alone (all of them: the
        // product overwrites C), so they are initialised before `set_len`.
        unsafe {
            let c = (out.as_mut_ptr(), n);
            packed_gemm::matmul_rows(&mut PackedA::default(), x, (m, k, k), &self.0, c, true);
            out.set_len(m * n);
        }
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

    /// With an f32 `VarBuilder` on a CPU with AVX-512 the layer takes the f32 kernel and
    /// matches candle's `Linear` up to summation order (1e-5 of the output's scale); elsewhere
    /// it is candle's.
    #[test]
    fn f32_products_match_candle() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let layer = linear(300, 70, vb.pp("l")).unwrap();
        assert_eq!(
            layer.packed.as_ref().map(|p| p.0),
            packed_gemm::Kernel::f32()
        );
        let x = Tensor::randn(0f32, 1., (2, 33, 300), &dev).unwrap();
        let want = layer.inner.forward(&x).unwrap();
        let got = layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 33, 70]);
        let e = crate::model::rel_err(&got, &want).unwrap();
        assert!(e < 1e-5, "{e}");
    }

    /// With a bf16 `VarBuilder` on the CPU the layer reads f32 parameters, multiplies in bf16
    /// and stays within bf16 rounding of candle's f32 `Linear` (1e-2 of the output's scale for
    /// 512 random inputs per output).
    #[test]
    fn bf16_products_stay_close_to_f32() {
        if !packed_gemm::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb32 = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let f32_layer = linear(512, 70, vb32.pp("l")).unwrap();
        let vb16 = VarBuilder::from_varmap(&map, DType::BF16, &dev);
        let bf16_layer = linear(512, 70, vb16.pp("l")).unwrap();
        assert_eq!(bf16_layer.inner.weight().dtype(), DType::F32);
        let x = Tensor::randn(0f32, 1., (2, 33, 512), &dev).unwrap();
        let want = f32_layer.inner.forward(&x).unwrap();
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
