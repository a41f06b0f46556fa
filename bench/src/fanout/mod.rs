//! `fanout`: publishers send timestamped, sequenced messages, subscribers
//! receive them; deliveries/s, loss and reorders (per receiver),
//! publish→deliver latency and CPU per delivery, of one server or of a
//! cluster (several `--url`, several `--pid`, and the bus server's
//! `--bus-pid` reported apart).

mod report;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::{SplitSink, SplitStream};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Target, Ws};
use crate::procfs;
pub use report::{FanoutResult, print};
use report::{Latency, ProcessFigures, count};
use wire::{Frames, RecvStats, Role, Shared, new_histogram, publish, receive, subscribe};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The tutorial's `{"type":"broadcast","data":…}`: every other
    /// connected client receives it (works against both servers).
    Broadcast,
    /// Switchboard channels: subscribers `subscribe`, publishers `publish`.
    Channel,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Server URL (loopback only), e.g. ws://127.0.0.1:9001/. For a
    /// cluster, repeat it (or give a comma-separated list): subscriber i
    /// connects to URL i mod n, and so does publisher j (publisher 0 on the
    /// first URL).
    #[arg(long = "url", required = true, value_delimiter = ',')]
    pub urls: Vec<String>,
    /// Server process id, for its CPU time and memory. Repeat it for every
    /// instance of a cluster: figures are summed (and kept per process in
    /// the JSON).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// The bus server's process id (Redis, NATS): its CPU is reported
    /// apart from the servers', also per delivery.
    #[arg(long)]
    pub bus_pid: Option<u32>,
    /// Receiving clients.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Sending clients.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages per second, all publishers together (open loop: each
    /// message is stamped with its scheduled send time, so a stalled
    /// sender or server shows up as latency).
    #[arg(
        long,
        conflicts_with = "saturate",
        required_unless_present = "saturate"
    )]
    pub rate: Option<f64>,
    /// Send as fast as the window allows instead of at a rate.
    #[arg(long)]
    pub saturate: bool,
    /// At saturation: messages each publisher may have in flight, counted
    /// until they reach the designated receivers (subscribers 0 … n−1, one
    /// on each URL).
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Approximate size in bytes of each message's `data` JSON value.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, value_enum, default_value_t = Mode::Broadcast)]
    pub mode: Mode,
    /// Channel used in channel mode.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// After the last send, how long to wait for outstanding deliveries
    /// once none arrives any more (ms); at most 60 s of draining in all.
    #[arg(long, default_value_t = 3000)]
    pub drain_ms: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The longest drain after the last send, however late deliveries keep
/// arriving: the run stays bounded in time.
const DRAIN_CAP: Duration = Duration::from_secs(60);

/// CPU seconds of each process, `None` where `/proc` could not be read.
fn cpu_of(pids: &[u32]) -> Vec<Option<f64>> {
    pids.iter()
        .map(|&p| procfs::cpu_seconds(Some(p)).ok())
        .collect()
}

/// `b − a` per process.
fn cpu_delta(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<Option<f64>> {
    a.iter().zip(b).map(|(a, b)| Some((*b)? - (*a)?)).collect()
}

pub async fn run(args: &FanoutArgs) -> Result<FanoutResult, String> {
    let args = Arc::new(args.clone());
    let targets = args
        .urls
        .iter()
        .map(|u| Target::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err("need at least one --url".into());
    }
    if args.subscribers == 0 || args.publishers == 0 {
        return Err("need at least one subscriber and one publisher".into());
    }
    let (s, p, n_urls) = (args.subscribers, args.publishers, targets.len());
    // Connection i < s is subscriber i; connection s + j is publisher j.
    let url_of = move |i: usize| if i < s { i % n_urls } else { (i - s) % n_urls };
    let designated = s.min(n_urls);
    let shared = Arc::new(Shared::new(designated, p));
    let opened = conn::open_spread(&targets, 0..s + p, url_of, args.concurrency).await;
    let connect_errors = conn::summarize_errors(&opened.errors);
    if opened.clients.is_empty() {
        return Err(format!(
            "could not connect to {}: {connect_errors:?}",
            args.urls.join(",")
        ));
    }
    let mut subscribers_per_url = vec![0; n_urls];
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = tokio::task::JoinSet::new();
    let mut ready = tokio::task::JoinSet::new();
    let mut pub_sinks = Vec::new();
    let mut n_subs = 0u64;
    for (i, client) in opened.clients {
        let shared = shared.clone();
        let stop = stop_rx.clone();
        if i < s {
            n_subs += 1;
            subscribers_per_url[url_of(i)] += 1;
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            ready
                .spawn(async move { ready_rx.await.unwrap_or(Err("subscriber task died".into())) });
            let mode = args.mode;
            let channel = args.channel.clone();
            let designated = (i < designated).then_some(i);
            receivers.spawn(async move {
                let mut ws = client.ws;
                if mode == Mode::Channel {
                    if let Err(e) = subscribe(&mut ws, &channel).await {
                        let _ = ready_tx.send(Err(e.clone()));
                        return RecvStats {
                            role: Role::Unsubscribed,
                            ended: Some(e),
                            ..Default::default()
                        };
                    }
                }
                let _ = ready_tx.send(Ok(()));
                receive(ws, shared, Role::Subscriber, designated, p, stop).await
            });
        } else {
            let (sink, stream): (SplitSink<Ws, Message>, SplitStream<Ws>) = client.ws.split();
            pub_sinks.push((i - s, sink));
            receivers.spawn(receive(
                stream,
                shared,
                Role::Publisher(i - s),
                None,
                p,
                stop,
            ));
        }
    }
    let mut setup_errors = Vec::new();
    while let Some(r) = ready.join_next().await {
        if let Ok(Err(e)) = r {
            setup_errors.push(e);
        }
    }
    if !setup_errors.is_empty() {
        eprintln!(
            "fanout: {} subscriber(s) failed to subscribe: {:?}",
            setup_errors.len(),
            &setup_errors[..1]
        );
    }
    // Let the setup traffic (join events, welcomes) die down.
    let quiet_deadline = Instant::now() + Duration::from_secs(20);
    let mut last = u64::MAX;
    while Instant::now() < quiet_deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = shared.other.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let other_before = shared.other.load(Ordering::Relaxed);
    let receivers_per_message = match args.mode {
        Mode::Broadcast => n_subs + pub_sinks.len() as u64 - 1,
        Mode::Channel => n_subs - setup_errors.len() as u64,
    };
    let frames = Arc::new(Frames::new(args.mode, &args.channel, args.size));
    let bus_pids: Vec<u32> = args.bus_pid.into_iter().collect();
    let server_cpu0 = cpu_of(&args.pids);
    let bus_cpu0 = cpu_of(&bus_pids);
    let tool_cpu0 = procfs::cpu_seconds(None).unwrap_or(0.0);
    let t0 = shared.now_ns() + 5_000_000;
    let mut pubs = tokio::task::JoinSet::new();
    let n_pubs = pub_sinks.len();
    for (pi, sink) in pub_sinks {
        pubs.spawn(publish(
            sink,
            shared.clone(),
            frames.clone(),
            pi,
            args.clone(),
            t0,
        ));
    }
    let mut sent = 0;
    let mut sent_by = vec![0u64; p];
    let mut lag = new_histogram();
    let mut stalls = 0;
    let mut pub_errors = Vec::new();
    while let Some(r) = pubs.join_next().await {
        let st = r.map_err(|e| format!("publisher task: {e}"))?;
        sent += st.sent;
        sent_by[st.publisher] = st.sent;
        lag.add(&st.lag).ok();
        stalls += st.stalls;
        if let Some(e) = st.error {
            pub_errors.push(format!("publisher: {e}"));
        }
    }
    let expected = sent * receivers_per_message;
    // Drain: wait while deliveries still arrive (an overloaded server or
    // bus is late, not lossy), until `drain_ms` pass without one, or
    // DRAIN_CAP in all.
    let drain_cap = Instant::now() + DRAIN_CAP;
    let mut idle_since = Instant::now();
    let mut seen = shared.received.load(Ordering::Relaxed);
    while seen < expected
        && idle_since.elapsed() < Duration::from_millis(args.drain_ms)
        && Instant::now() < drain_cap
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = shared.received.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            idle_since = Instant::now();
        }
    }
    let server_cpu1 = cpu_of(&args.pids);
    let bus_cpu1 = cpu_of(&bus_pids);
    let tool_cpu1 = procfs::cpu_seconds(None).unwrap_or(0.0);
    let rss = |pid: u32| procfs::rss_bytes(Some(pid)).ok();
    let server_processes: Vec<ProcessFigures> = args
        .pids
        .iter()
        .zip(cpu_delta(&server_cpu0, &server_cpu1))
        .map(|(&pid, cpu_seconds)| ProcessFigures {
            pid,
            cpu_seconds,
            rss_bytes: rss(pid),
        })
        .collect();
    let bus = args.bus_pid.map(|pid| ProcessFigures {
        pid,
        cpu_seconds: cpu_delta(&bus_cpu0, &bus_cpu1)[0],
        rss_bytes: rss(pid),
    });
    let _ = stop_tx.send(true);
    let mut hist = new_histogram();
    let mut received = 0;
    let mut out_of_order = 0;
    let mut duplicates = 0;
    let mut receivers_with_loss = 0;
    let mut max_lost_by_one_receiver = 0;
    let mut receivers_with_reorder = 0;
    let mut closes = Vec::new();
    let mut ended = pub_errors;
    let mut errors = Vec::new();
    while let Some(r) = receivers.join_next().await {
        let st = r.map_err(|e| format!("receiver task: {e}"))?;
        // What this receiver should have got.
        let due = match (args.mode, st.role) {
            (_, Role::Unsubscribed) => 0,
            (_, Role::Subscriber) => sent,
            (Mode::Broadcast, Role::Publisher(j)) => sent - sent_by[j],
            (Mode::Channel, Role::Publisher(_)) => 0,
        };
        let lost = due.saturating_sub(st.received);
        if lost > 0 {
            receivers_with_loss += 1;
            max_lost_by_one_receiver = max_lost_by_one_receiver.max(lost);
        }
        if st.out_of_order > 0 {
            receivers_with_reorder += 1;
        }
        received += st.received;
        out_of_order += st.out_of_order;
        duplicates += st.duplicates;
        if let Some(h) = &st.hist {
            hist.add(h).ok();
        }
        closes.extend(st.close);
        ended.extend(st.ended);
        errors.extend(st.errors);
    }
    let measured_ns = shared
        .last_recv_ns
        .load(Ordering::Relaxed)
        .saturating_sub(t0);
    let measured = measured_ns as f64 / 1e9;
    let sum = |v: &[ProcessFigures]| -> Option<f64> {
        (!v.is_empty())
            .then(|| v.iter().map(|p| p.cpu_seconds).sum::<Option<f64>>())
            .flatten()
    };
    let server_cpu = sum(&server_processes);
    let server_rss = (!server_processes.is_empty())
        .then(|| {
            server_processes
                .iter()
                .map(|p| p.rss_bytes)
                .sum::<Option<u64>>()
        })
        .flatten();
    let bus_cpu = bus.as_ref().and_then(|b| b.cpu_seconds);
    let tool_cpu = tool_cpu1 - tool_cpu0;
    let per = |cpu: f64| {
        if received > 0 {
            cpu * 1e6 / received as f64
        } else {
            0.0
        }
    };
    let util = |c: f64| if measured > 0.0 { c / measured } else { 0.0 };
    let result = FanoutResult {
        kind: "fanout",
        url: args.urls.join(","),
        urls: args.urls.clone(),
        subscribers_per_url,
        mode: args.mode,
        subscribers: s,
        publishers: n_pubs,
        rate: args.rate,
        saturate: args.saturate,
        window: args.window,
        size: args.size,
        duration: args.duration,
        connect_errors,
        sent,
        receivers_per_message,
        expected,
        received,
        lost: expected.saturating_sub(received),
        loss_ratio: if expected > 0 {
            expected.saturating_sub(received) as f64 / expected as f64
        } else {
            0.0
        },
        out_of_order,
        duplicates,
        receivers_with_loss,
        max_lost_by_one_receiver,
        receivers_with_reorder,
        other_frames: shared.other.load(Ordering::Relaxed) - other_before,
        measured_seconds: measured,
        publish_per_sec: sent as f64 / args.duration,
        deliveries_per_sec: if measured > 0.0 {
            received as f64 / measured
        } else {
            0.0
        },
        latency: Latency::of(&hist),
        send_lag_p99_us: if args.rate.is_some() {
            lag.value_at_quantile(0.99) as f64 / 1e3
        } else {
            0.0
        },
        stalls,
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_delivery: server_cpu.map(per),
        server_cpu_util: server_cpu.map(util),
        server_rss_bytes: server_rss,
        server_processes,
        bus,
        bus_cpu_us_per_delivery: bus_cpu.map(per),
        bus_cpu_util: bus_cpu.map(util),
        tool_cpu_seconds: tool_cpu,
        tool_cpu_us_per_delivery: per(tool_cpu),
        closes: count(closes.into_iter()),
        disconnects: count(ended.into_iter().filter(|e| !e.is_empty())),
        error_frames: count(errors.into_iter()),
        machine: procfs::machine(),
    };
    Ok(result)
}
