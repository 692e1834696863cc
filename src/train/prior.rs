//! DreamBooth's prior preservation, as diffusers' train_dreambooth_lora.py
//! computes it: every brand sample of a step brings one class sample (an
//! image of the class prompt the base model drew, or a user's reg image),
//! and the step's loss is the brand loss plus `prior_loss_weight` times
//! the plain MSE of the class samples.
//!
//! Which class sample goes with a brand sample follows from (seed, the
//! brand sample's global index) alone: the class items are dealt in
//! shuffled rounds, round `g / n` a fresh permutation, so every class
//! image is drawn as often as the others and a resumed run or another
//! process count draws the same ones.
use super::data::{derive_seed, SplitMix64};

/// The random stream of the class-sample choice.
const PICK_STREAM: u64 = 5;
/// The streams of a class sample's own draws (latent, noise, timestep
/// through torch; flip and caption dropout through SplitMix64), apart from
/// the brand samples' 2 and 3 so turning prior preservation on leaves the
/// brand samples' draws as they were.
pub const TORCH_STREAM: u64 = 6;
pub const RNG_STREAM: u64 = 7;

/// The prior-preservation settings of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Prior {
    /// The class items of the data (never empty).
    pub items: Vec<usize>,
    /// Multiplies the class loss (diffusers' `prior_loss_weight`).
    pub weight: f64,
}

impl Prior {
    /// Prior preservation when the data has class items and the weight is
    /// above 0; a weight of 0 turns it off (the run is then the run
    /// without class images, bit for bit).
    pub fn new(items: Vec<usize>, weight: f64) -> Option<Self> {
        (!items.is_empty() && weight > 0.0).then_some(Prior { items, weight })
    }

    /// The class item that goes with brand sample `global` of a run seeded `seed`.
    pub fn class_item(&self, seed: u64, global: u64) -> usize {
        let n = self.items.len() as u64;
        let mut round = self.items.clone();
        SplitMix64::new(derive_seed(seed, PICK_STREAM, global / n)).shuffle(&mut round);
        round[(global % n) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_draws_every_class_item_once() {
        let prior = Prior::new(vec![3, 5, 8, 13], 1.0).unwrap();
        for round in 0..3u64 {
            let mut drawn: Vec<usize> = (round * 4..round * 4 + 4).map(|g| prior.class_item(9, g)).collect();
            drawn.sort_unstable();
            assert_eq!(drawn, [3, 5, 8, 13]);
        }
        let a: Vec<usize> = (0..12).map(|g| prior.class_item(9, g)).collect();
        let b: Vec<usize> = (0..12).map(|g| prior.class_item(10, g)).collect();
        assert_ne!(a, b, "another seed deals another order");
        assert_eq!(a, (0..12).map(|g| prior.class_item(9, g)).collect::<Vec<_>>());
    }

    #[test]
    fn no_class_items_or_weight_zero_is_off() {
        assert!(Prior::new(Vec::new(), 1.0).is_none());
        assert!(Prior::new(vec![1], 0.0).is_none());
    }
}
