//! Unit tests of the Redis bus that need no Redis: key and topic names,
//! the reconnection backoff. The bus itself is tested against a Redis
//! server by `tests/bus_redis.rs`.

use super::supervise::{BACKOFF_MAX, BACKOFF_MIN, backoff};
use super::*;

#[test]
fn topics_round_trip_channel_names() {
    let k = Keys::new("p", "i1");
    let t = k.topic("chat:room/1");
    assert_eq!(t, "p:ch:{chat:room/1}");
    assert_eq!(k.channel_of(&t), Some("chat:room/1"));
    assert_eq!(k.channel_of("p:all"), None);
    assert_eq!(k.meta("c"), "p:ch:{c}:meta");
}

#[test]
fn backoff_grows_and_is_capped() {
    for attempt in 0..20 {
        let d = backoff(attempt);
        assert!(
            d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX.mul_f64(1.5),
            "{d:?}"
        );
    }
}
