//! A weight delta back to a low-rank pair by SVD, truncated to a rank:
//! by Eckart-Young the truncation is the best rank-r approximation in the
//! Frobenius norm. Shared by `sdtune lora resize` and `sdtune lora merge`.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// A delta as `up @ down` (scale 1), and how much of it was kept.
pub struct Truncated {
    /// [r, in] or [r, in, k, k] (a kxk conv: LoCon).
    pub down: Tensor,
    /// [out, r] or [out, r, 1, 1].
    pub up: Tensor,
    /// Sum of the kept squared singular values over the sum of all of them
    /// (1 for a zero delta: nothing was lost).
    pub kept_energy: f64,
}

/// The delta `up @ down` of a pair, flattened to [out, in * k * k] in fp64.
pub fn pair_delta(down: &Tensor, up: &Tensor) -> Tensor {
    let rank = down.size()[0];
    let out = up.size()[0];
    up.to_kind(Kind::Double).reshape([out, rank]).matmul(&down.to_kind(Kind::Double).reshape([rank, -1]))
}

/// Truncates `delta` ([out, in * k * k], any float kind) to `rank` (capped
/// at the matrix's own size). `down_shape_tail` is `[in]` for a linear layer
/// or `[in, k, k]` for a conv, so the pair comes back in the layer's layout.
/// As kohya's `resize_lora.py`: up = U_r diag(S_r), down = Vh_r.
pub fn truncate(delta: &Tensor, rank: i64, down_shape_tail: &[i64], conv: bool) -> Result<Truncated> {
    if rank < 1 {
        bail!("a LoRA rank must be at least 1");
    }
    let delta = delta.to_kind(Kind::Double);
    let (out, inner) = (delta.size()[0], delta.size()[1]);
    let rank = rank.min(out).min(inner);
    let (u, s, v) = tch::no_grad(|| delta.f_svd(true, true))?;
    let total = f64::try_from(s.square().sum(Kind::Double))?;
    let kept = f64::try_from(s.narrow(0, 0, rank).square().sum(Kind::Double))?;
    let up = u.narrow(1, 0, rank) * s.narrow(0, 0, rank).unsqueeze(0);
    let down = v.narrow(1, 0, rank).transpose(0, 1);
    let mut down_shape = vec![rank];
    down_shape.extend_from_slice(down_shape_tail);
    let up_shape: Vec<i64> = if conv { vec![out, rank, 1, 1] } else { vec![out, rank] };
    Ok(Truncated {
        down: down.reshape(down_shape.as_slice()).to_kind(Kind::Float).contiguous(),
        up: up.reshape(up_shape.as_slice()).to_kind(Kind::Float).contiguous(),
        kept_energy: if total > 0.0 { kept / total } else { 1.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frobenius(t: &Tensor) -> f64 {
        f64::try_from(t.square().sum(Kind::Double).sqrt()).unwrap()
    }

    #[test]
    fn full_rank_reproduces_the_delta_and_a_lower_one_drops_the_smallest_values() {
        tch::manual_seed(3);
        let down = Tensor::randn([4, 6, 3, 3], (Kind::Float, tch::Device::Cpu));
        let up = Tensor::randn([5, 4, 1, 1], (Kind::Float, tch::Device::Cpu));
        let delta = pair_delta(&down, &up);
        let full = truncate(&delta, 4, &[6, 3, 3], true).unwrap();
        assert_eq!(full.down.size(), [4, 6, 3, 3]);
        assert_eq!(full.up.size(), [5, 4, 1, 1]);
        assert!(frobenius(&(pair_delta(&full.down, &full.up) - &delta)) < 1e-4 * frobenius(&delta));
        assert!((full.kept_energy - 1.0).abs() < 1e-9);

        let two = truncate(&delta, 2, &[6, 3, 3], true).unwrap();
        // Squared singular values as eigenvalues of delta delta^T (no SVD).
        let s2 = delta.matmul(&delta.transpose(0, 1)).linalg_eigvalsh("L").clamp_min(0.0).sort(0, true).0;
        let dropped = f64::try_from(s2.narrow(0, 2, 3).sum(Kind::Double)).unwrap();
        let err = frobenius(&(pair_delta(&two.down, &two.up) - &delta));
        assert!((err - dropped.sqrt()).abs() < 1e-4 * frobenius(&delta), "error {err} vs sqrt(dropped) {}", dropped.sqrt());
    }

    #[test]
    fn a_zero_delta_keeps_all_its_energy() {
        let t = truncate(&Tensor::zeros([3, 4], (Kind::Double, tch::Device::Cpu)), 2, &[4], false).unwrap();
        assert_eq!(t.kept_energy, 1.0);
        assert_eq!(t.up.size(), [3, 2]);
    }
}
