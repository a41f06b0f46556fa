//! WebSocket frames for raw-socket tests (`tests/ws_frames.rs`,
//! `tests/compression.rs`, through `raw_ws`): building client frames, and
//! parsing the server's with RFC 6455 checks on every frame.

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

// ---------------------------------------------------------------------------
// Server frames: parsing, with RFC 6455 checks on every frame
// ---------------------------------------------------------------------------

/// One frame as the server sent it (the parser checks that it is not
/// masked and has no RSV bit it may not have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a compressed message (only with permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
    /// The whole frame, header included, as it came over the wire.
    pub wire: Vec<u8>,
}

/// Whether a server may put `code` in a close frame (RFC 6455 §7.4; 1012 to
/// 1014 are registered with IANA since).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parse the frame at the front of `buf`; `None` while it is incomplete.
/// Panics when the server's frame breaks RFC 6455, including any RSV bit
/// (no extension negotiated).
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    parse_server_frame_with(buf, false)
}

/// [`parse_server_frame`], where `deflate` says whether permessage-deflate
/// was agreed: then RSV1 may be set on the first frame of a data message
/// (and is kept in [`Frame::rsv1`]), never on a continuation or control
/// frame (RFC 7692 §6); RSV2 and RSV3 never.
pub fn parse_server_frame_with(buf: &[u8], deflate: bool) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if deflate {
        assert_eq!(
            b0 & (RSV2 | RSV3),
            0,
            "server frame has RSV2/RSV3 set ({b0:#04x})"
        );
    } else {
        assert_eq!(
            b0 & (RSV1 | RSV2 | RSV3),
            0,
            "server frame has RSV bits set (first byte {b0:#04x}); no extension was negotiated (RFC 6455 §5.2)"
        );
    }
    assert_eq!(
        b1 & 0x80,
        0,
        "server frame is masked (RFC 6455 §5.1: a server MUST NOT mask)"
    );
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    assert!(
        matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG),
        "server frame has reserved opcode {opcode:#x}"
    );
    let (len, header_len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            let len = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            assert!(
                len >= 126,
                "server used a 16-bit length for {len} bytes (RFC 6455 §5.2: minimal encoding)"
            );
            (len, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            assert_eq!(len >> 63, 0, "server 64-bit length has its top bit set");
            assert!(
                len > 0xFFFF,
                "server used a 64-bit length for {len} bytes (RFC 6455 §5.2: minimal encoding)"
            );
            (len, 10)
        }
        len => (u64::from(len), 2),
    };
    if opcode >= CLOSE {
        assert!(
            fin,
            "server sent a fragmented control frame (RFC 6455 §5.5)"
        );
        assert!(
            len <= 125,
            "server sent a control frame of {len} bytes (RFC 6455 §5.5)"
        );
    }
    let total = header_len + usize::try_from(len).expect("frame length fits in memory");
    if buf.len() < total {
        return None;
    }
    let payload = buf[header_len..total].to_vec();
    if opcode == CLOSE {
        assert_ne!(
            payload.len(),
            1,
            "server close frame has a 1-byte payload (RFC 6455 §5.5.1)"
        );
        if payload.len() >= 2 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            assert!(
                valid_close_code(code),
                "server sent close code {code}, which may not be sent (RFC 6455 §7.4)"
            );
            assert!(
                std::str::from_utf8(&payload[2..]).is_ok(),
                "server close reason is not UTF-8 (RFC 6455 §5.5.1)"
            );
        }
    }
    let rsv1 = b0 & RSV1 != 0;
    if rsv1 {
        assert_ne!(
            opcode, CONTINUATION,
            "server set RSV1 on a continuation frame"
        );
        assert!(opcode < CLOSE, "RSV1 on a control frame");
    }
    Some((
        Frame {
            fin,
            rsv1,
            opcode,
            payload,
            wire: buf[..total].to_vec(),
        },
        total,
    ))
}

/// A complete server message (fragments reassembled) or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Vec<u8>),
}

/// What reading from the server produced.
#[derive(Debug)]
pub enum Event {
    Msg(Msg),
    /// The TCP connection ended (EOF, or the error that ended it).
    Closed(String),
    /// Nothing complete arrived in time.
    TimedOut,
}

pub fn data_message(opcode: u8, data: Vec<u8>) -> Msg {
    if opcode == TEXT {
        Msg::Text(
            String::from_utf8(data).expect("server text message is valid UTF-8 (RFC 6455 §5.6)"),
        )
    } else {
        Msg::Binary(data)
    }
}
