//! Unit tests of permessage-deflate: the shared configurations and helpers;
//! negotiation, compression and the reference decoder are in the files
//! below.

mod compression;
mod negotiation;
mod puff;

use super::*;

const OFF: DeflateConfig = DeflateConfig {
    context_takeover: false,
    level: 1,
    threshold: 0,
};
const ON: DeflateConfig = DeflateConfig {
    context_takeover: true,
    level: 1,
    threshold: 0,
};

const BOTH_NCT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn neg(offer: &str, cfg: &DeflateConfig) -> Option<Agreed> {
    negotiate([offer], cfg)
}

fn agreed(snct: bool, cnct: bool, sbits: u8, cbits: u8, offered: bool) -> Agreed {
    Agreed {
        server_no_context_takeover: snct,
        client_no_context_takeover: cnct,
        server_max_window_bits: sbits,
        client_max_window_bits: cbits,
        server_max_window_bits_offered: offered,
    }
}

/// Deterministic pseudo-random bytes (xorshift).
fn random(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn repetitive(n: usize) -> Vec<u8> {
    let line =
        br#"{"type":"broadcast","channel":"lobby","data":{"user":"ada","text":"hello, world"}}"#;
    line.iter().copied().cycle().take(n).collect()
}

fn conn(a: Agreed, cfg: &DeflateConfig) -> Deflate {
    Deflate::new(a, cfg)
}

fn compress(d: &mut Deflate, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    d.compress(payload, &mut out);
    out
}

/// A plain zlib raw inflate of a message with `bits` window bits.
fn inflate_bits(data: &[u8], bits: u8) -> Result<Vec<u8>, flate2::DecompressError> {
    let mut d = Decompress::new_with_window_bits(false, bits);
    let input = [data, &TAIL[..]].concat();
    let mut out = Vec::with_capacity(data.len() * 8 + 1024);
    loop {
        let i = d.total_in() as usize;
        d.decompress_vec(&input[i..], &mut out, FlushDecompress::Sync)?;
        if d.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(out.capacity());
    }
}
