//! Authentication and grants over real sockets: every denial path, and
//! the happy ones, with HS256, RS256, ES256 and a JWKS.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::*;
use switchboard::config::{NamespaceSettings, Settings};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-0123456789abcdef";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn now() -> u64 {
    switchboard::protocol::now_ms() / 1000
}

fn secret_file() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sb-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path
}

fn hs256(claims: Value) -> String {
    switchboard::auth::init_crypto();
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: Value, kid: Option<&str>) -> String {
    switchboard::auth::init_crypto();
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    encode(&header, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn es256(claims: Value) -> String {
    switchboard::auth::init_crypto();
    let pem = std::fs::read(fixture("ec_private.pem")).unwrap();
    encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "aud": "switchboard",
           "channels": {"subscribe": ["private:*"], "publish": ["private:mine"]}})
}

/// Auth on with the HS256 secret; the `private` namespace admits no
/// anonymous connection.
fn auth_settings() -> Settings {
    let mut s = settings();
    s.auth_hs256_secret_file = Some(secret_file());
    s.auth_audience = Some("switchboard".into());
    s.namespaces.insert(
        "private".into(),
        NamespaceSettings {
            anonymous: Some(false),
            ..Default::default()
        },
    );
    s
}

/// Connect with `?token=` and return the first frame or the close code.
async fn connect_token(server: &TestServer, token: &str) -> Result<Client, u16> {
    let url = format!("{}?token={token}", server.url("/ws"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await {
        Ok(Some(Ok(Message::Text(t)))) => {
            let v: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "connected");
            Ok(Client {
                ws,
                id: v["clientId"].as_str().unwrap().to_string(),
            })
        }
        Ok(Some(Ok(Message::Close(Some(f))))) => Err(f.code.into()),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn the_token_name_claim_names_the_connection_not_the_url() {
    let server = start_with(auth_settings()).await;
    let mut token = claims("user-7");
    token["name"] = json!("  Grace Hopper\u{7} ");
    // `?name=` is only for connections without a token: the token's claim wins.
    let mut c = connect_token(&server, &format!("{}&name=Mallory", hs256(token)))
        .await
        .unwrap();
    c.request(json!({"type":"subscribe","channel":"private:n"}), 1)
        .await;
    let p = c
        .request(json!({"type":"presence","channel":"private:n"}), 2)
        .await;
    assert_eq!(p["members"][0]["name"], "Grace Hopper");
    // A token without the claim: no name, whatever the URL says.
    let mut d = connect_token(
        &server,
        &format!("{}&name=Mallory", hs256(claims("user-8"))),
    )
    .await
    .unwrap();
    d.request(json!({"type":"subscribe","channel":"private:n"}), 1)
        .await;
    let p = d
        .request(json!({"type":"presence","channel":"private:n"}), 2)
        .await;
    let names: Vec<&Value> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["name"])
        .collect();
    assert!(names.contains(&&json!("Grace Hopper")));
    assert!(names.contains(&&Value::Null), "{p}");
    assert!(!p.to_string().contains("Mallory"));
    server.shutdown().await;
}

#[tokio::test]
async fn a_valid_token_sets_the_user_and_its_grants() {
    let server = start_with(auth_settings()).await;
    let mut c = connect_token(&server, &hs256(claims("user-42")))
        .await
        .unwrap();
    let r = c
        .request(json!({"type":"subscribe","channel":"private:room"}), 1)
        .await;
    assert_eq!(r["type"], "subscribed");
    let p = c
        .request(json!({"type":"presence","channel":"private:room"}), 2)
        .await;
    assert_eq!(p["members"][0]["userId"], "user-42");
    let ack = c
        .request(
            json!({"type":"publish","channel":"private:mine","data":1}),
            3,
        )
        .await;
    assert_eq!(ack["type"], "ack");
    // Not granted: publish elsewhere in the namespace.
    let e = c
        .request(
            json!({"type":"publish","channel":"private:room","data":1}),
            4,
        )
        .await;
    assert_eq!(e["code"], "permission_denied");
    server.shutdown().await;
}

#[tokio::test]
async fn every_denial_path() {
    let server = start_with(auth_settings()).await;
    // Bad signature.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory"),
        &EncodingKey::from_secret(b"not-the-secret-at-all-000"),
    )
    .unwrap();
    assert_eq!(connect_token(&server, &forged).await.err(), Some(4001));
    // Expired.
    let mut old = claims("late");
    old["exp"] = json!(now() - 3600);
    assert_eq!(connect_token(&server, &hs256(old)).await.err(), Some(4003));
    // Wrong audience.
    let mut aud = claims("lost");
    aud["aud"] = json!("someone-else");
    assert_eq!(connect_token(&server, &hs256(aud)).await.err(), Some(4001));
    // Not yet valid.
    let mut nbf = claims("early");
    nbf["nbf"] = json!(now() + 3600);
    assert_eq!(connect_token(&server, &hs256(nbf)).await.err(), Some(4001));
    // Garbage.
    assert_eq!(connect_token(&server, "not.a.jwt").await.err(), Some(4001));
    // No token: anonymous, refused where anonymous is off.
    let mut anon = Client::connect(&server).await;
    for (req, id) in [
        (json!({"type":"subscribe","channel":"private:x"}), 1),
        (json!({"type":"publish","channel":"private:x","data":1}), 2),
        (json!({"type":"history","channel":"private:x"}), 3),
        (json!({"type":"presence","channel":"private:x"}), 4),
    ] {
        let e = anon.request(req, id).await;
        assert_eq!(e["code"], "permission_denied", "{e}");
    }
    // ... but fine in anonymous namespaces.
    let ok = anon
        .request(json!({"type":"subscribe","channel":"open"}), 5)
        .await;
    assert_eq!(ok["type"], "subscribed");
    let (_, body) = get(&server, "/metrics").await;
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["authFailures"], 5);
    server.shutdown().await;
}

#[tokio::test]
async fn auth_required_takes_a_first_frame_or_closes() {
    let mut s = auth_settings();
    s.auth_required = Some(true);
    s.auth_timeout = Some("300ms".parse().unwrap());
    let server = start_with(s).await;
    // Silence past the deadline.
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws"))
        .await
        .unwrap();
    let mut silent = Client {
        ws,
        id: String::new(),
    };
    assert_eq!(silent.expect_close().await, 4001);
    // Something else first.
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws"))
        .await
        .unwrap();
    let mut rude = Client {
        ws,
        id: String::new(),
    };
    rude.send(json!({"type":"broadcast","data":1})).await;
    assert_eq!(rude.expect_close().await, 4001);
    // A first auth frame.
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws"))
        .await
        .unwrap();
    let mut good = Client {
        ws,
        id: String::new(),
    };
    good.send(json!({"type":"auth","token":hs256(claims("frame-user")),"id":"a1"}))
        .await;
    let welcome = good.recv().await;
    assert_eq!(welcome["type"], "connected");
    let ok = good.recv().await;
    assert_eq!(ok["type"], "authenticated");
    assert_eq!(ok["userId"], "frame-user");
    assert_eq!(ok["ref"], "a1");
    // The URL form works too.
    assert!(
        connect_token(&server, &hs256(claims("url-user")))
            .await
            .is_ok()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_token_can_be_refreshed_and_expiry_closes_with_4003() {
    let server = start_with(auth_settings()).await;
    let mut short = claims("ticking");
    short["exp"] = json!(now() + 2);
    let mut c = connect_token(&server, &hs256(short)).await.unwrap();
    // Refresh before it runs out.
    let fresh = c
        .request(json!({"type":"auth","token":hs256(claims("ticking"))}), 1)
        .await;
    assert_eq!(fresh["type"], "authenticated");
    assert!(fresh["expiresAt"].as_u64().unwrap() > now() + 60);
    // Another user's token is refused, the connection stays.
    let other = c
        .request(json!({"type":"auth","token":hs256(claims("someone"))}), 2)
        .await;
    assert_eq!(other["code"], "invalid_token");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pong = c.request(json!({"type":"ping"}), 3).await;
    assert_eq!(pong["type"], "pong", "the refreshed token kept it open");

    // Without a refresh the sweeper closes it when the token expires.
    let mut short = claims("ticking");
    short["exp"] = json!(now() + 1);
    let mut d = connect_token(&server, &hs256(short)).await.unwrap();
    assert_eq!(d.expect_close().await, 4003);
    server.shutdown().await;
}

#[tokio::test]
async fn rs256_es256_and_jwks_keys() {
    let mut s = settings();
    s.auth_public_key_file = Some(fixture("rsa_public.pem"));
    let server = start_with(s).await;
    assert!(
        connect_token(&server, &rs256(claims("rsa-user"), None))
            .await
            .is_ok()
    );
    assert_eq!(
        connect_token(&server, &es256(claims("ec-user")))
            .await
            .err(),
        Some(4001)
    );
    server.shutdown().await;

    let mut s = settings();
    s.auth_public_key_file = Some(fixture("ec_public.pem"));
    let server = start_with(s).await;
    assert!(
        connect_token(&server, &es256(claims("ec-user")))
            .await
            .is_ok()
    );
    server.shutdown().await;

    let mut s = settings();
    s.auth_jwks_file = Some(fixture("jwks.json"));
    let server = start_with(s).await;
    assert!(
        connect_token(&server, &rs256(claims("jwks-user"), Some("test-rsa")))
            .await
            .is_ok()
    );
    assert_eq!(
        connect_token(&server, &rs256(claims("jwks-user"), Some("unknown-kid")))
            .await
            .err(),
        Some(4001)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let mut s = auth_settings();
    s.max_connections_per_user = Some(2);
    let server = start_with(s).await;
    let token = hs256(claims("busy"));
    let a = connect_token(&server, &token).await.unwrap();
    let _b = connect_token(&server, &token).await.unwrap();
    assert_eq!(connect_token(&server, &token).await.err(), Some(4030));
    assert!(
        connect_token(&server, &hs256(claims("other")))
            .await
            .is_ok()
    );
    drop(a);
    let mut ok = false;
    for _ in 0..50 {
        if connect_token(&server, &token).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a slot frees up when a connection leaves");
    server.shutdown().await;
}

/// Auth required, with both an audience and an issuer configured.
fn strict_settings() -> Settings {
    let mut s = auth_settings();
    s.auth_required = Some(true);
    s.auth_issuer = Some("https://issuer.example".into());
    s
}

/// Present `token` in `?token=` and return the close code and reason.
async fn refused_over_url(server: &TestServer, token: &str) -> (u16, String) {
    let url = format!("{}?token={token}", server.url("/ws"));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut c = Client {
        ws,
        id: String::new(),
    };
    c.expect_close_frame().await
}

/// Present `token` in a first `auth` frame and return the close code and
/// reason.
async fn refused_over_frame(server: &TestServer, token: &str) -> (u16, String) {
    let (ws, _) = tokio_tungstenite::connect_async(server.url("/ws"))
        .await
        .unwrap();
    let mut c = Client {
        ws,
        id: String::new(),
    };
    c.send(json!({"type":"auth","token":token})).await;
    c.expect_close_frame().await
}

#[tokio::test]
async fn a_configured_audience_and_issuer_are_required() {
    let server = start_with(strict_settings()).await;
    let good = json!({"sub":"strict", "exp": now() + 600, "aud":"switchboard",
                      "iss":"https://issuer.example"});
    assert!(connect_token(&server, &hs256(good.clone())).await.is_ok());
    for (claim, reason) in [
        ("aud", "invalid_token: missing claim aud"),
        ("iss", "invalid_token: missing claim iss"),
    ] {
        let mut without = good.clone();
        without.as_object_mut().unwrap().remove(claim);
        let token = hs256(without);
        assert_eq!(
            refused_over_url(&server, &token).await,
            (4001, reason.to_string())
        );
        assert_eq!(
            refused_over_frame(&server, &token).await,
            (4001, reason.to_string())
        );
    }
    let mut other_service = good.clone();
    other_service["iss"] = json!("https://someone-else.example");
    let token = hs256(other_service);
    let wrong = (4001, "invalid_token: wrong issuer".to_string());
    assert_eq!(refused_over_url(&server, &token).await, wrong);
    assert_eq!(refused_over_frame(&server, &token).await, wrong);
    server.shutdown().await;
}

#[tokio::test]
async fn refusals_give_a_short_stable_reason() {
    let server = start_with(strict_settings()).await;
    let base = json!({"sub":"x", "exp": now() + 600, "aud":"switchboard",
                      "iss":"https://issuer.example"});
    let mut wrong_type = base.clone();
    wrong_type["sub"] = json!(42);
    let mut expired = base.clone();
    expired["exp"] = json!(now() - 3600);
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &base,
        &EncodingKey::from_secret(b"not-the-secret-at-all-000"),
    )
    .unwrap();
    for (token, want) in [
        (
            "not.a.jwt".to_string(),
            (4001, "invalid_token: malformed token"),
        ),
        (hs256(wrong_type), (4001, "invalid_token: invalid token")),
        (forged, (4001, "invalid_token: bad signature")),
        (
            hs256(expired),
            (4003, "token_expired: the token has expired"),
        ),
    ] {
        let want = (want.0, want.1.to_string());
        assert_eq!(refused_over_url(&server, &token).await, want);
        assert_eq!(refused_over_frame(&server, &token).await, want);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn direct_to_a_user_needs_a_grant() {
    let server = start_with(auth_settings()).await;
    let mut support = connect_token(&server, &hs256(claims("support")))
        .await
        .unwrap();
    let mut granted = claims("alice");
    granted["direct"] = json!(["supp*"]);
    let mut alice = connect_token(&server, &hs256(granted)).await.unwrap();
    let mut bob = connect_token(&server, &hs256(claims("bob"))).await.unwrap();
    let mut anon = Client::connect(&server).await;

    let ack = alice
        .request(json!({"type":"direct","userId":"support","data":"help"}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let d = support.recv_type("direct").await;
    assert_eq!(
        (d["data"].as_str(), d["senderId"].as_str()),
        (Some("help"), Some(&*alice.id))
    );
    // Not granted: another user, no `direct` claim, anonymous.
    for (c, target) in [
        (&mut alice, "bob"),
        (&mut bob, "support"),
        (&mut anon, "support"),
    ] {
        let e = c
            .request(json!({"type":"direct","userId":target,"data":"x"}), 2)
            .await;
        assert_eq!(e["code"], "permission_denied", "{e}");
    }
    // A client id needs no grant (client_direct is on).
    let ack = anon
        .request(
            json!({"type":"direct","targetId":support.id,"data":"hi"}),
            3,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(support.recv_type("direct").await["data"], "hi");
    server.shutdown().await;
}

#[tokio::test]
async fn a_refresh_with_narrower_grants_unsubscribes() {
    let server = start_with(auth_settings()).await;
    let mut c = connect_token(&server, &hs256(claims("narrow")))
        .await
        .unwrap();
    for (i, ch) in ["private:a", "private:b", "open"].iter().enumerate() {
        let r = c
            .request(json!({"type":"subscribe","channel":ch}), i as u64)
            .await;
        assert_eq!(r["type"], "subscribed", "{r}");
    }
    let mut narrower = claims("narrow");
    narrower["channels"]["subscribe"] = json!(["private:a"]);
    c.send(json!({"type":"auth","token":hs256(narrower),"id":9}))
        .await;
    let gone = c.recv_type("unsubscribed").await;
    assert_eq!(gone["channel"], "private:b");
    assert!(gone.get("ref").is_none_or(Value::is_null), "{gone}");
    let ok = c.recv().await;
    assert_eq!(
        (ok["type"].as_str(), ok["ref"].as_u64()),
        (Some("authenticated"), Some(9))
    );
    assert_eq!(server.node.hub().subscriber_count("private:b"), 0);
    assert_eq!(server.node.hub().subscriber_count("private:a"), 1);
    assert_eq!(
        server.node.hub().subscriber_count("open"),
        1,
        "anonymous namespace: kept"
    );
    // Still served where it is still granted.
    let mut grant = claims("pub");
    grant["channels"]["publish"] = json!(["private:*"]);
    let mut publisher = connect_token(&server, &hs256(grant)).await.unwrap();
    let ack = publisher
        .request(
            json!({"type":"publish","channel":"private:a","data":"still"}),
            1,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(c.recv_type("message").await["data"], "still");
    server.shutdown().await;
}
