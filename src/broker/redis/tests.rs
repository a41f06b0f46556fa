//! Unit tests of the Redis bus that need no Redis: key and topic names
//! (the reconnection backoff is tested in `broker::retry`). The bus itself
//! is tested against a Redis server by `tests/bus_redis.rs`.

use super::*;

#[test]
fn topics_round_trip_channel_names() {
    let k = Keys::new("p");
    let t = k.topic("chat:room/1");
    assert_eq!(t, "p:ch:{chat:room/1}");
    assert_eq!(k.channel_of(&t), Some("chat:room/1"));
    assert_eq!(k.channel_of("p:all"), None);
    assert_eq!(k.meta("c"), "p:ch:{c}:meta");
}
