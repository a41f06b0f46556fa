//! A private Redis Cluster for the tests: six `redis-server
//! --cluster-enabled yes` on free loopback ports (3 masters + 3 replicas,
//! made with `redis-cli --cluster create --cluster-replicas 1`), no
//! persistence, `cluster-node-timeout` 1 s so a failover takes seconds.
//!
//! Every server runs under a small shell watchdog that kills it (SIGKILL)
//! once the test process is gone, and removes the nodes' directory, so a
//! cluster kept in a `static` for a whole test file never outlives it;
//! [`RedisCluster`] also kills every server on drop. [`RedisCluster::kill`] is a `kill -9` of one server.
#![cfg(feature = "redis")]
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Start the node on `port` under its watchdog (which kills it, SIGKILL,
/// once the test process is gone, and then removes `dir`), keeping its
/// `nodes-<port>.conf` in `dir`: a node started again rejoins its cluster.
fn spawn_node(port: u16, dir: &std::path::Path) -> Child {
    let me = std::process::id();
    let server = format!(
        "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes \
         --cluster-config-file nodes-{port}.conf --cluster-node-timeout 1000 \
         --save '' --appendonly no --dir {dir}",
        dir = dir.display()
    );
    let script = format!(
        "{server} >/dev/null 2>&1 & r=$!; \
         while kill -0 {me} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
         kill -9 $r 2>/dev/null; kill -0 {me} 2>/dev/null || rm -rf {dir}",
        dir = dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh")
}

/// Until the server on `port` answers; its process id.
fn until_up(port: u16, deadline: Instant) -> u32 {
    loop {
        let info = cli(port, &["info", "server"]);
        if let Some(pid) = field(&info, "process_id") {
            return pid.parse().expect("pid");
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not start (is redis-server ≥ 7 installed?)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redis-cli -p port args…`, its standard output (empty when it failed).
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-cli ({e}): install it with `apt-get install redis-server`")
        });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One master and the slot ranges it serves.
#[derive(Debug, Clone)]
pub struct Master {
    pub port: u16,
    pub slots: Vec<(u16, u16)>,
}

/// Six cluster nodes owned by the test.
pub struct RedisCluster {
    /// Every node's port (masters and replicas as `--cluster create` made them).
    pub ports: Vec<u16>,
    /// The `redis-server` process ids, by port (for `kill -9`).
    pids: Vec<(u16, u32)>,
    /// The watchdog shells, reaped on drop (each ends with its server).
    watchdogs: Vec<Child>,
    /// Node config files.
    dir: PathBuf,
}

impl RedisCluster {
    /// Start six nodes, create the cluster, and wait until every node says
    /// `cluster_state:ok` and every replica is in sync (bounded: panics
    /// after 30 s). Blocking: usable from a `static` initialiser.
    pub fn start() -> RedisCluster {
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let dir = std::env::temp_dir().join(format!(
            "sb-redis-cluster-{}-{}",
            std::process::id(),
            ports[0]
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut watchdogs = Vec::new();
        let mut pids = Vec::new();
        for &port in &ports {
            watchdogs.push(spawn_node(port, &dir));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &ports {
            pids.push((port, until_up(port, deadline)));
        }
        let cluster = RedisCluster {
            ports,
            pids,
            watchdogs,
            dir,
        };
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_healthy(deadline);
        cluster
    }

    /// Until every live node reports `cluster_state:ok`, there are three
    /// masters covering every slot, and each has a replica in sync.
    fn wait_healthy(&self, deadline: Instant) {
        loop {
            let ok = self.ports.iter().all(|&p| {
                field(&cli(p, &["cluster", "info"]), "cluster_state").as_deref() == Some("ok")
            });
            let replicas_up = self
                .ports
                .iter()
                .filter(|&&p| {
                    let info = cli(p, &["info", "replication"]);
                    field(&info, "role").as_deref() == Some("slave")
                        && field(&info, "master_link_status").as_deref() == Some("up")
                })
                .count();
            // A replica that finished its initial sync is put online by its
            // master only after its first acknowledgement (up to a second
            // later); until then a failover may promote it without the
            // writes made meanwhile. A master with a replica means one
            // online.
            let masters = self.masters();
            let online = masters.iter().all(|m| {
                cli(m.port, &["info", "replication"])
                    .lines()
                    .any(|l| l.starts_with("slave0:") && l.contains("state=online"))
            });
            if ok && replicas_up == 3 && masters.len() == 3 && online {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the redis cluster did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The bus URL: every node as a seed.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// A live node's port.
    fn any_live(&self) -> u16 {
        *self
            .ports
            .iter()
            .find(|&&p| !cli(p, &["ping"]).is_empty())
            .expect("a live node")
    }

    /// The masters (that are not failed) and their slots, from
    /// `CLUSTER NODES` of a live node.
    pub fn masters(&self) -> Vec<Master> {
        let nodes = cli(self.any_live(), &["cluster", "nodes"]);
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 8 || !parts[2].contains("master") || parts[2].contains("fail") {
                continue;
            }
            let Some(port) = parts[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
            else {
                continue;
            };
            let slots: Vec<(u16, u16)> = parts[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            if !slots.is_empty() {
                masters.push(Master { port, slots });
            }
        }
        masters
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn key_slot(&self, key: &str) -> u16 {
        cli(self.any_live(), &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("keyslot")
    }

    /// The port of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> Option<u16> {
        self.masters()
            .into_iter()
            .find(|m| m.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|m| m.port)
    }

    /// The port of the replica of the master on `port` (its `INFO`).
    pub fn replica_of(&self, port: u16) -> Option<u16> {
        let info = cli(port, &["info", "replication"]);
        let line = info.lines().find(|l| l.starts_with("slave0:"))?;
        line.split(',')
            .find_map(|kv| kv.strip_prefix("port="))
            .and_then(|p| p.trim().parse().ok())
    }

    /// Send `signal` (`STOP`, `CONT`) to the server on `port`.
    pub fn signal(&self, port: u16, signal: &str) {
        if let Some(&(_, pid)) = self.pids.iter().find(|&&(p, _)| p == port) {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// `kill -9` the server on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.pids.iter().position(|&(p, _)| p == port) {
            let (_, pid) = self.pids.remove(i);
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }

    /// Start the node on `port` again (after [`kill`](Self::kill)), empty
    /// (no persistence), with its node config: it rejoins the cluster,
    /// as a replica when another master took its slots over.
    pub fn restart(&mut self, port: u16) {
        self.watchdogs.push(spawn_node(port, &self.dir));
        let pid = until_up(port, Instant::now() + Duration::from_secs(30));
        self.pids.push((port, pid));
    }

    /// Until a live master other than `old` serves `slot` and every live
    /// node says `cluster_state:ok` (bounded by `within`).
    pub fn until_failed_over(&self, slot: u16, old: u16, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        loop {
            let live: Vec<u16> = self.pids.iter().map(|&(p, _)| p).collect();
            let ok = live.iter().all(|&p| {
                field(&cli(p, &["cluster", "info"]), "cluster_state").as_deref() == Some("ok")
            });
            if let Some(new) = self.master_of(slot) {
                if ok && new != old && live.contains(&new) {
                    return Some(new);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, pid) in std::mem::take(&mut self.pids) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for mut w in std::mem::take(&mut self.watchdogs) {
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `name:value` from an INFO-style answer.
fn field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.trim()
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}
