//! The HTTP API: `POST /v1/images` queues a job, `GET /v1/jobs/{id}` shows
//! it, `/v1/jobs/{id}/events` streams its progress (server-sent events),
//! `/v1/jobs/{id}/images/{n}.png` is each image with its recipe,
//! `DELETE /v1/jobs/{id}` cancels it; `GET /v1/adapters`, `GET /healthz`,
//! the page at `/`, and A1111's `/sdapi/v1/txt2img`.
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use futures_util::Stream;

use super::app::App;
use super::jobs::Progress;
use super::rejection::Rejection;
use super::request::{self, ImagesRequest};
use super::{a1111, auth, page};

pub fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/v1/images", post(create))
        .route("/v1/jobs/{id}", get(job).delete(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/images/{file}", get(image))
        .route("/v1/adapters", get(adapters))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::require_token));
    Router::new()
        .merge(guarded)
        .route("/", get(page::page))
        .route("/healthz", get(health))
        .fallback(not_found)
        .with_state(app)
}

async fn not_found() -> Rejection {
    Rejection::not_found("no such route; the API is POST /v1/images, GET /v1/jobs/{id}, GET /v1/adapters, GET /healthz and POST /sdapi/v1/txt2img")
}

/// A job id from the path, or 404.
pub fn job_id(app: &App, text: &str) -> Result<u64, Rejection> {
    let unknown = || Rejection::not_found(format!("there is no job {text:?}; it never existed or was finished long enough ago to be dropped"));
    let id: u64 = text.parse().map_err(|_| unknown())?;
    app.jobs.view(id).map(|_| id).ok_or_else(unknown)
}

async fn create(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, Rejection> {
    let req: ImagesRequest = request::parse_json(&body, request::EXAMPLE)?;
    let order = request::check(req, &app.registry, &app.limits)?;
    let id = app.jobs.submit(order)?;
    let view = app.jobs.view(id).ok_or_else(|| Rejection::not_found("the job was dropped at once"))?;
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, format!("/v1/jobs/{id}"))], Json(view)).into_response())
}

async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, Rejection> {
    let id = job_id(&app, &id)?;
    let view = app.jobs.view(id).ok_or_else(|| Rejection::not_found(format!("job {id} was just dropped")))?;
    Ok(Json(view).into_response())
}

async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, Rejection> {
    let id = job_id(&app, &id)?;
    app.jobs.cancel(id);
    job(State(app), Path(id.to_string())).await
}

async fn image(State(app): State<Arc<App>>, Path((id, file)): Path<(String, String)>) -> Result<Response, Rejection> {
    let id = job_id(&app, &id)?;
    let missing = || Rejection::not_found(format!("job {id} has no image {file:?}; its results list the image URLs"));
    let index: usize = file.strip_suffix(".png").and_then(|n| n.parse().ok()).ok_or_else(missing)?;
    let png = app.jobs.image(id, index).ok_or_else(missing)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png.as_ref().clone()).into_response())
}

/// The job's progress now, then at each change, until it is final.
async fn events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Rejection> {
    let id = job_id(&app, &id)?;
    let rx = app.jobs.subscribe(id).ok_or_else(|| Rejection::not_found(format!("job {id} was just dropped")))?;
    let stream = futures_util::stream::unfold((rx, true, false), |(mut rx, first, ended)| async move {
        if ended || (!first && rx.changed().await.is_err()) {
            return None;
        }
        let progress: Progress = rx.borrow_and_update().clone();
        let last = progress.status.is_final();
        let data = serde_json::to_string(&progress).unwrap_or_default();
        let event = Event::default().event(if last { "done" } else { "progress" }).data(data);
        Some((Ok(event), (rx, false, last)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn adapters(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::json!({ "adapters": app.registry.list() })).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let (queued, running) = app.jobs.load();
    Json(serde_json::json!({
        "status": "ok",
        "model": crate::sample::settings::model_name(&app.loaded.recorded_model),
        "model_hash": app.loaded.model_hash,
        "queued": queued,
        "running": running,
        "queue_limit": app.limits.queue,
        "uptime_s": app.started.elapsed().as_secs(),
    }))
    .into_response()
}
