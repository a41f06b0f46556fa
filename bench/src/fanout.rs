//! `fanout`: publishers send timestamped messages, subscribers receive
//! them; deliveries/s, loss, publish→deliver latency and CPU per delivery.
//!
//! Every message carries, inside its JSON `data`, the send time in
//! nanoseconds since an instant shared by every task of the tool (`bt`),
//! its sequence number (`bs`) and its publisher (`bp`). Receivers find
//! these by a substring scan instead of a full JSON parse, to keep the
//! tool's own CPU per delivery low: it shares the machine with the server.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::conn::{self, Target, Ws};
use crate::procfs;

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
    /// Server URL (loopback only), e.g. ws://127.0.0.1:9001/
    #[arg(long)]
    pub url: String,
    /// Server process id, for its CPU time.
    #[arg(long)]
    pub pid: Option<u32>,
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
    /// until they reach the designated receiver (subscriber 0).
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
    /// After the last send, how long to wait for outstanding deliveries (ms).
    #[arg(long, default_value_t = 3000)]
    pub drain_ms: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    /// (latency µs, cumulative fraction), for a CDF plot.
    pub cdf: Vec<(f64, f64)>,
}

#[derive(Serialize, Debug)]
pub struct FanoutResult {
    pub kind: &'static str,
    pub url: String,
    pub mode: Mode,
    pub subscribers: usize,
    pub publishers: usize,
    pub rate: Option<f64>,
    pub saturate: bool,
    pub window: u64,
    pub size: usize,
    pub duration: f64,
    pub connect_errors: Vec<(String, usize)>,
    pub sent: u64,
    /// Receivers each message should reach.
    pub receivers_per_message: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub out_of_order: u64,
    /// Non-benchmark frames seen (join, subscribed, …).
    pub other_frames: u64,
    /// From the first send to the last delivery.
    pub measured_seconds: f64,
    pub publish_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub latency: Latency,
    /// Open loop only: how late the tool sent, relative to the schedule.
    pub send_lag_p99_us: f64,
    /// Saturation only: publisher waits for the window longer than 1 s.
    pub stalls: u64,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU as a share of one core over the measured time.
    pub server_cpu_util: Option<f64>,
    pub tool_cpu_seconds: f64,
    pub tool_cpu_us_per_delivery: f64,
    /// Close frames the clients received (code and reason) with counts.
    pub closes: Vec<(String, usize)>,
    /// Connections that ended with an error or EOF during the run.
    pub disconnects: Vec<(String, usize)>,
    /// `error` frames the clients received, by code.
    pub error_frames: Vec<(String, usize)>,
    pub machine: serde_json::Value,
}

struct Shared {
    start: Instant,
    /// Per publisher: sequence number + 1 of the newest message the
    /// designated receiver got.
    acked: Vec<AtomicU64>,
    wake: Vec<Notify>,
    received: AtomicU64,
    other: AtomicU64,
    last_recv_ns: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

fn new_histogram() -> Histogram<u64> {
    // 0.5 µs resolution below 1 ms, 3 significant digits, up to 60 s.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds")
}

/// The number after `"key":` in `s`.
fn field(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    let digits = s[at..].bytes().take_while(|b| b.is_ascii_digit()).count();
    s[at..at + digits].parse().ok()
}

#[derive(Default)]
struct RecvStats {
    received: u64,
    out_of_order: u64,
    hist: Option<Histogram<u64>>,
    close: Option<String>,
    ended: Option<String>,
    /// Codes of `error` frames received.
    errors: Vec<String>,
}

async fn receive<S>(
    mut stream: S,
    shared: Arc<Shared>,
    designated: bool,
    publishers: usize,
    mut stop: watch::Receiver<bool>,
) -> RecvStats
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut st = RecvStats {
        hist: Some(new_histogram()),
        ..Default::default()
    };
    let hist = st.hist.as_mut().unwrap();
    let mut last_seq = vec![u64::MAX; publishers];
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                let now = shared.now_ns();
                let (Some(bt), Some(bs), Some(bp)) = (
                    field(&t, "\"bt\":"),
                    field(&t, "\"bs\":"),
                    field(&t, "\"bp\":"),
                ) else {
                    shared.other.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                hist.saturating_record(now.saturating_sub(bt));
                st.received += 1;
                shared.received.fetch_add(1, Ordering::Relaxed);
                shared.last_recv_ns.fetch_max(now, Ordering::Relaxed);
                let bp = bp as usize;
                if let Some(last) = last_seq.get_mut(bp) {
                    if *last != u64::MAX && bs <= *last {
                        st.out_of_order += 1;
                    }
                    *last = bs;
                }
                if designated && bp < shared.acked.len() {
                    shared.acked[bp].fetch_max(bs + 1, Ordering::Release);
                    shared.wake[bp].notify_one();
                }
            }
            Some(Ok(Message::Close(frame))) => {
                st.close = Some(match frame {
                    Some(f) => format!("{} {}", u16::from(f.code), f.reason),
                    None => "close without code".into(),
                });
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                st.ended = Some(format!("error: {e}"));
                break;
            }
            None => {
                st.ended = Some("EOF".into());
                break;
            }
        }
    }
    st
}

struct Frames {
    prefix: String,
    pad: String,
}

impl Frames {
    fn new(mode: Mode, channel: &str, size: usize) -> Frames {
        let prefix = match mode {
            Mode::Broadcast => r#"{"type":"broadcast","data":"#.to_string(),
            Mode::Channel => format!(r#"{{"type":"publish","channel":"{channel}","data":"#),
        };
        // `{"bt":…,"bs":…,"bp":…,"pad":""}` is about 45 bytes.
        Frames {
            prefix,
            pad: "x".repeat(size.saturating_sub(45)),
        }
    }

    fn frame(&self, bt: u64, bs: u64, bp: usize) -> Message {
        Message::text(format!(
            r#"{}{{"bt":{bt},"bs":{bs},"bp":{bp},"pad":"{}"}}}}"#,
            self.prefix, self.pad
        ))
    }
}

struct PubStats {
    sent: u64,
    lag: Histogram<u64>,
    stalls: u64,
    error: Option<String>,
}

async fn publish(
    mut sink: SplitSink<Ws, Message>,
    shared: Arc<Shared>,
    frames: Arc<Frames>,
    p: usize,
    args: Arc<FanoutArgs>,
    t0: u64,
) -> PubStats {
    let mut st = PubStats {
        sent: 0,
        lag: new_histogram(),
        stalls: 0,
        error: None,
    };
    let end = t0 + (args.duration * 1e9) as u64;
    let mut k: u64 = 0;
    if let Some(rate) = args.rate {
        let period = 1e9 * args.publishers as f64 / rate;
        let offset = period * p as f64 / args.publishers as f64;
        let due = move |k: u64| t0 + (offset + period * k as f64) as u64;
        // Paced by an OS thread: Tokio's timer wheel ticks once a
        // millisecond, so a `sleep` would make the tool itself up to a
        // millisecond late on every message, and since messages carry
        // their scheduled time that lateness would count as the server's
        // latency. `thread::sleep` wakes within tens of microseconds.
        // (Still open loop: a stalled tool or server shows as latency.)
        let (tick_tx, mut tick) = tokio::sync::mpsc::unbounded_channel::<()>();
        let clock = shared.clone();
        std::thread::spawn(move || {
            let mut k = 0;
            while due(k) < end {
                let now = clock.now_ns();
                if due(k) > now {
                    std::thread::sleep(Duration::from_nanos(due(k) - now));
                }
                if tick_tx.send(()).is_err() {
                    break;
                }
                k += 1;
            }
        });
        while tick.recv().await.is_some() {
            let now = shared.now_ns();
            let mut n = 0;
            while due(k) <= now && due(k) < end {
                let intended = due(k);
                st.lag.saturating_record(now - intended);
                if let Err(e) = sink.feed(frames.frame(intended, k, p)).await {
                    st.error = Some(e.to_string());
                    return st;
                }
                k += 1;
                n += 1;
            }
            if n > 0 {
                if let Err(e) = sink.flush().await {
                    st.error = Some(e.to_string());
                    return st;
                }
            }
        }
    } else {
        let window = args.window.max(1);
        'outer: while shared.now_ns() < end {
            // Fill the window, then flush once.
            let mut n = 0;
            while k < shared.acked[p].load(Ordering::Acquire) + window {
                let now = shared.now_ns();
                if now >= end {
                    break;
                }
                if let Err(e) = sink.feed(frames.frame(now, k, p)).await {
                    st.error = Some(e.to_string());
                    break 'outer;
                }
                k += 1;
                n += 1;
            }
            if n > 0 {
                if let Err(e) = sink.flush().await {
                    st.error = Some(e.to_string());
                    break;
                }
            }
            // Wait for the designated receiver to make room.
            while k >= shared.acked[p].load(Ordering::Acquire) + window {
                let now = shared.now_ns();
                if now >= end {
                    break 'outer;
                }
                let wait = Duration::from_nanos((end - now).min(1_000_000_000));
                if tokio::time::timeout(wait, shared.wake[p].notified())
                    .await
                    .is_err()
                    && wait >= Duration::from_secs(1)
                {
                    st.stalls += 1;
                }
            }
        }
    }
    st.sent = k;
    // Dropping the sink half does not close the connection: the receiver
    // half keeps it until the run ends.
    drop(sink);
    st
}

async fn subscribe(ws: &mut Ws, channel: &str) -> Result<(), String> {
    ws.send(Message::text(format!(
        r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#
    )))
    .await
    .map_err(|e| format!("subscribe: {e}"))?;
    loop {
        match tokio::time::timeout(conn::CONNECT_TIMEOUT, ws.next()).await {
            Err(_) => return Err("subscribe: no answer".into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains(r#""type":"subscribed""#) {
                    return Ok(());
                }
                if t.contains(r#""type":"error""#) {
                    return Err(format!("subscribe: {t}"));
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(format!("subscribe: {e}")),
            Ok(None) => return Err("subscribe: closed".into()),
        }
    }
}

fn count(items: impl Iterator<Item = String>) -> Vec<(String, usize)> {
    let mut m: std::collections::BTreeMap<String, usize> = Default::default();
    for i in items {
        *m.entry(i).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

pub async fn run(args: &FanoutArgs) -> Result<FanoutResult, String> {
    let args = Arc::new(args.clone());
    let target = Target::parse(&args.url)?;
    if args.subscribers == 0 || args.publishers == 0 {
        return Err("need at least one subscriber and one publisher".into());
    }
    let (s, p) = (args.subscribers, args.publishers);
    let shared = Arc::new(Shared {
        start: Instant::now(),
        acked: (0..p).map(|_| AtomicU64::new(0)).collect(),
        wake: (0..p).map(|_| Notify::new()).collect(),
        received: AtomicU64::new(0),
        other: AtomicU64::new(0),
        last_recv_ns: AtomicU64::new(0),
    });
    let opened = conn::open_many(&target, 0..s + p, args.concurrency).await;
    let connect_errors = conn::summarize_errors(&opened.errors);
    if opened.clients.is_empty() {
        return Err(format!(
            "could not connect to {}: {connect_errors:?}",
            args.url
        ));
    }
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
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            ready
                .spawn(async move { ready_rx.await.unwrap_or(Err("subscriber task died".into())) });
            let mode = args.mode;
            let channel = args.channel.clone();
            receivers.spawn(async move {
                let mut ws = client.ws;
                if mode == Mode::Channel {
                    if let Err(e) = subscribe(&mut ws, &channel).await {
                        let _ = ready_tx.send(Err(e.clone()));
                        return RecvStats {
                            ended: Some(e),
                            ..Default::default()
                        };
                    }
                }
                let _ = ready_tx.send(Ok(()));
                receive(ws, shared, i == 0, p, stop).await
            });
        } else {
            let (sink, stream): (SplitSink<Ws, Message>, SplitStream<Ws>) = client.ws.split();
            pub_sinks.push((i - s, sink));
            receivers.spawn(receive(stream, shared, false, p, stop));
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
    let server_cpu0 = args.pid.and_then(|pid| procfs::cpu_seconds(Some(pid)).ok());
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
    let mut lag = new_histogram();
    let mut stalls = 0;
    let mut pub_errors = Vec::new();
    while let Some(r) = pubs.join_next().await {
        let st = r.map_err(|e| format!("publisher task: {e}"))?;
        sent += st.sent;
        lag.add(&st.lag).ok();
        stalls += st.stalls;
        if let Some(e) = st.error {
            pub_errors.push(format!("publisher: {e}"));
        }
    }
    let expected = sent * receivers_per_message;
    let drain_end = Instant::now() + Duration::from_millis(args.drain_ms);
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let server_cpu1 = args.pid.and_then(|pid| procfs::cpu_seconds(Some(pid)).ok());
    let tool_cpu1 = procfs::cpu_seconds(None).unwrap_or(0.0);
    let _ = stop_tx.send(true);
    let mut hist = new_histogram();
    let mut received = 0;
    let mut out_of_order = 0;
    let mut closes = Vec::new();
    let mut ended = pub_errors;
    let mut errors = Vec::new();
    while let Some(r) = receivers.join_next().await {
        let st = r.map_err(|e| format!("receiver task: {e}"))?;
        received += st.received;
        out_of_order += st.out_of_order;
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
    let server_cpu = match (server_cpu0, server_cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let tool_cpu = tool_cpu1 - tool_cpu0;
    let per = |cpu: f64| {
        if received > 0 {
            cpu * 1e6 / received as f64
        } else {
            0.0
        }
    };
    let us = |ns: u64| ns as f64 / 1e3;
    let mut cdf = Vec::new();
    if !hist.is_empty() {
        let total = hist.len() as f64;
        let mut cum = 0u64;
        for v in hist.iter_recorded() {
            cum += v.count_at_value();
            cdf.push((
                us(hist.highest_equivalent(v.value_iterated_to())),
                cum as f64 / total,
            ));
        }
    }
    let latency = Latency {
        count: hist.len(),
        p50_us: us(hist.value_at_quantile(0.50)),
        p90_us: us(hist.value_at_quantile(0.90)),
        p99_us: us(hist.value_at_quantile(0.99)),
        p999_us: us(hist.value_at_quantile(0.999)),
        max_us: us(hist.max()),
        mean_us: hist.mean() / 1e3,
        cdf,
    };
    let result = FanoutResult {
        kind: "fanout",
        url: args.url.clone(),
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
        other_frames: shared.other.load(Ordering::Relaxed) - other_before,
        measured_seconds: measured,
        publish_per_sec: sent as f64 / args.duration,
        deliveries_per_sec: if measured > 0.0 {
            received as f64 / measured
        } else {
            0.0
        },
        latency,
        send_lag_p99_us: if args.rate.is_some() {
            us(lag.value_at_quantile(0.99))
        } else {
            0.0
        },
        stalls,
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_delivery: server_cpu.map(per),
        server_cpu_util: server_cpu.map(|c| if measured > 0.0 { c / measured } else { 0.0 }),
        tool_cpu_seconds: tool_cpu,
        tool_cpu_us_per_delivery: per(tool_cpu),
        closes: count(closes.into_iter()),
        disconnects: count(ended.into_iter().filter(|e| !e.is_empty())),
        error_frames: count(errors.into_iter()),
        machine: procfs::machine(),
    };
    Ok(result)
}

pub fn print(r: &FanoutResult) {
    let load = match r.rate {
        Some(rate) => format!("{rate} msg/s"),
        None => format!("saturation, window {}", r.window),
    };
    println!(
        "fanout {}  mode {:?}, {} subscribers, {} publishers, {load}, {} B data, {} s",
        r.url, r.mode, r.subscribers, r.publishers, r.size, r.duration
    );
    if !r.connect_errors.is_empty() {
        println!("  connect errors   {:?}", r.connect_errors);
    }
    println!(
        "  messages         {} sent ({:.0}/s), {} receivers each",
        r.sent, r.publish_per_sec, r.receivers_per_message
    );
    println!(
        "  deliveries       {} of {} ({} lost, {:.4}%), {} out of order, {:.0}/s over {:.2} s",
        r.received,
        r.expected,
        r.lost,
        r.loss_ratio * 100.0,
        r.out_of_order,
        r.deliveries_per_sec,
        r.measured_seconds
    );
    let l = &r.latency;
    println!(
        "  latency          p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
    );
    if r.rate.is_some() {
        println!(
            "  send lag p99     {:.0} µs (tool's own lateness against the schedule)",
            r.send_lag_p99_us
        );
    }
    if r.stalls > 0 {
        println!(
            "  stalls           {} publisher waits over 1 s for the window",
            r.stalls
        );
    }
    if let (Some(c), Some(p), Some(u)) = (
        r.server_cpu_seconds,
        r.server_cpu_us_per_delivery,
        r.server_cpu_util,
    ) {
        println!(
            "  server CPU       {:.2} s = {:.3} µs per delivery ({:.0}% of a core)",
            c,
            p,
            u * 100.0
        );
    }
    println!(
        "  tool CPU         {:.2} s = {:.3} µs per delivery",
        r.tool_cpu_seconds, r.tool_cpu_us_per_delivery
    );
    if !r.closes.is_empty() {
        println!("  close frames     {:?}", r.closes);
    }
    if !r.disconnects.is_empty() {
        println!("  disconnects      {:?}", r.disconnects);
    }
    if !r.error_frames.is_empty() {
        println!("  error frames     {:?}", r.error_frames);
    }
    if r.other_frames > 0 {
        println!("  other frames     {} during the run", r.other_frames);
    }
}
