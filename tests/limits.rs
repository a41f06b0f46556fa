//! Limits over real sockets: browser origins, connections per instance,
//! the per-connection message rate.

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

async fn connect_with_origin(server: &TestServer, origin: &str) -> Result<(), u16> {
    let mut req = server.url("/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", HeaderValue::from_str(origin).unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn only_allowed_origins_may_connect() {
    let mut s = settings();
    s.allowed_origins = Some(vec!["https://app.example.com".into()]);
    let server = start_with(s).await;
    assert_eq!(
        connect_with_origin(&server, "https://app.example.com").await,
        Ok(())
    );
    assert_eq!(
        connect_with_origin(&server, "https://app.example.com/").await,
        Ok(())
    );
    assert_eq!(
        connect_with_origin(&server, "https://evil.example.com").await,
        Err(403)
    );
    // Non-browser clients send no Origin and are not affected.
    let _c = Client::connect(&server).await;
    let (_, body) = get(&server, "/metrics").await;
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["originRefused"], 1);
    server.shutdown().await;

    // Without an allow-list any origin is fine.
    let server = start().await;
    assert_eq!(
        connect_with_origin(&server, "https://anywhere.test").await,
        Ok(())
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_instance_refuses_connections_beyond_its_maximum() {
    let mut s = settings();
    s.max_connections = Some(2);
    let server = start_with(s).await;
    let _a = Client::connect(&server).await;
    let b = Client::connect(&server).await;
    match tokio_tungstenite::connect_async(server.url("/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(b);
    assert!(eventually(|| async { server.node.hub().len() == 1 }).await);
    let _c = Client::connect(&server).await;
    server.shutdown().await;
}

/// A request dropped by the rate limit is answered with its `ref`, so the
/// client's pending request fails at once; the next one, once the bucket
/// has refilled, is served.
#[tokio::test]
async fn a_rate_limited_request_is_answered_with_its_ref() {
    let mut s = settings();
    s.rate_limit = Some(1.0);
    s.rate_burst = Some(3);
    let server = start_with(s).await;
    let mut c = Client::connect(&server).await;
    let mut limited = None;
    for id in 1..=10 {
        let r = c.request(json!({"type": "ping", "id": id}), id).await;
        if r["type"] == "error" {
            limited = Some(r);
            break;
        }
        assert_eq!(r["type"], "pong", "{r}");
    }
    let r = limited.expect("a request over the limit");
    assert_eq!(r["code"], "rate_limited", "{r}");
    // Without an id the error has no ref (nothing to name).
    c.send(json!({"type": "ping"})).await;
    let r = c.recv().await;
    assert_eq!(r["code"], "rate_limited", "{r}");
    assert!(r.get("ref").is_none_or(|v| v.is_null()), "{r}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = c.request(json!({"type": "ping"}), 99).await;
    assert_eq!(r["type"], "pong", "{r}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_is_limited_while_other_clients_are_served() {
    let mut s = settings();
    s.rate_limit = Some(50.0);
    s.rate_burst = Some(100);
    let server = start_with(s).await;
    let mut other = Client::connect(&server).await;
    let mut flooder = Client::connect(&server).await;
    // 10,000 messages as fast as the socket takes them.
    let flood = tokio::spawn(async move {
        for i in 0..10_000 {
            let frame = json!({"type":"broadcast","data":i}).to_string();
            if flooder.ws.feed(frame.into()).await.is_err() {
                break; // closed by the server
            }
        }
        let _ = flooder.ws.flush().await;
        flooder
    });
    // The other client keeps being served while the flood goes on; its
    // ping round trip is printed (a figure for the record, not asserted).
    let mut broadcasts = 0;
    let asked = std::time::Instant::now();
    let pong = loop {
        other.send(json!({"type":"ping","id":1})).await;
        let m = other.recv().await;
        if m["type"] == "broadcast" {
            broadcasts += 1;
            // drain what the flooder managed to broadcast, then ask again
            continue;
        }
        break m;
    };
    assert_eq!(pong["type"], "pong");
    eprintln!(
        "another client's ping round trip during the flood: {:?}",
        asked.elapsed()
    );
    let mut flooder = flood.await.unwrap();
    // The flooder got rate_limited errors, then was closed with 4029.
    let mut errors = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut flooder.ws)).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "error" {
                    assert_eq!(v["code"], "rate_limited");
                    errors += 1;
                }
            }
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))) => {
                break u16::from(f.code);
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, 4029);
    assert!(errors >= 1);
    // At most the burst plus what the rate refilled got through: far fewer
    // than the 10,000 sent.
    let delivered = {
        let mut n = broadcasts;
        while let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))) =
            tokio::time::timeout(
                std::time::Duration::from_millis(200),
                futures_util::StreamExt::next(&mut other.ws),
            )
            .await
        {
            n += 1;
        }
        n
    };
    assert!(delivered < 1_000, "{delivered} broadcasts got through");
    let (_, body) = get(&server, "/metrics").await;
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(m["rateLimited"].as_u64().unwrap() >= 1);
    server.shutdown().await;
}
