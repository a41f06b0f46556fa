//! Client-side WebSocket frame building for raw-socket tests
//! (`tests/ws_frames.rs`, `tests/compression.rs`).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

pub const RSV1: u8 = 0x40;
pub const RSV2: u8 = 0x20;
pub const RSV3: u8 = 0x10;

/// A random 64-bit number (std only: a fresh `RandomState` per call).
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A random, non-zero masking key.
pub fn random_mask() -> [u8; 4] {
    loop {
        let m = (random_u64() as u32).to_be_bytes();
        if m != [0; 4] {
            return m;
        }
    }
}

/// A frame header declaring `len` payload bytes (minimal length encoding),
/// with the masking key if `mask` is given. `rsv` is OR-ed into the first
/// byte (`RSV1 | RSV2 | RSV3`); `opcode` is taken as is, reserved ones too.
pub fn frame_header(fin: bool, rsv: u8, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | rsv | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xFFFF {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
    out
}

/// A complete client frame, masked with a random key.
pub fn masked_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = random_mask();
    let mut out = frame_header(fin, rsv, opcode, payload.len() as u64, Some(mask));
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A complete frame without a mask (illegal from a client, RFC 6455 §5.1).
pub fn unmasked_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_header(fin, rsv, opcode, payload.len() as u64, None);
    out.extend_from_slice(payload);
    out
}

/// A close frame payload: the code, big-endian, then the reason bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}
