//! A TCP connection's round trip as the kernel measures it (`TCP_INFO`'s
//! smoothed RTT): free to read, and exact for the path the bytes take.

use std::os::fd::BorrowedFd;
use std::time::Duration;

/// The kernel's smoothed round trip of the TCP socket `fd`; `None` where
/// the platform has no `TCP_INFO` or the socket has no sample yet.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
pub(crate) fn smoothed(fd: BorrowedFd<'_>) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a plain C struct for which all zero bytes are a
    // valid value; getsockopt writes at most `len` bytes into it and sets
    // `len` to what it wrote. `fd` is borrowed, so it stays open for the
    // call. Neither crate we use (socket2, nix) exposes TCP_INFO.
    let (rc, info, len) = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (rc, info, len)
    };
    // tcpi_rtt (microseconds) sits well inside the oldest kernels' struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_rttvar);
    (rc == 0 && len as usize >= needed && info.tcpi_rtt > 0)
        .then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// No `TCP_INFO` here.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn smoothed(_fd: BorrowedFd<'_>) -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_loopback_connection_has_a_small_round_trip_and_a_udp_socket_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        use std::io::{Read, Write};
        // A byte each way gives the kernel its samples.
        c.write_all(b"x").unwrap();
        s.read_exact(&mut [0]).unwrap();
        s.write_all(b"y").unwrap();
        c.read_exact(&mut [0]).unwrap();
        let rtt = smoothed(c.as_fd()).expect("a sample after a round trip");
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(smoothed(udp.as_fd()), None);
    }
}
