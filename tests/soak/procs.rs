//! The processes a soak kills: Switchboard instances (the real binary,
//! each on a fixed port so that it comes back where clients look for it)
//! and the bus servers, with persistence where the bus has it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pubsub_emulator::Emulator;
use crate::redis_cluster::RedisCluster;
use crate::support::free_port;

/// How long a restarted process may take to answer (failed starts
/// retried meanwhile). Long: right after its own restart, on a loaded
/// 2-core machine, the Pub/Sub emulator has kept instances from starting
/// for more than 30 s, once for more than 60 s (every attempt's streaming
/// pull timing out).
const START: Duration = Duration::from_secs(120);

/// One `switchboard` process.
pub struct Instance {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
    /// Its log (stderr), shown when it fails to start.
    log: PathBuf,
    /// Starts that exited before becoming ready (and were retried).
    pub failed_starts: u64,
}

impl Instance {
    /// Start with `args` (besides host and port) and wait until ready.
    pub async fn start(args: Vec<String>) -> Instance {
        let port = free_port();
        let mut i = Instance {
            port,
            args,
            child: None,
            failed_starts: 0,
            log: std::env::temp_dir().join(format!(
                "sb-soak-{}-{port}.log",
                switchboard::ids::random_base36(6)
            )),
        };
        i.restart().await;
        i
    }

    /// `kill -9`: no drain, no goodbye on the bus.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start (again) on the same port; returns once `/readyz` answers 200.
    /// A process that exits before (a bus it cannot reach at start-up
    /// stops it, loudly) is started again, as a process manager would,
    /// and counted in `failed_starts`.
    pub async fn restart(&mut self) {
        self.kill();
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let deadline = tokio::time::Instant::now() + START;
        loop {
            if self.child.is_none() {
                let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
                    .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                    .args(&self.args)
                    .env("NO_COLOR", "1")
                    .env(
                        "RUST_LOG",
                        if debug() {
                            "info,switchboard=debug"
                        } else {
                            "info"
                        },
                    )
                    .stdout(if debug() {
                        Stdio::from(log_file(&self.log))
                    } else {
                        Stdio::null()
                    })
                    .stderr(log_file(&self.log))
                    .spawn()
                    .expect("spawn switchboard");
                self.child = Some(child);
            }
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "switchboard on {} did not become ready; its log ends:\n{}",
                    self.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.child = None;
                self.failed_starts += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn log_file(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

/// `SOAK_DEBUG`: instance logs at debug level, kept (their paths printed).
fn debug() -> bool {
    std::env::var("SOAK_DEBUG").is_ok()
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if debug() {
            eprintln!(
                "instance on :{} logged to {}",
                self.port,
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The bus under test, on a private server that the soak may kill -9.
pub enum BusServer {
    /// `redis-server --appendonly yes --appendfsync always`.
    Redis {
        port: u16,
        dir: PathBuf,
        child: Option<Child>,
    },
    /// `nats-server -js` with a file store.
    Nats {
        port: u16,
        dir: PathBuf,
        child: Option<Child>,
    },
    /// The Pub/Sub emulator (keeps nothing across a restart).
    PubSub(Emulator),
    /// A Redis Cluster of 3 masters + 3 replicas (no persistence): its
    /// "bus kill" is a `kill -9` of the master serving the soak's channel,
    /// then, once its replica took over, a restart of the node (it rejoins
    /// as a replica, empty, and syncs).
    Cluster(RedisCluster),
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sb-soak-{name}-{}",
        switchboard::ids::random_base36(8)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl BusServer {
    pub async fn redis() -> BusServer {
        let mut b = BusServer::Redis {
            port: free_port(),
            dir: scratch("redis"),
            child: None,
        };
        b.spawn().await;
        b
    }

    pub async fn nats() -> BusServer {
        let mut b = BusServer::Nats {
            port: free_port(),
            dir: scratch("nats"),
            child: None,
        };
        b.spawn().await;
        b
    }

    pub async fn pubsub() -> BusServer {
        BusServer::PubSub(Emulator::start().await)
    }

    pub async fn redis_cluster() -> BusServer {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("cluster");
        BusServer::Cluster(cluster)
    }

    pub fn name(&self) -> &'static str {
        match self {
            BusServer::Redis { .. } => "redis",
            BusServer::Nats { .. } => "nats",
            BusServer::PubSub(_) => "pubsub",
            BusServer::Cluster(_) => "redis-cluster",
        }
    }

    /// The TCP port clients of the bus connect to.
    pub fn port(&self) -> u16 {
        match self {
            BusServer::Redis { port, .. } | BusServer::Nats { port, .. } => *port,
            BusServer::PubSub(e) => e
                .host()
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .expect("emulator port"),
            BusServer::Cluster(c) => c.ports[0],
        }
    }

    /// `--bus` for an instance that reaches the bus at `port` (the bus's
    /// own, or a proxy's in front of it).
    pub fn url(&self, port: u16) -> String {
        match self {
            BusServer::Redis { .. } => format!("redis://127.0.0.1:{port}"),
            BusServer::Nats { .. } => format!("nats://127.0.0.1:{port}"),
            BusServer::PubSub(_) => format!("pubsub://soak-project?emulator=127.0.0.1:{port}"),
            // The cluster client finds every node itself: no proxy between.
            BusServer::Cluster(c) => c.url(),
        }
    }

    async fn spawn(&mut self) {
        let (program, args, port, child) = match self {
            BusServer::Redis { port, dir, child } => (
                "redis-server",
                vec![
                    "--port".to_string(),
                    port.to_string(),
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--dir".into(),
                    dir.display().to_string(),
                    "--appendonly".into(),
                    "yes".into(),
                    "--appendfsync".into(),
                    "always".into(),
                    "--save".into(),
                    String::new(),
                ],
                *port,
                child,
            ),
            BusServer::Nats { port, dir, child } => (
                "nats-server",
                vec![
                    "-a".to_string(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                    "-js".into(),
                    "-sd".into(),
                    dir.display().to_string(),
                ],
                *port,
                child,
            ),
            BusServer::PubSub(e) => {
                e.restart().await;
                return;
            }
            BusServer::Cluster(_) => return,
        };
        let c = Command::new(program)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                crate::support::services::cannot_run(
                    program,
                    e,
                    &format!("install it with `apt-get install {program}`"),
                )
            });
        *child = Some(c);
        let deadline = tokio::time::Instant::now() + START;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{program} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`, then start again on the same port with the same store.
    pub async fn kill_restart(&mut self) {
        match self {
            BusServer::Redis { child, .. } | BusServer::Nats { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            BusServer::PubSub(e) => e.kill(),
            BusServer::Cluster(c) => {
                let slot = c.key_slot(&format!("{{{}}}", crate::run::CHANNEL));
                let old = c.master_of(slot).expect("a master serves the channel");
                c.kill(old);
                tokio::task::block_in_place(|| {
                    c.until_failed_over(slot, old, Duration::from_secs(30))
                        .expect("the replica took over");
                    c.restart(old);
                });
                return;
            }
        }
        self.spawn().await;
    }
}

impl Drop for BusServer {
    fn drop(&mut self) {
        match self {
            BusServer::Redis { child, dir, .. } | BusServer::Nats { child, dir, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let _ = std::fs::remove_dir_all(dir);
            }
            BusServer::PubSub(_) | BusServer::Cluster(_) => {}
        }
    }
}
