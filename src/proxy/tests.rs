//! The answer bodies the backend may give, and the ones that are failures.

use super::answer::parse;
use super::*;

#[test]
fn each_answer_is_read() {
    let a: Answer<DataResult> = parse(br#"{"result":{"data":{"text":"hi"}}}"#).unwrap();
    assert!(
        matches!(a, Answer::Result(DataResult { data: Some(d) }) if d.get() == r#"{"text":"hi"}"#)
    );
    let a: Answer<Empty> = parse(br#"{"result":{}}"#).unwrap();
    assert!(matches!(a, Answer::Result(_)));
    let a: Answer<Empty> = parse(br#"{"error":{"code":"forbidden","message":"no"}}"#).unwrap();
    assert!(matches!(a, Answer::Refused(r) if r.code == "forbidden" && r.message == "no"));
    let a: Answer<Empty> = parse(br#"{"disconnect":{"code":4100,"reason":"banned"}}"#).unwrap();
    assert!(matches!(a, Answer::Disconnect(c) if c.code == Some(4100) && c.reason == "banned"));
    let a: Answer<ConnectResult> = parse(
        br#"{"result":{"userId":"u1","grants":{"subscribe":["chat:*"]},"data":[1],"channels":["news"],"expiresAt":9}}"#,
    )
    .unwrap();
    let Answer::Result(c) = a else { panic!() };
    assert_eq!(
        (c.user_id.as_str(), c.channels, c.expires_at),
        ("u1", vec!["news".to_string()], Some(9))
    );
    assert_eq!(c.grants.unwrap().subscribe, vec!["chat:*"]);
}

#[test]
fn anything_else_is_a_failure() {
    for body in [
        &b"not json"[..],
        b"",
        b"{}",
        b"[]",
        br#"{"result":{},"error":{"code":"x"}}"#,
        br#"{"error":{"code":""}}"#,
        br#"{"error":{"code":"has space"}}"#,
        br#"{"disconnect":{"code":1000,"reason":"x"}}"#,
        br#"{"disconnect":{"code":5000}}"#,
        br#"{"result":{"surprise":1}}"#,
        br#"{"other":1}"#,
    ] {
        assert!(
            parse::<Empty>(body).is_err(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // connect needs a userId
    assert!(parse::<ConnectResult>(br#"{"result":{}}"#).is_err());
}

#[test]
fn long_texts_are_cut_at_a_character_boundary() {
    let reason = "é".repeat(100);
    let body = format!(r#"{{"disconnect":{{"code":4000,"reason":"{reason}"}}}}"#);
    let Answer::Disconnect(c) = parse::<Empty>(body.as_bytes()).unwrap() else {
        panic!()
    };
    assert!(c.reason.len() <= 123 && c.reason.chars().all(|ch| ch == 'é'));
}

#[test]
fn the_request_body_leaves_out_what_a_kind_lacks() {
    let mut r = Request::new(Kind::Subscribe, "c1", "i1", "websocket", None);
    r.channel = Some("chat:a");
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(
        json,
        r#"{"kind":"subscribe","clientId":"c1","instanceId":"i1","transport":"websocket","userId":null,"channel":"chat:a"}"#
    );
}

#[test]
fn header_names_are_checked_and_lower_cased() {
    assert_eq!(
        parse_headers(vec![
            "Cookie".into(),
            " Authorization ".into(),
            "cookie".into()
        ])
        .unwrap(),
        vec!["cookie", "authorization"]
    );
    assert!(parse_headers(vec!["bad header".into()]).is_err());
    assert!(parse_url("proxy_rpc_url", Some("ftp://x".into())).is_err());
    assert!(
        parse_url("proxy_rpc_url", Some("http://127.0.0.1:1/rpc".into()))
            .unwrap()
            .is_some()
    );
}
