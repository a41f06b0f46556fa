//! The fan-out run's clients: what publishers send (timestamped,
//! sequenced frames), how they pace themselves, and what receivers count
//! (deliveries, latency, loss and reorders per receiver).
//!
//! Every message carries, inside its JSON `data`, the send time in
//! nanoseconds since an instant shared by every task of the tool (`bt`),
//! its sequence number (`bs`) and its publisher (`bp`). Receivers find
//! these by a substring scan instead of a full JSON parse, to keep the
//! tool's own CPU per delivery low: it shares the machine with the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, Stream, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{FanoutArgs, Mode};
use crate::conn::{self, Ws};

/// State shared by every client task of one run.
pub struct Shared {
    /// The clock every `bt` is measured on.
    pub start: Instant,
    /// `acked[d][p]`: sequence number + 1 of publisher `p`'s newest message
    /// that designated receiver `d` got. There is one designated receiver
    /// per server URL, so that at saturation the window covers delivery
    /// through the bus to every instance, not only the publisher's own.
    pub acked: Vec<Vec<AtomicU64>>,
    /// Per publisher: woken when a designated receiver advances.
    pub wake: Vec<Notify>,
    /// Deliveries so far, all receivers (the drain waits on it).
    pub received: AtomicU64,
    /// Frames that were not benchmark messages (join, subscribed, …).
    pub other: AtomicU64,
    /// Time of the newest delivery, for the measured interval.
    pub last_recv_ns: AtomicU64,
}

impl Shared {
    pub fn new(designated: usize, publishers: usize) -> Shared {
        Shared {
            start: Instant::now(),
            acked: (0..designated.max(1))
                .map(|_| (0..publishers).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            wake: (0..publishers).map(|_| Notify::new()).collect(),
            received: AtomicU64::new(0),
            other: AtomicU64::new(0),
            last_recv_ns: AtomicU64::new(0),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Publisher `p`'s messages every designated receiver has got.
    fn acked_by_all(&self, p: usize) -> u64 {
        self.acked
            .iter()
            .map(|d| d[p].load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 0.5 µs resolution below 1 ms, 3 significant digits, up to 60 s.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds")
}

/// The number after `"key":` in `s`.
fn field(s: &str, key: &str) -> Option<u64> {
    let at = s.find(key)? + key.len();
    let digits = s[at..].bytes().take_while(|b| b.is_ascii_digit()).count();
    s[at..at + digits].parse().ok()
}

/// The `code` of an `error` frame (without parsing the JSON).
fn error_code(frame: &str) -> String {
    let key = r#""code":""#;
    match frame.find(key) {
        Some(at) => frame[at + key.len()..]
            .split('"')
            .next()
            .unwrap_or_default()
            .to_string(),
        None => "error without code".into(),
    }
}

/// What a receiving connection is, to know what it should have received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// A subscriber (in channel mode: one whose `subscribe` succeeded).
    #[default]
    Subscriber,
    /// A subscriber whose `subscribe` failed: it expects nothing.
    Unsubscribed,
    /// Publisher `p`'s own connection (in broadcast mode it receives the
    /// other publishers' messages).
    Publisher(usize),
}

#[derive(Default)]
pub struct RecvStats {
    pub role: Role,
    pub received: u64,
    /// Arrivals with a lower sequence number than the previous arrival
    /// from the same publisher.
    pub out_of_order: u64,
    /// Arrivals with the same sequence number as the previous arrival from
    /// the same publisher.
    pub duplicates: u64,
    pub hist: Option<Histogram<u64>>,
    pub close: Option<String>,
    pub ended: Option<String>,
    /// Codes of `error` frames received.
    pub errors: Vec<String>,
}

pub async fn receive<S>(
    mut stream: S,
    shared: Arc<Shared>,
    role: Role,
    designated: Option<usize>,
    publishers: usize,
    mut stop: watch::Receiver<bool>,
) -> RecvStats
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut st = RecvStats {
        role,
        hist: Some(new_histogram()),
        ..Default::default()
    };
    let hist = st.hist.as_mut().unwrap();
    let mut last_seq: Vec<Option<u64>> = vec![None; publishers];
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
                    // An `error` frame (e.g. `recipient_busy`: a broadcast
                    // was dropped for a recipient that is behind) explains
                    // a loss: keep its code.
                    if t.contains(r#""type":"error""#) {
                        st.errors.push(error_code(&t));
                    }
                    continue;
                };
                hist.saturating_record(now.saturating_sub(bt));
                st.received += 1;
                shared.received.fetch_add(1, Ordering::Relaxed);
                shared.last_recv_ns.fetch_max(now, Ordering::Relaxed);
                let bp = bp as usize;
                if let Some(last) = last_seq.get_mut(bp) {
                    match *last {
                        Some(l) if bs == l => st.duplicates += 1,
                        Some(l) if bs < l => st.out_of_order += 1,
                        _ => {}
                    }
                    *last = Some(bs);
                }
                if let Some(d) = designated {
                    if bp < publishers {
                        shared.acked[d][bp].fetch_max(bs + 1, Ordering::Release);
                        shared.wake[bp].notify_one();
                    }
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

pub struct Frames {
    prefix: String,
    pad: String,
}

impl Frames {
    pub fn new(mode: Mode, channel: &str, size: usize) -> Frames {
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

pub struct PubStats {
    pub publisher: usize,
    pub sent: u64,
    pub lag: Histogram<u64>,
    pub stalls: u64,
    pub error: Option<String>,
}

pub async fn publish(
    mut sink: SplitSink<Ws, Message>,
    shared: Arc<Shared>,
    frames: Arc<Frames>,
    p: usize,
    args: Arc<FanoutArgs>,
    t0: u64,
) -> PubStats {
    let mut st = PubStats {
        publisher: p,
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
                    st.sent = k;
                    return st;
                }
                k += 1;
                n += 1;
            }
            if n > 0 {
                if let Err(e) = sink.flush().await {
                    st.error = Some(e.to_string());
                    st.sent = k;
                    return st;
                }
            }
        }
    } else {
        let window = args.window.max(1);
        'outer: while shared.now_ns() < end {
            // Fill the window, then flush once.
            let mut n = 0;
            while k < shared.acked_by_all(p) + window {
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
            // Wait for the designated receivers to make room.
            while k >= shared.acked_by_all(p) + window {
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

pub async fn subscribe(ws: &mut Ws, channel: &str) -> Result<(), String> {
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
