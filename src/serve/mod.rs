//! `sdtune serve`: the base model loaded once, adapters attached per
//! request, an HTTP API and a page over the sample pipeline.
//!
//! Two sides meet at the job table ([`jobs`]): the async HTTP side (axum on
//! a small tokio runtime) only checks requests and reads results; one
//! render thread ([`worker`]) owns the model and does all libtorch work.
pub mod a1111;
pub mod adapters;
pub mod api;
pub mod app;
pub mod auth;
pub mod cache;
pub mod figures;
pub mod jobs;
pub mod limits;
pub mod names;
pub mod page;
pub mod rejection;
pub mod request;
pub mod token;
pub mod worker;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use self::adapters::Registry;
use self::app::App;
use self::token::Token;
use self::jobs::Jobs;
use self::limits::Limits;
use self::worker::ModelChoice;

/// Everything `sdtune serve`'s flags decide.
pub struct ServeConfig {
    pub choice: ModelChoice,
    /// Every LoRA under it is an adapter.
    pub adapters: Option<PathBuf>,
    /// Training runs' folder: each run's final LoRA is an adapter.
    pub runs: Option<PathBuf>,
    /// The training folder: its prepared images are the brand set of runs
    /// that recorded none.
    pub work_dir: PathBuf,
    pub host: IpAddr,
    pub port: u16,
    pub token: Option<String>,
    /// `max_side` 0: twice the model's native size.
    pub limits: Limits,
}

/// Refuses to listen beyond this machine without a token.
pub fn check_exposure(host: IpAddr, token: Option<&str>) -> Result<()> {
    if !host.is_loopback() && token.is_none_or(|t| t.trim().is_empty()) {
        bail!(
            "--host {host} lets other machines render with this server and read its images; pass --token SECRET too (clients then send `Authorization: Bearer SECRET`), or keep the default --host 127.0.0.1"
        );
    }
    Ok(())
}

/// Serves until Ctrl-C or SIGTERM; then takes no more jobs, cancels the
/// queued ones, finishes the running one, and returns [`crate::interrupt::Interrupted`].
pub fn run(config: ServeConfig) -> Result<()> {
    check_exposure(config.host, config.token.as_deref())?;
    let mut limits = config.limits;
    let jobs = Arc::new(Jobs::new(limits.queue, limits.keep_jobs, limits.batch_size));
    eprintln!("loading {} ...", config.choice.model);
    let (worker, loaded) = worker::start(
        config.choice,
        jobs.clone(),
        limits.batch_size,
        limits.adapter_cache_bytes,
        figures::BrandSets::new(config.work_dir),
    )?;
    if limits.max_side == 0 {
        limits.max_side = 2 * loaded.native_side;
    }
    limits.text_layers = loaded.text_layers;
    eprintln!(
        "loaded {} in {:.1} s (native {}x{} px; requests up to {} px, {} steps, {} images; queue {})",
        crate::sample::settings::model_name(&loaded.recorded_model),
        loaded.seconds,
        loaded.native_side,
        loaded.native_side,
        limits.max_side,
        limits.max_steps,
        limits.max_images,
        limits.queue
    );
    let app = Arc::new(App {
        jobs: jobs.clone(),
        registry: Registry::new(config.adapters, config.runs),
        limits,
        token: config.token.as_deref().map(Token::new),
        loaded,
        started: Instant::now(),
    });
    let adapters = app.registry.list();
    eprintln!("{} adapter(s): {}", adapters.len(), adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", "));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the HTTP runtime")?;
    let addr = SocketAddr::new(config.host, config.port);
    let served = runtime.block_on(serve_http(app, addr));
    // The HTTP side is done (or never started): the render thread stops after its job.
    jobs.close();
    let _ = worker.join();
    served?;
    eprintln!("stopped");
    Err(crate::interrupt::Interrupted.into())
}

async fn serve_http(app: Arc<App>, addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}; pass another --port (0 picks a free one), or stop what is using it")
    })?;
    let bound = listener.local_addr().context("cannot read the address the server listens on")?;
    println!("listening on http://{bound}/");
    let _ = std::io::stdout().flush();
    let jobs = app.jobs.clone();
    let stop = async move {
        while !crate::interrupt::requested() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (cancelled, running) = jobs.close();
        let running = running.map_or(String::new(), |id| format!("; finishing job {id}"));
        eprintln!("stopping: {} queued job(s) cancelled{running}", cancelled.len());
    };
    axum::serve(listener, api::router(app)).with_graceful_shutdown(stop).await.context("the HTTP server stopped with an error")
}
