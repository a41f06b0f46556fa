//! Test support: start a real server on 127.0.0.1:0 and talk to it over
//! real sockets.
#![allow(dead_code)]

pub mod backend;
pub mod deflate;
pub mod event_sink;
pub mod frames;
pub mod raw_ws;
pub mod services;
pub mod sse;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::config::{Config, Settings};
use switchboard::{Node, server};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame that must come.
pub const WAIT: Duration = Duration::from_secs(5);

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub node: Node,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A server started by the test itself (on backends of its own).
    pub fn from_parts(
        addr: SocketAddr,
        node: Node,
        stop: oneshot::Sender<()>,
        task: JoinHandle<()>,
    ) -> TestServer {
        TestServer {
            addr,
            node,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Begin the shutdown and wait for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within the drain timeout")
                .expect("server task does not panic");
        }
    }

    /// Begin the shutdown, returning at once.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops")
                .expect("no panic");
        }
    }
}

/// Default test settings: everything as shipped, but bound to loopback on a
/// free port.
/// A port nobody listens on now (for a process the test spawns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn settings() -> Settings {
    Settings {
        host: Some([127, 0, 0, 1].into()),
        port: Some(0),
        drain_timeout: Some("5s".parse().unwrap()),
        ..Default::default()
    }
}

pub async fn start() -> TestServer {
    start_with(settings()).await
}

pub async fn start_with(settings: Settings) -> TestServer {
    if let Some(url) = &settings.bus {
        services::require_bus(url);
    }
    let config = Config::from_settings(settings).expect("valid test config");
    start_config(config).await
}

pub async fn start_config(config: Config) -> TestServer {
    let listener = server::bind((config.host, config.port).into()).unwrap();
    let addr = listener.local_addr().unwrap();
    let node = Node::new(config).await.expect("node starts");
    let (stop, stopped) = oneshot::channel::<()>();
    let n = node.clone();
    let task = tokio::spawn(async move {
        server::run(listener, n, async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    TestServer {
        addr,
        node,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A WebSocket test client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub id: String,
}

impl Client {
    /// Connect to `/ws` and read the welcome.
    pub async fn connect(server: &TestServer) -> Client {
        Client::connect_url(&server.url("/ws")).await
    }

    pub async fn connect_url(url: &str) -> Client {
        match Client::try_connect_url(url).await {
            Ok(c) => c,
            Err((code, reason)) => panic!("refused at connect: {code} {reason}"),
        }
    }

    /// Connect and read the welcome, or the close (code, reason) that
    /// refused the connection after the upgrade.
    pub async fn try_connect_url(url: &str) -> Result<Client, (u16, String)> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let mut c = Client {
            ws,
            id: String::new(),
        };
        let first = tokio::time::timeout(WAIT, c.ws.next())
            .await
            .expect("a frame arrives in time")
            .expect("the connection is open")
            .expect("no protocol error");
        let welcome: Value = match first {
            Message::Text(t) => serde_json::from_str(&t).unwrap(),
            Message::Close(Some(f)) => return Err((f.code.into(), f.reason.to_string())),
            other => panic!("unexpected first frame {other:?}"),
        };
        assert_eq!(welcome["type"], "connected", "{welcome}");
        c.id = welcome["clientId"].as_str().unwrap().to_string();
        Ok(c)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next text frame as JSON; panics after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame arrives in time")
                .expect("the connection is open")
                .expect("no protocol error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame of `ty`, skipping others (join/leave noise).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Assert that no text frame arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(d, self.ws.next()).await {
            panic!("expected nothing, got {t}");
        }
    }

    /// Send a request with an id and return the reply carrying that ref.
    pub async fn request(&mut self, mut v: Value, id: u64) -> Value {
        v["id"] = json!(id);
        self.send(v).await;
        loop {
            let r = self.recv().await;
            if r["ref"] == json!(id) {
                return r;
            }
        }
    }

    /// Wait for the server's close frame and return its code and reason.
    pub async fn expect_close_frame(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (f.code.into(), f.reason.to_string());
                }
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Wait (each frame at most `within`) for the server's close frame and
    /// return its code, failing if a `message` frame comes first (a
    /// publication slipped in before the client was told of a gap would be
    /// a silent gap).
    pub async fn expect_close_before_any_message(&mut self, within: Duration) -> u16 {
        loop {
            match tokio::time::timeout(within, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return f.code.into(),
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).expect("a JSON frame");
                    assert_ne!(v["type"], "message", "delivered before the close: {v}");
                }
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Wait for the server's close frame and return its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return f.code.into(),
                Ok(Some(Ok(Message::Close(None)))) => return 1005,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => panic!("error instead of close: {e}"),
                Ok(None) => panic!("stream ended without a close frame"),
                Err(_) => panic!("no close frame in time"),
            }
        }
    }
}

/// GET `path` and return (status, body).
pub async fn get(server: &TestServer, path: &str) -> (u16, String) {
    let resp = reqwest::get(server.http(path)).await.expect("http get");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// GET `url` with the server API key `key`; the JSON answer.
pub async fn get_json(url: String, key: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("http get")
        .json()
        .await
        .expect("a JSON answer")
}

/// Poll `f` until it is true or `WAIT` passes.
pub async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
