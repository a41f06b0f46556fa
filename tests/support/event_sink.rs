//! A real HTTP backend for lifecycle events: an axum server on
//! 127.0.0.1:0 that checks each delivery's signature, records the events,
//! and can be told to fail (503) as a backend that is down, or to hang
//! as a backend that is slow to answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

#[derive(Default)]
struct Shared {
    down: AtomicBool,
    /// Record each delivery in `held` and answer nothing while it is set
    /// (then 503).
    hold: AtomicBool,
    /// Events received while holding: delivered, never acknowledged.
    held: Mutex<Vec<Value>>,
    /// Every acknowledged event, in arrival order.
    events: Mutex<Vec<Value>>,
    /// Batches answered 2xx.
    batches: Mutex<usize>,
    /// Deliveries whose signature did not verify.
    bad_signatures: Mutex<usize>,
    secret: Vec<u8>,
}

/// The backend; dropped with the test's runtime.
#[derive(Clone)]
pub struct EventSink {
    shared: Arc<Shared>,
    pub url: String,
}

impl EventSink {
    pub async fn start(secret: &str) -> EventSink {
        EventSink::start_on(secret, 0).await
    }

    /// The URL a sink on `port` would have (to point a server at a
    /// backend that is not there yet).
    pub fn url_on(port: u16) -> String {
        format!("http://127.0.0.1:{port}/events")
    }

    /// A sink on `port` (0: a free one).
    pub async fn start_on(secret: &str, port: u16) -> EventSink {
        let shared = Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            ..Default::default()
        });
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = EventSink::url_on(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        EventSink { shared, url }
    }

    /// Answer 503 (down) or 200.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Hang on every delivery (recording it in [`EventSink::held`]) until
    /// released, then answer 503.
    pub fn set_hold(&self, hold: bool) {
        self.shared.hold.store(hold, Ordering::SeqCst);
    }

    /// The events received while holding, never acknowledged.
    pub fn held(&self) -> Vec<Value> {
        self.shared.held.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.events.lock().unwrap().clone()
    }

    pub fn batches(&self) -> usize {
        *self.shared.batches.lock().unwrap()
    }

    pub fn bad_signatures(&self) -> usize {
        *self.shared.bad_signatures.lock().unwrap()
    }

    /// The events of `subject`, in arrival order.
    pub fn of(&self, subject: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["subject"] == subject)
            .collect()
    }

    /// Wait (at most `within`) until `pred` holds for the events received.
    pub async fn until(&self, within: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let events = self.events();
            if pred(&events) {
                return events;
            }
            if tokio::time::Instant::now() >= end {
                panic!(
                    "events did not arrive in time; got {}",
                    serde_json::to_string_pretty(&events).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&s.secret).unwrap();
    mac.update(&body);
    let expected = format!("sha256={}", hex(&mac.finalize().into_bytes()));
    let given = headers
        .get("x-switchboard-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if given != expected
        || headers
            .get("content-type")
            .is_none_or(|v| v != "application/json")
    {
        *s.bad_signatures.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let v: Value = serde_json::from_slice(&body).unwrap();
    let batch = v["events"].as_array().unwrap().clone();
    if s.hold.load(Ordering::SeqCst) {
        s.held.lock().unwrap().extend(batch);
        while s.hold.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    s.events.lock().unwrap().extend(batch);
    *s.batches.lock().unwrap() += 1;
    StatusCode::OK
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
