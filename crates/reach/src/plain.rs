//! A plaintext stream over TCP: the application's bytes in chunks and an
//! authenticated end mark ([`reach_proto::plain_chunks`]), with no copy of
//! the data in user space.
//!
//! ```text
//! poll_write(buf) --writev [header, buf]--> TCP
//! TCP --readv [app's buffer up to the chunk's end, next header, rest of the app's buffer]--> poll_read(buf)
//! ```
//! `poll_shutdown` sends the end mark before closing the write side; a
//! reader that sees the connection end without a valid mark reports
//! truncation (`UnexpectedEof`) instead of a clean end of file.

use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use reach_proto::plain_chunks::{Deframer, EndKeys, Framer, PlainError, END_MARK_LEN};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plaintext stream (see the module docs).
pub(crate) struct PlainStream {
    tcp: TcpStream,
    framer: Framer,
    deframer: Deframer,
    /// Once shutting down: the end mark and how much of it is out.
    closing: Option<([u8; END_MARK_LEN], usize)>,
    /// A read error that came after data the last call returned.
    read_error: Option<io::Error>,
}

impl PlainStream {
    /// The TCP connection it runs on.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// A stream over `tcp` right after its handshake, with the handshake's
    /// end-mark keys.
    pub(crate) fn new(tcp: TcpStream, keys: EndKeys) -> Self {
        Self {
            tcp,
            framer: Framer::new(keys.send),
            deframer: Deframer::new(keys.recv),
            closing: None,
            read_error: None,
        }
    }

    /// The bare connection, for a caller that has neither read nor written
    /// through the stream (a relay circuit, whose bytes are another
    /// stream's records).
    pub(crate) fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

fn io_error(e: PlainError) -> io::Error {
    let kind = match e {
        PlainError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
        PlainError::WriteCutShort { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for PlainStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Reads go on until the buffer is full or the socket is drained:
        // only `WouldBlock` clears tokio's readiness for a vectored read,
        // so a call that returned after a short read would leave the socket
        // marked readable and the next would pick up a few bytes at a time.
        if let Some(e) = this.read_error.take() {
            return Poll::Ready(Err(e));
        }
        let mut delivered = 0;
        loop {
            if let Err(e) = this.deframer.check() {
                return Poll::Ready(if delivered > 0 {
                    Ok(())
                } else {
                    Err(io_error(e))
                });
            }
            if this.deframer.ended() || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let due = this.deframer.data_due();
            let cap = buf.remaining();
            let want = usize::try_from(due).map_or(cap, |d| d.min(cap));
            // Once the rest of the chunk fits, the same read takes the next
            // header into the deframer's spare and goes on into the buffer
            // right after the chunk's data: one boundary per read costs no
            // copy and no extra system call.
            let whole = u64::try_from(cap).map_or(true, |c| due <= c);
            if delivered == 0 {
                ready!(this.tcp.poll_read_ready(cx))?;
            }
            let start = buf.filled().len();
            let (res, spare_len) = {
                let dst = buf.initialize_unfilled_to(cap);
                let (head, tail) = dst.split_at_mut(want);
                let spare: &mut [u8] = if whole {
                    this.deframer.spare()
                } else {
                    &mut []
                };
                let spare_len = spare.len();
                let tail: &mut [u8] = if whole { tail } else { &mut [] };
                let mut iov = [
                    IoSliceMut::new(head),
                    IoSliceMut::new(spare),
                    IoSliceMut::new(tail),
                ];
                (this.tcp.try_read_vectored(&mut iov), spare_len)
            };
            match res {
                Ok(0) if delivered > 0 => return Poll::Ready(Ok(())),
                Ok(0) => {
                    this.deframer.at_eof().map_err(io_error)?;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    let data = n.min(want);
                    let framing = (n - data).min(spare_len);
                    let rest = n - data - framing;
                    let mut kept = data;
                    let mut outcome = this.deframer.received(data, framing);
                    if outcome.is_ok() && rest > 0 {
                        let region = &mut buf.initialized_mut()[start + want..start + want + rest];
                        match this.deframer.received_inline(region) {
                            Ok(k) => {
                                // `data == want` here: the read went past it.
                                kept += k;
                            }
                            Err(e) => outcome = Err(e),
                        }
                    }
                    buf.advance(kept);
                    delivered += kept;
                    if let Err(e) = outcome {
                        if delivered == 0 {
                            return Poll::Ready(Err(io_error(e)));
                        }
                        // The data is the application's either way; the
                        // deframer reports the error on the next call.
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if delivered > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) if delivered > 0 => {
                    // Reported on the next call, after this data.
                    this.read_error = Some(e);
                    return Poll::Ready(Ok(()));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PlainStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the stream was shut down",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            let next = this.framer.next(buf.len());
            let data = &buf[..next.data];
            let n = if next.head().is_empty() {
                ready!(Pin::new(&mut this.tcp).poll_write(cx, data))?
            } else {
                let iov = [IoSlice::new(next.head()), IoSlice::new(data)];
                ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, &iov))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let wrote = this.framer.wrote(n);
            if wrote > 0 {
                return Poll::Ready(Ok(wrote));
            }
            // Only (part of) the header went out: go on until data does or
            // the socket is full (then the waker is registered).
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.closing {
                None => {
                    let mark = this.framer.end_mark().map_err(io_error)?;
                    this.closing = Some((mark, 0));
                }
                Some((mark, at)) if *at < END_MARK_LEN => {
                    let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, &mark[*at..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *at += n;
                }
                Some(_) => return Pin::new(&mut this.tcp).poll_shutdown(cx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reach_proto::plain_chunks::EndKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Every wait in these tests is bounded by this.
    const DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(DEADLINE, f)
            .await
            .expect("deadline passed")
    }

    /// Two ends of a plaintext stream over loopback TCP.
    async fn pair() -> (PlainStream, PlainStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        let (x, y) = (EndKey::new(&[1; 32]), EndKey::new(&[2; 32]));
        let ka = EndKeys {
            send: x.clone(),
            recv: y.clone(),
        };
        let kb = EndKeys { send: y, recv: x };
        (PlainStream::new(a, ka), PlainStream::new(b, kb))
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_the_end_is_clean() {
        within(bytes_arrive_whole_and_the_end_is_clean_body()).await;
    }

    async fn bytes_arrive_whole_and_the_end_is_clean_body() {
        let (mut a, mut b) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Writes of many sizes, as applications make them.
            for (i, piece) in sent.chunks(65_521).enumerate() {
                let (x, y) = piece.split_at(piece.len().min(i * 37 % 9000));
                a.write_all(x).await.expect("write");
                a.write_all(y).await.expect("write");
            }
            a.shutdown().await.expect("shutdown");
            a
        });
        let mut got = Vec::new();
        let mut small = [0u8; 7];
        let n = b.read(&mut small).await.expect("small read");
        got.extend_from_slice(&small[..n]);
        b.read_to_end(&mut got).await.expect("clean end");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        // Reads after the end keep saying end of file.
        assert_eq!(b.read(&mut small).await.expect("eof"), 0);
        let mut a = writer.await.expect("writer");
        // The other direction is still open, and ends on its own.
        b.write_all(b"back").await.expect("write back");
        b.shutdown().await.expect("shutdown back");
        let mut back = Vec::new();
        a.read_to_end(&mut back).await.expect("clean end back");
        assert_eq!(back, b"back");
    }

    #[tokio::test]
    async fn small_writes_read_back_in_large_reads() {
        within(small_writes_read_back_in_large_reads_body()).await;
    }

    async fn small_writes_read_back_in_large_reads_body() {
        // Every write its own chunk, all in the socket before the first
        // read: each read crosses many chunk boundaries.
        let (mut a, mut b) = pair().await;
        let mut sent = Vec::new();
        for i in 0..2000u32 {
            let piece: Vec<u8> = (0..(i % 97 + 1)).map(|j| (i + j) as u8).collect();
            a.write_all(&piece).await.expect("write");
            sent.extend_from_slice(&piece);
        }
        a.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = b.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
    }

    #[tokio::test]
    async fn a_connection_closed_without_the_end_mark_is_truncation() {
        within(a_connection_closed_without_the_end_mark_is_truncation_body()).await;
    }

    async fn a_connection_closed_without_the_end_mark_is_truncation_body() {
        let (mut a, mut b) = pair().await;
        a.write_all(b"part of it").await.expect("write");
        // Closed as a relay or a crashed peer would: FIN, no end mark.
        let mut tcp = a.into_tcp();
        tcp.shutdown().await.expect("fin");
        let mut got = Vec::new();
        let err = b.read_to_end(&mut got).await.expect_err("truncated");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            err.to_string().contains("truncated after 10 bytes"),
            "{err}"
        );
        assert_eq!(got, b"part of it");
        // And it stays an error.
        let mut more = [0u8; 4];
        assert!(b.read(&mut more).await.is_err());
    }

    #[tokio::test]
    async fn a_mark_from_another_session_is_refused() {
        within(a_mark_from_another_session_is_refused_body()).await;
    }

    async fn a_mark_from_another_session_is_refused_body() {
        let (a, mut b) = pair().await;
        let mut tcp = a.into_tcp();
        let mut wrong = Framer::new(EndKey::new(&[9; 32]));
        let next = wrong.next(2);
        let mut wire = next.head().to_vec();
        wire.extend_from_slice(b"hi");
        wrong.wrote(wire.len());
        wire.extend_from_slice(&wrong.end_mark().expect("complete"));
        tcp.write_all(&wire).await.expect("write");
        tcp.shutdown().await.expect("fin");
        let mut got = Vec::new();
        let err = b.read_to_end(&mut got).await.expect_err("forged");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }
}
