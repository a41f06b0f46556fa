//! The client side of permessage-deflate (RFC 7692) for raw-socket tests:
//! compressing with flate2, inflating the server's messages, and the
//! parameters the server agreed to.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// What a sync flush ends with (RFC 7692 §7.2.1).
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// `data` compressed by `c` (continuing its stream) with a sync flush, the
/// trailing `00 00 FF FF` removed (RFC 7692 §7.2.1).
pub fn deflate_with(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let start = c.total_in();
    loop {
        let used = (c.total_in() - start) as usize;
        c.compress_vec(&data[used..], &mut out, FlushCompress::Sync)
            .expect("deflate");
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    assert!(out.ends_with(&TAIL), "a sync flush ends with 00 00 FF FF");
    out.truncate(out.len() - TAIL.len());
    out
}

/// `data` as one self-contained permessage-deflate payload.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    deflate_with(&mut Compress::new(Compression::default(), false), data)
}

/// Inflate one message payload with `d` (continuing its stream): append
/// `00 00 FF FF` and raw-inflate (RFC 7692 §7.2.2). At most 16 MiB.
///
/// zlib-rs inflates with a 32 KiB window whatever window bits it is given,
/// so a window size agreed below 15 bits is checked by the compressed size
/// instead (see `far_repeat` in `tests/compression.rs`).
pub fn inflate_with(d: &mut Decompress, payload: &[u8]) -> Result<Vec<u8>, String> {
    const CHUNK: usize = 4096;
    let mut input = payload.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::new();
    let mut chunk = [0u8; CHUNK];
    let mut pos = 0;
    loop {
        let (in_before, out_before) = (d.total_in(), d.total_out());
        d.decompress(&input[pos..], &mut chunk, FlushDecompress::Sync)
            .map_err(|e| format!("inflate failed after {} bytes: {e}", out.len()))?;
        let used = (d.total_in() - in_before) as usize;
        let made = (d.total_out() - out_before) as usize;
        pos += used;
        out.extend_from_slice(&chunk[..made]);
        if pos == input.len() && made < CHUNK {
            return Ok(out);
        }
        if used == 0 && made == 0 {
            return Err(format!(
                "inflate made no progress ({pos} of {} input bytes used)",
                input.len()
            ));
        }
        if out.len() > 16 << 20 {
            return Err("inflated beyond 16 MiB".into());
        }
    }
}

/// The permessage-deflate parameters the server agreed to, from its
/// response header.
#[derive(Debug)]
pub struct Agreed {
    pub server_no_context_takeover: bool,
    pub server_max_window_bits: u8,
}

impl Agreed {
    pub fn parse(header: &str) -> Agreed {
        let mut params = header.split(';').map(str::trim);
        assert_eq!(params.next(), Some("permessage-deflate"), "{header}");
        let mut agreed = Agreed {
            server_no_context_takeover: false,
            server_max_window_bits: 15,
        };
        for p in params {
            match p.split_once('=') {
                None if p == "server_no_context_takeover" => {
                    agreed.server_no_context_takeover = true
                }
                None if p == "client_no_context_takeover" => {}
                Some(("server_max_window_bits", v)) => {
                    agreed.server_max_window_bits = v.trim_matches('"').parse().unwrap()
                }
                Some(("client_max_window_bits", _)) => {}
                _ => panic!("unexpected parameter {p:?} in {header:?}"),
            }
        }
        agreed
    }
}
