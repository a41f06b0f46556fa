//! Random identifiers: client ids, epochs, instance ids, bus tokens.

/// `n` random characters of `[0-9a-z]`.
pub fn random_base36(n: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..n)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

/// Length of an instance's tag: the first characters of the random part of
/// every client id it gives (36⁴ ≈ 1.7 M tags).
pub const TAG_LEN: usize = 4;

/// A client id in the tutorial's form, `client-<ms>-<9 base36>`, whose
/// nine characters start with `tag` (the instance holding the client, see
/// [`tag_of`]) followed by random ones. The buses route a direct message by
/// this tag, so nothing per client has to be written on the bus.
pub fn client_id(now_ms: u64, tag: &str) -> std::sync::Arc<str> {
    debug_assert_eq!(tag.len(), TAG_LEN);
    format!("client-{now_ms}-{tag}{}", random_base36(9 - TAG_LEN)).into()
}

/// The instance tag of a client id given by [`client_id`]; `None` for an
/// id of another form (a made-up or foreign target).
pub fn tag_of(client_id: &str) -> Option<&str> {
    let rest = client_id.strip_prefix("client-")?;
    let (ms, random) = rest.split_once('-')?;
    let base36 = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if random.len() != 9 || !base36(random) {
        return None;
    }
    Some(&random[..TAG_LEN])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_carry_their_instance_tag() {
        let id = client_id(1_700_000_000_000, "ab12");
        assert!(id.starts_with("client-1700000000000-ab12"), "{id}");
        assert_eq!(id.len(), "client-1700000000000-".len() + 9);
        assert_eq!(tag_of(&id), Some("ab12"));
        for bad in [
            "",
            "client-",
            "client-12-abc",
            "client--abcdefghi",
            "client-12-ABCDEFGHI",
            "client-1x-abcdefghi",
            "user-12-abcdefghi",
            "client-12-abcdefghij",
        ] {
            assert_eq!(tag_of(bad), None, "{bad}");
        }
    }
}
