//! `--token`: every API route wants `Authorization: Bearer TOKEN`.
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::app::App;
use super::rejection::Rejection;

/// Lets a request through when the server has no token or the request
/// carries it; 401 otherwise.
pub async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let Some(token) = &app.token else { return next.run(request).await };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| token.matches(g.trim())) {
        return next.run(request).await;
    }
    let mut response = Rejection::new(
        StatusCode::UNAUTHORIZED,
        "this server wants its token; send the header `Authorization: Bearer TOKEN` with the token it was started with",
    )
    .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}
