//! The fan-out run's result: the JSON written with `--json`, and the
//! human-readable summary.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Mode;

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

impl Latency {
    pub fn of(hist: &Histogram<u64>) -> Latency {
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
        Latency {
            count: hist.len(),
            p50_us: us(hist.value_at_quantile(0.50)),
            p90_us: us(hist.value_at_quantile(0.90)),
            p99_us: us(hist.value_at_quantile(0.99)),
            p999_us: us(hist.value_at_quantile(0.999)),
            max_us: us(hist.max()),
            mean_us: hist.mean() / 1e3,
            cdf,
        }
    }
}

/// One measured process's figures over the run.
#[derive(Serialize, Debug)]
pub struct ProcessFigures {
    pub pid: u32,
    /// CPU time (user + system) from the first send to the end of the
    /// drain; `None` if `/proc` could not be read.
    pub cpu_seconds: Option<f64>,
    /// VmRSS at the end of the drain.
    pub rss_bytes: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct FanoutResult {
    pub kind: &'static str,
    /// The server URLs joined with commas (one URL: that URL).
    pub url: String,
    /// Every server URL; subscribers and publishers are spread over them
    /// round-robin.
    pub urls: Vec<String>,
    /// Subscribers connected to each URL, in `urls` order.
    pub subscribers_per_url: Vec<usize>,
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
    /// Arrivals with a lower sequence number than the previous arrival
    /// from the same publisher, summed over receivers.
    pub out_of_order: u64,
    /// Arrivals repeating the previous sequence number of their publisher.
    pub duplicates: u64,
    /// Receivers that got fewer messages than were sent to them.
    pub receivers_with_loss: usize,
    /// The most messages one receiver missed.
    pub max_lost_by_one_receiver: u64,
    /// Receivers that saw at least one out-of-order arrival.
    pub receivers_with_reorder: usize,
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
    /// CPU of every server process (`--pid`), summed.
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU as a share of one core over the measured time.
    pub server_cpu_util: Option<f64>,
    /// VmRSS of every server process at the end, summed.
    pub server_rss_bytes: Option<u64>,
    /// Each server process (`--pid`, in order).
    pub server_processes: Vec<ProcessFigures>,
    /// The bus server (`--bus-pid`: Redis, NATS), apart from the servers.
    pub bus: Option<ProcessFigures>,
    pub bus_cpu_us_per_delivery: Option<f64>,
    /// Bus server CPU as a share of one core over the measured time.
    pub bus_cpu_util: Option<f64>,
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

pub fn count(items: impl Iterator<Item = String>) -> Vec<(String, usize)> {
    let mut m: std::collections::BTreeMap<String, usize> = Default::default();
    for i in items {
        *m.entry(i).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
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
    if r.urls.len() > 1 {
        println!(
            "  cluster          {} instances, subscribers per instance {:?}",
            r.urls.len(),
            r.subscribers_per_url
        );
    }
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
    if r.receivers_with_loss > 0 || r.receivers_with_reorder > 0 || r.duplicates > 0 {
        println!(
            "  per receiver     {} with loss (worst {} lost), {} with reorders, {} duplicates",
            r.receivers_with_loss,
            r.max_lost_by_one_receiver,
            r.receivers_with_reorder,
            r.duplicates
        );
    }
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
    if r.server_processes.len() > 1 {
        let each: Vec<String> = r
            .server_processes
            .iter()
            .map(|p| match p.cpu_seconds {
                Some(c) => format!("{}: {c:.2} s", p.pid),
                None => format!("{}: ?", p.pid),
            })
            .collect();
        println!("  per process      {}", each.join(", "));
    }
    if let (Some(b), Some(p), Some(u)) = (&r.bus, r.bus_cpu_us_per_delivery, r.bus_cpu_util) {
        println!(
            "  bus server CPU   {:.2} s = {:.3} µs per delivery ({:.0}% of a core; pid {})",
            b.cpu_seconds.unwrap_or(0.0),
            p,
            u * 100.0,
            b.pid
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
