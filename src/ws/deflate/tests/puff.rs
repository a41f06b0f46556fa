//! A reference DEFLATE decoder that reports back-reference distances, to
//! check the window a compressor kept to.

use crate::ws::deflate::TAIL;

/// An independent DEFLATE decoder (after Mark Adler's puff.c) that
/// also reports the longest back-reference distance. zlib-rs always
/// inflates with a 32 KiB window, whatever window bits it is given, so
/// it cannot tell whether a compressor kept to a smaller window.
/// `history` is the data of earlier messages (context takeover).
/// Returns the message and the longest distance, or None if invalid.
pub(super) fn puff(data: &[u8], history: &[u8]) -> Option<(Vec<u8>, usize)> {
    const LBASE: [u16; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEXT: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    const DBASE: [u16; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DEXT: [u32; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
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
