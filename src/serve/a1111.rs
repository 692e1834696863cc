//! AUTOMATIC1111's `POST /sdapi/v1/txt2img`, so existing scripts and
//! plugins can call the server: its fields (prompt with `<lora:NAME:SCALE>`
//! tags, negative_prompt, seed, steps, cfg_scale, width, height,
//! sampler_name, batch_size, n_iter) are read, the others ignored as A1111's
//! own extensions would be; the answer waits for the images and holds them
//! as base64 PNGs (recipe chunks inside), with A1111's `info` JSON text.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;

use super::app::App;
use super::jobs::Status;
use super::rejection::Rejection;
use super::request::{self, AdapterChoice, ImagesRequest};
use crate::sample::settings::{scheduler_from_a1111, split_lora_tags};

#[derive(Debug, Default, Deserialize)]
struct Txt2Img {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    /// -1 (A1111's default): a random seed.
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    cfg_scale: Option<f64>,
    #[serde(default)]
    width: Option<i64>,
    #[serde(default)]
    height: Option<i64>,
    #[serde(default)]
    sampler_name: Option<String>,
    /// A1111 1.9+'s schedule type (`Karras`).
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    n_iter: Option<usize>,
}

const EXAMPLE: &str = r#"{"prompt": "acme mug <lora:acme:0.8>", "steps": 20, "cfg_scale": 7, "seed": 1}"#;

pub async fn txt2img(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, Rejection> {
    let t: Txt2Img = request::parse_json(&body, EXAMPLE)?;
    let (prompt, tags) = split_lora_tags(&t.prompt);
    let adapters = tags.iter().map(|tag| tag_choice(tag)).collect::<Result<Vec<_>, _>>()?;
    let scheduler = match &t.sampler_name {
        None => None,
        Some(name) => Some(
            scheduler_from_a1111(name, t.scheduler.as_deref())
                .ok_or_else(|| Rejection::bad(format!("sampler_name {name:?} is not one sdtune has; use DDIM, Euler, Euler a, DPM++ 2M (schedule Karras too), Heun, LMS or PLMS")))?
                .name()
                .to_string(),
        ),
    };
    let count = t.batch_size.unwrap_or(1).max(1) * t.n_iter.unwrap_or(1).max(1);
    let seed = match t.seed {
        None | Some(-1) => random_seed(),
        Some(s) if s < 0 => return Err(Rejection::bad(format!("seed {s} is negative; give a seed from 0 up, or -1 for a random one"))),
        Some(s) => s as u64,
    };
    let req = ImagesRequest {
        prompt,
        negative_prompt: t.negative_prompt.filter(|n| !n.is_empty()),
        adapters,
        seed: Some(seed),
        count: Some(count),
        steps: Some(t.steps.unwrap_or(20)),
        guidance: Some(t.cfg_scale.unwrap_or(7.0)),
        width: t.width,
        height: t.height,
        scheduler,
        ..ImagesRequest::default()
    };
    let order = request::check(req, &app.registry, &app.limits)?;
    let id = app.jobs.submit(order)?;
    // A client that hangs up stops waiting; its job is cancelled with it.
    let mut guard = CancelOnDrop { app: app.clone(), id, armed: true };
    let mut rx = app.jobs.subscribe(id).ok_or_else(|| Rejection::not_found("the job was dropped at once"))?;
    loop {
        if rx.borrow_and_update().status.is_final() || rx.changed().await.is_err() {
            break;
        }
    }
    guard.armed = false;
    let view = app.jobs.view(id).ok_or_else(|| Rejection::not_found(format!("job {id} was dropped before it was read")))?;
    match view.progress.status {
        Status::Done => {}
        Status::Cancelled => return Err(Rejection::new(StatusCode::CONFLICT, format!("job {id} was cancelled before it finished"))),
        _ => {
            let why = view.progress.error.unwrap_or_else(|| "no reason given".into());
            return Err(Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {why}")));
        }
    }
    let images = app.jobs.images(id).unwrap_or_default();
    let b64 = base64::engine::general_purpose::STANDARD;
    let seeds: Vec<u64> = images.iter().map(|(s, _, _)| *s).collect();
    let info = serde_json::json!({
        "prompt": view.request["prompt"],
        "negative_prompt": view.request["negative_prompt"],
        "seed": seeds.first(),
        "all_seeds": seeds,
        "steps": view.request["steps"],
        "cfg_scale": view.request["guidance"],
        "width": view.request["width"],
        "height": view.request["height"],
        "sampler_name": t.sampler_name,
        "infotexts": images.iter().map(|(_, _, p)| p.clone()).collect::<Vec<_>>(),
        "job": id.to_string(),
    });
    Ok(Json(serde_json::json!({
        "images": images.iter().map(|(_, png, _)| b64.encode(png.as_slice())).collect::<Vec<_>>(),
        "parameters": view.request,
        "info": info.to_string(),
    }))
    .into_response())
}

/// `NAME:SCALE` or `NAME` from a `<lora:...>` tag.
fn tag_choice(tag: &str) -> Result<AdapterChoice, Rejection> {
    // A1111 also allows `NAME:TE:UNET` strengths; sdtune applies one.
    let mut parts = tag.split(':');
    let name = parts.next().unwrap_or_default().trim().to_string();
    let scale = match parts.next() {
        None => 1.0,
        Some(s) => s.trim().parse::<f64>().map_err(|_| {
            Rejection::bad(format!("<lora:{tag}> has strength {s:?}, which is not a number; write <lora:NAME:0.8>"))
        })?,
    };
    if parts.next().is_some() {
        return Err(Rejection::bad(format!("<lora:{tag}> gives separate text-encoder and UNet strengths; sdtune applies one, write <lora:{name}:SCALE>")));
    }
    Ok(AdapterChoice { name, scale })
}

/// A seed from the clock, as A1111 draws one for -1 (32 bits).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let digest = <sha2::Sha256 as sha2::Digest>::digest(nanos.to_le_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) as u64
}

/// `GET /sdapi/v1/loras` as A1111 answers it (name, alias, path, metadata).
pub async fn loras(State(app): State<Arc<App>>) -> Response {
    let list: Vec<serde_json::Value> = app
        .registry
        .list()
        .into_iter()
        .map(|a| serde_json::json!({ "name": a.name, "alias": a.name, "path": a.file, "metadata": a.info }))
        .collect();
    Json(list).into_response()
}

struct CancelOnDrop {
    app: Arc<App>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.app.jobs.cancel(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_give_name_and_strength() {
        let c = tag_choice("acme:0.8").unwrap();
        assert_eq!((c.name.as_str(), c.scale), ("acme", 0.8));
        assert_eq!(tag_choice("acme").unwrap().scale, 1.0);
        assert!(tag_choice("acme:x").is_err());
        assert!(tag_choice("acme:0.5:1").is_err());
    }
}
