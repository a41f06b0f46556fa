//! Property-based fuzzing of the two parsers that read untrusted input:
//! the frame → request parser and the token verifier. They must never
//! panic, and must answer every input with a result or a documented code.
//!
//! Runs 256 cases per property in the normal test run; for a longer run:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release --test fuzz_parsers
//! ```
//!
//! (cargo-fuzz needs a nightly toolchain, which these machines do not
//! have; proptest runs on stable and shrinks failures to a minimal input.)

use proptest::prelude::*;
use serde_json::{Value, json};
use switchboard::auth::{AuthConfig, Authenticator};
use switchboard::protocol::{RequestKind, parse_request};

const CODES: &[&str] = &["invalid_json", "invalid_frame", "unknown_type"];
/// Every request type, and one that does not exist.
fn types() -> Vec<&'static str> {
    let mut t = RequestKind::TYPES.to_vec();
    t.push("nope");
    t
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped like requests: a known or unknown type, and fields of
/// any JSON type.
fn request_like() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(types()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(ty, id, data, channel, since, target)| {
            let mut v = json!({"type": ty});
            for (k, f) in [
                ("id", id),
                ("data", data),
                ("channel", channel),
                ("since", since),
                ("targetId", target),
            ] {
                if let Some(f) = f {
                    v[k] = f;
                }
            }
            v
        })
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,256}") {
        if let Err(e) = parse_request(&text) {
            prop_assert!(CODES.contains(&e.error.code.as_str()), "{}", e.error.code);
        }
    }

    #[test]
    fn arbitrary_bytes_as_utf8_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_request(&text);
    }

    #[test]
    fn request_shaped_objects_parse_or_get_a_code(v in request_like()) {
        let text = v.to_string();
        match parse_request(&text) {
            Ok(req) => {
                // What parsed is what was sent.
                if let RequestKind::Subscribe { channel, .. } = &req.kind {
                    prop_assert_eq!(Some(channel.as_str()), v["channel"].as_str());
                }
                if let Some(id) = req.id {
                    // The id is carried as the very text that was sent.
                    prop_assert_eq!(id.get(), v["id"].to_string());
                }
            }
            Err(e) => {
                prop_assert!(CODES.contains(&e.error.code.as_str()));
                prop_assert!(e.error.code.as_str() != "invalid_json", "valid JSON was called invalid");
                if v["type"] == "nope" {
                    prop_assert_eq!(e.error.code.as_str(), "unknown_type");
                }
            }
        }
    }

    #[test]
    fn tokens_never_panic_and_never_verify_when_mangled(
        junk in "[A-Za-z0-9_.=-]{0,300}",
        cut in 0usize..200,
        flip in any::<u8>(),
    ) {
        let auth = authenticator();
        prop_assert!(auth.verify(&junk).is_err());
        let good = token();
        prop_assert!(auth.verify(&good).is_ok());
        let mut bytes = good.into_bytes();
        let at = cut % bytes.len();
        let replacement = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[flip as usize % 64];
        if bytes[at] != replacement && bytes[at] != b'.' {
            bytes[at] = replacement;
            let mangled = String::from_utf8(bytes).unwrap();
            // Changing a base64url character of the header, payload or
            // signature must not produce a token that verifies — unless it
            // only touched padding bits of the last character, which
            // decode to the same bytes.
            if let Ok(id) = auth.verify(&mangled) {
                prop_assert_eq!(&*id.user_id, "fuzz-user");
            }
        }
    }
}

const SECRET: &str = "fuzz-secret-0123456789abcdef";

fn authenticator() -> Authenticator {
    let path = std::env::temp_dir().join(format!("sb-fuzz-secret-{}", std::process::id()));
    std::fs::write(&path, SECRET).unwrap();
    Authenticator::from_config(&AuthConfig {
        hs256_secret_file: Some(path),
        ..Default::default()
    })
    .unwrap()
    .unwrap()
}

fn token() -> String {
    switchboard::auth::init_crypto();
    let exp = switchboard::protocol::now_ms() / 1000 + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "fuzz-user", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}
