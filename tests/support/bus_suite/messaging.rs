//! The suite's messaging cases, run by every bus through the factory:
//! broadcast, direct to a client and to a user, and the server API's
//! disconnect, each across instances. Part of `bus_suite` (re-exported
//! there, listed in its `bus_suite!` macro).

use std::time::Duration;

use serde_json::json;

use super::{BusFactory, Cluster, QUIET, bounded, recv_within, until_unknown_target};
use crate::support::{Client, WAIT};

/// A broadcast from A reaches every other client on A, B and C exactly
/// once, in the sender's order, and never the sender.
pub async fn broadcast_reaches_other_instances(f: &dyn BusFactory) {
    bounded("broadcast_reaches_other_instances", async {
        let cluster = Cluster::start(f, "broadcast", 3).await;
        let mut sender = cluster.client(0).await;
        let mut others = vec![
            cluster.client(0).await,
            cluster.client(1).await,
            cluster.client(1).await,
            cluster.client(2).await,
        ];
        for n in 1..=3 {
            let ack = sender
                .request(json!({"type": "broadcast", "data": {"n": n}}), n)
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        for c in &mut others {
            for n in 1..=3 {
                let m = c.recv().await;
                assert_eq!(m["type"], "broadcast", "{m}");
                assert_eq!(m["data"]["n"], n, "in the sender's order: {m}");
                assert_eq!(m["senderId"], sender.id.as_str());
            }
        }
        sender.expect_silence(QUIET).await;
        for c in &mut others {
            c.expect_silence(QUIET).await;
        }
        drop((sender, others));
        cluster.shutdown().await;
    })
    .await;
}

/// Direct messages cross instances both ways; on the same instance too; an
/// unknown target is `unknown_target`, and so is a target that left.
pub async fn direct_across_instances(f: &dyn BusFactory) {
    bounded("direct_across_instances", async {
        let cluster = Cluster::start(f, "direct", 2).await;
        let mut a = cluster.client(0).await;
        let mut a2 = cluster.client(0).await;
        let mut b = cluster.client(1).await;

        let ack = a
            .request(
                json!({"type": "direct", "targetId": b.id, "data": "to b"}),
                1,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = b.recv().await;
        assert_eq!(m["type"], "direct", "{m}");
        assert_eq!(m["data"], "to b");
        assert_eq!(m["senderId"], a.id.as_str());

        let ack = b
            .request(
                json!({"type": "direct", "targetId": a.id, "data": "to a"}),
                2,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = a.recv().await;
        assert_eq!(m["data"], "to a", "{m}");
        assert_eq!(m["senderId"], b.id.as_str());

        let ack = a
            .request(
                json!({"type": "direct", "targetId": a2.id, "data": "local"}),
                3,
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(a2.recv().await["data"], "local");

        let err = a
            .request(
                json!({"type": "direct", "targetId": "client-0-nosuchone", "data": 1}),
                4,
            )
            .await;
        assert_eq!(err["type"], "error", "{err}");
        assert_eq!(err["code"], "unknown_target", "{err}");

        // Nobody got anything twice, and the others got nothing.
        a.expect_silence(QUIET).await;
        a2.expect_silence(QUIET).await;
        b.expect_silence(QUIET).await;

        // A client that left stops resolving.
        let gone = b.id.clone();
        drop(b);
        assert!(
            until_unknown_target(&mut a, &gone, WAIT).await,
            "a departed client becomes unknown_target"
        );
        drop((a, a2));
        cluster.shutdown().await;
    })
    .await;
}

/// `{"type":"direct","userId":U}` reaches every connection of user U on
/// every instance, and nobody else.
pub async fn direct_to_a_user_across_instances(f: &dyn BusFactory) {
    bounded("direct_to_a_user_across_instances", async {
        const SECRET: &str = "suite-secret-0123456789abcdef";
        let path = std::env::temp_dir().join(format!("sb-suite-secret-{}", std::process::id()));
        std::fs::write(&path, SECRET).unwrap();
        let cluster = Cluster::start_with(f, "userdirect", 2, |s| {
            s.auth_hs256_secret_file = Some(path.clone());
        })
        .await;
        switchboard::auth::init_crypto();
        let token = |sub: &str| {
            let exp = switchboard::protocol::now_ms() / 1000 + 600;
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                // Every user may send `direct` to any user (with auth on it
                // needs this grant; anonymous connections may not).
                &json!({"sub": sub, "exp": exp, "direct": ["*"]}),
                &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let as_user =
            |i: usize, sub: &str| format!("{}?token={}", cluster.get(i).url("/ws"), token(sub));
        let mut alice_a = Client::connect_url(&as_user(0, "alice")).await;
        let mut alice_b = Client::connect_url(&as_user(1, "alice")).await;
        let mut bob = Client::connect_url(&as_user(1, "bob")).await;
        let mut sender = Client::connect_url(&as_user(0, "carol")).await;
        // The user's connections register with the bus as they connect;
        // retry until both are reached (bounded).
        let mut got_a = None;
        let mut got_b = None;
        for attempt in 0..50u64 {
            let ack = sender
                .request(
                    json!({"type":"direct","userId":"alice","data":{"n":attempt}}),
                    100 + attempt,
                )
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            if got_a.is_none() {
                got_a = recv_within(&mut alice_a, Duration::from_millis(200)).await;
            }
            if got_b.is_none() {
                got_b = recv_within(&mut alice_b, Duration::from_millis(200)).await;
            }
            if got_a.is_some() && got_b.is_some() {
                break;
            }
        }
        for m in [got_a.expect("alice on A"), got_b.expect("alice on B")] {
            assert_eq!(m["type"], "direct", "{m}");
            assert_eq!(m["senderId"], sender.id.as_str());
        }
        bob.expect_silence(QUIET).await;
        // Nobody connected as that user: accepted, delivered to no one.
        let ack = sender
            .request(json!({"type":"direct","userId":"nobody","data":1}), 1)
            .await;
        assert_eq!(ack["type"], "ack");
        cluster.shutdown().await;
    })
    .await;
}

/// The server API's disconnect reaches a client on another instance.
pub async fn api_disconnect_across_instances(f: &dyn BusFactory) {
    bounded("api_disconnect_across_instances", async {
        let key = "suite-api-key-0123456789abcdef";
        let path = std::env::temp_dir().join(format!("sb-suite-api-key-{}", std::process::id()));
        std::fs::write(&path, key).unwrap();
        let cluster = Cluster::start_with(f, "apidisconnect", 2, |s| {
            s.api_key_file = Some(path.clone());
        })
        .await;
        let mut b = cluster.client(1).await;
        let http = reqwest::Client::new();
        let disconnect = |id: String| {
            http.post(cluster.get(0).http("/api/disconnect"))
                .bearer_auth(key)
                .json(&json!({"clientId": id, "code": 4321, "reason": "bye"}))
                .send()
        };
        // The directory may take a moment to learn of `b` on some buses.
        let mut status = 0;
        for _ in 0..50 {
            status = disconnect(b.id.clone()).await.unwrap().status().as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200);
        assert_eq!(b.expect_close().await, 4321);
        let unknown = disconnect("client-nobody".into()).await.unwrap();
        assert_eq!(unknown.status().as_u16(), 404);
        cluster.shutdown().await;
    })
    .await;
}
