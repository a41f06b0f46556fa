//! Compression and inflation: round trips, context takeover, the RFC
//! examples, window bits, and the limits on what a peer may send.

use super::puff::puff;
use super::*;

fn configs() -> Vec<(Agreed, DeflateConfig)> {
    let mut v = Vec::new();
    for (level, offers) in [
        (
            1,
            &[
                "permessage-deflate",
                "permessage-deflate; server_max_window_bits=10",
            ][..],
        ),
        (
            9,
            &[
                "permessage-deflate",
                "permessage-deflate; server_max_window_bits=12",
            ],
        ),
        (0, &["permessage-deflate"]),
    ] {
        for cfg in [
            DeflateConfig { level, ..OFF },
            DeflateConfig { level, ..ON },
        ] {
            for offer in offers {
                v.push((neg(offer, &cfg).unwrap(), cfg));
            }
        }
    }
    v
}

#[test]
fn round_trips() {
    let big = [
        Vec::new(),
        b"Hello".to_vec(),
        random(100_000, 7),
        repetitive(1_000_000),
    ];
    // Slower levels get smaller messages (the tests run unoptimised).
    let small = [
        Vec::new(),
        b"Hello".to_vec(),
        random(10_000, 7),
        repetitive(100_000),
    ];
    for (a, cfg) in configs() {
        let payloads = if cfg.level == 1 { &big } else { &small };
        // The peer: inflates with the takeover we compress with, and
        // compresses with the takeover we inflate with.
        let mut server = conn(a, &cfg);
        let mirrored = Agreed {
            server_no_context_takeover: a.client_no_context_takeover,
            client_no_context_takeover: a.server_no_context_takeover,
            ..a
        };
        let mut peer = conn(mirrored, &cfg);
        for _ in 0..2 {
            for p in payloads {
                let packed = compress(&mut server, p);
                assert!(!packed.ends_with(&TAIL), "{a:?}");
                let got = peer.decompress(&packed, p.len());
                assert!(got.as_ref() == Ok(p), "{a:?} {}", p.len());
                let back = compress(&mut peer, p);
                let got = server.decompress(&back, p.len());
                assert!(got.as_ref() == Ok(p), "{a:?} {}", p.len());
            }
        }
    }
}

#[test]
fn repetitive_compresses_well() {
    let p = repetitive(1_000_000);
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let packed = compress(&mut d, &p);
    assert!(packed.len() < p.len() / 50, "{}", packed.len());
}

#[test]
fn context_takeover_shrinks_second_message() {
    let p = br#"{"type":"broadcast","channel":"prices","data":{"sym":"ACME","bid":101.25,"ask":101.5}}"#;
    let a = neg("permessage-deflate", &ON).unwrap();
    let mut server = conn(a, &ON);
    let mut client = conn(a, &ON);
    let first = compress(&mut server, p);
    let second = compress(&mut server, p);
    assert!(
        second.len() < first.len(),
        "{} vs {}",
        second.len(),
        first.len()
    );
    assert!(second.len() < 10, "{}", second.len());
    assert_eq!(client.decompress(&first, 1000).unwrap(), p);
    assert_eq!(client.decompress(&second, 1000).unwrap(), p);
    assert!(server.compressor.is_some() && client.decompressor.is_some());

    // Without takeover both compress the same.
    let mut fresh = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    assert_eq!(compress(&mut fresh, p), first);
    assert_eq!(compress(&mut fresh, p), first);
    // ...and a fresh inflater cannot read the second takeover message.
    assert_eq!(fresh.decompress(&second, 1000), Err(InflateError::Invalid));
}

#[test]
fn no_state_without_takeover() {
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let packed = compress(&mut d, &repetitive(10_000));
    d.decompress(&packed, 10_000).unwrap();
    assert!(d.compressor.is_none() && d.decompressor.is_none());
    assert!(std::mem::size_of::<Deflate>() <= 48);
}

#[test]
fn lazy_state_with_takeover() {
    let mut d = conn(neg("permessage-deflate", &ON).unwrap(), &ON);
    assert!(d.compressor.is_none() && d.decompressor.is_none());
    let packed = compress(&mut d, b"Hello");
    assert!(d.compressor.is_some() && d.decompressor.is_none());
    d.decompress(&packed, 5).unwrap();
    assert!(d.decompressor.is_some());

    // Takeover only in the direction the client allowed.
    let a = neg("permessage-deflate; client_no_context_takeover", &ON).unwrap();
    let mut d = conn(a, &ON);
    let packed = compress(&mut d, b"Hello");
    d.decompress(&packed, 5).unwrap();
    assert!(d.compressor.is_some() && d.decompressor.is_none());
}

#[test]
fn empty_message() {
    for (a, cfg) in configs() {
        let mut d = conn(a, &cfg);
        for _ in 0..3 {
            let packed = compress(&mut d, b"");
            assert_eq!(packed, [0x00], "{a:?}"); // RFC 7692 §7.2.3.6
        }
        assert_eq!(d.decompress(&[], 0), Ok(Vec::new()));
        assert_eq!(d.decompress(&[0x00], 0), Ok(Vec::new()));
        assert_eq!(d.decompress(&[], 0), Ok(Vec::new()));
        assert_eq!(
            d.decompress(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 5)
                .unwrap(),
            b"Hello"
        );
    }
}

#[test]
fn appends_to_out() {
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let mut out = b"head".to_vec();
    d.compress(b"Hello", &mut out);
    assert_eq!(out, b"head\xf2\x48\xcd\xc9\xc9\x07\x00");
}

#[test]
fn rfc_hello() {
    // RFC 7692 §7.2.3.1.
    const HELLO: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    for level in 1..=9 {
        let cfg = DeflateConfig { level, ..OFF };
        let mut d = conn(neg("permessage-deflate", &cfg).unwrap(), &cfg);
        assert_eq!(compress(&mut d, b"Hello"), HELLO, "level {level}");
        assert_eq!(compress_shared(b"Hello", level), HELLO);
    }
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    assert_eq!(d.decompress(HELLO, 5).unwrap(), b"Hello");
    assert_eq!(d.decompress(HELLO, 4), Err(InflateError::TooBig));
    let mut d = conn(neg("permessage-deflate", &ON).unwrap(), &ON);
    assert_eq!(d.decompress(HELLO, 5).unwrap(), b"Hello");
}

#[test]
fn rfc_other_examples() {
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    for payload in [
        // §7.2.3.3: no compression (a stored block).
        &[
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ][..],
        // §7.2.3.4: a block with BFINAL set, and the same without padding.
        &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
        &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
        // §7.2.3.5: two DEFLATE blocks in one message.
        &[
            0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
        ],
    ] {
        assert_eq!(d.decompress(payload, 5).unwrap(), b"Hello", "{payload:x?}");
        assert_eq!(d.decompress(payload, 4), Err(InflateError::TooBig));
    }
    // More data after a final block is refused, not dropped.
    let extra = [
        0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0xf3, 0x00, 0x11, 0x00, 0x00,
    ];
    assert_eq!(d.decompress(&extra, 100), Err(InflateError::Invalid));
}

#[test]
fn rfc_sharing_window() {
    // RFC 7692 §7.2.3.2: the second "Hello" refers to the first.
    const FIRST: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    const SECOND: &[u8] = &[0xf2, 0x00, 0x11, 0x00, 0x00];
    let a = neg("permessage-deflate", &ON).unwrap();
    let mut d = conn(a, &ON);
    assert_eq!(d.decompress(FIRST, 5).unwrap(), b"Hello");
    assert_eq!(d.decompress(SECOND, 5).unwrap(), b"Hello");
    assert_eq!(d.decompress(SECOND, 5).unwrap(), b"Hello");

    let mut s = conn(a, &ON);
    assert_eq!(compress(&mut s, b"Hello"), FIRST);
    let second = compress(&mut s, b"Hello");
    assert!(second.len() <= 5, "{second:x?}");
    let mut c = conn(a, &ON);
    c.decompress(FIRST, 5).unwrap();
    assert_eq!(c.decompress(&second, 5).unwrap(), b"Hello");

    // Without client context takeover the reference is invalid.
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    assert_eq!(d.decompress(FIRST, 5).unwrap(), b"Hello");
    assert_eq!(d.decompress(SECOND, 5), Err(InflateError::Invalid));
}

#[test]
fn takeover_after_final_block() {
    // A client that ends each message with a final block: the next
    // message may still refer to the previous one's data.
    let mut d = conn(neg("permessage-deflate", &ON).unwrap(), &ON);
    let final_hello = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    assert_eq!(d.decompress(&final_hello, 5).unwrap(), b"Hello");
    assert_eq!(
        d.decompress(&[0xf2, 0x00, 0x11, 0x00, 0x00], 5).unwrap(),
        b"Hello"
    );
    assert_eq!(d.decompress(&final_hello, 5).unwrap(), b"Hello");
}

#[test]
fn shared_equals_per_connection() {
    let payloads = [
        b"Hello".to_vec(),
        repetitive(300),
        repetitive(70_000),
        random(5_000, 3),
    ];
    // Level 0 (stored blocks) is left out: there zlib splits blocks
    // by the room left in the output buffer, so the bytes may differ
    // (each is still valid for every shareable connection).
    for level in 1..=9 {
        let cfg = DeflateConfig { level, ..ON };
        let a = neg("permessage-deflate; server_no_context_takeover", &cfg).unwrap();
        assert!(a.shareable());
        let mut d = conn(a, &cfg);
        let mut other = conn(neg("permessage-deflate", &cfg).unwrap(), &cfg);
        for p in &payloads {
            let shared = compress_shared(p, d.level());
            assert!(shared == compress(&mut d, p), "level {level}");
            // Interleaving other connections' messages changes nothing.
            compress(&mut other, &repetitive(1000));
            assert!(compress_shared(p, level) == shared);
            assert!(compress(&mut d, p) == shared);
            // And a fresh thread (fresh compressor) agrees.
            let q = p.clone();
            let there = std::thread::spawn(move || compress_shared(&q, level));
            assert!(there.join().unwrap() == shared);
        }
    }
}

#[test]
fn output_independent_of_buffer_room() {
    // What makes sharing work: the bytes depend on the message and the
    // level, not on the room in the caller's buffer.
    let payloads = [repetitive(70_000), random(70_000, 1), b"Hello".to_vec()];
    for level in 1..=9 {
        for p in &payloads {
            let shared = compress_shared(p, level);
            for room in [0, 1, 7, 100, 4096, p.len() / 2 + 16, 200_000] {
                let cfg = DeflateConfig { level, ..OFF };
                let mut d = conn(neg("permessage-deflate", &cfg).unwrap(), &cfg);
                let mut out = Vec::with_capacity(room);
                d.compress(p, &mut out);
                assert!(out == shared, "level {level}, room {room}, len {}", p.len());
            }
        }
    }
}

#[test]
fn window_bits_honoured() {
    // Random 300-byte blocks repeated every 1201 bytes: with a 32 KiB
    // window the repeats are references 1201 bytes back.
    let block: Vec<u8> = random(300, 11);
    let mut p = Vec::new();
    for i in 0..40u8 {
        p.extend_from_slice(&block);
        p.push(i);
        p.extend_from_slice(&random(900, u64::from(i) + 100));
    }
    p.extend_from_slice(&repetitive(20_000));
    for level in [1, 9] {
        for bits in [9, 10, 12, 14, 15] {
            for takeover in [false, true] {
                let cfg = DeflateConfig {
                    level,
                    context_takeover: takeover,
                    threshold: 0,
                };
                let offer = format!("permessage-deflate; server_max_window_bits={bits}");
                let a = neg(&offer, &cfg).unwrap();
                assert_eq!(a.server_max_window_bits, bits);
                let mut d = conn(a, &cfg);
                let first = compress(&mut d, &p);
                let (out, longest) = puff(&first, &[]).expect("valid DEFLATE");
                assert!(out == p, "level {level} bits {bits}");
                assert!(longest <= 1 << bits, "level {level} bits {bits}: {longest}");
                if bits == 15 {
                    assert!(longest > 1000, "the test means something: {longest}");
                }
                // A bits-window zlib inflater reads it too.
                assert!(inflate_bits(&first, bits).unwrap() == p);
                // The second message (which may refer to the first).
                let second = compress(&mut d, &p);
                let history = if takeover { &p[..] } else { &[] };
                let (out, longest) = puff(&second, history).expect("valid DEFLATE");
                assert!(
                    out == p && longest <= 1 << bits,
                    "level {level} bits {bits}"
                );
            }
        }
    }
}

#[test]
fn bomb_is_too_big() {
    let zeros = vec![0u8; 10 << 20];
    let packed = compress_shared(&zeros, 9);
    assert!(packed.len() < 20_000, "{}", packed.len());
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let max = 1 << 20;
    assert_eq!(d.decompress(&packed, max), Err(InflateError::TooBig));
    // The buffer never grew past max + 1.
    let mut out = Vec::new();
    let r = with_decompressor(|dec| inflate_into(dec, &packed, max, &mut out));
    assert_eq!(r, Err(InflateError::TooBig));
    assert!(out.capacity() <= max + 1, "{}", out.capacity());
    assert_eq!(out.len(), max + 1);

    // With takeover too.
    let mut d = conn(neg("permessage-deflate", &ON).unwrap(), &ON);
    assert_eq!(d.decompress(&packed, max), Err(InflateError::TooBig));
    // Still usable afterwards (a fresh stream).
    let hello = compress(
        &mut conn(neg("permessage-deflate", &OFF).unwrap(), &OFF),
        b"Hello",
    );
    assert_eq!(d.decompress(&hello, 5).unwrap(), b"Hello");
}

#[test]
fn max_is_inclusive() {
    let p = repetitive(100_000);
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let packed = compress(&mut d, &p);
    assert_eq!(d.decompress(&packed, p.len()).unwrap(), p);
    assert_eq!(
        d.decompress(&packed, p.len() - 1),
        Err(InflateError::TooBig)
    );
    assert_eq!(d.decompress(&packed, 0), Err(InflateError::TooBig));
    assert_eq!(d.decompress(&packed, usize::MAX).unwrap(), p);
    let small = compress(&mut d, b"x");
    assert_eq!(d.decompress(&small, 0), Err(InflateError::TooBig));
    assert_eq!(d.decompress(&small, 1).unwrap(), b"x");
}

#[test]
fn garbage_is_invalid() {
    const HELLO: &[u8] = &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    for cfg in [OFF, ON] {
        for garbage in [
            &[0xff; 32][..],                     // reserved block type
            &[0x07, 0x00],                       // reserved block type
            &[0x00, 0x05, 0x00, 0x00, 0x00],     // stored LEN/NLEN mismatch
            &[0xf2, 0x00, 0x11, 0x00, 0x00],     // distance before the start
            b"this is not deflate data at all!", // invalid codes
        ] {
            let mut d = conn(neg("permessage-deflate", &cfg).unwrap(), &cfg);
            assert_eq!(
                d.decompress(garbage, 1 << 20),
                Err(InflateError::Invalid),
                "{garbage:x?}"
            );
            // The state recovers for the next message.
            assert_eq!(d.decompress(HELLO, 5).unwrap(), b"Hello");
        }
    }
    // The thread-local inflater is reset after an error.
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    assert_eq!(d.decompress(&[0xff; 8], 100), Err(InflateError::Invalid));
    assert_eq!(
        d.decompress(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 5)
            .unwrap(),
        b"Hello"
    );
}

#[test]
fn truncated_message_does_not_panic() {
    let p = random(10_000, 5);
    let mut d = conn(neg("permessage-deflate", &OFF).unwrap(), &OFF);
    let packed = compress(&mut d, &p);
    for cut in [1, 2, 100, packed.len() / 2, packed.len() - 1] {
        // Either an error or some (wrong or partial) output: never more
        // than asked, never a panic.
        if let Ok(out) = d.decompress(&packed[..cut], p.len()) {
            assert!(out.len() <= p.len());
        }
    }
}

#[test]
fn compress_if_smaller_keeps_peers_in_step() {
    let a = neg("permessage-deflate", &ON).unwrap();
    let (mut server, mut client) = (conn(a, &ON), conn(a, &ON));
    let text = repetitive(500);
    let noise = random(500, 9);
    for p in [&text, &noise, &text, &noise, &text] {
        let mut out = b"x".to_vec();
        if server.compress_if_smaller(p, &mut out) {
            assert!(out.len() - 1 < p.len());
            assert_eq!(&client.decompress(&out[1..], 1000).unwrap(), p);
        } else {
            assert_eq!(out, b"x"); // sent uncompressed: the client inflates nothing
            assert!(std::ptr::eq(p, &noise));
        }
    }
    let mut out = Vec::new();
    assert!(!server.compress_if_smaller(b"", &mut out));
    assert!(out.is_empty());
}

#[test]
fn wants_threshold_and_level() {
    let cfg = DeflateConfig {
        context_takeover: false,
        level: 42,
        threshold: 128,
    };
    let d = conn(neg("permessage-deflate", &cfg).unwrap(), &cfg);
    assert!(!d.wants(0) && !d.wants(127));
    assert!(d.wants(128) && d.wants(1 << 20));
    assert_eq!(d.level(), 9);
    assert_eq!(compress_shared(b"Hello", 42), compress_shared(b"Hello", 9));
}
