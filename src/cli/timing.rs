//! Timing for the component benchmarks (`bench-unet`, `bench-taesd`): warm-up calls, then timed
//! calls, each started only once the rest of the machine is idle (bounded wait), as the Python
//! peers (`scripts/bench/components_peer.py`, `unet_peer.py`) do, because small shared machines
//! are noisy.

use std::time::{Duration, Instant};

/// Busy CPU seconds of the whole machine (user..steal in /proc/stat).
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((v.iter().sum::<u64>() - v[3] - v[4]) as f64 / tck)
}

/// CPU seconds used by this process.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Waits until other processes use less than 10 % of the machine for two consecutive 1 s
/// windows, at most `max_wait`. Returns whether the machine was idle.
pub(crate) fn wait_idle(max_wait: Duration) -> bool {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let start = Instant::now();
    let mut ok = 0;
    loop {
        let (Some(b0), m0, w0) = (machine_busy_s(), own_cpu_s(), Instant::now()) else {
            return false;
        };
        std::thread::sleep(Duration::from_secs(1));
        let Some(b1) = machine_busy_s() else {
            return false;
        };
        let others = (b1 - b0) - (own_cpu_s() - m0);
        let frac = others / (w0.elapsed().as_secs_f64() * ncpu);
        ok = if frac < 0.10 { ok + 1 } else { 0 };
        if ok >= 2 {
            return true;
        }
        if start.elapsed() > max_wait {
            return false;
        }
    }
}

/// The flags every component benchmark shares.
#[derive(clap::Args, Debug)]
pub(crate) struct TimingArgs {
    /// Timed calls per shape.
    #[arg(long, default_value_t = 5)]
    pub(crate) iters: usize,
    /// Untimed calls before them.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Do not wait for an idle machine before each timed call.
    #[arg(long)]
    no_gate: bool,
    /// Longest wait for an idle machine, seconds (then it times anyway and says so).
    #[arg(long, default_value_t = 60.0)]
    idle_max_wait: f64,
    /// Number type: `f32`, or `bf16` as `model.dtype = "bf16"` runs on the CPU (f32
    /// activations, bf16 matrix products; needs AVX512-BF16).
    #[arg(long, value_enum, default_value_t = CpuDtype::F32)]
    pub(crate) dtype: CpuDtype,
}

/// The number types the CPU component benchmarks run in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CpuDtype {
    F32,
    Bf16,
}

impl CpuDtype {
    /// `f32` / `bf16`, for logs and rows.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl TimingArgs {
    /// The dtype to build the component's `VarBuilder` in on the CPU (bf16 = bf16 products).
    ///
    /// # Errors
    /// `--dtype bf16` on a CPU without AVX512-BF16.
    pub(crate) fn var_builder_dtype(&self) -> anyhow::Result<candle_core::DType> {
        match self.dtype {
            CpuDtype::F32 => Ok(candle_core::DType::F32),
            CpuDtype::Bf16 => {
                anyhow::ensure!(
                    crate::model::device::cpu_runs_bf16(),
                    "--dtype bf16 needs AVX512-BF16, which this CPU lacks"
                );
                Ok(candle_core::DType::BF16)
            }
        }
    }

    /// The row fields of `timing`, with these flags' settings.
    pub(crate) fn fields(&self, timing: &Timing) -> TimingFields {
        timing.fields(self.warmup, self.dtype)
    }

    /// The idle gate's longest wait, or `None` with `--no-gate`.
    pub(crate) fn gate(&self) -> Option<Duration> {
        (!self.no_gate).then(|| Duration::from_secs_f64(self.idle_max_wait))
    }

    /// [`Timing::measure`] with these flags.
    ///
    /// # Errors
    /// The first error of `call` or `check`.
    pub(crate) fn measure<T>(
        &self,
        call: impl FnMut() -> anyhow::Result<T>,
        check: impl Fn(&T) -> anyhow::Result<()>,
    ) -> anyhow::Result<Timing> {
        Timing::measure(self.warmup, self.iters, self.gate(), call, check)
    }
}

/// The timing fields every component benchmark row prints (the Python peers print the same).
#[derive(Debug, serde::Serialize)]
pub(crate) struct TimingFields {
    pub(crate) dtype: &'static str,
    pub(crate) iters: usize,
    pub(crate) warmup: usize,
    pub(crate) threads: usize,
    pub(crate) median_ms: f64,
    pub(crate) min_ms: f64,
    pub(crate) mean_ms: f64,
    pub(crate) times_ms: Vec<f64>,
    /// Timed calls that started on an idle machine.
    pub(crate) idle_iters: usize,
}

/// Timed calls of one benchmark: milliseconds per call, and how many started on an idle machine.
pub(crate) struct Timing {
    pub(crate) times_ms: Vec<f64>,
    pub(crate) idle_iters: usize,
}

impl Timing {
    /// Runs `call` `warmup` times untimed, then `iters` times timed (each after
    /// [`wait_idle`] unless `no_gate`), checking each result with `check`.
    ///
    /// # Errors
    /// The first error of `call` or `check`.
    pub(crate) fn measure<T>(
        warmup: usize,
        iters: usize,
        gate: Option<Duration>,
        mut call: impl FnMut() -> anyhow::Result<T>,
        check: impl Fn(&T) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        for _ in 0..warmup {
            check(&std::hint::black_box(call()?))?;
        }
        let mut times_ms = Vec::with_capacity(iters);
        let mut idle_iters = 0;
        for _ in 0..iters {
            if let Some(max_wait) = gate {
                if wait_idle(max_wait) {
                    idle_iters += 1;
                }
            }
            let t = Instant::now();
            let out = call()?;
            times_ms.push(t.elapsed().as_secs_f64() * 1e3);
            check(&out)?;
        }
        Ok(Self {
            times_ms,
            idle_iters,
        })
    }

    /// Median, min and mean, the times rounded to 0.1 ms, and the run's settings.
    fn fields(&self, warmup: usize, dtype: CpuDtype) -> TimingFields {
        let mut sorted = self.times_ms.clone();
        let median_ms = crate::cli::median(&mut sorted);
        TimingFields {
            dtype: dtype.name(),
            iters: self.times_ms.len(),
            warmup,
            threads: candle_core::utils::get_num_threads(),
            median_ms,
            min_ms: sorted.first().copied().unwrap_or(0.0),
            mean_ms: self.times_ms.iter().sum::<f64>() / self.times_ms.len().max(1) as f64,
            times_ms: self
                .times_ms
                .iter()
                .map(|t| (t * 10.0).round() / 10.0)
                .collect(),
            idle_iters: self.idle_iters,
        }
    }

    /// Prints `row` as one JSON line, or `label` with the timing as a table line.
    ///
    /// # Errors
    /// Serialising the row fails (it does not for these structs).
    pub(crate) fn print<R: serde::Serialize>(
        row: &R,
        t: &TimingFields,
        json: bool,
        label: &str,
    ) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(row)?);
        } else {
            println!(
                "{label}  median {:8.1} ms  min {:8.1} ms  ({} iters, {} on an idle machine)",
                t.median_ms, t.min_ms, t.iters, t.idle_iters
            );
        }
        Ok(())
    }
}
