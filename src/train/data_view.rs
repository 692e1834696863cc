//! The one delegating wrapper of [`TrainingData`]: a view over other data
//! (held-out images left out, captions shuffled) says what it wraps and
//! overrides only what it changes; every other question passes through,
//! so a method added to the trait is delegated here once, not per view.
use anyhow::Result;

use super::data::{TrainSample, TrainingData};
use crate::models::conditioning::Conditioning;

/// Training data seen through a view: by default every answer is the
/// wrapped data's.
pub trait DataView {
    /// The data this view wraps.
    fn inner(&self) -> &dyn TrainingData;

    /// As [`TrainingData::buckets`].
    fn view_buckets(&self) -> Vec<Vec<usize>> {
        self.inner().buckets()
    }

    /// As [`TrainingData::sample_for`].
    fn view_sample_for(&self, index: usize, flip: bool, global: u64) -> Result<TrainSample> {
        self.inner().sample_for(index, flip, global)
    }
}

impl<T: DataView> TrainingData for T {
    fn buckets(&self) -> Vec<Vec<usize>> {
        self.view_buckets()
    }
    fn sample(&self, index: usize, flip: bool) -> Result<TrainSample> {
        self.inner().sample(index, flip)
    }
    fn sample_for(&self, index: usize, flip: bool, global: u64) -> Result<TrainSample> {
        self.view_sample_for(index, flip, global)
    }
    fn has_flips(&self) -> bool {
        self.inner().has_flips()
    }
    fn empty_caption(&self) -> Result<Conditioning> {
        self.inner().empty_caption()
    }
    fn time_ids(&self, index: usize, flip: bool) -> Result<Option<[f32; 6]>> {
        self.inner().time_ids(index, flip)
    }
    fn repeats(&self, index: usize) -> usize {
        self.inner().repeats(index)
    }
    fn caption(&self, index: usize) -> Result<String> {
        self.inner().caption(index)
    }
    fn loss_weight(&self, index: usize) -> f64 {
        self.inner().loss_weight(index)
    }
    fn class_items(&self) -> Vec<usize> {
        self.inner().class_items()
    }
}
