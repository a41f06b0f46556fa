//! RFC 6455 conformance of the WebSocket layer, black-box, over real TCP
//! sockets with hand-built frames.
//!
//! [`RawClient`] (`tests/support/raw_ws.rs`) does the opening handshake by
//! hand, writes client frames (masked with a random key, or deliberately
//! malformed: unmasked, reserved bits or opcodes, split across TCP writes)
//! and parses the server's frames itself, checking what RFC 6455 requires of
//! *every* frame a server sends; no extension is offered here, so any RSV
//! bit from the server fails the test. Each test thus also checks the
//! server's own framing.
//!
//! Close-related outcomes are compared as short strings from
//! [`RawClient::close_summary`] (`"close 1002"`: a close frame with code 1002
//! and, after the client's answer, the TCP connection closed by the server),
//! so a failure says what the server did instead.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::frames::*;
use support::raw_ws::*;
use support::*;
use switchboard::config::Settings;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;

/// Connect, send `bytes` in one write, and describe how the server closed.
async fn outcome_of(server: &TestServer, bytes: &[u8]) -> String {
    let mut c = RawClient::connect(server).await;
    c.send_raw(bytes).await;
    c.close_summary().await
}

/// A server whose `max_message_size` is `limit`.
async fn start_with_limit(limit: usize) -> TestServer {
    start_with(Settings {
        max_message_size: Some(limit),
        ..settings()
    })
    .await
}

// ---------------------------------------------------------------------------
// 1-4. Framing errors: close 1002 (RFC 6455 §5.1, §5.2, §5.5, §7.4.1)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unmasked_client_frame_is_closed_with_1002() {
    let server = start().await;
    // A valid request, but unmasked: the server must not answer it.
    let bytes = unmasked_frame(true, 0, TEXT, br#"{"type":"ping","id":1}"#);
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    let server = start().await;
    let mut observed = Vec::new();
    for opcode in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let bytes = masked_frame(true, 0, opcode, b"x");
        observed.push((opcode, outcome_of(&server, &bytes).await));
    }
    let expected: Vec<_> = observed
        .iter()
        .map(|(op, _)| (*op, "close 1002".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn rsv_bits_without_an_extension_are_closed_with_1002() {
    let server = start().await;
    let mut observed = Vec::new();
    for (name, rsv) in [("RSV1", RSV1), ("RSV2", RSV2), ("RSV3", RSV3)] {
        let bytes = masked_frame(true, rsv, TEXT, br#"{"type":"ping","id":3}"#);
        observed.push((name, outcome_of(&server, &bytes).await));
    }
    let expected: Vec<_> = observed
        .iter()
        .map(|(name, _)| (*name, "close 1002".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn control_frame_with_126_byte_payload_is_closed_with_1002() {
    let server = start().await;
    let bytes = masked_frame(true, 0, PING, &[b'p'; 126]);
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

#[tokio::test]
async fn fragmented_ping_is_closed_with_1002() {
    let server = start().await;
    let mut bytes = masked_frame(false, 0, PING, b"ab");
    bytes.extend(masked_frame(true, 0, CONTINUATION, b"c"));
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. UTF-8 (RFC 6455 §5.6, §8.1): close 1007
// ---------------------------------------------------------------------------

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let server = start().await;
    let bytes = masked_frame(true, 0, TEXT, b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}");
    assert_eq!(outcome_of(&server, &bytes).await, "close 1007");
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_across_two_fragments_is_closed_with_1007() {
    let server = start().await;
    // Each fragment is fine on its own (the first ends with the lead byte
    // of a 2-byte sequence, the second is ASCII); together they are not.
    let mut bytes = masked_frame(false, 0, TEXT, b"{\"type\":\"ping\",\"id\":\"\xce");
    bytes.extend(masked_frame(true, 0, CONTINUATION, b"A\"}"));
    assert_eq!(outcome_of(&server, &bytes).await, "close 1007");
    server.shutdown().await;
}

#[tokio::test]
async fn multibyte_character_split_across_fragments_is_accepted() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    let text = r#"{"type":"ping","id":"é"}"#.as_bytes();
    let lead = text.iter().position(|&b| b == 0xC3).unwrap();
    // Split between the two bytes of "é" (0xC3 0xA9).
    c.send_frame(false, 0, TEXT, &text[..=lead]).await;
    c.send_frame(true, 0, CONTINUATION, &text[lead + 1..]).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","ref":"é"}));
    drop(c);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. Fragmentation errors (RFC 6455 §5.4): close 1002
// ---------------------------------------------------------------------------

#[tokio::test]
async fn continuation_without_a_started_message_is_closed_with_1002() {
    let server = start().await;
    let bytes = masked_frame(true, 0, CONTINUATION, br#"{"type":"ping","id":6}"#);
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

#[tokio::test]
async fn new_text_frame_inside_a_fragmented_message_is_closed_with_1002() {
    let server = start().await;
    let mut bytes = masked_frame(false, 0, TEXT, br#"{"type":"ping","#);
    bytes.extend(masked_frame(true, 0, TEXT, br#"{"type":"ping","id":6}"#));
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. Size limit: close 1009 (RFC 6455 §7.4.1, §10.4)
// ---------------------------------------------------------------------------

const LIMIT: usize = 1024;

#[tokio::test]
async fn message_of_exactly_the_limit_is_accepted() {
    let server = start_with_limit(LIMIT).await;
    let mut c = RawClient::connect(&server).await;
    let mut text = br#"{"type":"ping","id":70}"#.to_vec();
    text.resize(LIMIT, b' '); // JSON allows trailing whitespace
    c.send_text(&text).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","ref":70}));
    drop(c);
    server.shutdown().await;
}

#[tokio::test]
async fn frame_declaring_a_huge_length_is_closed_with_1009_without_its_body() {
    let server = start_with_limit(LIMIT).await;
    // The header alone: 1 MB announced, no byte of it sent.
    let header = frame_header(true, 0, TEXT, 1_000_000, Some(random_mask()));
    assert_eq!(outcome_of(&server, &header).await, "close 1009");
    server.shutdown().await;
}

#[tokio::test]
async fn frame_one_byte_over_the_limit_is_closed_with_1009_without_its_body() {
    let server = start_with_limit(LIMIT).await;
    let header = frame_header(true, 0, TEXT, LIMIT as u64 + 1, Some(random_mask()));
    assert_eq!(outcome_of(&server, &header).await, "close 1009");
    server.shutdown().await;
}

#[tokio::test]
async fn fragments_together_over_the_limit_are_closed_with_1009() {
    let server = start_with_limit(LIMIT).await;
    // Three fragments of 400 bytes (1200 > 1024); the message is never
    // finished: the server must not wait for its end to refuse it.
    let mut bytes = masked_frame(false, 0, TEXT, &[b' '; 400]);
    bytes.extend(masked_frame(false, 0, CONTINUATION, &[b' '; 400]));
    bytes.extend(masked_frame(false, 0, CONTINUATION, &[b' '; 400]));
    assert_eq!(outcome_of(&server, &bytes).await, "close 1009");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 8. Ping/pong (RFC 6455 §5.5.2, §5.5.3, §5.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ping_is_answered_with_a_pong_of_the_same_payload() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    c.send_frame(true, 0, PING, b"abc").await;
    c.expect_pong(b"abc").await;
    // Empty and maximal (125-byte) payloads too.
    c.send_frame(true, 0, PING, b"").await;
    c.expect_pong(b"").await;
    let big: Vec<u8> = (0..125u8).collect();
    c.send_frame(true, 0, PING, &big).await;
    c.expect_pong(&big).await;
    drop(c);
    server.shutdown().await;
}

#[tokio::test]
async fn ping_between_fragments_is_answered_and_the_message_still_processed() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    let text = br#"{"type":"ping","id":8}"#;
    c.send_frame(false, 0, TEXT, &text[..10]).await;
    c.send_frame(true, 0, PING, b"mid").await;
    // Answered while the message is still unfinished.
    c.expect_pong(b"mid").await;
    c.send_frame(true, 0, CONTINUATION, &text[10..]).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","ref":8}));
    drop(c);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. Fragmentation and pipelining
// ---------------------------------------------------------------------------

#[tokio::test]
async fn request_in_five_fragments_written_byte_by_byte_is_answered() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    let text = br#"{"type":"ping","id":9}"#;
    let chunks: Vec<&[u8]> = text.chunks(text.len().div_ceil(5)).collect();
    assert_eq!(chunks.len(), 5);
    for (i, chunk) in chunks.iter().enumerate() {
        let (fin, opcode) = (i == 4, if i == 0 { TEXT } else { CONTINUATION });
        let frame = masked_frame(fin, 0, opcode, chunk);
        c.send_raw_slowly(&frame, Duration::from_millis(2)).await;
    }
    assert_eq!(c.recv_json().await, json!({"type":"pong","ref":9}));
    drop(c);
    server.shutdown().await;
}

#[tokio::test]
async fn fifty_requests_in_one_write_are_answered_in_order() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    let mut bytes = Vec::new();
    for id in 0..50 {
        let req = json!({"type":"ping","id":id}).to_string();
        bytes.extend(masked_frame(true, 0, TEXT, req.as_bytes()));
    }
    c.send_raw(&bytes).await;
    let mut refs = Vec::new();
    for _ in 0..50 {
        let r = c.recv_json().await;
        assert_eq!(r["type"], "pong", "{r}");
        refs.push(r["ref"].as_u64().unwrap());
    }
    assert_eq!(refs, (0..50).collect::<Vec<u64>>());
    drop(c);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. Closing handshake (RFC 6455 §5.5.1, §7.1, §7.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_close_is_answered_with_1000_and_tcp_closed_by_the_server() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    c.send_close(&close_payload(1000, b"bye")).await;
    // The server answers with its close frame, then closes TCP itself
    // (§7.1.1: the server closes the TCP connection first).
    assert_eq!(c.close_summary().await, "close 1000");
    server.shutdown().await;
}

#[tokio::test]
async fn client_close_without_a_code_is_answered() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    c.send_close(b"").await;
    let summary = c.close_summary().await;
    assert!(
        summary == "close without code" || summary == "close 1000",
        "{summary}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn client_close_with_other_valid_codes_is_answered() {
    let server = start().await;
    let mut observed = Vec::new();
    for code in [1001u16, 1003, 1007, 1011, 3000, 3999, 4000, 4999] {
        let mut c = RawClient::connect(&server).await;
        c.send_close(&close_payload(code, b"")).await;
        let summary = c.close_summary().await;
        // Any valid code (the parser checks it), then TCP closed.
        let ok = summary.starts_with("close ") && !summary.contains(',');
        observed.push((code, if ok { "answered".into() } else { summary }));
    }
    let expected: Vec<_> = observed
        .iter()
        .map(|(code, _)| (*code, "answered".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn close_with_an_invalid_code_is_closed_with_1002() {
    let server = start().await;
    let mut observed = Vec::new();
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let bytes = masked_frame(true, 0, CLOSE, &close_payload(code, b""));
        observed.push((code, outcome_of(&server, &bytes).await));
    }
    let expected: Vec<_> = observed
        .iter()
        .map(|(code, _)| (*code, "close 1002".to_string()))
        .collect();
    assert_eq!(observed, expected);
    server.shutdown().await;
}

#[tokio::test]
async fn close_with_a_one_byte_payload_is_closed_with_1002() {
    let server = start().await;
    let bytes = masked_frame(true, 0, CLOSE, &[0x03]);
    assert_eq!(outcome_of(&server, &bytes).await, "close 1002");
    server.shutdown().await;
}

#[tokio::test]
async fn close_reason_with_invalid_utf8_is_closed_with_1007() {
    let server = start().await;
    let bytes = masked_frame(true, 0, CLOSE, &close_payload(1000, b"bye\xff"));
    assert_eq!(outcome_of(&server, &bytes).await, "close 1007");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 11. Binary frames on the protocol endpoint
// ---------------------------------------------------------------------------

#[tokio::test]
async fn binary_frame_gets_an_error_and_the_connection_stays_open() {
    let server = start().await;
    let mut c = RawClient::connect(&server).await;
    c.send_frame(true, 0, BINARY, &[0, 1, 2, 0xFF]).await;
    let e = c.recv_json().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "binary_not_supported", "{e}");
    c.send_json(&json!({"type":"ping","id":11})).await;
    assert_eq!(c.recv_json().await, json!({"type":"pong","ref":11}));
    drop(c);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 12. Isolation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn protocol_error_on_one_connection_does_not_disturb_another() {
    let server = start().await;
    let mut subscriber = Client::connect(&server).await;
    let r = subscriber
        .request(json!({"type":"subscribe","channel":"iso"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let mut publisher = Client::connect(&server).await;
    let mut bad = RawClient::connect(&server).await;

    bad.send_frame(true, 0, 0x3, b"x").await;
    // The server has seen the error and is closing `bad` (its close frame
    // is here, this client has not answered it yet).
    match bad.next_event(WAIT).await {
        Event::Msg(Msg::Close(p)) => assert_eq!(p.get(..2), Some(&1002u16.to_be_bytes()[..])),
        other => panic!("expected a close frame with 1002, got {other:?}"),
    }

    // Meanwhile the others carry on.
    let ack = publisher
        .request(json!({"type":"publish","channel":"iso","data":"after"}), 2)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = subscriber.recv_type("message").await;
    assert_eq!(m["data"], "after", "{m}");
    assert_eq!(m["channel"], "iso", "{m}");

    // And `bad` finishes closing.
    let echo = masked_frame(true, 0, CLOSE, &close_payload(1002, b""));
    let _ = timeout(WAIT, bad.stream.write_all(&echo)).await;
    assert!(
        matches!(bad.next_event(WAIT).await, Event::Closed(_)),
        "TCP closed after the closing handshake"
    );
    drop(subscriber);
    drop(publisher);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 13. Handshake errors (RFC 6455 §4.2.1, §4.2.2, §4.4)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_101_and_the_welcome_leave_in_one_write() {
    // The 101 response is held back and sent with the welcome (one write,
    // one segment on loopback): the read that completes the response head
    // already holds the whole welcome frame.
    let server = start().await;
    let key = generate_key();
    let req = upgrade_request("GET", server.addr, "/ws", &key, "13", &[]);
    let (_s, resp, rest) = http_exchange(server.addr, &req).await;
    assert_eq!(resp.status, 101, "{resp:?}");
    let (frame, len) = parse_server_frame(&rest).expect("the welcome came with the 101");
    assert_eq!(frame.opcode, TEXT);
    let welcome: Value = serde_json::from_slice(&frame.payload).unwrap();
    assert_eq!(welcome["type"], "connected", "{welcome}");
    assert_eq!(len, rest.len(), "nothing but the welcome follows the 101");
    server.shutdown().await;
}

#[tokio::test]
async fn with_first_frame_auth_the_101_is_not_held_for_the_welcome() {
    // When the server waits for an `auth` frame, the client must have the
    // 101 first: the held response goes out when the session starts
    // reading, and the client can authenticate.
    let dir = std::env::temp_dir().join(format!("sb-ws-frames-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-test-secret-of-enough-length-0123456789\n").unwrap();
    let server = start_with(Settings {
        auth_required: Some(true),
        auth_hs256_secret_file: Some(secret),
        ..settings()
    })
    .await;
    let key = generate_key();
    let req = upgrade_request("GET", server.addr, "/ws", &key, "13", &[]);
    let (_s, resp, rest) = http_exchange(server.addr, &req).await;
    assert_eq!(resp.status, 101, "{resp:?}");
    assert!(rest.is_empty(), "no welcome before auth: {rest:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_without_a_key_is_400() {
    let server = start().await;
    let req = upgrade_request("GET", server.addr, "/ws", "", "13", &["Sec-WebSocket-Key"]);
    let (_s, resp, _) = http_exchange(server.addr, &req).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_with_version_8_is_426_naming_version_13() {
    let server = start().await;
    let req = upgrade_request("GET", server.addr, "/ws", &generate_key(), "8", &[]);
    let (_s, resp, _) = http_exchange(server.addr, &req).await;
    assert_eq!(resp.status, 426, "{resp:?}");
    assert!(
        resp.header("sec-websocket-version")
            .is_some_and(|v| v.split(',').any(|t| t.trim() == "13")),
        "426 must name the supported version (RFC 6455 §4.4): {resp:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn post_with_upgrade_headers_is_not_upgraded() {
    let server = start().await;
    let req = upgrade_request("POST", server.addr, "/ws", &generate_key(), "13", &[]);
    let (_s, resp, _) = http_exchange(server.addr, &req).await;
    assert_ne!(resp.status, 101, "{resp:?}");
    assert!((400..500).contains(&resp.status), "{resp:?}");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 14. The server's own frames (also checked on every frame above)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn server_frames_are_unmasked_and_use_every_length_encoding_minimally() {
    // Replies of < 126, 126..=65535 and > 65535 bytes: the three length
    // encodings, each checked by the parser (no mask, no RSV, minimal).
    let server = start_with_limit(256 * 1024).await;
    let mut c = RawClient::connect(&server).await;
    for (id, n) in [(1u64, 1usize), (2, 300), (3, 100_000)] {
        let long = "x".repeat(n);
        c.send_json(&json!({"type":"ping","id":long})).await;
        let r = c.recv_json().await;
        assert_eq!(r["type"], "pong", "reply {id}");
        assert_eq!(r["ref"].as_str().map(str::len), Some(n), "reply {id}");
    }
    drop(c);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// The helpers themselves (no server)
// ---------------------------------------------------------------------------

#[test]
fn helper_encodes_lengths_minimally_and_masks() {
    let mask = [1, 2, 3, 4];
    assert_eq!(frame_header(true, 0, TEXT, 125, None), [0x81, 125]);
    assert_eq!(frame_header(true, 0, TEXT, 126, None), [0x81, 126, 0, 126]);
    assert_eq!(
        frame_header(false, RSV1, CONTINUATION, 65535, Some(mask)),
        [0x40, 0x80 | 126, 0xFF, 0xFF, 1, 2, 3, 4]
    );
    assert_eq!(
        frame_header(true, 0, BINARY, 65536, None),
        [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]
    );
    let f = masked_frame(true, 0, TEXT, b"hello");
    let k = [f[2], f[3], f[4], f[5]];
    let unmasked: Vec<u8> = f[6..]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ k[i % 4])
        .collect();
    assert_eq!(f[1], 0x80 | 5);
    assert_eq!(unmasked, b"hello");
}

#[test]
fn helper_parses_server_frames() {
    let mut bytes = unmasked_frame(true, 0, TEXT, &[b'a'; 300]);
    assert_eq!(parse_server_frame(&bytes[..100]), None, "incomplete");
    bytes.extend(unmasked_frame(true, 0, PONG, b"x"));
    let (f, used) = parse_server_frame(&bytes).unwrap();
    assert_eq!(
        (f.fin, f.opcode, f.payload.len(), used),
        (true, TEXT, 300, 304)
    );
    let (f, _) = parse_server_frame(&bytes[used..]).unwrap();
    assert_eq!(f.payload, b"x");
}

#[test]
#[should_panic(expected = "masked")]
fn helper_rejects_a_masked_server_frame() {
    parse_server_frame(&masked_frame(true, 0, TEXT, b"hi"));
}

#[test]
#[should_panic(expected = "RSV")]
fn helper_rejects_rsv_bits_from_the_server() {
    parse_server_frame(&unmasked_frame(true, RSV1, TEXT, b"hi"));
}

#[test]
#[should_panic(expected = "minimal")]
fn helper_rejects_a_non_minimal_length_from_the_server() {
    parse_server_frame(&[0x81, 126, 0, 5, b'h', b'e', b'l', b'l', b'o']);
}

#[test]
#[should_panic(expected = "close code 1005")]
fn helper_rejects_an_unsendable_close_code_from_the_server() {
    parse_server_frame(&unmasked_frame(true, 0, CLOSE, &close_payload(1005, b"")));
}
