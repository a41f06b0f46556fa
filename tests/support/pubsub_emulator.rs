//! A private Pub/Sub emulator for tests, on a free loopback port.
//!
//! The emulator is started directly (the `cloud-pubsub-emulator` script
//! `exec`s Java, so the PID held is the JVM's), and is ready when its log
//! says `Server started, listening on PORT`. A watchdog (`setsid sh`) kills
//! it when the test process goes away, so even an emulator held in a
//! `static` (never dropped) does not outlive the tests; an owned
//! [`Emulator`] is also killed on drop (panics included).
#![cfg(feature = "pubsub")]
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::OnceCell;

/// The emulator launcher of the Cloud SDK.
pub const EMULATOR_BIN: &str =
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator";

/// How to install the emulator (it also needs Java).
pub const EMULATOR_INSTALL: &str = "install it with `apt-get install \
     google-cloud-cli-pubsub-emulator openjdk-17-jre-headless` (the emulator \
     package comes from Google's Cloud SDK apt repository)";

/// Longest a start may take (a JVM on a busy two-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running emulator.
pub struct Emulator {
    /// Its port (REST and gRPC).
    pub port: u16,
    /// The JVM; `None` while killed.
    child: Option<Child>,
    /// Where its output goes.
    log: PathBuf,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Emulator {
    /// Start an emulator of its own on a free port.
    pub async fn start() -> Emulator {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "switchboard-pubsub-emulator-{}-{port}.log",
            std::process::id()
        ));
        let mut e = Emulator {
            port,
            child: None,
            log,
        };
        e.spawn().await;
        e
    }

    /// The emulator shared by the tests of this process (started once).
    pub async fn shared() -> &'static Emulator {
        static SHARED: OnceCell<Emulator> = OnceCell::const_new();
        SHARED.get_or_init(Emulator::start).await
    }

    /// `HOST:PORT`, as `PUBSUB_EMULATOR_HOST` would say it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The bus URL for `project` on this emulator.
    pub fn bus_url(&self, project: &str) -> String {
        format!("pubsub://{project}?emulator={}", self.host())
    }

    async fn spawn(&mut self) {
        // Appended to across restarts: readiness is read past this point.
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("emulator log file");
        let err = log.try_clone().expect("emulator log file");
        let child = Command::new(EMULATOR_BIN)
            .arg("--host=127.0.0.1")
            .arg(format!("--port={}", self.port))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                crate::support::services::cannot_run(EMULATOR_BIN, e, EMULATOR_INSTALL)
            });
        // Kill the JVM when this test process disappears.
        let _ = Command::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(
                "while kill -0 $PARENT 2>/dev/null && kill -0 $CHILD 2>/dev/null; \
                 do sleep 0.5; done; kill -9 $CHILD 2>/dev/null",
            )
            .env("PARENT", std::process::id().to_string())
            .env("CHILD", child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        self.child = Some(child);
        let ready = format!("Server started, listening on {}", self.port);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let text = text.get(from..).unwrap_or_default();
            if text.contains(&ready) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the emulator exited ({status}) before it was ready \
                     (is Java installed? {EMULATOR_INSTALL}):\n{text}"
                );
            }
            if tokio::time::Instant::now() > deadline {
                self.kill();
                panic!("the emulator was not ready within {START_TIMEOUT:?}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9` (all its state is lost, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: no topics, no subscriptions).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
        if std::env::var("SOAK_DEBUG").is_ok() {
            eprintln!("the emulator logged to {}", self.log.display());
            return;
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
