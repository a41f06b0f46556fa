//! The bus's interest in a channel follows the local subscribers, even when
//! they come and go at once and the bus's subscribe is slow or fails: no
//! subscriber is left on a channel the bus does not deliver here.
//!
//! The bus is the memory bus behind a fault injector (like a TCP proxy in
//! the broker tests): its subscribe takes 300 ms and fails the first time,
//! and it delivers only the channels it was subscribed to, as a shared bus
//! does.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use support::{Client, TestServer};
use switchboard::broker::memory::{MemoryBroker, MemoryPresence};
use switchboard::broker::{
    Broker, BrokerHandler, Control, Direct, HistoryOptions, HistoryResult, NewPublication,
};
use switchboard::config::Config;
use switchboard::error::Error;
use switchboard::protocol::{Publication, StreamPosition};
use switchboard::{Node, Result, server};
use tokio::sync::oneshot;

/// The channels the injector's bus is subscribed to.
type Subscribed = Arc<Mutex<HashSet<String>>>;

/// The memory bus, subscribing slowly, failing its first subscribe, and
/// delivering only what it is subscribed to.
struct Gated {
    inner: MemoryBroker,
    subscribed: Subscribed,
    failed_once: Mutex<bool>,
}

/// Hands on only the publications of subscribed channels.
struct GatedHandler {
    inner: Arc<dyn BrokerHandler>,
    subscribed: Subscribed,
}

impl BrokerHandler for GatedHandler {
    fn positions(&self) -> Vec<(Arc<str>, Option<StreamPosition>)> {
        self.inner.positions()
    }
    fn position(&self, channel: &str) -> Option<StreamPosition> {
        self.inner.position(channel)
    }
    fn resync_failed(&self, channel: &str) {
        self.inner.resync_failed(channel)
    }
    fn on_publication(&self, channel: &Arc<str>, epoch: &Arc<str>, publication: &Publication) {
        if self.subscribed.lock().unwrap().contains(&**channel) {
            self.inner.on_publication(channel, epoch, publication)
        }
    }
    fn on_control(&self, control: &Control) {
        self.inner.on_control(control)
    }
    fn on_direct(&self, direct: &Direct) -> bool {
        self.inner.on_direct(direct)
    }
}

#[async_trait]
impl Broker for Gated {
    async fn start(&self, handler: Arc<dyn BrokerHandler>) -> Result<()> {
        let gated = GatedHandler {
            inner: handler,
            subscribed: self.subscribed.clone(),
        };
        self.inner.start(Arc::new(gated)).await
    }
    async fn subscribe(&self, channel: &str) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let first = std::mem::replace(&mut *self.failed_once.lock().unwrap(), true);
        if !first {
            return Err(Error::Bus("injected: the first subscribe fails".into()));
        }
        self.subscribed.lock().unwrap().insert(channel.into());
        Ok(())
    }
    async fn unsubscribe(&self, channel: &str) -> Result<()> {
        self.subscribed.lock().unwrap().remove(channel);
        Ok(())
    }
    async fn publish(
        &self,
        channel: &str,
        publication: NewPublication,
        history: HistoryOptions,
    ) -> Result<StreamPosition> {
        self.inner.publish(channel, publication, history).await
    }
    async fn publish_control(&self, control: Control) -> Result<()> {
        self.inner.publish_control(control).await
    }
    async fn direct(&self, direct: Direct) -> Result<bool> {
        self.inner.direct(direct).await
    }
    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        newest_first: bool,
        history: HistoryOptions,
    ) -> Result<HistoryResult> {
        self.inner
            .history(channel, since, limit, newest_first, history)
            .await
    }
}

async fn start_gated() -> (TestServer, Subscribed) {
    let config = Config::from_settings(support::settings()).unwrap();
    let subscribed = Subscribed::default();
    let broker = Arc::new(Gated {
        inner: MemoryBroker::new(),
        subscribed: subscribed.clone(),
        failed_once: Mutex::new(false),
    });
    let listener = server::bind((config.host, config.port).into()).unwrap();
    let addr = listener.local_addr().unwrap();
    let node = Node::with_backends(config, broker, Arc::new(MemoryPresence::new()))
        .await
        .expect("node starts");
    let (stop, stopped) = oneshot::channel::<()>();
    let n = node.clone();
    let task = tokio::spawn(async move {
        server::run(listener, n, async {
            let _ = stopped.await;
        })
        .await
        .expect("server runs");
    });
    (TestServer::from_parts(addr, node, stop, task), subscribed)
}

/// Three clients subscribe at once; the bus's first subscribe fails after
/// 300 ms. Each client is either told the error or subscribed, and every
/// subscribed one receives the next publication; the bus holds the
/// channel exactly while someone here is subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_subscribers_and_a_failed_bus_subscribe() {
    let (server, subscribed) = start_gated().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(&server).await);
    }
    for c in clients.iter_mut() {
        c.send(json!({"type": "subscribe", "channel": "room", "id": 1}))
            .await;
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for mut c in clients {
        let r = loop {
            let r = c.recv().await;
            if r["ref"] == 1 {
                break r;
            }
        };
        match r["type"].as_str() {
            Some("subscribed") => ok.push(c),
            Some("error") => {
                assert_eq!(r["code"], "bus_unavailable", "{r}");
                refused += 1;
            }
            _ => panic!("unexpected {r}"),
        }
    }
    assert_eq!(refused, 1, "the one whose bus subscribe failed is told");
    assert_eq!(ok.len(), 2);
    assert!(subscribed.lock().unwrap().contains("room"));

    let mut p = Client::connect(&server).await;
    let ack = p
        .request(
            json!({"type": "publish", "channel": "room", "data": "hello"}),
            2,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for c in ok.iter_mut() {
        let m = c.recv_type("message").await;
        assert_eq!(m["data"], "hello", "{m}");
    }

    // The last one leaving while a new one arrives: the bus still holds it.
    let mut late = Client::connect(&server).await;
    let (a, b) = (ok.pop().unwrap(), ok.pop().unwrap());
    drop((a, b));
    let r = late
        .request(json!({"type": "subscribe", "channel": "room"}), 3)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert!(
        support::eventually(|| {
            let s = subscribed.clone();
            async move { s.lock().unwrap().contains("room") }
        })
        .await
    );
    let ack = p
        .request(
            json!({"type": "publish", "channel": "room", "data": "again"}),
            4,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = late.recv_type("message").await;
    assert_eq!(m["data"], "again", "{m}");

    // Nobody left: the bus lets the channel go.
    drop(late);
    assert!(
        support::eventually(|| {
            let s = subscribed.clone();
            async move { !s.lock().unwrap().contains("room") }
        })
        .await,
        "unsubscribed once the last subscriber left"
    );
    drop(p);
    server.shutdown().await;
}
