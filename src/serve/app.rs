//! What every HTTP handler shares: the job table, the adapter listing,
//! the limits, the token and what the render thread said of the model.
use std::sync::Arc;
use std::time::Instant;

use super::adapters::Registry;
use super::token::Token;
use super::jobs::Jobs;
use super::limits::Limits;
use super::worker::Loaded;

pub struct App {
    pub jobs: Arc<Jobs>,
    pub registry: Registry,
    pub limits: Limits,
    pub token: Option<Token>,
    pub loaded: Loaded,
    pub started: Instant,
}
