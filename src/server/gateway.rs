//! Every request's way in: the metered endpoints go straight to the proxy, every other
//! route through the router. Both answer each refusal in OpenAI's error envelope, read
//! bodies under the same limit and timeout (`edge`), and check the key before the body.

use std::future::Future;
use std::pin::Pin;

use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{api, proxy};

/// The router, with every route of SPEC §4, §3, §6 and §7.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new();
    // SDKs configured with a base URL without `/v1` call these paths directly. Routes,
    // not a nested router: nesting rebuilds every request's URI to strip the prefix.
    for prefix in ["/v1", ""] {
        router = router
            .route(&format!("{prefix}/chat/completions"), post(proxy::chat_completions))
            .route(&format!("{prefix}/completions"), post(proxy::completions))
            .route(&format!("{prefix}/embeddings"), post(proxy::embeddings))
            .route(&format!("{prefix}/models"), get(api::models::list));
    }
    router
        .merge(api::admin::router())
        .merge(api::spend::router())
        .merge(api::health::router())
        .fallback(|| async { ApiError::NotFound("Unknown path. tollgate serves /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /admin, /spend and /health.".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
}

/// Each connection's service: a request to a metered endpoint (`POST` to chat/completions,
/// completions or embeddings, with or without `/v1`) goes straight to its handler; every
/// other request goes through the router, which has the same routes. The direct path skips
/// the router's per-request work (a boxed route service cloned, its futures, extensions),
/// several percent of the CPU a proxied request costs.
#[derive(Clone)]
pub(super) struct Gateway {
    router: Router,
    state: AppState,
}

impl Gateway {
    pub(super) fn new(router: Router, state: AppState) -> Gateway {
        Gateway { router, state }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Gateway {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Answer;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Answer {
        let req = req.map(axum::body::Body::new);
        match proxy::metered_endpoint(req.method(), req.uri().path()) {
            Some(endpoint) => {
                let state = self.state.clone();
                Box::pin(async move { Ok(proxy::proxy(state, endpoint, req).await) })
            }
            None => {
                let span = tracing::debug_span!("request", method = %req.method(), path = req.uri().path());
                Box::pin(tower::ServiceExt::oneshot(self.router.clone(), req).instrument(span))
            }
        }
    }
}
