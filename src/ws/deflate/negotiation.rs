//! permessage-deflate negotiation (RFC 7692 §5, §7.1): the offers of the
//! `Sec-WebSocket-Extensions` request headers, parsed leniently where the
//! RFC allows and strictly where it does not, the first acceptable one
//! turned into [`Agreed`], and the response header that answers it. The
//! rules are listed in the parent module's docs.

use std::fmt::Write as _;

use super::{DeflateConfig, MAX_WINDOW_BITS, MIN_SERVER_WINDOW_BITS};

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";

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
