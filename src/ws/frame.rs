//! RFC 6455 framing: decoding client frames, encoding server frames.
//!
//! The [`Decoder`] works on whatever bytes the connection has read, in
//! place (it unmasks the payload where it lies), and keeps between frames
//! only a fragmented message that is still being assembled. It checks
//! everything §5 asks of a server: masking, reserved bits and opcodes,
//! control-frame rules, fragmentation order, UTF-8 of text (incrementally,
//! so an invalid fragment fails at once), close codes, and the message
//! size limit (from the header, before the payload has arrived).

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;

use super::Error;
use super::deflate::{Deflate, InflateError};
use crate::error::close;

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Close code for a protocol violation (RFC 6455 §7.4.1).
pub const PROTOCOL_ERROR: u16 = 1002;
/// Close code for a text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;

/// A message being assembled from fragments.
struct Partial {
    /// Text (checked as UTF-8) or binary.
    text: bool,
    /// RSV1 was set on the first frame: the whole message is deflated.
    compressed: bool,
    /// The payload so far (compressed, if `compressed`).
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8 (uncompressed text).
    valid: usize,
}

/// What one call to [`Decoder::decode`] found.
pub(crate) enum Decoded {
    /// The bytes do not yet hold a whole frame.
    Incomplete,
    /// A frame of `len` bytes was consumed; `msg` is the message it
    /// completed, if any (a non-final fragment completes none).
    Frame { len: usize, msg: Option<Message> },
}

/// Decoding state of one connection.
pub(crate) struct Decoder {
    /// The fragmented message in progress; `None` (no allocation) between
    /// messages.
    partial: Option<Box<Partial>>,
}

fn violation(reason: &'static str) -> Error {
    Error::Protocol {
        code: PROTOCOL_ERROR,
        reason: reason.into(),
    }
}

fn invalid_utf8() -> Error {
    Error::Protocol {
        code: INVALID_PAYLOAD,
        reason: "text message is not valid UTF-8".into(),
    }
}

/// Whether a peer may send this close code (RFC 6455 §7.4; 1012–1014 are
/// registered with IANA since).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XOR the payload with the client's masking key.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

impl Decoder {
    pub(crate) fn new() -> Self {
        Decoder { partial: None }
    }

    fn too_big(max: usize) -> Error {
        Error::Protocol {
            code: close::TOO_BIG,
            reason: format!("message larger than {max} bytes").into(),
        }
    }

    /// Decode the first frame in `buf`, unmasking it in place. `max` is
    /// the largest message accepted, after decompression (close 1009
    /// beyond); `deflate` is the connection's permessage-deflate state,
    /// when negotiated.
    pub(crate) fn decode(
        &mut self,
        buf: &mut [u8],
        max: usize,
        deflate: Option<&mut Deflate>,
    ) -> Result<Decoded, Error> {
        if buf.len() < 2 {
            return Ok(Decoded::Incomplete);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x30 != 0 {
            return Err(violation("reserved bits RSV2/RSV3 set"));
        }
        if b1 & 0x80 == 0 {
            return Err(violation("client frames must be masked"));
        }
        let (header, len) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(Decoded::Incomplete);
                }
                (4, u64::from(u16::from_be_bytes([buf[2], buf[3]])))
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(Decoded::Incomplete);
                }
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(violation("frame length with the high bit set"));
                }
                (10, len)
            }
            n => (2, u64::from(n)),
        };
        let control = opcode & 0x8 != 0;
        if control {
            if !matches!(opcode, OP_CLOSE | OP_PING | OP_PONG) {
                return Err(violation("reserved control opcode"));
            }
            if !fin {
                return Err(violation("fragmented control frame"));
            }
            if len > 125 {
                return Err(violation("control frame payload over 125 bytes"));
            }
            if rsv1 {
                return Err(violation("RSV1 set on a control frame"));
            }
        } else {
            match opcode {
                OP_CONTINUATION => {
                    if self.partial.is_none() {
                        return Err(violation("continuation frame without a message"));
                    }
                    if rsv1 {
                        return Err(violation("RSV1 set on a continuation frame"));
                    }
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(violation("new message before the previous one ended"));
                    }
                    if rsv1 && deflate.is_none() {
                        return Err(violation("RSV1 set without permessage-deflate"));
                    }
                }
                _ => return Err(violation("reserved data opcode")),
            }
            let so_far = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
            let compressed = rsv1 || self.partial.as_ref().is_some_and(|p| p.compressed);
            // Deflated data may be a little larger than what it inflates to.
            let limit = if compressed {
                max as u64 + max as u64 / 64 + 64
            } else {
                max as u64
            };
            if so_far + len > limit {
                return Err(Self::too_big(max));
            }
        }
        let total = header + 4 + len as usize;
        if buf.len() < total {
            return Ok(Decoded::Incomplete);
        }
        let mask: [u8; 4] = buf[header..header + 4].try_into().expect("4 bytes");
        let payload = &mut buf[header + 4..total];
        unmask(payload, mask);
        let msg = match opcode {
            OP_PING => Some(Message::Ping(Bytes::copy_from_slice(payload))),
            OP_PONG => Some(Message::Pong(Bytes::copy_from_slice(payload))),
            OP_CLOSE => Some(Message::Close(parse_close(payload)?)),
            _ => self.data(opcode, fin, rsv1, payload, max, deflate)?,
        };
        Ok(Decoded::Frame { len: total, msg })
    }

    /// A data frame: a whole message, or one fragment of it.
    fn data(
        &mut self,
        opcode: u8,
        fin: bool,
        rsv1: bool,
        payload: &[u8],
        max: usize,
        deflate: Option<&mut Deflate>,
    ) -> Result<Option<Message>, Error> {
        if fin && self.partial.is_none() {
            // The common case: an unfragmented message.
            return self
                .finish(opcode == OP_TEXT, rsv1, payload.to_vec(), max, deflate)
                .map(Some);
        }
        let partial = self.partial.get_or_insert_with(|| {
            Box::new(Partial {
                text: opcode == OP_TEXT,
                compressed: rsv1,
                data: Vec::new(),
                valid: 0,
            })
        });
        partial.data.extend_from_slice(payload);
        if partial.text && !partial.compressed {
            // Fail fast: an invalid sequence is an error as soon as it is
            // seen, a character cut at the end of a fragment is not.
            match std::str::from_utf8(&partial.data[partial.valid..]) {
                Ok(_) => partial.valid = partial.data.len(),
                Err(e) if e.error_len().is_none() && !fin => partial.valid += e.valid_up_to(),
                Err(_) => return Err(invalid_utf8()),
            }
        }
        if !fin {
            return Ok(None);
        }
        let p = self.partial.take().expect("a message in progress");
        self.finish(p.text, p.compressed, p.data, max, deflate)
            .map(Some)
    }

    /// Turn a whole message's payload into a [`Message`].
    fn finish(
        &self,
        text: bool,
        compressed: bool,
        data: Vec<u8>,
        max: usize,
        deflate: Option<&mut Deflate>,
    ) -> Result<Message, Error> {
        let data = if compressed {
            let deflate = deflate.expect("RSV1 is refused without deflate");
            deflate.decompress(&data, max).map_err(|e| match e {
                InflateError::TooBig => Self::too_big(max),
                InflateError::Invalid => Error::Protocol {
                    code: INVALID_PAYLOAD,
                    reason: "invalid compressed data".into(),
                },
            })?
        } else {
            data
        };
        if text {
            let text = String::from_utf8(data).map_err(|_| invalid_utf8())?;
            Ok(Message::Text(Utf8Bytes::from(text)))
        } else {
            Ok(Message::Binary(Bytes::from(data)))
        }
    }
}

/// A close frame's payload: nothing, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(violation("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !valid_close_code(code) {
                return Err(violation("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| Error::Protocol {
                code: INVALID_PAYLOAD,
                reason: "close reason is not valid UTF-8".into(),
            })?;
            Ok(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }))
        }
    }
}

/// Append a server frame header (FIN set, never masked).
pub(crate) fn header(out: &mut Vec<u8>, opcode: u8, rsv1: bool, len: usize) {
    let b0 = 0x80 | opcode | if rsv1 { 0x40 } else { 0 };
    if len < 126 {
        out.extend_from_slice(&[b0, len as u8]);
    } else if len <= 0xFFFF {
        out.extend_from_slice(&[b0, 126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[b0, 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Append a whole server frame.
pub(crate) fn frame(out: &mut Vec<u8>, opcode: u8, rsv1: bool, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    header(out, opcode, rsv1, payload.len());
    out.extend_from_slice(payload);
}

/// Append a close frame; the reason is cut (at a character boundary) to
/// fit the 125-byte control payload.
pub(crate) fn close_frame(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(out, OP_CLOSE, false, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = Vec::new();
        let b0 = opcode | if fin { 0x80 } else { 0 } | if rsv1 { 0x40 } else { 0 };
        out.push(b0);
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn decode_all(d: &mut Decoder, max: usize, mut bytes: Vec<u8>) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            match d.decode(&mut bytes[pos..], max, None)? {
                Decoded::Incomplete => break,
                Decoded::Frame { len, msg } => {
                    pos += len;
                    out.extend(msg);
                }
            }
        }
        Ok(out)
    }

    fn code(e: Error) -> u16 {
        match e {
            Error::Protocol { code, .. } => code,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn text_binary_and_lengths() {
        let (mut d, max) = (Decoder::new(), 1 << 20);
        for n in [0, 1, 125, 126, 127, 65535, 65536, 100_000] {
            let text = "x".repeat(n);
            let msgs =
                decode_all(&mut d, max, client(OP_TEXT, true, false, text.as_bytes())).unwrap();
            assert!(matches!(&msgs[..], [Message::Text(t)] if t.as_str() == text));
        }
        let msgs = decode_all(&mut d, max, client(OP_BINARY, true, false, &[0, 255])).unwrap();
        assert!(matches!(&msgs[..], [Message::Binary(b)] if b[..] == [0, 255]));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let frame = client(OP_TEXT, true, false, &[b'a'; 300]);
        let (mut d, max) = (Decoder::new(), 1024);
        for cut in 0..frame.len() {
            let mut part = frame[..cut].to_vec();
            assert!(matches!(
                d.decode(&mut part, max, None),
                Ok(Decoded::Incomplete)
            ));
        }
    }

    #[test]
    fn fragments_and_interleaved_control() {
        let (mut d, max) = (Decoder::new(), 1024);
        let mut bytes = client(OP_TEXT, false, false, "h\u{e9}".as_bytes()[..2].as_ref());
        bytes.extend(client(OP_PING, true, false, b"p"));
        bytes.extend(client(
            OP_CONTINUATION,
            true,
            false,
            &"h\u{e9}".as_bytes()[2..],
        ));
        let msgs = decode_all(&mut d, max, bytes).unwrap();
        assert!(matches!(&msgs[0], Message::Ping(p) if &p[..] == b"p"));
        assert!(matches!(&msgs[1], Message::Text(t) if t.as_str() == "h\u{e9}"));
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x00], PROTOCOL_ERROR),                   // unmasked
            (client(0x3, true, false, b""), PROTOCOL_ERROR),      // reserved opcode
            (client(0xB, true, false, b""), PROTOCOL_ERROR),      // reserved control
            (client(OP_TEXT, true, true, b"x"), PROTOCOL_ERROR),  // RSV1, no deflate
            (client(OP_PING, false, false, b""), PROTOCOL_ERROR), // fragmented control
            (client(OP_PING, true, false, &[0; 126]), PROTOCOL_ERROR), // long control
            (client(OP_CONTINUATION, true, false, b""), PROTOCOL_ERROR), // no message
            (client(OP_TEXT, true, false, &[0xff]), INVALID_PAYLOAD),
            (client(OP_CLOSE, true, false, &[3]), PROTOCOL_ERROR),
            (client(OP_CLOSE, true, false, &[3, 0xe7]), PROTOCOL_ERROR), // 999
            (client(OP_CLOSE, true, false, &[3, 0xed]), PROTOCOL_ERROR), // 1005
            (
                client(OP_CLOSE, true, false, &[3, 0xe8, 0xff]),
                INVALID_PAYLOAD,
            ),
            (client(OP_TEXT, true, false, &[b'a'; 2000]), close::TOO_BIG),
        ];
        for (bytes, want) in cases {
            let (mut d, max) = (Decoder::new(), 1024);
            let got = decode_all(&mut d, max, bytes.clone()).map(|_| ());
            assert_eq!(code(got.unwrap_err()), want, "{bytes:02x?}");
        }
        // Too big is known from the header alone.
        let (mut d, max) = (Decoder::new(), 1024);
        let mut header_only = client(OP_BINARY, true, false, &[0; 70_000])[..14].to_vec();
        assert_eq!(
            code(d.decode(&mut header_only, max, None).err().unwrap()),
            close::TOO_BIG
        );
        // A new message inside a fragmented one.
        let (mut d, max) = (Decoder::new(), 1024);
        let mut bytes = client(OP_TEXT, false, false, b"a");
        bytes.extend(client(OP_TEXT, true, false, b"b"));
        assert_eq!(
            code(decode_all(&mut d, max, bytes).unwrap_err()),
            PROTOCOL_ERROR
        );
        // Fragments that together exceed the limit.
        let (mut d, max) = (Decoder::new(), 1024);
        let mut bytes = client(OP_TEXT, false, false, &[b'a'; 600]);
        bytes.extend(client(OP_CONTINUATION, true, false, &[b'a'; 600]));
        assert_eq!(
            code(decode_all(&mut d, max, bytes).unwrap_err()),
            close::TOO_BIG
        );
        // Invalid UTF-8 fails at the fragment that holds it.
        let (mut d, max) = (Decoder::new(), 1024);
        let mut bytes = client(OP_TEXT, false, false, &[b'a', 0xC0]);
        assert_eq!(
            code(d.decode(&mut bytes, max, None).err().unwrap()),
            INVALID_PAYLOAD
        );
    }

    #[test]
    fn close_frames() {
        let (mut d, max) = (Decoder::new(), 1024);
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let msgs = decode_all(&mut d, max, client(OP_CLOSE, true, false, &payload)).unwrap();
        assert!(
            matches!(&msgs[..], [Message::Close(Some(f))] if f.code == 1000 && f.reason == "bye")
        );
        let msgs = decode_all(&mut d, max, client(OP_CLOSE, true, false, b"")).unwrap();
        assert!(matches!(&msgs[..], [Message::Close(None)]));
    }

    #[test]
    fn server_frames() {
        let mut out = Vec::new();
        frame(&mut out, OP_TEXT, false, b"hi");
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        let mut out = Vec::new();
        header(&mut out, OP_BINARY, true, 70_000);
        assert_eq!(out[..2], [0xC2, 127]);
        assert_eq!(u64::from_be_bytes(out[2..10].try_into().unwrap()), 70_000);
        let mut out = Vec::new();
        close_frame(&mut out, 1012, &"\u{e9}".repeat(100));
        assert!(out.len() <= 127);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
