//! Unit tests of the parts that need no Pub/Sub server: the project spec,
//! the gossip's version order, de-duplication and the wire envelope (the
//! bus itself is tested against the emulator in `tests/bus_pubsub.rs`).

use tokio::time::Instant;

use super::presence::Remote;
use super::supervise::{Seen, parse_project};
use super::*;

fn info(id: &str) -> ClientInfo {
    ClientInfo {
        client_id: id.into(),
        user_id: None,
        name: None,
    }
}

fn present(r: &Remote, ch: &str) -> Vec<String> {
    let mut v: Vec<String> = r
        .members
        .get(ch)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| e.info.is_some())
                .map(|(k, _)| k.to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn project_spec_parses_the_emulator_override() {
    assert_eq!(parse_project("p"), ("p".into(), None));
    assert_eq!(
        parse_project("p?emulator=127.0.0.1:9"),
        ("p".into(), Some("127.0.0.1:9".into()))
    );
}

#[test]
fn late_deltas_and_snapshots_never_undo_newer_ones() {
    let mut r = Remote::new("b".into());
    // add(1), remove(2) arrive reversed: the member stays removed.
    r.apply_delta(2, Some("c".into()), info("x"), false);
    r.apply_delta(1, Some("c".into()), info("x"), true);
    assert!(present(&r, "c").is_empty());
    // A snapshot at 3 with y; a late delta at 3 or older is ignored.
    r.apply_snapshot(
        3,
        vec![],
        vec![("c".into(), vec![info("y")])],
        vec![],
        vec![],
    );
    r.apply_delta(3, Some("c".into()), info("y"), false);
    assert_eq!(present(&r, "c"), vec!["y"]);
    // A newer delta that arrived before an older snapshot wins.
    r.apply_delta(5, Some("c".into()), info("z"), true);
    r.apply_snapshot(
        4,
        vec![],
        vec![("c".into(), vec![info("y")])],
        vec![],
        vec![],
    );
    assert_eq!(present(&r, "c"), vec!["y", "z"]);
    // A stale snapshot is ignored.
    r.apply_snapshot(2, vec![], vec![], vec![], vec![]);
    assert_eq!(present(&r, "c"), vec!["y", "z"]);
    // A snapshot drops what it no longer lists (up to its version).
    r.apply_snapshot(
        6,
        vec![],
        vec![("c".into(), vec![info("z")])],
        vec![],
        vec![],
    );
    assert_eq!(present(&r, "c"), vec!["z"]);
}

#[test]
fn dedupe_remembers_names() {
    let mut s = Seen::default();
    let now = Instant::now();
    assert!(s.insert(("b".into(), 1), now));
    assert!(!s.insert(("b".into(), 1), now));
    assert!(s.insert(("c".into(), 1), now));
}

#[test]
fn wire_keeps_raw_payloads() {
    let w = Wire {
        src: "i".into(),
        boot: "b".into(),
        id: 7,
        body: Body::Pub {
            channel: "ch".into(),
            data: serde_json::from_str::<Box<serde_json::value::RawValue>>(r#"{"a": [1, 2]}"#)
                .unwrap()
                .into(),
            sender_id: None,
            timestamp: 1,
            size: 10,
            ttl_ms: 1000,
        },
    };
    let bytes = serde_json::to_vec(&w).unwrap();
    let back: Wire = serde_json::from_slice(&bytes).unwrap();
    match back.body {
        Body::Pub { data, .. } => assert_eq!(data.get(), r#"{"a": [1, 2]}"#),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sequencer_adverts_follow_the_gossip_order() {
    let mut r = Remote::new("b".into());
    // Released (3) before the claim (2) arrives: stays released.
    r.apply_sequences(3, "c".into(), None);
    r.apply_sequences(2, "c".into(), Some("e1".into()));
    assert_eq!(r.sequences.get("c").and_then(|(_, e)| e.clone()), None);
    // A snapshot at 5 lists it: sequenced again, older deltas ignored.
    r.apply_snapshot(5, vec![], vec![], vec![("c".into(), "e2".into())], vec![]);
    r.apply_sequences(4, "c".into(), None);
    assert_eq!(
        r.sequences.get("c").and_then(|(_, e)| e.clone()).as_deref(),
        Some("e2")
    );
    // A later snapshot without it: gone.
    r.apply_snapshot(6, vec![], vec![], vec![], vec![]);
    assert!(!r.sequences.contains_key("c"));
}

#[test]
fn only_another_boots_renames_are_leftovers() {
    use super::stall::leftover_rename;
    let mine = "aaaaaaaaaaaa";
    let base = "sub-c3";
    assert!(leftover_rename("sub-c3-rzzzzzzzzzzzz1", base, mine));
    assert!(leftover_rename("sub-c3-r0123456789ab12", base, mine));
    // This process's own renames, the configured name, another shard's,
    // and names that only look alike are kept.
    assert!(!leftover_rename("sub-c3-raaaaaaaaaaaa1", base, mine));
    assert!(!leftover_rename("sub-c3", base, mine));
    assert!(!leftover_rename("sub-c4-rzzzzzzzzzzzz1", base, mine));
    assert!(!leftover_rename("sub-c3-rzzzzzzzzzzzz", base, mine));
    assert!(!leftover_rename("sub-c3-rzzzzzzzzzzzz1-c3", base, mine));
    assert!(!leftover_rename("sub-c3-rZZZZZZZZZZZZ1", base, mine));
    assert!(!leftover_rename("sub-c3-rx", base, mine));
    assert!(!leftover_rename("sub-c3-r1-c3", base, mine));
}
