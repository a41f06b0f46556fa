//! Unit tests of the Redis bus that need no Redis: key and topic names,
//! hash slots and cluster URLs (the reconnection backoff is tested in
//! `broker::retry`). The bus itself is tested against a Redis server by
//! `tests/bus_redis.rs`, and against a Redis Cluster by
//! `tests/bus_redis_cluster.rs`.

use super::*;

#[test]
fn topics_round_trip_channel_names() {
    let k = Keys::new("p", false);
    let t = k.topic("chat:room/1");
    assert_eq!(t, "p:ch:{chat:room/1}");
    assert_eq!(k.channel_of(&t), Some("chat:room/1"));
    assert_eq!(k.channel_of("p:all"), None);
    assert_eq!(k.meta("c"), "p:ch:{c}:meta");
}

#[test]
fn key_slots_follow_redis_hash_tags() {
    // Values from `CLUSTER KEYSLOT` of Redis 7.
    assert_eq!(cluster::key_slot("foo"), 12182);
    assert_eq!(cluster::key_slot("bar"), 5061);
    assert_eq!(cluster::key_slot("{foo}.x"), 12182);
    assert_ne!(cluster::key_slot("{}foo"), cluster::key_slot("{}bar"));
    // A channel's keys, its topic and its generator share one slot.
    let k = Keys::new("p", true);
    let slot = cluster::key_slot(&k.meta("chat:1"));
    for key in [
        k.stream("chat:1"),
        k.topic("chat:1"),
        k.idempotency("chat:1", "x"),
        k.members("chat:1"),
        k.expiry("chat:1"),
        k.generation("chat:1"),
    ] {
        assert_eq!(cluster::key_slot(&key), slot, "{key}");
    }
    assert_eq!(k.publish_cmd(), "SPUBLISH");
    // One Redis keeps its single generator.
    assert_eq!(Keys::new("p", false).generation("chat:1"), "p:gen");
}

#[test]
fn every_slot_has_a_tag() {
    let tags = cluster::slot_tags();
    assert_eq!(tags.len(), usize::from(cluster::SLOTS));
    for (slot, tag) in tags.iter().enumerate() {
        assert_eq!(usize::from(cluster::key_slot(tag)), slot, "{tag}");
    }
}

#[test]
fn cluster_urls_name_their_seed_nodes() {
    assert!(cluster::is_cluster_url("redis+cluster://h:1"));
    assert!(!cluster::is_cluster_url("redis://h:1"));
    assert_eq!(
        cluster::seed_nodes("redis+cluster://a:7000,b:7001/").unwrap(),
        ["redis://a:7000/?protocol=3", "redis://b:7001/?protocol=3"]
    );
    assert_eq!(
        cluster::seed_nodes("rediss+cluster://u:pw@a:7000,b:7001").unwrap(),
        [
            "rediss://u:pw@a:7000/?protocol=3",
            "rediss://u:pw@b:7001/?protocol=3"
        ]
    );
    for bad in [
        "redis+cluster://a",
        "redis+cluster://a:x",
        "redis+cluster://a:1/2",
        "redis+cluster://:1",
        "redis://a:1",
    ] {
        assert!(cluster::seed_nodes(bad).is_err(), "{bad}");
    }
}
