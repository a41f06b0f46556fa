//! A backend for the proxy tests (`tests/proxy.rs`): an axum server on
//! 127.0.0.1:0 that records every call (body and headers) and answers
//! each as the test's script says.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the backend does with one call.
pub enum Reply {
    Json(Value),
    Status(u16),
    Raw(&'static str),
    /// Answer after a pause.
    Slow(Duration, Value),
}

pub type Script = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// The test's backend: every call's body and headers, in order.
#[derive(Clone)]
pub struct Backend {
    pub calls: Arc<Mutex<Vec<(Value, HeaderMap)>>>,
    /// Calls answered so far.
    pub answered: Arc<AtomicUsize>,
    script: Script,
}

impl Backend {
    /// Start a backend answering with `script`; its base URL.
    pub async fn start(
        script: impl Fn(&Value) -> Reply + Send + Sync + 'static,
    ) -> (Backend, String) {
        let backend = Backend {
            calls: Arc::default(),
            answered: Arc::default(),
            script: Arc::new(script),
        };
        let app = axum::Router::new()
            .route("/{kind}", axum::routing::post(answer))
            .with_state(backend.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (backend, url)
    }

    pub fn calls(&self) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }

    pub fn calls_of(&self, kind: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c["kind"] == kind)
            .collect()
    }
}

async fn answer(State(b): State<Backend>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).expect("the server sends JSON");
    b.calls.lock().unwrap().push((body.clone(), headers));
    let reply = (b.script)(&body);
    let response = match reply {
        Reply::Json(v) => axum::Json(v).into_response(),
        Reply::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Reply::Raw(text) => text.into_response(),
        Reply::Slow(d, v) => {
            tokio::time::sleep(d).await;
            axum::Json(v).into_response()
        }
    };
    b.answered.fetch_add(1, Ordering::SeqCst);
    response
}

pub fn ok(result: Value) -> Reply {
    Reply::Json(json!({ "result": result }))
}

pub fn forbidden() -> Reply {
    Reply::Json(json!({"error": {"code": "forbidden", "message": "not you"}}))
}
