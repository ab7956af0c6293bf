//! An encrypted byte stream over any transport, driving the record layer.
//!
//! ```text
//! poll_write(buf) --seal up to one record--> wbuf --write--> transport
//! transport --read--> rbuf --open in place--> plaintext range --copy--> poll_read(buf)
//! ```
//! Each direction has one buffer: writes seal into `wbuf` (one copy, fused
//! with encryption's pass over the data) and reads decrypt in place inside
//! `rbuf`, so nothing is allocated per record. The buffers start small and
//! grow (to 256 KiB each at most) only when records or writes need it: a
//! stream that carries requests and answers holds a few KiB, not half a
//! megabyte, and setting one up zeroes no large buffer it will not use.
//!
//! `poll_shutdown` sends the authenticated end-of-stream record before closing the
//! transport's write side; a reader that sees the transport end without that
//! record reports truncation instead of a clean end of file.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use reach_proto::handshake::{SessionKeys, CONFIRM_LEN};
use reach_proto::record::{
    Opener, RecordKind, Sealer, MAX_RECORD_LEN, MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN, TAG_LEN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Records sealed per `poll_write` call at most: large application writes go out
/// in one transport write of up to this many records, cutting syscalls.
const RECORDS_PER_WRITE: usize = 4;
/// Read buffer: room for a few whole records, so one transport read can pull in
/// several and compaction moves at most one partial record.
const READ_BUF_LEN: usize = 4 * MAX_RECORD_LEN;
/// The read buffer at first: a page, for small records (a hub holds one per
/// node link). A record that does not fit doubles it, up to
/// [`READ_BUF_LEN`].
const INITIAL_READ_BUF_LEN: usize = 4 * 1024;
/// The write buffer at most.
const WRITE_BUF_LEN: usize = RECORDS_PER_WRITE * MAX_RECORD_LEN;

/// An encrypted stream over transport `T`.
pub struct SecureStream<T> {
    io: T,
    sealer: Sealer,
    opener: Opener,
    rbuf: Box<[u8]>,
    /// Undecrypted bytes are `rbuf[rstart..rend]`.
    rstart: usize,
    rend: usize,
    /// Decrypted bytes not yet handed out are `rbuf[pstart..pend]`.
    pstart: usize,
    pend: usize,
    read_done: bool,
    /// The peer moved its direction to another connection (a `Moved` record).
    moved: bool,
    /// Sealed bytes waiting for the transport are `wbuf[wpos..wlen]`.
    wbuf: Box<[u8]>,
    wpos: usize,
    wlen: usize,
    end_sent: bool,
    /// The peer's key confirmation, still to come before its first record
    /// (see [`SecureStream::expect_confirmation`]).
    awaiting: Option<[u8; CONFIRM_LEN]>,
}

impl<T> SecureStream<T> {
    /// Wraps `io` with the keys of a finished handshake.
    pub fn new(io: T, keys: &SessionKeys) -> Self {
        Self {
            io,
            sealer: Sealer::new(keys.cipher, &keys.send),
            opener: Opener::new(keys.cipher, &keys.recv),
            rbuf: vec![0u8; INITIAL_READ_BUF_LEN].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            pstart: 0,
            pend: 0,
            read_done: false,
            moved: false,
            wbuf: Box::default(),
            wpos: 0,
            wlen: 0,
            end_sent: false,
            awaiting: None,
        }
    }

    /// The peer's key confirmation comes first on the transport, before
    /// its first record: reads fail unless it is `confirmation`. For a
    /// stream handed out before the handshake's confirmation arrived (a
    /// connect-back to the node that asked for it): nothing can be read
    /// before the peer proved it holds the keys, and what this side writes
    /// is sealed with keys a replayer does not have.
    pub(crate) fn expect_confirmation(&mut self, confirmation: [u8; CONFIRM_LEN]) {
        self.awaiting = Some(confirmation);
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Whether the peer's direction moved to another connection: reads then
    /// end as at end of file, and the rest comes on the new connection.
    pub fn moved(&self) -> bool {
        self.moved
    }

    /// Whether this side's direction has ended or moved.
    pub fn write_closed(&self) -> bool {
        self.end_sent
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<T: AsyncRead + Unpin> SecureStream<T> {
    /// Decrypts the next record into the plaintext window; Ok(false) when more
    /// transport bytes are needed.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(r) = self
            .opener
            .open(&mut self.rbuf[self.rstart..self.rend])
            .map_err(invalid)?
        else {
            return Ok(false);
        };
        let base = self.rstart;
        self.rstart += r.consumed;
        match r.kind {
            RecordKind::Data => {
                self.pstart = base + r.payload.start;
                self.pend = base + r.payload.end;
            }
            RecordKind::End => self.read_done = true,
            RecordKind::Moved => {
                self.read_done = true;
                self.moved = true;
            }
        }
        Ok(true)
    }

    /// Reads more transport bytes into the buffer; an end of the transport
    /// here is an abnormal end, described by `eof`.
    fn poll_fill(&mut self, cx: &mut Context<'_>, eof: &'static str) -> Poll<io::Result<()>> {
        self.make_room()?;
        let mut rb = ReadBuf::new(&mut self.rbuf[self.rend..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, eof)));
        }
        self.rend += n;
        Poll::Ready(Ok(()))
    }

    /// Makes room for the record at `rstart` by moving its partial bytes to the
    /// front when it would not fit in the space left.
    fn make_room(&mut self) -> io::Result<()> {
        let pending = self.rend - self.rstart;
        let need = if self.awaiting.is_some() {
            CONFIRM_LEN
        } else {
            Opener::needed(&self.rbuf[self.rstart..self.rend])
                .map_err(invalid)?
                // The length is not known yet: the full buffer keeps room
                // for a largest record (fewer, larger reads); the small one
                // needs only the header to learn whether it must grow.
                .unwrap_or(if self.rbuf.len() >= READ_BUF_LEN {
                    RECORD_HEADER_LEN + MAX_RECORD_PAYLOAD + TAG_LEN
                } else {
                    RECORD_HEADER_LEN
                })
                .min(READ_BUF_LEN)
        };
        if need > self.rbuf.len() {
            // Small records: double. A large one means bulk traffic: the
            // full buffer at once, whose reads are large.
            let size = if need > 16 * 1024 {
                READ_BUF_LEN
            } else {
                need.next_power_of_two().max(2 * self.rbuf.len())
            };
            let mut grown = vec![0u8; size.max(need)].into_boxed_slice();
            grown[..pending].copy_from_slice(&self.rbuf[self.rstart..self.rend]);
            self.rbuf = grown;
            self.rstart = 0;
            self.rend = pending;
        } else if pending == 0 {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart + need > self.rbuf.len() {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rstart = 0;
            self.rend = pending;
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SecureStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pstart < this.pend {
                let n = (this.pend - this.pstart).min(buf.remaining());
                buf.put_slice(&this.rbuf[this.pstart..this.pstart + n]);
                this.pstart += n;
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            if let Some(expected) = this.awaiting {
                let pending = &this.rbuf[this.rstart..this.rend];
                if let Some(got) = pending.first_chunk::<CONFIRM_LEN>() {
                    reach_proto::handshake::check_confirmation(&expected, got).map_err(invalid)?;
                    this.rstart += CONFIRM_LEN;
                    this.awaiting = None;
                    continue;
                }
                ready!(this.poll_fill(
                    cx,
                    "the peer closed the connection before confirming the session keys"
                ))?;
                continue;
            }
            let pending = &this.rbuf[this.rstart..this.rend];
            let whole = Opener::peek(pending).map_err(invalid)?;
            if let Some((_, len)) = whole.filter(|(_, len)| *len <= buf.remaining()) {
                // Fast path: decrypt straight into the caller's buffer when the
                // whole record fits there, saving a pass over the data.
                if let Some(r) = this
                    .opener
                    .open_into(pending, buf.initialize_unfilled_to(len))
                    .map_err(invalid)?
                {
                    this.rstart += r.consumed;
                    match r.kind {
                        RecordKind::Data if r.payload.is_empty() => continue,
                        RecordKind::Data => {
                            buf.advance(r.payload.len());
                            return Poll::Ready(Ok(()));
                        }
                        RecordKind::End => {
                            this.read_done = true;
                            continue;
                        }
                        RecordKind::Moved => {
                            this.read_done = true;
                            this.moved = true;
                            continue;
                        }
                    }
                }
            }
            if this.open_next()? {
                continue;
            }
            ready!(this.poll_fill(
                cx,
                "stream truncated: peer closed the connection without ending the stream"
            ))?;
        }
    }
}

impl<T: AsyncWrite + Unpin> SecureStream<T> {
    /// Ends this direction with a `Moved` record: everything written so far
    /// goes out first, then the transport's write side closes, and the peer
    /// knows the rest comes on another connection.
    pub fn poll_move(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_close_with(cx, RecordKind::Moved)
    }

    fn poll_close_with(&mut self, cx: &mut Context<'_>, kind: RecordKind) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if !self.end_sent {
            self.reserve(RECORD_HEADER_LEN + TAG_LEN);
            self.wlen += self
                .sealer
                .seal_into(kind, &[], &mut self.wbuf[self.wlen..])
                .map_err(invalid)?;
            self.end_sent = true;
            ready!(self.poll_drain(cx))?;
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Makes `wbuf` hold at least `len` bytes; only called drained (nothing
    /// to keep), growing in powers of two up to [`WRITE_BUF_LEN`].
    fn reserve(&mut self, len: usize) {
        debug_assert_eq!(self.wlen, 0);
        if self.wbuf.len() < len {
            let size = len.next_power_of_two().clamp(1024, WRITE_BUF_LEN).max(len);
            self.wbuf = vec![0u8; size].into_boxed_slice();
        }
    }

    /// Writes out sealed bytes until `wbuf` is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wlen {
            let n =
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..self.wlen]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wpos = 0;
        self.wlen = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SecureStream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.end_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        ready!(this.poll_drain(cx))?;
        let take = buf.len().min(RECORDS_PER_WRITE * MAX_RECORD_PAYLOAD);
        let records = take.div_ceil(MAX_RECORD_PAYLOAD).max(1);
        this.reserve(take + records * (RECORD_HEADER_LEN + TAG_LEN));
        for chunk in buf[..take].chunks(MAX_RECORD_PAYLOAD) {
            this.wlen += this
                .sealer
                .seal_into(RecordKind::Data, chunk, &mut this.wbuf[this.wlen..])
                .map_err(invalid)?;
        }
        // Start sending at once; what the transport cannot take yet stays
        // buffered and goes out on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_close_with(cx, RecordKind::End)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::Cipher;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn keys(flip: bool) -> SessionKeys {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let (send, recv) = if flip { (b, a) } else { (a, b) };
        SessionKeys {
            cipher: Cipher::ChaChaPoly,
            send,
            recv,
        }
    }

    #[tokio::test]
    async fn bytes_cross_in_both_directions_with_half_close() {
        let (a, b) = tokio::io::duplex(1000);
        let mut a = SecureStream::new(a, &keys(false));
        let mut b = SecureStream::new(b, &keys(true));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.expect("write");
            a.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, data);
        b.write_all(b"thanks").await.expect("reply");
        b.shutdown().await.expect("shutdown");
        assert_eq!(writer.await.expect("join"), b"thanks");
    }

    /// Sends `writes` (each a size) from one stream to the other, reading
    /// with `read_len` buffers; returns what arrived and both ends' buffer
    /// sizes (read buffer of the reader, write buffer of the writer).
    async fn transfer(writes: Vec<usize>, read_len: usize) -> (Vec<u8>, Vec<u8>, usize, usize) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut a = SecureStream::new(a, &keys(false));
        let mut b = SecureStream::new(b, &keys(true));
        let mut sent = Vec::new();
        for (i, n) in writes.iter().enumerate() {
            sent.extend((0..*n).map(|j| (i * 7 + j) as u8));
        }
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for n in writes {
                a.write_all(&data[at..at + n]).await.expect("write");
                at += n;
            }
            a.shutdown().await.expect("shutdown");
            a.wbuf.len()
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; read_len];
        loop {
            let n = b.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let wlen = writer.await.expect("join");
        (got, sent, b.rbuf.len(), wlen)
    }

    #[tokio::test]
    async fn small_traffic_keeps_small_buffers_and_bulk_grows_them() {
        let (got, sent, rlen, wlen) = transfer(vec![100, 2000, 9000, 1], 4096).await;
        assert_eq!(got, sent);
        assert!(rlen <= 16 * 1024, "{rlen}");
        assert!(wlen <= 16 * 1024, "{wlen}");
        let (got, sent, rlen, wlen) = transfer(vec![10, 300_000, 10], 1 << 20).await;
        assert_eq!(got, sent);
        assert_eq!(rlen, READ_BUF_LEN);
        assert_eq!(wlen, WRITE_BUF_LEN);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        #[test]
        fn any_writes_arrive_intact_whatever_the_buffers_grow_to(
            writes in proptest::collection::vec(0usize..150_000, 1..8),
            read_len in 1usize..100_000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let (got, sent, _, _) = rt.block_on(transfer(writes, read_len));
            proptest::prop_assert!(got == sent);
        }
    }

    #[tokio::test]
    async fn a_deferred_confirmation_is_checked_before_the_first_byte_is_read() {
        for (sent, ok) in [([7u8; CONFIRM_LEN], true), ([8u8; CONFIRM_LEN], false)] {
            let (mut a, b) = tokio::io::duplex(1 << 16);
            // The initiator's confirmation, then its records.
            a.write_all(&sent).await.expect("confirmation");
            let mut a = SecureStream::new(a, &keys(false));
            let mut b = SecureStream::new(b, &keys(true));
            b.expect_confirmation([7u8; CONFIRM_LEN]);
            // Writing needs no confirmation: it is sealed for the peer's keys.
            b.write_all(b"early")
                .await
                .expect("write before confirming");
            a.write_all(b"hello").await.expect("write");
            a.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            let read = b.read_to_end(&mut got).await;
            if ok {
                read.expect("confirmed");
                assert_eq!(got, b"hello");
            } else {
                let err = read.expect_err("a wrong confirmation");
                assert!(err.to_string().contains("did not confirm"), "{err}");
                assert!(got.is_empty(), "nothing is read from an unconfirmed peer");
            }
        }
    }

    #[tokio::test]
    async fn closing_without_end_record_is_truncation() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut a = SecureStream::new(a, &keys(false));
        let mut b = SecureStream::new(b, &keys(true));
        a.write_all(b"partial").await.expect("write");
        a.flush().await.expect("flush");
        drop(a);
        let mut got = Vec::new();
        let err = b.read_to_end(&mut got).await.expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"partial");
    }

    #[tokio::test]
    async fn tampered_bytes_are_an_error_not_data() {
        let (mut raw, b) = tokio::io::duplex(1 << 20);
        let mut b = SecureStream::new(b, &keys(true));
        let mut sealer = Sealer::new(Cipher::ChaChaPoly, &[1; 32]);
        let mut wire = Vec::new();
        sealer
            .seal(RecordKind::Data, b"hello", &mut wire)
            .expect("seal");
        wire[5] ^= 0x40;
        raw.write_all(&wire).await.expect("write");
        let mut buf = [0u8; 16];
        let err = b.read(&mut buf).await.expect_err("forged");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
