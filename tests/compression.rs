//! permessage-deflate (RFC 7692), black-box, over real TCP sockets.
//!
//! [`RawClient`] (`tests/support/raw_ws.rs`) does the opening handshake by
//! hand (with or without a `Sec-WebSocket-Extensions` offer), writes masked
//! client frames (RSV1 and DEFLATE data built with flate2) and parses the
//! server's frames itself; with deflate agreed it keeps the RSV1 bit and the
//! exact wire bytes, and inflates compressed server messages as RFC 7692
//! §7.2.2 says with a window of the agreed size, by a fresh inflater per
//! message or, when the server kept its context, by ONE inflater for the
//! whole connection.
//!
//! Close outcomes are compared as short strings from
//! [`RawClient::close_summary`] (`"close 1009"`), so a failure says what the
//! server did instead.

mod support;

use flate2::{Compress, Compression};
use serde_json::{Value, json};
use support::deflate::*;
use support::frames::*;
use support::raw_ws::*;
use support::*;
use switchboard::config::Settings;

/// The server's answer to any offer while context takeover is off.
const BOTH_NCT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

// ---------------------------------------------------------------------------
// Settings and payloads
// ---------------------------------------------------------------------------

/// Test settings with compression on (defaults otherwise: threshold 128,
/// level 1, no context takeover).
fn compressing() -> Settings {
    Settings {
        compression: Some(true),
        ..settings()
    }
}

/// `n` bytes of JSON-safe text that compresses well but not trivially:
/// words drawn pseudo-randomly (xorshift, fixed seed) from a small list.
fn words(n: usize, mut seed: u64) -> String {
    const WORDS: [&str; 16] = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut s = String::with_capacity(n + 16);
    while s.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        s.push_str(WORDS[(seed >> 40) as usize % WORDS.len()]);
        s.push(' ');
    }
    s.truncate(n);
    s
}

/// A publication's `data` whose JSON is about `n` bytes and compressible.
fn big_data(n: usize) -> Value {
    json!({ "items": (0..n / 64).map(|i| json!({"id": i, "name": "widget", "state": "ok"})).collect::<Vec<_>>() })
}

/// `n` pseudo-random alphanumeric characters: no 3-byte string repeats
/// nearby, so deflate finds no short matches in it.
fn noise(n: usize, mut seed: u64) -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(ALNUM[(seed >> 32) as usize % ALNUM.len()])
        })
        .collect()
}

/// About 3.8 KB of JSON whose second 1,400-byte block can only be
/// compressed by referring back 1,400 bytes to the first: beyond a 10-bit
/// (1 KiB) window. With a 15-bit window it deflates to about 1.5 KB, with a
/// 10-bit one to about 2.8 KB. The repetitive `pad` keeps it compressible
/// with a 10-bit window too.
fn far_repeat(seed: u64) -> Value {
    let block = noise(1400, seed);
    json!({ "a": block, "b": block, "pad": "x".repeat(1000) })
}

/// Connect with the default offer, send `bytes` in one write, and describe
/// how the server closed.
async fn outcome_of(server: &TestServer, bytes: &[u8]) -> String {
    let mut c = RawClient::connect_offering(server, Some("permessage-deflate")).await;
    assert!(c.extensions.is_some(), "deflate was not negotiated");
    c.send_raw(bytes).await;
    c.close_summary().await
}

// ---------------------------------------------------------------------------
// Negotiation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn without_compression_an_offer_is_ignored_and_nothing_is_compressed() {
    let server = start().await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    assert_eq!(c.extensions, None, "compression is off by default");
    // A large message (our own publication) must go out plain; `recv`
    // also panics on RSV1 since nothing was agreed.
    c.subscribe("plain").await;
    let data = big_data(2048);
    c.send_json(&json!({"type":"publish","channel":"plain","data":data}))
        .await;
    let m = c.recv_type("message").await;
    assert!(!m.compressed, "RSV1 set with compression off");
    assert_eq!(m.json()["data"], data);
    // And the server refuses RSV1 from the client: nothing was agreed.
    c.send_frame(true, RSV1, TEXT, &deflate(br#"{"type":"ping","id":1}"#))
        .await;
    assert_eq!(c.close_summary().await, "close 1002");
    server.shutdown().await;
}

#[tokio::test]
async fn offers_are_answered_with_no_context_takeover_by_default() {
    let server = start_with(compressing()).await;
    let mut observed = Vec::new();
    for offer in [
        "permessage-deflate",
        // What browsers (and Node's WebSocket) offer.
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    ] {
        let c = RawClient::handshake(server.addr, "/ws", Some(offer)).await;
        observed.push((offer, c.extensions));
    }
    let expected: Vec<_> = observed
        .iter()
        .map(|(offer, _)| (*offer, Some(BOTH_NCT.to_string())))
        .collect();
    assert_eq!(observed, expected);

    // No offer: no extension.
    let c = RawClient::handshake(server.addr, "/ws", None).await;
    assert_eq!(c.extensions, None);
    // An offer of another extension only: no extension.
    let c = RawClient::handshake(server.addr, "/ws", Some("x-webkit-deflate-frame")).await;
    assert_eq!(c.extensions, None);
    server.shutdown().await;
}

#[tokio::test]
async fn server_max_window_bits_is_echoed_and_honoured() {
    let server = start_with(compressing()).await;
    let mut c = RawClient::connect_offering(
        &server,
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        c.extensions.as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10"
        )
    );
    // A payload that repeats at a distance of ~1400 bytes: a 10-bit window
    // cannot reach back that far, so the repeat costs as much again.
    let data = far_repeat(7);
    c.subscribe("bits").await;
    c.send_json(&json!({"type":"publish","channel":"bits","data":data}))
        .await;
    let m = c.recv_type("message").await;
    assert!(m.compressed, "a 4 KB message is compressed");
    assert_eq!(m.json()["data"], data);
    let wide = deflate_with(
        &mut Compress::new(Compression::fast(), false),
        m.text().as_bytes(),
    );
    assert!(
        m.raw.len() > wide.len() * 3 / 2,
        "{} compressed bytes, as few as with a 15-bit window ({}): \
         the server compressed beyond the agreed 10-bit window",
        m.raw.len(),
        wide.len()
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Sending: shared compression, threshold
// ---------------------------------------------------------------------------

#[tokio::test]
async fn broadcast_is_compressed_once_and_shared() {
    let server = start_with(compressing()).await;
    let mut a = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    let mut b =
        RawClient::connect_offering(&server, Some("permessage-deflate; client_max_window_bits"))
            .await;
    let mut plain = RawClient::connect_offering(&server, None).await;
    // A client with a smaller window cannot share the others' bytes.
    let mut narrow = RawClient::connect_offering(
        &server,
        Some("permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(a.extensions.as_deref(), Some(BOTH_NCT));
    assert_eq!(b.extensions.as_deref(), Some(BOTH_NCT));
    assert_eq!(plain.extensions, None);
    for c in [&mut a, &mut b, &mut plain, &mut narrow] {
        // The `subscribed` reply is under the default threshold of 128.
        let reply = c.subscribe("shared").await;
        assert!(!reply.compressed, "{reply:?}");
    }
    let mut publisher = Client::connect(&server).await;
    // ~4 KB of compressible JSON, with a repeat ~1400 bytes back that
    // `narrow` cannot inflate if it is sent the shared 15-bit copy.
    let data = far_repeat(3);
    let ack = publisher
        .request(json!({"type":"publish","channel":"shared","data":data}), 9)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let from_plain = plain.recv_type("message").await;
    assert!(
        !from_plain.compressed,
        "a client that made no offer got RSV1"
    );
    let text = from_plain.text().to_string();
    assert!(text.len() > 3000, "{}", text.len());
    assert_eq!(from_plain.json()["data"], data);
    assert_eq!(from_plain.json()["offset"], ack["offset"]);

    let from_a = a.recv_type("message").await;
    let from_b = b.recv_type("message").await;
    let from_narrow = narrow.recv_type("message").await;
    for (name, m) in [("a", &from_a), ("b", &from_b), ("narrow", &from_narrow)] {
        assert!(m.compressed, "{name}: the broadcast is not compressed");
        assert_eq!(m.opcode, TEXT, "{name}");
        assert!(
            m.raw.len() < text.len(),
            "{name}: {} compressed bytes for {}",
            m.raw.len(),
            text.len()
        );
        assert_eq!(m.text(), text, "{name}: inflates to another message");
    }
    assert!(
        from_a.raw.len() < text.len() / 2,
        "{} compressed bytes for {}: the far repeat was not used",
        from_a.raw.len(),
        text.len()
    );
    assert_eq!(
        from_a.wire, from_b.wire,
        "two clients with the same parameters got different bytes"
    );
    // `narrow` got a copy compressed with its 10-bit window, not the
    // shared one (whose second block refers 1,400 bytes back).
    assert_ne!(from_narrow.raw, from_a.raw);
    assert!(
        from_narrow.raw.len() > from_a.raw.len() * 3 / 2,
        "{} compressed bytes for the 10-bit client, {} for the others: \
         it was sent data compressed with a 15-bit window",
        from_narrow.raw.len(),
        from_a.raw.len()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn messages_below_the_threshold_are_not_compressed() {
    let server = start_with(Settings {
        compression_threshold: Some(512),
        ..compressing()
    })
    .await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    assert_eq!(c.extensions.as_deref(), Some(BOTH_NCT));
    let sub = c.subscribe("small").await;
    assert!(!sub.compressed, "`subscribed` reply compressed: {sub:?}");

    c.send_json(&json!({"type":"ping","id":2})).await;
    let pong = c.recv_type("pong").await;
    assert!(!pong.compressed);
    assert_eq!(pong.json(), json!({"type":"pong","ref":2}));

    // A small publication (~150 bytes, under 512), then a large one.
    c.send_json(&json!({"type":"publish","channel":"small","data":{"t":1}}))
        .await;
    let small = c.recv_type("message").await;
    assert!(small.raw.len() < 512, "{}", small.text());
    assert!(!small.compressed, "{} bytes compressed", small.raw.len());
    assert_eq!(small.json()["data"], json!({"t":1}));

    let data = big_data(2048);
    c.send_json(&json!({"type":"publish","channel":"small","data":data}))
        .await;
    let large = c.recv_type("message").await;
    assert!(large.compressed, "a 2 KB publication went out plain");
    assert_eq!(large.json()["data"], data);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Receiving: compressed requests, limits, protocol errors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn compressed_requests_are_processed() {
    let server = start_with(compressing()).await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;

    c.send_json_deflated(&json!({"type":"ping","id":5})).await;
    let pong = c.recv().await;
    assert_eq!(pong.json(), json!({"type":"pong","ref":5}));
    assert!(!pong.compressed, "a 23-byte pong was compressed");

    // Fragmented: RSV1 on the first frame only (RFC 7692 §6.1).
    let packed = deflate(br#"{"type":"ping","id":6}"#);
    let (head, tail) = packed.split_at(packed.len() / 2);
    c.send_frame(false, RSV1, TEXT, head).await;
    c.send_frame(true, 0, CONTINUATION, tail).await;
    assert_eq!(c.recv().await.json(), json!({"type":"pong","ref":6}));

    // A compressed publication reaches a plain subscriber intact.
    let mut plain = RawClient::connect_offering(&server, None).await;
    plain.subscribe("in").await;
    let data = big_data(4096);
    c.send_json_deflated(&json!({"type":"publish","channel":"in","data":data,"id":7}))
        .await;
    let ack = c.recv_type("ack").await.json();
    assert_eq!(ack["ref"], 7, "{ack}");
    assert_eq!(plain.recv_type("message").await.json()["data"], data);

    // Uncompressed messages stay allowed on a compressing connection.
    c.send_json(&json!({"type":"ping","id":8})).await;
    assert_eq!(c.recv().await.json(), json!({"type":"pong","ref":8}));
    server.shutdown().await;
}

#[tokio::test]
async fn inflated_size_is_limited_by_max_message_size() {
    let limit = 64 * 1024;
    let server = start_with(Settings {
        max_message_size: Some(limit),
        ..compressing()
    })
    .await;

    // Exactly the limit once inflated: accepted.
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    let mut exact = br#"{"type":"ping","id":10}"#.to_vec();
    exact.resize(limit, b' ');
    let packed = deflate(&exact);
    assert!(packed.len() < 1024);
    c.send_frame(true, RSV1, TEXT, &packed).await;
    assert_eq!(c.recv().await.json(), json!({"type":"pong","ref":10}));

    // One byte more: 1009.
    let mut over = exact.clone();
    over.push(b' ');
    c.send_frame(true, RSV1, TEXT, &deflate(&over)).await;
    assert_eq!(c.close_summary().await, "close 1009");

    // A bomb: 2 MB of spaces in ~2 KB.
    let bomb = deflate(&vec![b' '; 2 << 20]);
    assert!(bomb.len() < 8 * 1024, "{}", bomb.len());
    let bytes = masked_frame(true, RSV1, TEXT, &bomb);
    assert_eq!(outcome_of(&server, &bytes).await, "close 1009");
    server.shutdown().await;
}

#[tokio::test]
async fn corrupt_deflate_data_is_closed_with_1007() {
    let server = start_with(compressing()).await;
    let mut observed = Vec::new();
    for (name, payload) in [
        // BTYPE 11 (reserved) in the first block header.
        ("reserved block type", vec![0xff; 16]),
        ("garbage", b"this is not deflate data at all".to_vec()),
    ] {
        let bytes = masked_frame(true, RSV1, TEXT, &payload);
        observed.push((name, outcome_of(&server, &bytes).await));
    }
    // Valid DEFLATE, but the text is not UTF-8.
    let bytes = masked_frame(
        true,
        RSV1,
        TEXT,
        &deflate(b"{\"type\":\"ping\",\"id\":\"\xff\"}"),
    );
    observed.push(("invalid UTF-8 inside", outcome_of(&server, &bytes).await));
    let expected: Vec<_> = observed
        .iter()
        .map(|(name, _)| (*name, "close 1007".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn rsv1_on_continuation_or_control_frames_is_closed_with_1002() {
    let server = start_with(compressing()).await;
    let packed = deflate(br#"{"type":"ping","id":11}"#);
    let (head, tail) = packed.split_at(packed.len() / 2);
    let mut observed = Vec::new();

    let mut bytes = masked_frame(false, RSV1, TEXT, head);
    bytes.extend(masked_frame(true, RSV1, CONTINUATION, tail));
    observed.push(("RSV1 on a continuation", outcome_of(&server, &bytes).await));

    let bytes = masked_frame(true, RSV1, PING, b"hi");
    observed.push(("RSV1 on a ping", outcome_of(&server, &bytes).await));

    let bytes = masked_frame(true, 0x20, TEXT, br#"{"type":"ping","id":12}"#);
    observed.push(("RSV2 on a text frame", outcome_of(&server, &bytes).await));

    let expected: Vec<_> = observed
        .iter()
        .map(|(name, _)| (*name, "close 1002".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Context takeover
// ---------------------------------------------------------------------------

fn takeover() -> Settings {
    Settings {
        compression_context_takeover: Some(true),
        ..compressing()
    }
}

#[tokio::test]
async fn with_context_takeover_only_what_was_asked_is_echoed() {
    let server = start_with(takeover()).await;
    let mut observed = Vec::new();
    for offer in [
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate; client_no_context_takeover",
        "permessage-deflate; server_no_context_takeover",
    ] {
        let c = RawClient::handshake(server.addr, "/ws", Some(offer)).await;
        observed.push((offer, c.extensions));
    }
    let answer = |s: &str| Some(s.to_string());
    assert_eq!(
        observed,
        vec![
            ("permessage-deflate", answer("permessage-deflate")),
            (
                "permessage-deflate; client_max_window_bits",
                answer("permessage-deflate")
            ),
            (
                "permessage-deflate; client_no_context_takeover",
                answer("permessage-deflate; client_no_context_takeover")
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                answer("permessage-deflate; server_no_context_takeover")
            ),
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn with_context_takeover_the_window_is_kept_between_messages() {
    let server = start_with(takeover()).await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    assert_eq!(c.extensions.as_deref(), Some("permessage-deflate"));
    assert!(
        !c.inflater.as_ref().unwrap().1,
        "the client keeps ONE inflater for the connection"
    );
    // Two identical messages: pongs echoing the same 2 KB id. Its first
    // half has no short-range repeats, so the second copy can only shrink
    // by referring back into the first message: to the kept window.
    let id = noise(1000, 11) + &"x".repeat(1000);
    let mut frames = Vec::new();
    for _ in 0..2 {
        c.send_json(&json!({"type":"ping","id":id})).await;
        let pong = c.recv_type("pong").await;
        assert!(pong.compressed, "a 2 KB pong went out plain");
        assert_eq!(pong.json(), json!({"type":"pong","ref":id}));
        frames.push(pong);
    }
    assert!(
        frames[1].raw.len() * 4 < frames[0].raw.len(),
        "the second copy ({} bytes) is not much shorter than the first ({} bytes): \
         the window was not kept",
        frames[1].raw.len(),
        frames[0].raw.len()
    );
    // And a third, different message still inflates in the same stream.
    c.send_json(&json!({"type":"ping","id":13})).await;
    assert_eq!(c.recv().await.json(), json!({"type":"pong","ref":13}));
    server.shutdown().await;
}

#[tokio::test]
async fn with_context_takeover_the_client_may_keep_its_window() {
    let server = start_with(takeover()).await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    assert_eq!(c.extensions.as_deref(), Some("permessage-deflate"));
    // ONE compressor for both messages: the second refers back into the
    // first, so the server must have kept its inflater's window.
    let mut compressor = Compress::new(Compression::default(), false);
    let id = words(2048, 5);
    let request = json!({"type":"ping","id":id}).to_string();
    let first = deflate_with(&mut compressor, request.as_bytes());
    let second = deflate_with(&mut compressor, request.as_bytes());
    assert!(
        second.len() * 4 < first.len(),
        "{} vs {}",
        second.len(),
        first.len()
    );
    for packed in [first, second] {
        c.send_frame(true, RSV1, TEXT, &packed).await;
        let pong = c.recv_type("pong").await;
        assert_eq!(pong.json(), json!({"type":"pong","ref":id}));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn without_context_takeover_a_client_window_reference_fails() {
    // The default answer includes client_no_context_takeover: a client
    // that ignored it and referred back into its previous message breaks
    // the agreement; the server must not silently accept it.
    let server = start_with(compressing()).await;
    let mut c = RawClient::connect_offering(&server, Some("permessage-deflate")).await;
    assert_eq!(c.extensions.as_deref(), Some(BOTH_NCT));
    let mut compressor = Compress::new(Compression::default(), false);
    let id = words(2048, 5);
    let request = json!({"type":"ping","id":id}).to_string();
    let first = deflate_with(&mut compressor, request.as_bytes());
    let second = deflate_with(&mut compressor, request.as_bytes());
    c.send_frame(true, RSV1, TEXT, &first).await;
    assert_eq!(c.recv_type("pong").await.json()["ref"], id);
    c.send_frame(true, RSV1, TEXT, &second).await;
    assert_eq!(c.close_summary().await, "close 1007");
    server.shutdown().await;
}
