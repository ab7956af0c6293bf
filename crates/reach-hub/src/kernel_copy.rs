//! Moving bytes between two TCP connections inside the kernel: each
//! direction `splice(2)`s from one socket into a pipe and from the pipe into
//! the other socket, so the bytes are never copied to or from user space
//! (a relay that reads and writes, like socat, copies each byte twice).
//!
//! Ends are passed on as they came: a clean end of one direction (FIN) as a
//! FIN on the other side, once every byte before it went out; a failed
//! direction (reset, timeout) resets both connections, so neither node can
//! mistake a cut circuit for a finished one. Elsewhere than Linux the same
//! contract is kept with a user-space copy.

use std::io;
use std::net::Shutdown;

use tokio::net::TcpStream;

/// Bytes moved each way before the circuit ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the first connection to the second.
    pub forward: u64,
    /// From the second to the first.
    pub backward: u64,
}

/// Relays between `a` and `b` until both directions ended. An error means
/// a direction failed and both connections were reset.
pub async fn relay(a: TcpStream, b: TcpStream) -> io::Result<Moved> {
    let result = both_ways(&a, &b).await;
    if result.is_err() {
        reset(&a);
        reset(&b);
    }
    result
}

/// Runs both directions; the first failure ends both (the other direction
/// may be waiting for bytes that will never come).
async fn both_ways(a: &TcpStream, b: &TcpStream) -> io::Result<Moved> {
    let ab = one_way(a, b);
    let ba = one_way(b, a);
    tokio::pin!(ab, ba);
    let (mut forward, mut backward) = (None, None);
    while forward.is_none() || backward.is_none() {
        tokio::select! {
            r = &mut ab, if forward.is_none() => forward = Some(r?),
            r = &mut ba, if backward.is_none() => backward = Some(r?),
        }
    }
    Ok(Moved {
        forward: forward.unwrap_or_default(),
        backward: backward.unwrap_or_default(),
    })
}

/// Makes closing `tcp` send a reset instead of a FIN.
fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Ends `to`'s sending side after `from` ended cleanly.
fn pass_end(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        // The peer is gone already: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod splice {
    use std::io;
    use std::os::fd::OwnedFd;

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Bytes asked of each splice call, and the pipe size asked for: large
    /// moves mean few system calls. A kernel that caps pipes lower
    /// (`fs.pipe-max-size`) keeps its default, and the loop just turns more.
    const CHUNK: usize = 1 << 20;

    /// A pipe: the kernel buffer between the two sockets.
    pub(super) struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Self> {
            let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
            Ok(Self { r, w })
        }
    }

    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
    }

    /// Moves one direction until `from` ends; the bytes moved.
    pub(super) async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
        let pipe = Pipe::new()?;
        let mut total = 0u64;
        loop {
            // Fill the (empty) pipe from the source socket.
            let n = loop {
                from.readable().await?;
                let filled = from.try_io(Interest::READABLE, || {
                    splice(from, None, &pipe.w, None, CHUNK, flags()).map_err(io::Error::from)
                });
                match filled {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                super::pass_end(to)?;
                return Ok(total);
            }
            // Drain it into the other socket.
            let mut held = n;
            while held > 0 {
                to.writable().await?;
                let drained = to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.r, None, to, None, held, flags()).map_err(io::Error::from)
                });
                match drained {
                    Ok(m) => {
                        held -= m;
                        total += m as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
use splice::one_way;

/// Moves one direction with a user-space buffer (no `splice(2)` here).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            pass_end(to)?;
            return Ok(total);
        }
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs on loopback: (client end, relay end) twice.
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut out = Vec::new();
        for _ in 0..2 {
            let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
            out.push((c.expect("connect"), s.expect("accept").0));
        }
        let second = out.pop().expect("two");
        let first = out.pop().expect("two");
        (first, second)
    }

    const DEADLINE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn bytes_cross_both_ways_intact_and_each_end_arrives_as_an_end() {
        let ((mut a, a_relay), (mut b, b_relay)) = pairs().await;
        let relay = tokio::spawn(relay(a_relay, b_relay));
        // 24 MiB one way, 5 MiB the other, at once: more than any pipe or
        // socket buffer holds, so both directions block and resume.
        let data_ab: Vec<u8> = (0..24u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
        let data_ba: Vec<u8> = (0..5u32 << 20).map(|i| (i * 13 + i / 251) as u8).collect();
        let (mut ar, mut aw) = a.split();
        let (mut br, mut bw) = b.split();
        let run = async {
            let send_a = async {
                aw.write_all(&data_ab).await?;
                aw.shutdown().await
            };
            let send_b = async {
                bw.write_all(&data_ba).await?;
                bw.shutdown().await
            };
            let (mut got_b, mut got_a) = (Vec::new(), Vec::new());
            let (sa, sb, rb, ra) = tokio::join!(
                send_a,
                send_b,
                br.read_to_end(&mut got_b),
                ar.read_to_end(&mut got_a)
            );
            sa.and(sb).and(rb).and(ra)?;
            io::Result::Ok((got_a, got_b))
        };
        let (got_a, got_b) = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("within the deadline")
            .expect("io");
        assert!(got_b == data_ab, "a to b intact ({} bytes)", got_b.len());
        assert!(got_a == data_ba, "b to a intact ({} bytes)", got_a.len());
        let moved = tokio::time::timeout(DEADLINE, relay)
            .await
            .expect("the relay ends")
            .expect("task")
            .expect("clean");
        assert_eq!(
            moved,
            Moved {
                forward: data_ab.len() as u64,
                backward: data_ba.len() as u64
            }
        );
    }

    #[tokio::test]
    async fn a_reset_on_one_side_reaches_the_other_as_a_reset() {
        let ((a, a_relay), (mut b, b_relay)) = pairs().await;
        let relay = tokio::spawn(relay(a_relay, b_relay));
        // a vanishes abnormally.
        socket2::SockRef::from(&a)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(a);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(DEADLINE, b.read(&mut buf))
            .await
            .expect("within the deadline");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "b sees a reset, not an end of file"
        );
        let ended = tokio::time::timeout(DEADLINE, relay)
            .await
            .expect("the relay ends")
            .expect("task");
        assert!(ended.is_err(), "the relay reports the failure: {ended:?}");
    }
}
