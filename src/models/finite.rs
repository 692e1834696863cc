//! The one finiteness check: whether a tensor holds no NaN or infinity.
use tch::Tensor;

/// True when every value of `t` is finite (waits for the device).
pub fn all_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}
