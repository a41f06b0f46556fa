//! Opening benchmark connections: loopback only, spread over source
//! addresses 127.0.0.1 … 127.0.0.8, with a small client read buffer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub type Ws = WebSocketStream<TcpStream>;

/// How many loopback source addresses connections are spread over.
pub const SOURCE_ADDRS: usize = 8;
/// Longest wait for one TCP connect + upgrade + welcome.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// Each client's read buffer ([`FANOUT_READ_BUFFER`] unless changed).
    pub read_buffer: usize,
    /// The opening handshake's request, encoded once per run: the tool
    /// shares the cores with the server it measures, so its own cost per
    /// connection is kept low. One key for the run; the server only checks
    /// a key's form.
    request: Arc<str>,
    /// The `Sec-WebSocket-Accept` value the 101 must carry for that key.
    accept: Arc<str>,
}

impl Target {
    /// The same target, with `bytes` of read buffer per client.
    pub fn with_read_buffer(self, bytes: usize) -> Target {
        Target {
            read_buffer: bytes,
            ..self
        }
    }

    /// Parse `ws://host:port/path`; refuses anything but a loopback address.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| format!("{url}: no IPv4 address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{url}: the benchmark only targets loopback addresses"
            ));
        }
        let path = rest.find('/').map_or("/", |i| &rest[i..]);
        let host = rest.split('/').next().unwrap_or(rest);
        let key = generate_key();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        Ok(Target {
            addr,
            read_buffer: FANOUT_READ_BUFFER,
            request: request.into(),
            accept: derive_accept_key(key.as_bytes()).into(),
        })
    }
}

/// Client read buffer of the fan-out scenarios: several frames per read
/// at saturation.
pub const FANOUT_READ_BUFFER: usize = 8 * 1024;
/// Client read buffer of the idle scenario: a welcome frame fits. The tool
/// shares the cores with the server it measures, and at 19k connections
/// zero-filling bigger buffers was a third of its CPU time.
pub const IDLE_READ_BUFFER: usize = 1024;

fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(16 * 1024)
}

/// Source address for connection `i`.
pub fn source_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCE_ADDRS) as u8))
}

/// A connected client (its welcome has arrived).
pub struct Client {
    pub ws: Ws,
}

/// Connect (binding to the `i`-th source address), upgrade, and wait for
/// the `connected` welcome.
pub async fn connect(target: &Target, i: usize) -> Result<Client, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, connect_inner(target, i))
        .await
        .map_err(|_| "timed out waiting for connect/upgrade/welcome".to_string())?
}

async fn connect_inner(target: &Target, i: usize) -> Result<Client, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    bind_address_no_port(&sock);
    sock.bind(SocketAddr::new(source_addr(i), 0))
        .map_err(|e| format!("bind {}: {e}", source_addr(i)))?;
    let stream = sock
        .connect(target.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let mut ws = upgrade(target, stream).await?;
    loop {
        match ws.next().await {
            // The welcome, found without parsing the JSON.
            Some(Ok(Message::Text(t))) if t.contains("\"type\":\"connected\"") => {
                return Ok(Client { ws });
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("before welcome: {e}")),
            None => return Err("closed before welcome".into()),
        }
    }
}

/// The client side of the opening handshake (RFC 6455 §4.1), by hand:
/// send the prepared request, read the response head, check the 101 and
/// its accept key, and hand what followed the head (the welcome, usually)
/// to the WebSocket.
async fn upgrade(target: &Target, mut stream: TcpStream) -> Result<Ws, String> {
    stream
        .write_all(target.request.as_bytes())
        .await
        .map_err(|e| format!("upgrade request: {e}"))?;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    let end = loop {
        let got = stream
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("upgrade response: {e}"))?;
        if got == 0 {
            return Err("closed during the upgrade".into());
        }
        n += got;
        if let Some(i) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if n == buf.len() {
            return Err("upgrade response head too long".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or_default().to_string();
        return Err(format!("upgrade refused: {status}"));
    }
    if !head.contains(&*target.accept) {
        return Err("upgrade response without the expected Sec-WebSocket-Accept".into());
    }
    Ok(WebSocketStream::from_partially_read(
        stream,
        buf[end..n].to_vec(),
        Role::Client,
        Some(ws_config(target.read_buffer)),
    )
    .await)
}

/// Let `connect` pick the source port instead of `bind`. With port 0,
/// `bind` alone must find a port free for *every* destination, a search
/// that grows with the ports in use; deferred to `connect`, the kernel only
/// needs the 4-tuple to be unique, and the tool spends far less CPU per
/// connection (CPU the server shares on this machine). Best effort.
fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int that
    // lives across the call, with its size: what IP_BIND_ADDRESS_NO_PORT
    // expects. socket2 has no wrapper for this option.
    let _ = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Make dropping these clients reset their connections instead of closing
/// them: a closed connection leaves its port in TIME_WAIT for a minute,
/// and tens of thousands of those make the next run's connects slower
/// (back-to-back runs would not be comparable). Only for teardown after
/// the measurement.
pub fn reset_all<'a>(clients: impl Iterator<Item = &'a Client>) {
    for c in clients {
        let _ = c.ws.get_ref().set_zero_linger();
    }
}

/// The outcome of opening many connections.
pub struct Opened {
    /// Connected clients, in index order (failed ones left out).
    pub clients: Vec<(usize, Client)>,
    /// Failures: (index, error).
    pub errors: Vec<(usize, String)>,
    /// From the first connect to the last welcome.
    pub elapsed: Duration,
    /// Each successful connection's connect→welcome time.
    pub handshake_times: Vec<Duration>,
}

/// Open connections `indices` with at most `concurrency` in flight.
pub async fn open_many(
    target: &Target,
    indices: std::ops::Range<usize>,
    concurrency: usize,
) -> Opened {
    open_spread(std::slice::from_ref(target), indices, |_| 0, concurrency).await
}

/// Open connections `indices`, connection `i` to `targets[pick(i)]`, with
/// at most `concurrency` in flight (a cluster: several instances).
pub async fn open_spread(
    targets: &[Target],
    indices: std::ops::Range<usize>,
    pick: impl Fn(usize) -> usize,
    concurrency: usize,
) -> Opened {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in indices {
        let target = targets[pick(i) % targets.len()].clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore closed");
            let t = tokio::time::Instant::now();
            let r = connect(&target, i).await;
            let done = tokio::time::Instant::now();
            (i, r, done - t, done)
        });
    }
    let mut clients = Vec::new();
    let mut errors = Vec::new();
    let mut handshake_times = Vec::new();
    let mut last = start;
    while let Some(joined) = set.join_next().await {
        let (i, r, took, done) = match joined {
            Ok(x) => x,
            Err(e) => {
                errors.push((usize::MAX, format!("task: {e}")));
                continue;
            }
        };
        match r {
            Ok(c) => {
                clients.push((i, c));
                handshake_times.push(took);
                last = last.max(done);
            }
            Err(e) => errors.push((i, e)),
        }
    }
    clients.sort_by_key(|(i, _)| *i);
    Opened {
        clients,
        errors,
        elapsed: last - start,
        handshake_times,
    }
}

/// The most common error messages, with counts.
pub fn summarize_errors(errors: &[(usize, String)]) -> Vec<(String, usize)> {
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for (_, e) in errors {
        *counts.entry(e.as_str()).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.truncate(5);
    v
}

/// p-th percentile of durations, in milliseconds.
pub fn percentile_ms(times: &mut [Duration], p: f64) -> f64 {
    if times.is_empty() {
        return 0.0;
    }
    times.sort_unstable();
    let idx = ((p / 100.0) * (times.len() - 1) as f64).round() as usize;
    times[idx.min(times.len() - 1)].as_secs_f64() * 1e3
}
