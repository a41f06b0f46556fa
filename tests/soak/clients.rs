//! The soak's clients: subscribers that resume wherever they land, and
//! the two publishers (server API, WebSocket) that record what was
//! acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use crate::run::{API_KEY, Acked, CHANNEL, Live, Seen, pick};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16) -> Option<Ws> {
    let url = format!("ws://127.0.0.1:{port}/ws");
    match timeout(
        Duration::from_secs(2),
        tokio_tungstenite::connect_async(url),
    )
    .await
    {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

fn record(seen: &mut Seen, m: &Value) {
    let (Some(p), Some(n)) = (m["data"]["p"].as_u64(), m["data"]["n"].as_u64()) else {
        return;
    };
    let count = seen.received.entry((p, n)).or_default();
    *count += 1;
    if *count > 1 {
        // Counted as a duplicate; where it came from again, for SOAK_DEBUG.
        seen.events.push((
            Instant::now(),
            format!("({p}, {n}) again at {}:{}", m["epoch"], m["offset"]),
        ));
        return;
    }
    seen.arrivals.push((p, n));
    if let (Some(e), Some(o)) = (m["epoch"].as_str(), m["offset"].as_u64()) {
        seen.positions.insert((p, n), (e.to_string(), o));
    }
}

/// Follow [`CHANNEL`] until `stop`, moving to a random live instance
/// whenever the connection ends, resuming with `since`.
pub async fn subscriber(
    live: Live,
    ports: Arc<Vec<u16>>,
    stop: Arc<AtomicBool>,
    subscribed: Arc<AtomicU64>,
) -> Seen {
    let mut seen = Seen::default();
    let mut pos: Option<(String, u64)> = None;
    let mut last_rx = Instant::now();
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let Some(port) = pick(&live, &ports) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(mut ws) = connect(port).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        seen.events.push((
            Instant::now(),
            format!("connected to :{port}, since {pos:?}"),
        ));
        let lost_at = last_rx;
        let mut sub = json!({"type": "subscribe", "channel": CHANNEL, "id": 1});
        if let Some((epoch, offset)) = &pos {
            sub["since"] = json!({"epoch": epoch, "offset": offset});
        }
        if ws.send(Message::text(sub.to_string())).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let frame = match timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue, // look at `stop` again
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(c)))) => {
                    seen.events.push((Instant::now(), format!("closed {c:?}")));
                    continue;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(_) => break,
            };
            let Ok(v) = serde_json::from_str::<Value>(&frame) else {
                continue;
            };
            match v["type"].as_str() {
                Some("message") => {
                    record(&mut seen, &v);
                    if let (Some(e), Some(o)) = (v["epoch"].as_str(), v["offset"].as_u64()) {
                        pos = Some((e.to_string(), o));
                    }
                    last_rx = Instant::now();
                }
                Some("subscribed") => {
                    seen.events.push((
                        Instant::now(),
                        format!(
                            "subscribed recovered:{} at {}:{}",
                            v["recovered"], v["epoch"], v["offset"]
                        ),
                    ));
                    if v["recovered"] == false && pos.is_some() {
                        let from = lost_at
                            .checked_sub(Duration::from_secs(1))
                            .unwrap_or(lost_at);
                        seen.told.push((from, Instant::now()));
                    }
                    // A position taken from the answer counts as received
                    // now; `recovered:true` only confirms the last one
                    // received (a publication acked before it and missing
                    // after it is told by a later `recovered:false` from
                    // that position, so its window starts from there).
                    if v["recovered"] != true {
                        if let (Some(e), Some(o)) = (v["epoch"].as_str(), v["offset"].as_u64()) {
                            pos = Some((e.to_string(), o));
                        }
                        last_rx = Instant::now();
                    }
                    if first {
                        first = false;
                        subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // A refused subscribe (the bus is down): try elsewhere.
                Some("error") => {
                    seen.events.push((Instant::now(), format!("error {frame}")));
                    break;
                }
                _ => {}
            }
        }
        if stop.load(Ordering::Relaxed) {
            let _ = ws.close(None).await;
            break;
        }
        seen.reconnects += 1;
        seen.events
            .push((Instant::now(), "connection ended".into()));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..300))).await;
    }
    seen
}

/// Publish `{"p": p, "n": n}` for n = 1, 2, … through `/api/publish` of a
/// random live instance, every `period`, until `stop`.
pub async fn api_publisher(
    p: u64,
    period: Duration,
    live: Live,
    ports: Arc<Vec<u16>>,
    stop: Arc<AtomicBool>,
    acked: Acked,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if let Some(port) = pick(&live, &ports) {
            let sent = Instant::now();
            let r = http
                .post(format!("http://127.0.0.1:{port}/api/publish"))
                .bearer_auth(API_KEY)
                .json(&json!({"channel": CHANNEL, "data": {"p": p, "n": n}}))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                acked.lock().unwrap().push(((p, n), sent, Instant::now()));
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// The same over a WebSocket `publish`, reconnecting to a random live
/// instance when the connection is lost.
pub async fn ws_publisher(
    p: u64,
    period: Duration,
    live: Live,
    ports: Arc<Vec<u16>>,
    stop: Arc<AtomicBool>,
    acked: Acked,
) {
    let mut ws: Option<Ws> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        if ws.is_none() {
            if let Some(port) = pick(&live, &ports) {
                ws = connect(port).await;
            }
        }
        if let Some(conn) = ws.as_mut() {
            let frame = json!({"type": "publish", "channel": CHANNEL,
                "data": {"p": p, "n": n}, "id": n});
            let sent = Instant::now();
            let answer = async {
                conn.send(Message::text(frame.to_string())).await.ok()?;
                loop {
                    match conn.next().await? {
                        Ok(Message::Text(t)) => {
                            let v: Value = serde_json::from_str(&t).ok()?;
                            if v["ref"] == n {
                                return Some(v);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            };
            match timeout(Duration::from_secs(2), answer).await {
                Ok(Some(v)) if v["type"] == "ack" => {
                    acked.lock().unwrap().push(((p, n), sent, Instant::now()));
                }
                Ok(Some(_)) => {} // an error reply: not published
                _ => ws = None,   // lost or silent: reconnect
            }
        }
        tokio::time::sleep(period).await;
    }
}
