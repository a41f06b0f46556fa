//! `idle`: the server's resident memory per idle connection, and the
//! handshake rate.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::conn::{self, Target};
use crate::procfs;

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Server URL (loopback only), e.g. ws://127.0.0.1:9001/
    #[arg(long)]
    pub url: String,
    /// Server process id, for its VmRSS.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Connections to open (the tool and the server are limited to 20,000
    /// open files each: keep N at or below about 19,000).
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub n: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Connections opened and closed before the baseline is read, so that
    /// lazily initialised server state is not counted per connection.
    #[arg(long, default_value_t = 32)]
    pub warmup: usize,
    /// Pause after the last welcome before VmRSS is read again (ms).
    #[arg(long, default_value_t = 2000)]
    pub settle_ms: u64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
pub struct IdleResult {
    pub kind: &'static str,
    pub url: String,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub errors: Vec<(String, usize)>,
    pub server_rss_before: Option<u64>,
    pub server_rss_after: Option<u64>,
    /// (after − before) / connected.
    pub server_bytes_per_conn: Option<f64>,
    pub tool_bytes_per_conn: f64,
    /// From the first connect to the last welcome.
    pub handshake_seconds: f64,
    pub handshakes_per_sec: f64,
    pub handshake_p50_ms: f64,
    pub handshake_p99_ms: f64,
    /// Server CPU time spent from the first connect to the last welcome,
    /// per successful handshake.
    pub server_cpu_us_per_handshake: Option<f64>,
    pub tool_cpu_us_per_handshake: f64,
    pub concurrency: usize,
    pub machine: serde_json::Value,
}

pub async fn run(args: &IdleArgs) -> Result<IdleResult, String> {
    let target = Target::parse(&args.url)?.with_read_buffer(conn::IDLE_READ_BUFFER);
    if args.warmup > 0 {
        let w = conn::open_many(&target, 0..args.warmup, args.concurrency).await;
        if w.clients.is_empty() {
            return Err(format!(
                "could not connect to {}: {:?}",
                args.url,
                conn::summarize_errors(&w.errors)
            ));
        }
        conn::reset_all(w.clients.iter().map(|(_, c)| c));
        drop(w);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rss = |pid: Option<u32>| pid.and_then(|p| procfs::rss_bytes(Some(p)).ok());
    let before = rss(args.pid);
    let tool_before = procfs::rss_bytes(None).unwrap_or(0);
    let cpu = |pid: Option<u32>| pid.and_then(|p| procfs::cpu_seconds(Some(p)).ok());
    let server_cpu0 = cpu(args.pid);
    let tool_cpu0 = procfs::cpu_seconds(None).unwrap_or(0.0);
    let mut opened = conn::open_many(&target, 0..args.n, args.concurrency).await;
    let server_cpu1 = cpu(args.pid);
    let tool_cpu1 = procfs::cpu_seconds(None).unwrap_or(0.0);
    let ok = opened.clients.len();
    let per_handshake = |c: f64| if ok > 0 { c * 1e6 / ok as f64 } else { 0.0 };
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let after = rss(args.pid);
    let tool_after = procfs::rss_bytes(None).unwrap_or(0);
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if ok > 0 => Some((a as f64 - b as f64) / ok as f64),
        _ => None,
    };
    let secs = opened.elapsed.as_secs_f64();
    let result = IdleResult {
        kind: "idle",
        url: args.url.clone(),
        requested: args.n,
        connected: ok,
        failed: opened.errors.len(),
        errors: conn::summarize_errors(&opened.errors),
        server_rss_before: before,
        server_rss_after: after,
        server_bytes_per_conn: per_conn,
        tool_bytes_per_conn: if ok > 0 {
            (tool_after as f64 - tool_before as f64) / ok as f64
        } else {
            0.0
        },
        handshake_seconds: secs,
        handshakes_per_sec: if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        handshake_p50_ms: conn::percentile_ms(&mut opened.handshake_times, 50.0),
        handshake_p99_ms: conn::percentile_ms(&mut opened.handshake_times, 99.0),
        server_cpu_us_per_handshake: match (server_cpu0, server_cpu1) {
            (Some(a), Some(b)) => Some(per_handshake(b - a)),
            _ => None,
        },
        tool_cpu_us_per_handshake: per_handshake(tool_cpu1 - tool_cpu0),
        concurrency: args.concurrency,
        machine: procfs::machine(),
    };
    conn::reset_all(opened.clients.iter().map(|(_, c)| c));
    drop(opened);
    Ok(result)
}

pub fn print(r: &IdleResult) {
    println!("idle  {}", r.url);
    println!(
        "  connections      {} of {} ({} failed){}",
        r.connected,
        r.requested,
        r.failed,
        if r.errors.is_empty() {
            String::new()
        } else {
            format!("  errors: {:?}", r.errors)
        }
    );
    if let (Some(b), Some(a), Some(p)) = (
        r.server_rss_before,
        r.server_rss_after,
        r.server_bytes_per_conn,
    ) {
        println!(
            "  server VmRSS     {:.1} MiB -> {:.1} MiB = {:.2} KiB per connection",
            b as f64 / 1048576.0,
            a as f64 / 1048576.0,
            p / 1024.0
        );
    }
    println!(
        "  tool VmRSS       {:.2} KiB per connection",
        r.tool_bytes_per_conn / 1024.0
    );
    println!(
        "  handshakes       {:.0}/s ({} in {:.2} s, {} in flight; connect->welcome p50 {:.2} ms, p99 {:.2} ms)",
        r.handshakes_per_sec,
        r.connected,
        r.handshake_seconds,
        r.concurrency,
        r.handshake_p50_ms,
        r.handshake_p99_ms
    );
}
