//! permessage-deflate (RFC 7692): negotiation and per-message (de)compression.
//!
//! # Negotiation ([`negotiate`], [`Agreed::response_header`])
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
//! # Compression ([`Deflate`], [`compress_shared`])
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
use std::fmt::Write as _;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";

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

/// The parameters agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// We compress every message with a fresh window.
    pub server_no_context_takeover: bool,
    /// The client compresses every message with a fresh window (so we
    /// inflate every message with a fresh window).
    pub client_no_context_takeover: bool,
    /// Window bits the server compresses with (9..=15).
    pub server_max_window_bits: u8,
    /// Window bits the client compresses with, as far as we know (15 if not limited).
    pub client_max_window_bits: u8,
    /// The client's offer had `server_max_window_bits`, so the response must
    /// carry it too (RFC 7692 §7.1.2.1), even when it is 15.
    pub server_max_window_bits_offered: bool,
}

/// Pick the first acceptable `permessage-deflate` offer from the request's
/// `Sec-WebSocket-Extensions` header values (there may be several header lines,
/// each a comma-separated list of offers, each with `;`-separated params,
/// values possibly quoted). Returns None when there is no acceptable offer
/// (malformed params, duplicate params, unknown params, out-of-range window
/// bits, or window bits we cannot honour all make THAT offer unacceptable, and
/// the next offer is tried — RFC 7692 §5 and §7.1).
pub fn negotiate<'a>(
    offers: impl IntoIterator<Item = &'a str>,
    cfg: &DeflateConfig,
) -> Option<Agreed> {
    offers
        .into_iter()
        .flat_map(|line| Split::new(line, b','))
        .find_map(|offer| accept(offer, cfg))
}

/// The agreement for one offer (one element of the extension list), or
/// `None` if it is not an acceptable `permessage-deflate` offer.
fn accept(offer: &str, cfg: &DeflateConfig) -> Option<Agreed> {
    let mut parts = Split::new(offer, b';');
    let name = trim(parts.next()?);
    if !name.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut server_nct = false;
    let mut client_nct = false;
    let mut server_bits: Option<u8> = None;
    // Some(None): offered without a value.
    let mut client_bits: Option<Option<u8>> = None;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (trim(k), Some(param_value(trim(v))?)),
            None => (trim(param), None),
        };
        if !is_token(key) {
            return None;
        }
        if key.eq_ignore_ascii_case("server_no_context_takeover") {
            if server_nct || value.is_some() {
                return None;
            }
            server_nct = true;
        } else if key.eq_ignore_ascii_case("client_no_context_takeover") {
            if client_nct || value.is_some() {
                return None;
            }
            client_nct = true;
        } else if key.eq_ignore_ascii_case("server_max_window_bits") {
            if server_bits.is_some() {
                return None;
            }
            server_bits = Some(window_bits(&value?)?);
        } else if key.eq_ignore_ascii_case("client_max_window_bits") {
            if client_bits.is_some() {
                return None;
            }
            client_bits = Some(match value {
                Some(v) => Some(window_bits(&v)?),
                None => None,
            });
        } else {
            return None;
        }
    }
    // zlib cannot compress raw DEFLATE with a 256-byte window.
    if server_bits.is_some_and(|b| b < MIN_SERVER_WINDOW_BITS) {
        return None;
    }
    Some(Agreed {
        server_no_context_takeover: !cfg.context_takeover || server_nct,
        client_no_context_takeover: !cfg.context_takeover || client_nct,
        server_max_window_bits: server_bits.unwrap_or(MAX_WINDOW_BITS),
        client_max_window_bits: client_bits.flatten().unwrap_or(MAX_WINDOW_BITS),
        server_max_window_bits_offered: server_bits.is_some(),
    })
}

/// A parameter's value: a token, or a quoted string whose content (after
/// unescaping) is a token (RFC 7692 §5.1 / RFC 6455 §9.1).
fn param_value(v: &str) -> Option<String> {
    let value = match v.strip_prefix('"') {
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.push(chars.next()?),
                    '"' => return None,
                    c => out.push(c),
                }
            }
            out
        }
        None => v.to_owned(),
    };
    is_token(&value).then_some(value)
}

/// A window-bits value: a decimal integer 8..=15 without leading zeroes
/// (RFC 7692 §7.1.2.1, §7.1.2.2).
fn window_bits(v: &str) -> Option<u8> {
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 2 || b[0] == b'0' || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u8 = v.parse().ok()?;
    (8..=MAX_WINDOW_BITS).contains(&n).then_some(n)
}

/// Whether `s` is an HTTP token (RFC 7230 §3.2.6).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// `s` without surrounding optional whitespace.
fn trim(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// Splits at `sep` outside quoted strings.
struct Split<'a> {
    rest: Option<&'a str>,
    sep: u8,
}

impl<'a> Split<'a> {
    fn new(s: &'a str, sep: u8) -> Self {
        Split { rest: Some(s), sep }
    }
}

impl<'a> Iterator for Split<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, &c) in s.as_bytes().iter().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted {
                match c {
                    b'\\' => escaped = true,
                    b'"' => quoted = false,
                    _ => {}
                }
            } else if c == b'"' {
                quoted = true;
            } else if c == self.sep {
                // `sep` is ASCII, so `i` and `i + 1` are char boundaries.
                self.rest = Some(&s[i + 1..]);
                return Some(&s[..i]);
            }
        }
        self.rest = None;
        Some(s)
    }
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` response header value, e.g.
    /// "permessage-deflate; server_no_context_takeover; client_no_context_takeover".
    pub fn response_header(&self) -> String {
        let mut h = String::from(NAME);
        if self.server_no_context_takeover {
            h.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            h.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits_offered || self.server_max_window_bits < MAX_WINDOW_BITS {
            let _ = write!(
                h,
                "; server_max_window_bits={}",
                self.server_max_window_bits
            );
        }
        h
    }

    /// Whether the compressed form of a message is the same for every
    /// connection with these parameters, so a broadcast can be compressed once
    /// and the bytes shared (server_no_context_takeover and 15 window bits).
    pub fn shareable(&self) -> bool {
        self.server_no_context_takeover && self.server_max_window_bits == MAX_WINDOW_BITS
    }
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
mod tests {
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

    const BOTH_NCT: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

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
        let line = br#"{"type":"broadcast","channel":"lobby","data":{"user":"ada","text":"hello, world"}}"#;
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

    // ---- negotiation ----

    #[test]
    fn plain_offer() {
        let a = neg("permessage-deflate", &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 15, false));
        assert_eq!(a.response_header(), BOTH_NCT);
        assert!(a.shareable());

        let a = neg("permessage-deflate", &ON).unwrap();
        assert_eq!(a, agreed(false, false, 15, 15, false));
        assert_eq!(a.response_header(), "permessage-deflate");
        assert!(!a.shareable());
    }

    #[test]
    fn browser_default_offer() {
        let offer = "permessage-deflate; client_max_window_bits";
        let a = neg(offer, &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 15, false));
        assert_eq!(a.response_header(), BOTH_NCT);
        let a = neg(offer, &ON).unwrap();
        assert_eq!(a, agreed(false, false, 15, 15, false));
        assert_eq!(a.response_header(), "permessage-deflate");
    }

    #[test]
    fn each_param() {
        // Context takeover on: we echo what the client asked for.
        let a = neg("permessage-deflate; server_no_context_takeover", &ON).unwrap();
        assert_eq!(a, agreed(true, false, 15, 15, false));
        assert_eq!(
            a.response_header(),
            "permessage-deflate; server_no_context_takeover"
        );
        assert!(a.shareable());

        let a = neg("permessage-deflate; client_no_context_takeover", &ON).unwrap();
        assert_eq!(a, agreed(false, true, 15, 15, false));
        assert_eq!(
            a.response_header(),
            "permessage-deflate; client_no_context_takeover"
        );

        let a = neg("permessage-deflate; server_max_window_bits=10", &ON).unwrap();
        assert_eq!(a, agreed(false, false, 10, 15, true));
        assert_eq!(
            a.response_header(),
            "permessage-deflate; server_max_window_bits=10"
        );
        assert!(!a.shareable());

        let a = neg("permessage-deflate; server_max_window_bits=15", &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 15, true));
        assert_eq!(
            a.response_header(),
            format!("{BOTH_NCT}; server_max_window_bits=15")
        );
        assert!(a.shareable());

        for bits in 9..=15u8 {
            let a = neg(
                &format!("permessage-deflate; server_max_window_bits={bits}"),
                &OFF,
            );
            assert_eq!(a.unwrap().server_max_window_bits, bits);
        }

        let a = neg("permessage-deflate; client_max_window_bits=12", &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 12, false));
        assert_eq!(a.response_header(), BOTH_NCT); // not answered
        let a = neg("permessage-deflate; client_max_window_bits=8", &OFF).unwrap();
        assert_eq!(a.client_max_window_bits, 8);

        let all = "permessage-deflate; server_no_context_takeover; \
                   client_no_context_takeover; server_max_window_bits=9; \
                   client_max_window_bits=10";
        let a = neg(all, &ON).unwrap();
        assert_eq!(a, agreed(true, true, 9, 10, true));
        assert_eq!(
            a.response_header(),
            format!("{BOTH_NCT}; server_max_window_bits=9")
        );
    }

    #[test]
    fn quoted_values() {
        let a = neg(r#"permessage-deflate; server_max_window_bits="10""#, &OFF).unwrap();
        assert_eq!(a.server_max_window_bits, 10);
        let a = neg(r#"permessage-deflate; client_max_window_bits="9""#, &OFF).unwrap();
        assert_eq!(a.client_max_window_bits, 9);
        let a = neg(r#"permessage-deflate; server_max_window_bits="1\1""#, &OFF).unwrap();
        assert_eq!(a.server_max_window_bits, 11);
        // A comma or semicolon inside quotes does not split (and the
        // value is then not a token, so the offer is declined).
        let h = r#"permessage-deflate; server_max_window_bits="1,0", permessage-deflate"#;
        assert_eq!(negotiate([h], &OFF), neg("permessage-deflate", &OFF));
        for bad in [
            r#"permessage-deflate; server_max_window_bits="10"#,
            r#"permessage-deflate; server_max_window_bits=10""#,
            r#"permessage-deflate; server_max_window_bits="""#,
            r#"permessage-deflate; server_max_window_bits="1 0""#,
            r#"permessage-deflate; server_max_window_bits="1;0""#,
            r#"permessage-deflate; server_no_context_takeover="""#,
            r#"permessage-deflate; server_max_window_bits=""10"""#,
        ] {
            assert_eq!(neg(bad, &OFF), None, "{bad}");
        }
    }

    #[test]
    fn first_acceptable_offer_wins() {
        // RFC 7692 §7.1.3, with a window we cannot honour first.
        let h = "permessage-deflate; client_max_window_bits; server_max_window_bits=8, \
                 permessage-deflate; client_max_window_bits";
        let a = negotiate([h], &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 15, false));

        let h = "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
                 permessage-deflate; client_max_window_bits";
        assert_eq!(negotiate([h], &OFF).unwrap().server_max_window_bits, 10);

        // Across header lines, skipping other extensions and bad offers.
        let lines = [
            "x-webkit-deflate-frame",
            "permessage-deflate; foo=1, permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=12, permessage-deflate",
        ];
        assert_eq!(negotiate(lines, &OFF).unwrap().server_max_window_bits, 12);

        // Empty list elements are ignored.
        let a = negotiate([" , ,permessage-deflate ,"], &OFF).unwrap();
        assert_eq!(a, agreed(true, true, 15, 15, false));
    }

    #[test]
    fn no_acceptable_offer() {
        let none: [&str; 0] = [];
        assert_eq!(negotiate(none, &OFF), None);
        for bad in [
            "",
            "x-webkit-deflate-frame",
            "x-webkit-deflate-frame; no_context_takeover",
            "deflate-frame",
            "permessage-deflate-x",
            "permessage-deflate;",
            "permessage-deflate; ; server_no_context_takeover",
            // duplicates
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate; client_max_window_bits; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=10; client_max_window_bits",
            // unknown params
            "permessage-deflate; foo",
            "permessage-deflate; foo=bar",
            "permessage-deflate; no_context_takeover",
            "permessage-deflate; server_max_window_bit=10",
            // values where none is allowed
            "permessage-deflate; server_no_context_takeover=true",
            "permessage-deflate; client_no_context_takeover=1",
            // missing or bad values
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=0",
            "permessage-deflate; server_max_window_bits=09",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; server_max_window_bits=-9",
            "permessage-deflate; server_max_window_bits=9a",
            "permessage-deflate; server_max_window_bits=100",
            "permessage-deflate; server_max_window_bits=10=1",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=",
            // honourable by the RFC, not by zlib
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits=\"8\"",
        ] {
            assert_eq!(neg(bad, &OFF), None, "{bad:?}");
            assert_eq!(neg(bad, &ON), None, "{bad:?}");
        }
    }

    #[test]
    fn lenient_syntax() {
        let a = neg(
            "  PerMessage-Deflate ;\tServer_Max_Window_Bits = 12 ; CLIENT_MAX_WINDOW_BITS  ",
            &ON,
        )
        .unwrap();
        assert_eq!(a, agreed(false, false, 12, 15, true));
        assert_eq!(
            a.response_header(),
            "permessage-deflate; server_max_window_bits=12"
        );
    }

    #[test]
    fn shareable() {
        assert!(agreed(true, false, 15, 10, false).shareable());
        assert!(agreed(true, true, 15, 15, true).shareable());
        assert!(!agreed(false, true, 15, 15, false).shareable());
        assert!(!agreed(true, true, 14, 15, true).shareable());
    }

    // ---- compression ----

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

    /// An independent DEFLATE decoder (after Mark Adler's puff.c) that
    /// also reports the longest back-reference distance. zlib-rs always
    /// inflates with a 32 KiB window, whatever window bits it is given, so
    /// it cannot tell whether a compressor kept to a smaller window.
    /// `history` is the data of earlier messages (context takeover).
    /// Returns the message and the longest distance, or None if invalid.
    fn puff(data: &[u8], history: &[u8]) -> Option<(Vec<u8>, usize)> {
        const LBASE: [u16; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEXT: [u32; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DBASE: [u16; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXT: [u32; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        const ORDER: [usize; 19] = [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ];

        struct Huff {
            count: [u16; 16],
            symbol: Vec<u16>,
        }
        fn huff(lengths: &[u8]) -> Huff {
            let mut count = [0u16; 16];
            for &l in lengths {
                count[usize::from(l)] += 1;
            }
            let mut offs = [0u16; 16];
            for i in 1..15 {
                offs[i + 1] = offs[i] + count[i];
            }
            let mut symbol = vec![0; lengths.len()];
            for (s, &l) in lengths.iter().enumerate() {
                if l != 0 {
                    symbol[usize::from(offs[usize::from(l)])] = s as u16;
                    offs[usize::from(l)] += 1;
                }
            }
            Huff { count, symbol }
        }
        struct Bits<'a> {
            data: &'a [u8],
            pos: usize,
            buf: u32,
            cnt: u32,
        }
        impl Bits<'_> {
            fn need(&mut self, n: u32) -> Option<u32> {
                while self.cnt < n {
                    self.buf |= u32::from(*self.data.get(self.pos)?) << self.cnt;
                    self.pos += 1;
                    self.cnt += 8;
                }
                let v = self.buf & ((1 << n) - 1);
                self.buf >>= n;
                self.cnt -= n;
                Some(v)
            }
            fn decode(&mut self, h: &Huff) -> Option<usize> {
                let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
                for len in 1..16 {
                    code |= self.need(1)? as i32;
                    let count = i32::from(h.count[len]);
                    if code - count < first {
                        return Some(usize::from(h.symbol[(index + code - first) as usize]));
                    }
                    index += count;
                    first = (first + count) << 1;
                    code <<= 1;
                }
                None
            }
        }

        let input = [data, &TAIL[..]].concat();
        let mut s = Bits {
            data: &input,
            pos: 0,
            buf: 0,
            cnt: 0,
        };
        let mut out = history.to_vec();
        let mut longest = 0;
        while s.pos < input.len() {
            let last = s.need(1)?;
            let (lens, dists) = match s.need(2)? {
                0 => {
                    (s.buf, s.cnt) = (0, 0);
                    let len = s.need(16)?;
                    if s.need(16)? != !len & 0xffff {
                        return None;
                    }
                    for _ in 0..len {
                        out.push(s.need(8)? as u8);
                    }
                    if last == 1 {
                        break;
                    }
                    continue;
                }
                1 => {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (huff(&l), huff(&[5; 30]))
                }
                2 => {
                    let nlen = s.need(5)? as usize + 257;
                    let ndist = s.need(5)? as usize + 1;
                    let ncode = s.need(4)? as usize + 4;
                    let mut cl = [0u8; 19];
                    for &i in &ORDER[..ncode] {
                        cl[i] = s.need(3)? as u8;
                    }
                    let clh = huff(&cl);
                    let mut l = Vec::new();
                    while l.len() < nlen + ndist {
                        match s.decode(&clh)? {
                            sym @ 0..=15 => l.push(sym as u8),
                            16 => {
                                let prev = *l.last()?;
                                for _ in 0..3 + s.need(2)? {
                                    l.push(prev);
                                }
                            }
                            17 => l.extend(std::iter::repeat_n(0, 3 + s.need(3)? as usize)),
                            _ => l.extend(std::iter::repeat_n(0, 11 + s.need(7)? as usize)),
                        }
                    }
                    (huff(&l[..nlen]), huff(&l[nlen..]))
                }
                _ => return None,
            };
            loop {
                match s.decode(&lens)? {
                    sym @ 0..=255 => out.push(sym as u8),
                    256 => break,
                    sym => {
                        let i = sym - 257;
                        let len = usize::from(*LBASE.get(i)?) + s.need(LEXT[i])? as usize;
                        let d = s.decode(&dists)?;
                        let dist = usize::from(*DBASE.get(d)?) + s.need(DEXT[d])? as usize;
                        if dist > out.len() {
                            return None;
                        }
                        longest = longest.max(dist);
                        for _ in 0..len {
                            out.push(out[out.len() - dist]);
                        }
                    }
                }
            }
            if last == 1 {
                break;
            }
        }
        Some((out.split_off(history.len()), longest))
    }

    #[test]
    fn puff_reads_the_rfc_examples() {
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(puff(&hello, &[]), Some((b"Hello".to_vec(), 0)));
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(puff(&stored, &[]).unwrap().0, b"Hello");
        assert_eq!(
            puff(&[0xf2, 0x00, 0x11, 0x00, 0x00], b"Hello"),
            Some((b"Hello".to_vec(), 5))
        );
        assert_eq!(puff(&[0xf2, 0x00, 0x11, 0x00, 0x00], b""), None);
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
}
