//! How a plaintext stream carries its bytes: in chunks as the application
//! wrote them, then an authenticated end mark.
//!
//! # Why chunks
//! A plaintext stream's bytes travel as they are, so a relay, a middlebox or
//! an attacker on the path that closes the connection early would look like
//! a clean end of file: a truncated transfer would pass as complete. The
//! sender therefore ends the stream with a mark only it can make (a MAC
//! under a key of this session's handshake over the number of bytes sent),
//! and the receiver reports an end of file only after checking it. For the
//! receiver to tell the mark from data without holding bytes back (which
//! would stall request and answer protocols), each application write goes
//! out behind an 8-byte length header:
//!
//! ```text
//! len u64 (1..=MAX_CHUNK) | len bytes      a chunk of data, repeated
//! 0 u64 | sent u64 | tag [16]              the end mark, then the TCP FIN
//! ```
//!
//! The header and the data leave in one vectored write. The reader reads
//! a chunk's data straight into the application's buffer, the next header
//! into eight bytes of its own, and on into the application's buffer right
//! after the data, all in one vectored read: as long as a read crosses at
//! most one chunk boundary (chunks at least as large as the reader's
//! buffer, as bulk writers make them), no byte of data is copied in user
//! space and no read stops short at a boundary, which is what plaintext is
//! for. Only a read that crosses a second boundary moves the bytes after it
//! within the application's buffer ([`Deframer::received_inline`]). A chunk
//! is as large as the application's write (up to [`MAX_CHUNK`]).
//!
//! Why reads must not stop at boundaries: in the lab, a reader whose reads
//! ended at every 256 KiB chunk boundary moved one stream at 0.35-0.65x of
//! plain TCP, and the same split reads with no header bytes on the wire
//! still only 0.7-0.85x: the extra short reads cost it. Reading on past the
//! header brought it back to 1.0x.
//!
//! The mark authenticates the end and the byte count, not the bytes
//! (plaintext streams trade integrity for speed on trusted fabrics): a
//! connection cut anywhere, or closed without the mark, is reported as
//! truncation, never as a clean end.
//!
//! [`Framer`] and [`Deframer`] hold the state; the driver does the I/O.

use aws_lc_rs::{constant_time, hmac};

/// Length of a chunk header.
pub const HEADER_LEN: usize = 8;
/// Length of the end mark's body after its zero header: the byte count and
/// the tag.
pub const END_BODY_LEN: usize = 8 + TAG_LEN;
/// Length of the whole end mark.
pub const END_MARK_LEN: usize = HEADER_LEN + END_BODY_LEN;
/// Length of the end mark's tag.
pub const TAG_LEN: usize = 16;
/// Largest chunk: a larger write goes out as several.
pub const MAX_CHUNK: u32 = 1 << 24;
/// What the tag covers besides the byte count.
const END_LABEL: &[u8] = b"reach plaintext end";

/// What is wrong with a plaintext stream's framing.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlainError {
    /// A header announced more than a chunk may hold.
    #[error("plaintext chunk of {0} bytes announced, more than the {MAX_CHUNK} allowed")]
    ChunkTooLong(u64),
    /// The end mark's tag is not this session's.
    #[error("plaintext stream's end mark failed authentication")]
    EndForged,
    /// The end mark counts other bytes than arrived.
    #[error("plaintext stream's end mark counts {said} bytes but {got} arrived")]
    EndMiscounted {
        /// The sender's count.
        said: u64,
        /// What this side received.
        got: u64,
    },
    /// Bytes came after the end mark.
    #[error("plaintext stream went on after its end mark")]
    DataAfterEnd,
    /// The connection ended before the end mark.
    #[error(
        "plaintext stream truncated after {got} bytes: the connection ended without the peer's end mark"
    )]
    Truncated {
        /// Bytes received before the cut.
        got: u64,
    },
    /// The stream cannot end cleanly: the application's last write was cut
    /// short and the rest of its chunk never came.
    #[error("{owed} bytes of the last write were never written; the stream cannot end cleanly")]
    WriteCutShort {
        /// Bytes the chunk header announced that were not written.
        owed: u64,
    },
}

/// The MAC key of one direction's end mark (the raw secret: the HMAC key
/// schedule is made once, when the mark is made or checked).
#[derive(Clone)]
pub struct EndKey([u8; 32]);

impl std::fmt::Debug for EndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndKey(..)")
    }
}

impl EndKey {
    /// A key from 32 secret bytes of the handshake's key schedule.
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(*secret)
    }

    fn tag(&self, sent: u64) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &self.0));
        ctx.update(END_LABEL);
        ctx.update(&sent.to_be_bytes());
        let full = ctx.sign();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        tag
    }
}

/// One direction's end-mark keys, from the handshake.
#[derive(Clone, Debug)]
pub struct EndKeys {
    /// For the mark this side sends.
    pub send: EndKey,
    /// For the mark this side receives.
    pub recv: EndKey,
}

/// The sending side's state: which chunk is being written.
#[derive(Debug)]
pub struct Framer {
    key: EndKey,
    /// The current chunk's header; `head_sent` of its bytes are out.
    head: [u8; HEADER_LEN],
    head_sent: usize,
    /// Data bytes the current chunk still owes.
    owed: u64,
    /// Data bytes sent so far.
    sent: u64,
}

/// What the driver writes next: `head` (possibly empty), then up to `data`
/// bytes of the application's buffer, in one vectored write.
#[derive(Debug, PartialEq, Eq)]
pub struct Next {
    head: [u8; HEADER_LEN],
    head_len: usize,
    /// Data bytes the write may carry.
    pub data: usize,
}

impl Next {
    /// The header bytes to write before the data (empty inside a chunk).
    pub fn head(&self) -> &[u8] {
        &self.head[HEADER_LEN - self.head_len..]
    }
}

impl Framer {
    /// A sender whose end mark is made with `key`.
    pub fn new(key: EndKey) -> Self {
        Self {
            key,
            head: [0; HEADER_LEN],
            head_sent: HEADER_LEN,
            owed: 0,
            sent: 0,
        }
    }

    /// What to write when the application offers `available` bytes (more
    /// than zero): the rest of the current chunk, or a new chunk's header
    /// and its data.
    pub fn next(&mut self, available: usize) -> Next {
        if self.owed == 0 && self.head_sent == HEADER_LEN && available > 0 {
            let len = u32::try_from(available).map_or(MAX_CHUNK, |n| n.min(MAX_CHUNK));
            self.head = u64::from(len).to_be_bytes();
            self.head_sent = 0;
            self.owed = u64::from(len);
        }
        let data = usize::try_from(self.owed).map_or(available, |o| o.min(available));
        Next {
            head: self.head,
            head_len: HEADER_LEN - self.head_sent,
            data,
        }
    }

    /// `n` bytes of the last [`Next`] went out; returns how many of them
    /// were the application's data.
    pub fn wrote(&mut self, n: usize) -> usize {
        let head = n.min(HEADER_LEN - self.head_sent);
        self.head_sent += head;
        let data = n - head;
        self.owed -= data as u64;
        self.sent += data as u64;
        data
    }

    /// The end mark, once every chunk is complete.
    pub fn end_mark(&self) -> Result<[u8; END_MARK_LEN], PlainError> {
        if self.owed > 0 || self.head_sent < HEADER_LEN {
            return Err(PlainError::WriteCutShort { owed: self.owed });
        }
        let mut mark = [0u8; END_MARK_LEN];
        mark[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&self.sent.to_be_bytes());
        mark[HEADER_LEN + 8..].copy_from_slice(&self.key.tag(self.sent));
        Ok(mark)
    }
}

/// Where the receiving side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    /// Inside a chunk: this many data bytes still to come (0: the next
    /// header is due).
    Chunk(u64),
    /// The end mark's body is due.
    EndBody,
    /// The end checked out.
    Ended,
    /// The stream failed; every later call reports it again.
    Failed(PlainError),
}

/// The receiving side's state.
#[derive(Debug)]
pub struct Deframer {
    key: EndKey,
    state: ReadState,
    /// The header or end body being read; `got` bytes of it are in.
    spare: [u8; END_BODY_LEN],
    got: usize,
    received: u64,
}

impl Deframer {
    /// A receiver that checks the end mark with `key`.
    pub fn new(key: EndKey) -> Self {
        Self {
            key,
            state: ReadState::Chunk(0),
            spare: [0; END_BODY_LEN],
            got: 0,
            received: 0,
        }
    }

    /// Data bytes the driver may read into the application's buffer now
    /// (before [`spare`](Self::spare)); 0 when a header or the end's body is
    /// due, or the stream has ended.
    pub fn data_due(&self) -> u64 {
        match self.state {
            ReadState::Chunk(left) => left,
            _ => 0,
        }
    }

    /// Where the driver reads framing bytes: the rest of the next header
    /// (after the chunk's last data bytes, in the same vectored read) or of
    /// the end mark's body. Empty once the stream ended or failed.
    pub fn spare(&mut self) -> &mut [u8] {
        let want = match self.state {
            ReadState::Chunk(_) => HEADER_LEN,
            ReadState::EndBody => END_BODY_LEN,
            ReadState::Ended | ReadState::Failed(_) => 0,
        };
        let got = self.got.min(want);
        &mut self.spare[got..want]
    }

    /// A read put `data` bytes into the application's buffer (at most
    /// [`data_due`](Self::data_due)) and then `spare` bytes into
    /// [`spare`](Self::spare).
    pub fn received(&mut self, data: usize, spare: usize) -> Result<(), PlainError> {
        self.check()?;
        if let ReadState::Chunk(left) = self.state {
            let data = (data as u64).min(left);
            self.received += data;
            self.state = ReadState::Chunk(left - data);
        }
        self.got += spare;
        let parsed = self.parse();
        self.failing(parsed)
    }

    /// Takes the framing out of `bytes` that arrived after the
    /// [`spare`](Self::spare) was filled (a read that went on into the
    /// application's buffer past a chunk's header): moves the data to the
    /// front of `bytes` and returns its length. A read whose bytes all
    /// belong to the chunk after the header moves nothing; only bytes after
    /// a further header in the same read are moved within the buffer.
    pub fn received_inline(&mut self, bytes: &mut [u8]) -> Result<usize, PlainError> {
        let kept = self.inline(bytes);
        self.failing(kept)
    }

    /// `outcome`, after making an error the stream's for good.
    fn failing<T>(&mut self, outcome: Result<T, PlainError>) -> Result<T, PlainError> {
        if let Err(e) = outcome {
            self.state = ReadState::Failed(e);
        }
        outcome
    }

    fn inline(&mut self, bytes: &mut [u8]) -> Result<usize, PlainError> {
        self.check()?;
        let (mut at, mut kept) = (0, 0);
        while at < bytes.len() {
            match self.state {
                ReadState::Chunk(left) if left > 0 => {
                    let n =
                        usize::try_from(left).map_or(bytes.len() - at, |l| l.min(bytes.len() - at));
                    if kept != at {
                        bytes.copy_within(at..at + n, kept);
                    }
                    at += n;
                    kept += n;
                    self.received += n as u64;
                    self.state = ReadState::Chunk(left - n as u64);
                }
                ReadState::Chunk(_) | ReadState::EndBody => {
                    let spare = self.spare();
                    let n = spare.len().min(bytes.len() - at);
                    spare[..n].copy_from_slice(&bytes[at..at + n]);
                    at += n;
                    self.got += n;
                    self.parse()?;
                }
                ReadState::Ended => {
                    return Err(PlainError::DataAfterEnd);
                }
                ReadState::Failed(e) => return Err(e),
            }
        }
        Ok(kept)
    }

    /// The connection ended (read returned 0): fine only after the end mark.
    pub fn at_eof(&mut self) -> Result<(), PlainError> {
        self.check()?;
        if self.state == ReadState::Ended {
            return Ok(());
        }
        let truncated = Err(PlainError::Truncated { got: self.received });
        self.failing(truncated)
    }

    /// The end mark arrived and checked out: the stream ended cleanly.
    pub fn ended(&self) -> bool {
        self.state == ReadState::Ended
    }

    /// The error the stream failed with, if it did (every later call
    /// reports it again).
    pub fn check(&self) -> Result<(), PlainError> {
        match self.state {
            ReadState::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Acts on a header or end body that is complete.
    fn parse(&mut self) -> Result<(), PlainError> {
        match self.state {
            ReadState::Chunk(0) if self.got == HEADER_LEN => {
                self.got = 0;
                let mut head = [0u8; HEADER_LEN];
                head.copy_from_slice(&self.spare[..HEADER_LEN]);
                match u64::from_be_bytes(head) {
                    0 => self.state = ReadState::EndBody,
                    len if len > u64::from(MAX_CHUNK) => return Err(PlainError::ChunkTooLong(len)),
                    len => self.state = ReadState::Chunk(len),
                }
            }
            ReadState::EndBody if self.got == END_BODY_LEN => {
                self.got = 0;
                let mut said = [0u8; 8];
                said.copy_from_slice(&self.spare[..8]);
                let said = u64::from_be_bytes(said);
                let want = self.key.tag(said);
                constant_time::verify_slices_are_equal(&want, &self.spare[8..])
                    .map_err(|_| PlainError::EndForged)?;
                if said != self.received {
                    return Err(PlainError::EndMiscounted {
                        said,
                        got: self.received,
                    });
                }
                self.state = ReadState::Ended;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> (EndKey, EndKey) {
        (EndKey::new(&[7; 32]), EndKey::new(&[7; 32]))
    }

    /// What a framer puts on the wire for `writes`, each written whole in
    /// pieces of at most `piece` bytes (as a socket with little room takes
    /// them), and the data as the application offered it.
    fn wire(writes: &[Vec<u8>], piece: usize) -> Vec<u8> {
        let mut f = Framer::new(keys().0);
        let mut out = Vec::new();
        for w in writes {
            let mut at = 0;
            while at < w.len() {
                let next = f.next(w.len() - at);
                let mut bytes = next.head().to_vec();
                bytes.extend_from_slice(&w[at..at + next.data]);
                let n = bytes.len().min(piece);
                out.extend_from_slice(&bytes[..n]);
                at += f.wrote(n);
            }
        }
        out.extend_from_slice(&f.end_mark().expect("every chunk complete"));
        out
    }

    /// Reads `wire` through a deframer as the driver does, in reads of at
    /// most `piece` bytes into a buffer of `cap`: the chunk's data, the
    /// next header into the spare, then on into the buffer (like readv);
    /// returns the data and whether the end checked out.
    fn read(wire: &[u8], piece: usize, cap: usize) -> Result<(Vec<u8>, bool), PlainError> {
        let mut d = Deframer::new(keys().1);
        let mut data = Vec::new();
        let mut at = 0;
        while at < wire.len() && !d.ended() {
            let avail = (wire.len() - at).min(piece);
            let due = usize::try_from(d.data_due()).unwrap_or(usize::MAX);
            let want = due.min(cap);
            let whole = due <= cap;
            let to_data = want.min(avail);
            data.extend_from_slice(&wire[at..at + to_data]);
            let (to_spare, spare_len) = if whole && to_data == want {
                let s = d.spare();
                let n = s.len().min(avail - to_data);
                s[..n].copy_from_slice(&wire[at + to_data..at + to_data + n]);
                (n, s.len())
            } else {
                (0, 1)
            };
            let to_rest = if to_spare == spare_len {
                (cap - want).min(avail - to_data - to_spare)
            } else {
                0
            };
            if to_data + to_spare + to_rest == 0 {
                break;
            }
            let rest_at = at + to_data + to_spare;
            at = rest_at + to_rest;
            d.received(to_data, to_spare)?;
            let mut rest = wire[rest_at..rest_at + to_rest].to_vec();
            let kept = d.received_inline(&mut rest)?;
            data.extend_from_slice(&rest[..kept]);
        }
        if !d.ended() {
            d.at_eof()?;
        }
        Ok((data, d.ended()))
    }

    #[test]
    fn bytes_after_the_end_mark_are_refused() {
        let mut w = wire(&[b"abc".to_vec()], 100);
        w.push(0);
        assert_eq!(read(&w, 100, 100), Err(PlainError::DataAfterEnd));
    }

    #[test]
    fn an_empty_stream_is_just_the_end_mark() {
        let w = wire(&[], 1);
        assert_eq!(w.len(), END_MARK_LEN);
        assert_eq!(read(&w, 100, 100), Ok((Vec::new(), true)));
    }

    #[test]
    fn a_stream_cut_before_its_mark_is_truncated() {
        let w = wire(&[b"hello".to_vec()], 100);
        for cut in 0..w.len() {
            assert!(
                matches!(read(&w[..cut], 100, 100), Err(PlainError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn another_sessions_mark_or_a_changed_count_fails() {
        let mut f = Framer::new(EndKey::new(&[8; 32]));
        let next = f.next(3);
        assert_eq!(next.head(), &3u64.to_be_bytes());
        f.wrote(HEADER_LEN + 3);
        let mut w = 3u64.to_be_bytes().to_vec();
        w.extend_from_slice(b"abc");
        let mark = f.end_mark().expect("complete");
        let mut forged = w.clone();
        forged.extend_from_slice(&mark);
        assert_eq!(read(&forged, 100, 100), Err(PlainError::EndForged));
        // The right key, counting one byte less than arrived.
        let mut d = Deframer::new(keys().1);
        let mut own = Framer::new(keys().0);
        own.next(2);
        own.wrote(HEADER_LEN + 2);
        let mut body = [0u8; END_BODY_LEN];
        body.copy_from_slice(&own.end_mark().expect("complete")[HEADER_LEN..]);
        d.spare().copy_from_slice(&3u64.to_be_bytes());
        d.received(0, HEADER_LEN).expect("header");
        d.received(3, 0).expect("data");
        d.spare().copy_from_slice(&[0; HEADER_LEN]);
        d.received(0, HEADER_LEN).expect("end header");
        d.spare().copy_from_slice(&body);
        assert_eq!(
            d.received(0, END_BODY_LEN),
            Err(PlainError::EndMiscounted { said: 2, got: 3 })
        );
        // Failed for good.
        assert!(d.at_eof().is_err());
    }

    #[test]
    fn a_header_beyond_the_largest_chunk_is_refused() {
        let mut d = Deframer::new(keys().1);
        d.spare()
            .copy_from_slice(&(u64::from(MAX_CHUNK) + 1).to_be_bytes());
        assert_eq!(
            d.received(0, HEADER_LEN),
            Err(PlainError::ChunkTooLong(u64::from(MAX_CHUNK) + 1))
        );
    }

    #[test]
    fn a_write_cut_short_cannot_end_cleanly() {
        let mut f = Framer::new(keys().0);
        f.next(10);
        assert_eq!(f.wrote(HEADER_LEN + 4), 4);
        assert_eq!(f.end_mark(), Err(PlainError::WriteCutShort { owed: 6 }));
        // The rest comes from the next write, without a new header.
        let next = f.next(100);
        assert_eq!((next.head(), next.data), (&[][..], 6));
        f.wrote(6);
        assert!(f.end_mark().is_ok());
        // A header only partly out is a cut too.
        let mut f = Framer::new(keys().0);
        f.next(1);
        f.wrote(2);
        assert!(f.end_mark().is_err());
    }

    #[test]
    fn large_writes_go_out_in_chunks_of_at_most_the_largest() {
        let mut f = Framer::new(keys().0);
        let next = f.next(usize::MAX);
        assert_eq!(next.data, MAX_CHUNK as usize);
        assert_eq!(next.head(), &u64::from(MAX_CHUNK).to_be_bytes());
    }

    proptest! {
        #[test]
        fn any_writes_read_back_whole_in_any_pieces(
            writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..12),
            wpiece in 1usize..64,
            rpiece in 1usize..64,
            cap in 1usize..64,
        ) {
            let w = wire(&writes, wpiece);
            let (data, ended) = read(&w, rpiece, cap).expect("reads back");
            prop_assert!(ended);
            prop_assert_eq!(data, writes.concat());
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_end_cleanly(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            rpiece in 1usize..64,
            cap in 1usize..64,
        ) {
            // Without the key, no byte string ends cleanly.
            prop_assert!(read(&bytes, rpiece, cap).is_err());
        }

        #[test]
        fn any_cut_of_a_stream_is_reported(
            writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let w = wire(&writes, usize::MAX);
            let cut = cut.index(w.len());
            prop_assert!(read(&w[..cut], 7, 13).is_err());
        }
    }
}
