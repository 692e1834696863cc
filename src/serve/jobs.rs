//! The job table between the HTTP side and the render thread: a bounded
//! queue (beyond it, 429 with a Retry-After from recent job times), each
//! job's progress as a watch channel (for GET and the event stream), its
//! PNGs once rendered, and a bounded number of finished jobs kept.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;

use super::figures::GridFigures;
use super::rejection::Rejection;
use super::request::Order;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// A job's progress, as the event stream sends it.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub status: Status,
    /// Denoising steps done over the whole job, of `steps`.
    pub step: usize,
    pub steps: usize,
    pub images_done: usize,
    pub images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One rendered image: its PNG (recipe chunks inside) and its A1111 text.
pub struct ServedImage {
    pub seed: u64,
    pub png: Arc<Vec<u8>>,
    pub parameters: String,
}

/// What the render thread takes from the queue.
pub struct Work {
    pub id: u64,
    pub order: Arc<Order>,
    pub cancel: Arc<AtomicBool>,
}

struct Job {
    order: Arc<Order>,
    progress: watch::Sender<Progress>,
    images: Vec<ServedImage>,
    /// What rendering said without stopping (a prompt cut at 77 tokens).
    warnings: Vec<String>,
    cancel: Arc<AtomicBool>,
    seconds: Option<f64>,
    /// The grid against each run adapter's brand set, once rendered.
    figures: Vec<GridFigures>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    queue: VecDeque<u64>,
    running: Option<u64>,
    jobs: HashMap<u64, Job>,
    finished: VecDeque<u64>,
    closed: bool,
    /// Recent seconds per job (a moving average), for Retry-After.
    seconds_per_job: Option<f64>,
}

pub struct Jobs {
    table: Mutex<Table>,
    wake: Condvar,
    queue_limit: usize,
    keep_finished: usize,
    /// Images per UNet batch: how a job's steps add up.
    batch_size: usize,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Serialize)]
pub struct JobView {
    pub id: String,
    #[serde(flatten)]
    pub progress: Progress,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    pub warnings: Vec<String>,
    pub request: serde_json::Value,
    pub results: Vec<ResultView>,
    /// The grid's palette distance and seed spread against each run
    /// adapter's brand set (empty when no brand set is known).
    pub consistency: Vec<GridFigures>,
}

#[derive(Serialize)]
pub struct ResultView {
    pub index: usize,
    pub seed: u64,
    pub url: String,
    /// The image's settings in A1111's text form (also inside the PNG).
    pub parameters: String,
}

impl Jobs {
    pub fn new(queue_limit: usize, keep_finished: usize, batch_size: usize) -> Self {
        let keep_finished = keep_finished.max(1);
        Jobs { table: Mutex::new(Table::default()), wake: Condvar::new(), queue_limit, keep_finished, batch_size: batch_size.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `order`; refused with 429 (and when to try again) when the
    /// queue is full, with 503 once the server is stopping.
    pub fn submit(&self, order: Order) -> Result<u64, Rejection> {
        let mut t = self.lock();
        if t.closed {
            return Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down and takes no new jobs; try again once it is back"));
        }
        if t.queue.len() >= self.queue_limit {
            let per_job = t.seconds_per_job.unwrap_or(1.0);
            let wait = (per_job * (t.queue.len() + 1) as f64).ceil().max(1.0) as u64;
            let mut r = Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} jobs waiting); try again in about {wait} s", t.queue.len()),
            );
            r.retry_after = Some(wait);
            return Err(r);
        }
        t.next_id += 1;
        let id = t.next_id;
        let images = order.seeds.len();
        let steps = order.settings.steps * images.div_ceil(self.batch_size);
        let progress = Progress { status: Status::Queued, step: 0, steps, images_done: 0, images, error: None };
        let job = Job {
            order: Arc::new(order),
            progress: watch::Sender::new(progress),
            images: Vec::new(),
            warnings: Vec::new(),
            cancel: Arc::default(),
            seconds: None,
            figures: Vec::new(),
        };
        t.jobs.insert(id, job);
        t.queue.push_back(id);
        drop(t);
        self.wake.notify_one();
        Ok(id)
    }

    /// The next job to render, waiting for one; `None` once the server is
    /// stopping and nothing is left.
    pub fn next(&self) -> Option<Work> {
        let mut t = self.lock();
        loop {
            if let Some(id) = t.queue.pop_front() {
                t.running = Some(id);
                let job = t.jobs.get(&id).expect("queued jobs are in the table");
                job.progress.send_modify(|p| p.status = Status::Running);
                return Some(Work { id, order: job.order.clone(), cancel: job.cancel.clone() });
            }
            if t.closed {
                return None;
            }
            t = self.wake.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// `step` of `steps` denoising steps done over the whole job.
    pub fn set_progress(&self, id: u64, step: usize, steps: usize) {
        if let Some(job) = self.lock().jobs.get(&id) {
            job.progress.send_modify(|p| {
                p.step = step;
                p.steps = steps;
            });
        }
    }

    pub fn add_warning(&self, id: u64, warning: String) {
        if let Some(job) = self.lock().jobs.get_mut(&id) {
            if !job.warnings.contains(&warning) {
                job.warnings.push(warning);
            }
        }
    }

    pub fn add_image(&self, id: u64, image: ServedImage) {
        if let Some(job) = self.lock().jobs.get_mut(&id) {
            job.images.push(image);
            let done = job.images.len();
            job.progress.send_modify(|p| p.images_done = done);
        }
    }

    pub fn set_figures(&self, id: u64, figures: Vec<GridFigures>) {
        if let Some(job) = self.lock().jobs.get_mut(&id) {
            job.figures = figures;
        }
    }

    /// The render thread is done with job `id`: `Ok` when every image was
    /// rendered, else why not (`None`: it was cancelled).
    pub fn finish(&self, id: u64, outcome: Result<(), Option<String>>, seconds: f64) {
        let mut t = self.lock();
        t.running = None;
        t.seconds_per_job = Some(t.seconds_per_job.map_or(seconds, |s| 0.7 * s + 0.3 * seconds));
        if let Some(job) = t.jobs.get_mut(&id) {
            job.seconds = Some(seconds);
            job.progress.send_modify(|p| match outcome {
                Ok(()) => p.status = Status::Done,
                Err(None) => p.status = Status::Cancelled,
                Err(Some(e)) => {
                    p.status = Status::Failed;
                    p.error = Some(e);
                }
            });
        }
        self.retire(&mut t, id);
    }

    /// Keeps at most `keep_finished` finished jobs.
    fn retire(&self, t: &mut Table, id: u64) {
        t.finished.push_back(id);
        while t.finished.len() > self.keep_finished {
            if let Some(old) = t.finished.pop_front() {
                t.jobs.remove(&old);
            }
        }
    }

    /// Cancels job `id`: a queued one at once, the running one at its next
    /// denoising step. `None`: no such job.
    pub fn cancel(&self, id: u64) -> Option<()> {
        let mut t = self.lock();
        let job = t.jobs.get(&id)?;
        job.cancel.store(true, Ordering::SeqCst);
        if let Some(i) = t.queue.iter().position(|&q| q == id) {
            t.queue.remove(i);
            t.jobs[&id].progress.send_modify(|p| p.status = Status::Cancelled);
            self.retire(&mut t, id);
        }
        Some(())
    }

    /// Stops taking jobs and cancels the queued ones (returned); the
    /// running one, if any, finishes (its id returned).
    pub fn close(&self) -> (Vec<u64>, Option<u64>) {
        let mut t = self.lock();
        t.closed = true;
        let queued: Vec<u64> = t.queue.drain(..).collect();
        for &id in &queued {
            if let Some(job) = t.jobs.get(&id) {
                job.progress.send_modify(|p| p.status = Status::Cancelled);
            }
            self.retire(&mut t, id);
        }
        let running = t.running;
        drop(t);
        self.wake.notify_all();
        (queued, running)
    }

    pub fn subscribe(&self, id: u64) -> Option<watch::Receiver<Progress>> {
        self.lock().jobs.get(&id).map(|j| j.progress.subscribe())
    }

    pub fn image(&self, id: u64, index: usize) -> Option<Arc<Vec<u8>>> {
        self.lock().jobs.get(&id)?.images.get(index).map(|i| i.png.clone())
    }

    /// Every PNG of a finished job, in seed order.
    pub fn images(&self, id: u64) -> Option<Vec<(u64, Arc<Vec<u8>>, String)>> {
        let t = self.lock();
        Some(t.jobs.get(&id)?.images.iter().map(|i| (i.seed, i.png.clone(), i.parameters.clone())).collect())
    }

    pub fn view(&self, id: u64) -> Option<JobView> {
        let t = self.lock();
        let job = t.jobs.get(&id)?;
        let order = &job.order;
        let s = &order.settings;
        let request = serde_json::json!({
            "prompt": order.prompt,
            "negative_prompt": order.negative_prompt,
            "seeds": order.seeds,
            "adapters": order.adapters.iter().map(|(a, scale)| serde_json::json!({"name": a.name, "scale": scale})).collect::<Vec<_>>(),
            "steps": s.steps,
            "guidance": s.guidance,
            "width": s.width,
            "height": s.height,
            "scheduler": s.scheduler,
            "clip_skip": s.clip_skip,
            "brand": order.brand_named.then(|| order.brand_of.first().map(|a| a.name.clone())).flatten(),
        });
        let results = job
            .images
            .iter()
            .enumerate()
            .map(|(index, i)| ResultView { index, seed: i.seed, url: format!("/v1/jobs/{id}/images/{index}.png"), parameters: i.parameters.clone() })
            .collect();
        let progress = job.progress.borrow().clone();
        Some(JobView {
            id: id.to_string(),
            progress,
            queue_position: t.queue.iter().position(|&q| q == id).map(|p| p + 1),
            seconds: job.seconds,
            warnings: order.warnings.iter().chain(&job.warnings).cloned().collect(),
            request,
            results,
            consistency: job.figures.clone(),
        })
    }

    /// (queued, running) now.
    pub fn load(&self) -> (usize, usize) {
        let t = self.lock();
        (t.queue.len(), usize::from(t.running.is_some()))
    }
}
