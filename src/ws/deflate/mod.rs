//! permessage-deflate (RFC 7692): negotiation and per-message (de)compression.
//!
//! # Negotiation ([`negotiate`], [`Agreed::response_header`]; `negotiation.rs`)
//!
//! - The offers are the values of every `Sec-WebSocket-Extensions` request
//!   header line, each a comma-separated list; the first acceptable
//!   `permessage-deflate` offer wins (§5). Other extensions (such as the
//!   pre-standard `x-webkit-deflate-frame`) are ignored, as are empty list
//!   elements.
//! - An offer is declined — and the next one tried — when any of its
//!   parameters is malformed, unknown, duplicated, has a value where none is
//!   allowed, lacks a required value, or has a window-bits value that is not
//!   a decimal integer 8..=15 without leading zeroes (§7.1). Values may be
//!   quoted strings (`server_max_window_bits="10"`); unquoted, they must be
//!   tokens. Extension and parameter names are compared ASCII
//!   case-insensitively, and whitespace around `,` `;` `=` is allowed.
//! - Unless [`DeflateConfig::context_takeover`] is set we always answer with
//!   `server_no_context_takeover` and `client_no_context_takeover`, whether
//!   or not the client asked (§7.1.1.1 and §7.1.1.2 let a server add both):
//!   then a connection keeps no compressor or decompressor state between
//!   messages. With context takeover enabled we only echo what the client
//!   asked for.
//! - `server_max_window_bits=N` limits the window we compress with. zlib
//!   cannot produce a raw DEFLATE stream with an 8-bit (256-byte) window, so
//!   an offer with `N = 8` is declined; 9..=15 is honoured and echoed
//!   (§7.1.2.1 requires echoing it, even when `N = 15`).
//! - `client_max_window_bits[=N]` is only recorded: our inflater always
//!   uses a 15-bit window, which decodes data compressed with any smaller
//!   window, so we never need to limit the client and never answer the
//!   parameter (§7.1.2.2 makes answering optional).
//!
//! # Compression ([`Deflate`], [`compress_shared`]; this file)
//!
//! A message is compressed as raw DEFLATE flushed with a sync flush, whose
//! trailing `00 00 FF FF` is removed (§7.2.1); received messages get those
//! four bytes appended back before inflating (§7.2.2).
//!
//! Without context takeover, a connection holds no zlib state: a
//! thread-local compressor per (window bits, level) and one thread-local
//! decompressor are reset and reused for every message, so neither sending
//! nor receiving allocates zlib's state (≈ 300 KiB to compress, ≈ 40 KiB to
//! inflate) per message. With context takeover the connection boxes its own
//! compressor and/or decompressor, created on first use, and keeps their
//! windows between messages.
//!
//! With `server_no_context_takeover` and a 15-bit window, a message's
//! compressed form depends only on the message and the level, so a
//! broadcast is compressed once ([`compress_shared`]) and the bytes are
//! shared by every such connection ([`Agreed::shareable`]).

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

mod negotiation;
pub use negotiation::{Agreed, negotiate};

/// What a sync flush ends with: removed when sending, appended when
/// receiving (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest LZ77 window, in bits (32 KiB).
const MAX_WINDOW_BITS: u8 = 15;

/// The smallest window zlib can compress raw DEFLATE with.
const MIN_SERVER_WINDOW_BITS: u8 = 9;

/// The largest LZ77 window, in bytes.
const WINDOW: usize = 1 << MAX_WINDOW_BITS;

/// Server-side settings (from the server's config).
#[derive(Debug, Clone, Copy)]
pub struct DeflateConfig {
    /// Keep the LZ77 window between messages (both directions). Off by default:
    /// then a connection keeps no compressor state at all between messages.
    pub context_takeover: bool,
    /// zlib level 0..=9.
    pub level: u32,
    /// Messages shorter than this are sent uncompressed (RSV1 clear).
    pub threshold: usize,
}

/// One connection's deflate state. With no context takeover it holds no
/// compressor/decompressor (uses a thread-local one, reset per message), so
/// an idle connection costs only a few bytes; with context takeover it boxes
/// its own flate2 Compress/Decompress, created lazily on first use.
pub struct Deflate {
    agreed: Agreed,
    level: u32,
    threshold: usize,
    /// Only with server context takeover.
    compressor: Option<Box<Compress>>,
    /// Only with client context takeover.
    decompressor: Option<Box<Decompress>>,
}

impl std::fmt::Debug for Deflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflate")
            .field("agreed", &self.agreed)
            .field("level", &self.level)
            .field("threshold", &self.threshold)
            .field("compressor", &self.compressor.is_some())
            .field("decompressor", &self.decompressor.is_some())
            .finish()
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// The decompressed message would exceed `max` bytes (close 1009).
    TooBig,
    /// Corrupt compressed data (close 1007 is what most servers use; we'll map it).
    Invalid,
}

impl std::fmt::Display for InflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InflateError::TooBig => "decompressed message too big",
            InflateError::Invalid => "invalid compressed data",
        })
    }
}

impl std::error::Error for InflateError {}

impl Deflate {
    /// The state for a connection that agreed on `agreed`. Allocates
    /// nothing; a level above 9 is treated as 9, and window bits outside
    /// 9..=15 (which [`negotiate`] never agrees to) as the nearest of them.
    pub fn new(agreed: Agreed, cfg: &DeflateConfig) -> Self {
        Deflate {
            agreed,
            level: cfg.level.min(9),
            threshold: cfg.threshold,
            compressor: None,
            decompressor: None,
        }
    }

    /// The parameters agreed with this client.
    pub fn agreed(&self) -> Agreed {
        self.agreed
    }

    /// The zlib level this connection compresses with (0..=9); pass it to
    /// [`compress_shared`] for a [`shareable`](Agreed::shareable) connection.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Whether this payload should be compressed (len >= threshold).
    pub fn wants(&self, len: usize) -> bool {
        len >= self.threshold
    }

    /// Compress one whole message payload for sending, appending to `out`:
    /// raw DEFLATE, flushed with a sync flush, the trailing 00 00 FF FF removed
    /// (RFC 7692 §7.2.1). Honours server_max_window_bits and context takeover.
    ///
    /// **With server context takeover the output must be sent** (with RSV1):
    /// the compressor's window now holds this message, and a peer that never
    /// inflated it would misread later messages. To send the message
    /// uncompressed instead, use [`compress_if_smaller`](Self::compress_if_smaller)
    /// (or call [`discard`](Self::discard)).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let bits = self.agreed.server_max_window_bits;
        if self.agreed.server_no_context_takeover {
            with_compressor(bits, self.level, |c| deflate_into(c, payload, out));
        } else {
            let c = self
                .compressor
                .get_or_insert_with(|| Box::new(new_compressor(bits, self.level)));
            deflate_into(c, payload, out);
        }
    }

    /// [`compress`](Self::compress), keeping the result only when it is
    /// shorter than `payload`. Returns whether it did (then send `out`'s new
    /// bytes with RSV1 set); otherwise `out` is as it was, and the message
    /// should be sent uncompressed. Safe with context takeover, unlike
    /// discarding the output of `compress`.
    pub fn compress_if_smaller(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        self.compress(payload, out);
        if out.len() - start < payload.len() {
            return true;
        }
        out.truncate(start);
        self.discard();
        false
    }

    /// Forget the output of the last [`compress`](Self::compress): it was
    /// not sent. With server context takeover the compressor is reset (its
    /// window held data the peer never saw; an uncompressed message does not
    /// enter the peer's window); otherwise there is nothing to do.
    pub fn discard(&mut self) {
        if let Some(c) = &mut self.compressor {
            c.reset();
        }
    }

    /// Decompress one whole received message (the concatenated payloads of its
    /// frames; the caller does NOT append 00 00 FF FF — you do, §7.2.2), never
    /// producing more than `max` bytes (stop early and return TooBig: a
    /// decompression bomb must not allocate beyond max).
    ///
    /// A message whose DEFLATE data ends with a final block (BFINAL, RFC 7692
    /// §7.2.3.4) is accepted when nothing but the padding byte `00` follows
    /// it; more data after a final block is [`InflateError::Invalid`]. With
    /// client context takeover, the next message then starts a new stream
    /// whose window is this message's last 32 KiB.
    ///
    /// After an error the connection is expected to close; the state stays
    /// usable all the same.
    pub fn decompress(&mut self, payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
        if payload.is_empty() {
            // Not valid DEFLATE data (`00 00 FF FF` alone is a truncated
            // stored block), but unambiguous: an empty message. Feeding it
            // to a kept inflater would leave it mid-block.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if self.agreed.client_no_context_takeover {
            with_decompressor(|d| inflate_into(d, payload, max, &mut out))?;
        } else {
            let d = self
                .decompressor
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            match inflate_into(d, payload, max, &mut out) {
                Ok(false) => {}
                Ok(true) => {
                    // The stream ended: start a new one that may refer back.
                    d.reset(false);
                    let from = out.len().saturating_sub(WINDOW);
                    if d.set_dictionary(&out[from..]).is_err() {
                        d.reset(false);
                    }
                }
                Err(e) => {
                    d.reset(false);
                    return Err(e);
                }
            }
        }
        let spare = out.capacity() - out.len();
        if spare > 4096 && spare > out.len() / 4 {
            out.shrink_to_fit();
        }
        Ok(out)
    }
}

/// Compress once for every connection whose `Agreed::shareable()` is true
/// (fresh window, 15 bits, the given level). Same output format as `compress`.
pub fn compress_shared(payload: &[u8], level: u32) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() / 4 + 64);
    with_compressor(MAX_WINDOW_BITS, level.min(9), |c| {
        deflate_into(c, payload, &mut out)
    });
    let spare = out.capacity() - out.len();
    if spare > 1024 && spare > out.len() / 8 {
        out.shrink_to_fit();
    }
    Bytes::from(out)
}

/// A raw-DEFLATE compressor; `bits` is clamped to what zlib supports.
fn new_compressor(bits: u8, level: u32) -> Compress {
    let bits = bits.clamp(MIN_SERVER_WINDOW_BITS, MAX_WINDOW_BITS);
    Compress::new_with_window_bits(Compression::new(level.min(9)), false, bits)
}

/// This thread's reusable zlib state, for connections without context
/// takeover.
struct Pool {
    /// One per (window bits, level) in use on this thread; in practice one
    /// or two.
    compressors: Vec<(u8, u32, Compress)>,
    decompressor: Option<Decompress>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool { compressors: Vec::new(), decompressor: None })
    };
}

/// Run `f` with a fresh (reset) compressor for `bits` and `level`: this
/// thread's, or a new one if that is unavailable (thread teardown).
fn with_compressor<R>(bits: u8, level: u32, f: impl FnOnce(&mut Compress) -> R) -> R {
    let mut f = Some(f);
    let pooled = POOL.try_with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        let i = match pool
            .compressors
            .iter()
            .position(|(b, l, _)| *b == bits && *l == level)
        {
            Some(i) => {
                pool.compressors[i].2.reset();
                i
            }
            None => {
                pool.compressors
                    .push((bits, level, new_compressor(bits, level)));
                pool.compressors.len() - 1
            }
        };
        let f = f.take().expect("called once");
        Some(f(&mut pool.compressors[i].2))
    });
    match pooled {
        Ok(Some(r)) => r,
        _ => f.take().expect("not called yet")(&mut new_compressor(bits, level)),
    }
}

/// Run `f` with a fresh (reset) 15-bit raw inflater: this thread's, or a
/// new one if that is unavailable (thread teardown).
fn with_decompressor<R>(f: impl FnOnce(&mut Decompress) -> R) -> R {
    let mut f = Some(f);
    let pooled = POOL.try_with(|pool| {
        let mut pool = pool.try_borrow_mut().ok()?;
        let d = match &mut pool.decompressor {
            Some(d) => {
                d.reset(false);
                d
            }
            slot @ None => slot.insert(Decompress::new(false)),
        };
        let f = f.take().expect("called once");
        Some(f(d))
    });
    match pooled {
        Ok(Some(r)) => r,
        _ => f.take().expect("not called yet")(&mut Decompress::new(false)),
    }
}

/// Compress `input` with a sync flush, appending to `out`, and remove the
/// flush's trailing `00 00 FF FF`.
fn deflate_into(c: &mut Compress, mut input: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    loop {
        // zlib wants more than 6 bytes of room to finish a flush cleanly.
        if out.capacity() - out.len() < 64 {
            out.reserve(input.len() / 2 + 64);
        }
        let (in_before, out_before) = (c.total_in(), out.len());
        c.compress_vec(input, out, FlushCompress::Sync)
            .expect("deflate of in-memory data cannot fail");
        let used = (c.total_in() - in_before) as usize;
        input = &input[used..];
        // Done once all input is taken and the flush finished with room to spare.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        if used == 0 && out.len() == out_before && out.len() < out.capacity() {
            debug_assert!(false, "deflate made no progress");
            break;
        }
    }
    if out[start..].ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    } else if out.len() == start {
        // A sync flush right after another one (an empty message with
        // context takeover) writes nothing: send an empty stored block's
        // header, which the peer's appended `00 00 FF FF` completes
        // (RFC 7692 §7.2.3.6).
        out.push(0x00);
    } else {
        debug_assert!(false, "a sync flush ends with 00 00 FF FF");
    }
}

/// Inflate `payload` followed by `00 00 FF FF` into `out` (empty), which
/// never grows beyond `max + 1` bytes of capacity. Returns whether the
/// DEFLATE stream ended (a final block).
fn inflate_into(
    d: &mut Decompress,
    payload: &[u8],
    max: usize,
    out: &mut Vec<u8>,
) -> Result<bool, InflateError> {
    // One byte more than allowed, to tell "exactly max" from "too big".
    let limit = max.saturating_add(1);
    out.reserve_exact(payload.len().saturating_mul(4).max(256).min(limit));
    let mut parts = [payload, &TAIL[..]];
    let mut i = 0;
    while i < parts.len() {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(InflateError::TooBig);
            }
            let target = out.capacity().saturating_mul(2).max(256).min(limit);
            out.reserve_exact(target - out.len());
        }
        let (in_before, out_before) = (d.total_in(), out.len());
        let status = d
            .decompress_vec(parts[i], out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        let used = (d.total_in() - in_before) as usize;
        parts[i] = &parts[i][used..];
        if out.len() > max {
            return Err(InflateError::TooBig);
        }
        if status == Status::StreamEnd {
            // A final block. What may follow is the header byte of an
            // empty stored block (RFC 7692 §7.2.3.4) and our tail.
            return match parts[0] {
                [] | [0x00] => Ok(true),
                _ => Err(InflateError::Invalid),
            };
        }
        if parts[i].is_empty() && out.len() < out.capacity() {
            i += 1;
        } else if used == 0 && out.len() == out_before && out.len() < out.capacity() {
            return Err(InflateError::Invalid); // no progress possible
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
