//! What one request may ask for and how much the server holds, set by
//! `sdtune serve`'s flags. The defaults keep a laptop responsive: a few
//! images a request, a short queue, sizes up to twice the model's own.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest width or height in pixels.
    pub max_side: i64,
    pub max_steps: usize,
    /// Images (seeds) per request.
    pub max_images: usize,
    /// Jobs waiting behind the running one; beyond it, 429.
    pub queue: usize,
    /// Images per UNet batch within a job.
    pub batch_size: usize,
    /// Bytes of LoRA files kept loaded (least recently used dropped first).
    pub adapter_cache_bytes: u64,
    /// Finished jobs kept for `GET /v1/jobs/{id}` (oldest dropped first).
    pub keep_jobs: usize,
    /// Characters of a prompt or negative prompt.
    pub max_prompt_chars: usize,
    /// Layers of the model's shallowest text encoder (clip skip must leave one).
    pub text_layers: usize,
}
