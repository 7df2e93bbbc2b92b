//! AdamW over a range of the flat buffers, with the arithmetic of `torch.optim.AdamW` — or, for
//! DeepSpeed's `Adam` with `adam_w_mode: false`, of `torch.optim.Adam` (L2 weight decay added to
//! the gradient).
//!
//! On the CPU the step is one pass over memory: each element's weight, gradient and two moments
//! are read once and the weight and moments written once (28 bytes per parameter), split over
//! libtorch's intra-op thread count — the bound is memory bandwidth (see `worker info --bench`).
//! libtorch's `_fused_adamw_` is not exposed by tch and takes no per-element decay mask, so the
//! loop is written here over the flat f32 slices. On CUDA the step is a short chain of in-place
//! tensor operations.

use super::partition::PartitionRange;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay of the weights; false: L2, `weight_decay · p` added to the gradient.
    pub decoupled: bool,
}

/// State for one range of the flat buffers (this rank's partition).
pub struct AdamW {
    pub params: AdamWParams,
    start: i64,
    len: i64,
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Runs of the range (offsets within it) that are decayed (`true`) or not; covers the range.
    decay_runs: Vec<(Range<usize>, bool)>,
    /// Per-element decay factor (0 or 1) for the range, for the CUDA path; `None`: decay everything.
    decay_mask: Option<Tensor>,
    /// Workspace of the range's size for the CUDA path (allocated on first use).
    scratch: Option<Tensor>,
}

/// The per-step scalars of the update, as `torch.optim.AdamW` computes them (in f64, then
/// applied to f32 tensors as f32 scalars).
#[derive(Debug, Clone, Copy)]
struct StepScalars {
    /// Multiplies every gradient first (clipping and loss-scale unscaling folded into the pass).
    grad_scale: f32,
    /// `1 − lr·wd` for decoupled decay of decayed elements.
    decay: f32,
    /// `wd` added as `wd·p` to the gradient of decayed elements (L2 mode).
    l2: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl AdamW {
    /// `decay_mask` covers the whole flat buffer; the optimizer keeps its `range` of it.
    pub fn new(params: AdamWParams, range: PartitionRange, device: Device, decay_mask: Option<Tensor>) -> Self {
        let PartitionRange { start, len, .. } = range;
        let mask = decay_mask.map(|m| m.narrow(0, start, len).contiguous());
        let decay_runs = match &mask {
            None => vec![(0..len as usize, true)],
            Some(m) => runs(
                &Vec::<f32>::try_from(&m.to_device(Device::Cpu)).unwrap_or_default(),
                len as usize,
            ),
        };
        Self {
            params,
            start,
            len,
            step: 0,
            exp_avg: Tensor::zeros([len], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([len], (Kind::Float, device)),
            decay_runs,
            decay_mask: mask.filter(|_| device.is_cuda()),
            scratch: None,
        }
    }

    /// Bytes of optimizer state this instance holds (moments; the fp32 weights live in the
    /// flat buffer and are counted by the caller).
    pub fn state_bytes(&self) -> u64 {
        (self.exp_avg.numel() + self.exp_avg_sq.numel()) as u64 * 4
    }

    /// Bytes one step reads and writes: weight, gradient and both moments read, weight and
    /// moments written.
    pub fn bytes_per_step(&self) -> u64 {
        self.len as u64 * 28
    }

    /// One step at learning rate `lr` on this range of `flat_params` with that of `flat_grads`
    /// times `grad_scale` (gradient clipping and loss-scale unscaling), entirely in place. The
    /// gradient range may be left modified (it is zeroed before the next step).
    pub fn step(&mut self, flat_params: &Tensor, flat_grads: &Tensor, lr: f64, grad_scale: f64) {
        let AdamWParams {
            betas: (b1, b2),
            eps,
            weight_decay,
            decoupled,
        } = self.params;
        self.step += 1;
        let bias_correction1 = 1.0 - b1.powi(self.step as i32);
        let bias_correction2 = 1.0 - b2.powi(self.step as i32);
        let scalars = StepScalars {
            grad_scale: grad_scale as f32,
            decay: if decoupled {
                (1.0 - lr * weight_decay) as f32
            } else {
                1.0
            },
            l2: if decoupled { 0.0 } else { weight_decay as f32 },
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: eps as f32,
            neg_step_size: (-lr / bias_correction1) as f32,
        };
        let p = flat_params.narrow(0, self.start, self.len);
        let g = flat_grads.narrow(0, self.start, self.len);
        let on_cpu = [&p, &g, &self.exp_avg, &self.exp_avg_sq]
            .iter()
            .all(|t| t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
        if on_cpu {
            self.step_cpu(&p, &g, scalars);
        } else {
            self.step_tensors(p, g, scalars, lr, weight_decay);
        }
    }

    /// The single-pass CPU step, split into contiguous pieces over libtorch's thread count.
    fn step_cpu(&mut self, p: &Tensor, g: &Tensor, s: StepScalars) {
        let len = self.len as usize;
        // SAFETY: the four tensors are distinct contiguous CPU f32 buffers (checked by the
        // caller; the moments are owned by `self`, the weight and gradient ranges are
        // narrowings of the flat buffers, which never alias each other) of `len` elements each,
        // alive for this call; nothing else reads or writes them during it (the step runs on
        // the training thread between backward passes and collectives).
        let (p, g, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(p.data_ptr() as *mut f32, len),
                std::slice::from_raw_parts(g.data_ptr() as *const f32, len),
                std::slice::from_raw_parts_mut(self.exp_avg.data_ptr() as *mut f32, len),
                std::slice::from_raw_parts_mut(self.exp_avg_sq.data_ptr() as *mut f32, len),
            )
        };
        let threads = (tch::get_num_threads().max(1) as usize).min(len / 65_536 + 1);
        let piece = len.div_ceil(threads).max(1);
        let runs = &self.decay_runs;
        std::thread::scope(|scope| {
            let pieces = p
                .chunks_mut(piece)
                .zip(g.chunks(piece))
                .zip(m.chunks_mut(piece))
                .zip(v.chunks_mut(piece));
            for (n, (((p, g), m), v)) in pieces.enumerate() {
                let offset = n * piece;
                scope.spawn(move || {
                    for (run, decayed) in runs {
                        let lo = run.start.max(offset);
                        let hi = run.end.min(offset + p.len());
                        if lo < hi {
                            let r = lo - offset..hi - offset;
                            update(
                                &mut p[r.clone()],
                                &g[r.clone()],
                                &mut m[r.clone()],
                                &mut v[r],
                                s,
                                *decayed,
                            );
                        }
                    }
                });
            }
        });
    }

    /// The same update as in-place tensor operations (CUDA).
    fn step_tensors(&mut self, mut p: Tensor, mut g: Tensor, s: StepScalars, lr: f64, weight_decay: f64) {
        let len = self.len;
        let tmp = self
            .scratch
            .get_or_insert_with(|| Tensor::zeros([len], (Kind::Float, p.device())));
        tch::no_grad(|| {
            if s.grad_scale != 1.0 {
                let _ = g.g_mul_scalar_(f64::from(s.grad_scale));
            }
            match &self.decay_mask {
                _ if weight_decay == 0.0 => {}
                _ if s.l2 != 0.0 => {
                    tmp.copy_(&p);
                    let _ = tmp.g_mul_scalar_(weight_decay);
                    if let Some(mask) = &self.decay_mask {
                        let _ = tmp.g_mul_(mask);
                    }
                    let _ = g.g_add_(tmp);
                }
                None => {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                Some(mask) => {
                    tmp.copy_(mask);
                    let _ = tmp.g_mul_scalar_(-lr * weight_decay);
                    let _ = tmp.g_add_scalar_(1.0);
                    let _ = p.g_mul_(tmp);
                }
            }
            let _ = self.exp_avg.lerp_(&g, f64::from(s.one_minus_b1));
            tmp.copy_(&g);
            let _ = tmp.g_mul_scalar_(f64::from(s.one_minus_b2));
            let _ = self.exp_avg_sq.g_mul_scalar_(f64::from(s.b2));
            let _ = self.exp_avg_sq.addcmul_(&g, tmp);
            // p += m / ((√v / √bc2 + eps) / (−step_size))
            let _ = self.exp_avg_sq.sqrt_out(tmp);
            let _ = tmp.g_mul_scalar_(1.0 / f64::from(s.bias_correction2_sqrt));
            let _ = tmp.g_add_scalar_(f64::from(s.eps));
            let _ = tmp.g_mul_scalar_(1.0 / f64::from(s.neg_step_size));
            let _ = p.addcdiv_(&self.exp_avg, tmp);
        });
    }
}

/// The update of one run of elements, in `torch.optim.AdamW`'s order of operations: decay,
/// `m.lerp_(g, 1 − b1)`, `v = v·b2 + (1 − b2)·g²`, `p += (−step_size·m) / (√v / √bc2 + eps)`.
#[inline]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: StepScalars, decayed: bool) {
    let (decay, l2) = if decayed { (s.decay, s.l2) } else { (1.0, 0.0) };
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * s.grad_scale + l2 * *p;
        // lerp with a weight below 0.5, as ATen computes it: m + w·(g − m)
        *m += s.one_minus_b1 * (g - *m);
        *v = *v * s.b2 + s.one_minus_b2 * (g * g);
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        *p = *p * decay + s.neg_step_size * *m / denom;
    }
}

/// Maximal runs of equal decay flags of a 0/1 mask of `len` elements (all decayed when the mask
/// is shorter, which it never is for a mask made by `FlatParams::decay_mask`).
fn runs(mask: &[f32], len: usize) -> Vec<(Range<usize>, bool)> {
    if mask.len() < len {
        return vec![(0..len, true)];
    }
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &flag) in mask[..len].iter().enumerate() {
        let decayed = flag != 0.0;
        match out.last_mut() {
            Some((run, d)) if *d == decayed => run.end = i + 1,
            _ => out.push((i..i + 1, decayed)),
        }
    }
    out
}

/// Throughput of the optimizer step against a copy of the same bytes, on the CPU.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Bandwidth {
    pub elements: i64,
    /// Bytes read and written per second by the AdamW step (28 per element).
    pub adamw_bytes_per_s: f64,
    /// Bytes read and written per second by a copy between two buffers of the same total size.
    pub memcpy_bytes_per_s: f64,
}

/// Times AdamW steps over `elements` parameters and copies of the same bytes (best of a few).
pub fn measure_bandwidth(elements: i64, repeats: usize) -> Bandwidth {
    let params = AdamWParams {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.01,
        decoupled: true,
    };
    let range = PartitionRange {
        rank: 0,
        start: 0,
        len: elements,
    };
    let p = Tensor::randn([elements], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([elements], (Kind::Float, Device::Cpu));
    let mut adamw = AdamW::new(params, range, Device::Cpu, None);
    // 28 bytes per element moved: copy 14 bytes' worth (7 f32) from one buffer to another.
    let src = Tensor::randn([elements * 7 / 2], (Kind::Float, Device::Cpu));
    let mut dst = Tensor::zeros_like(&src);
    let best = |f: &mut dyn FnMut()| {
        f();
        (0..repeats.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let adamw_s = best(&mut || adamw.step(&p, &g, 1e-3, 1.0));
    let copy_s = best(&mut || dst.copy_(&src));
    let bytes = elements as f64 * 28.0;
    Bandwidth {
        elements,
        adamw_bytes_per_s: bytes / adamw_s,
        memcpy_bytes_per_s: bytes / copy_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(params: AdamWParams, mask: Option<&Tensor>, steps: u64) -> (Tensor, Tensor) {
        // torch.optim.AdamW's single-tensor update written with tensor operations.
        let p = Tensor::linspace(-1.0, 1.0, 1000, (Kind::Float, Device::Cpu));
        let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
        let mut p = p;
        for step in 1..=steps {
            let g = (&p * 0.3 + 0.01 * step as f64).sin() * 0.5;
            let (b1, b2) = params.betas;
            let decay = match mask {
                Some(mask) => mask * (-1e-2 * params.weight_decay) + 1.0,
                None => p.ones_like() * (1.0 - 1e-2 * params.weight_decay),
            };
            p = &p * decay;
            m = &m + (&g - &m) * (1.0 - b1);
            v = &v * b2 + &g * &g * (1.0 - b2);
            let bc1 = 1.0 - b1.powi(step as i32);
            let bc2 = 1.0 - b2.powi(step as i32);
            let denom = v.sqrt() / bc2.sqrt() + params.eps;
            p = &p + &m * (-1e-2 / bc1) / denom;
        }
        (p, m)
    }

    #[test]
    fn the_one_pass_cpu_step_matches_the_tensor_formula_with_a_decay_mask() {
        let params = AdamWParams {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.1,
            decoupled: true,
        };
        let mask = Tensor::from_slice(
            &(0..1000)
                .map(|i| f32::from(u8::from(i % 300 < 200)))
                .collect::<Vec<_>>(),
        );
        let p = Tensor::linspace(-1.0, 1.0, 1000, (Kind::Float, Device::Cpu));
        let range = PartitionRange {
            rank: 0,
            start: 0,
            len: 1000,
        };
        let mut adamw = AdamW::new(params, range, Device::Cpu, Some(mask.shallow_clone()));
        assert_eq!(adamw.decay_runs.len(), 7);
        for step in 1..=3u64 {
            let g = (&p * 0.3 + 0.01 * step as f64).sin() * 0.5 * 4.0;
            adamw.step(&p, &g, 1e-2, 0.25);
        }
        let (want_p, want_m) = reference(params, Some(&mask), 3);
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&p, &want_p) < 1e-6, "{}", diff(&p, &want_p));
        assert!(diff(&adamw.exp_avg, &want_m) < 1e-6);
    }

    #[test]
    fn runs_cover_the_mask() {
        assert_eq!(
            runs(&[1.0, 1.0, 0.0, 1.0], 4),
            vec![(0..2, true), (2..3, false), (3..4, true)]
        );
        assert_eq!(runs(&[], 3), vec![(0..3, true)]);
    }

    #[test]
    fn bandwidth_is_measured() {
        let b = measure_bandwidth(1 << 16, 2);
        assert!(b.adamw_bytes_per_s > 0.0 && b.memcpy_bytes_per_s > 0.0);
    }
}
