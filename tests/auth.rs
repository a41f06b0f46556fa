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
