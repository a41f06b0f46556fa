//! The suite's instances: [`Instance`], one server in a Tokio runtime of
//! its own (so a crash drops every task of it, like a killed process),
//! and [`Cluster`], the instances of one case started from the factory.
//! Part of `bus_suite` (re-exported there).

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::config::{Config, Settings};
use switchboard::{Node, server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{BusFactory, init_logging, unique_prefix};
use crate::support::Client;

/// One server in its own runtime.
pub struct Instance {
    pub addr: SocketAddr,
    pub node: Node,
    /// The instance's runtime; dropped (in the background) by `crash`.
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Instance {
    /// Start a server with `settings` in a runtime of its own. Panics if the
    /// node cannot start (the bus is unreachable; a shared bus server that
    /// is down is named, with how to start it).
    pub async fn start(settings: Settings) -> Instance {
        match Instance::try_start(settings).await {
            Ok(i) => i,
            Err(e) => panic!("instance starts: {e}"),
        }
    }

    /// Like [`start`](Instance::start), returning the start-up error.
    pub async fn try_start(settings: Settings) -> switchboard::Result<Instance> {
        init_logging();
        if let Some(url) = &settings.bus {
            crate::support::services::require_bus(url);
        }
        let config = Config::from_settings(settings)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sb-instance")
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let started = rt.spawn(async move {
            let listener = switchboard::server::bind((config.host, config.port).into())?;
            let addr = listener.local_addr()?;
            let node = Node::new(config).await?;
            let n = node.clone();
            let task = tokio::spawn(async move {
                let _ = server::run(listener, n, async {
                    let _ = stopped.await;
                })
                .await;
            });
            Ok::<_, switchboard::error::Error>((addr, node, task))
        });
        let result = match started.await {
            Ok(r) => r,
            Err(e) => panic!("instance start-up task failed: {e}"),
        };
        match result {
            Ok((addr, node, task)) => Ok(Instance {
                addr,
                node,
                rt: Some(rt),
                stop: Some(stop),
                task: Some(task),
            }),
            Err(e) => {
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A new WebSocket client of this instance (welcome read).
    pub async fn client(&self) -> Client {
        Client::connect_url(&self.url("/ws")).await
    }

    /// Kill the instance: every task of its runtime is dropped where it
    /// stands; no unsubscribe, no presence removal, no bus close.
    pub fn crash(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Clean shutdown: drain (bounded), close the bus, stop the runtime.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The instances of one case.
pub struct Cluster {
    /// The case's unique bus prefix.
    pub prefix: String,
    /// `None` once crashed.
    instances: Vec<Option<Instance>>,
}

impl Cluster {
    /// Start `n` instances (at most the factory's distinct count).
    pub async fn start(f: &dyn BusFactory, case: &str, n: usize) -> Cluster {
        Cluster::start_with(f, case, n, |_| {}).await
    }

    /// Start `n` instances with `tweak` applied to each one's settings.
    pub async fn start_with(
        f: &dyn BusFactory,
        case: &str,
        n: usize,
        tweak: impl Fn(&mut Settings),
    ) -> Cluster {
        let prefix = unique_prefix(case);
        let n = n.min(f.distinct_instances()).max(1);
        let mut instances = Vec::new();
        for i in 0..n {
            let mut s = f.settings(&prefix, i);
            tweak(&mut s);
            instances.push(Some(Instance::start(s).await));
        }
        Cluster { prefix, instances }
    }

    /// Instance `i`; with fewer distinct instances, `i` wraps around.
    pub fn get(&self, i: usize) -> &Instance {
        self.instances[i % self.instances.len()]
            .as_ref()
            .expect("instance is alive")
    }

    /// Distinct running servers.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// A client of instance `i`.
    pub async fn client(&self, i: usize) -> Client {
        self.get(i).client().await
    }

    /// Crash instance `i` (see [`Instance::crash`]).
    pub fn crash(&mut self, i: usize) {
        let n = self.instances.len();
        if let Some(inst) = self.instances[i % n].take() {
            inst.crash();
        }
    }

    /// Shut every instance down cleanly.
    pub async fn shutdown(mut self) {
        for inst in self.instances.drain(..).flatten() {
            inst.shutdown().await;
        }
    }
}
