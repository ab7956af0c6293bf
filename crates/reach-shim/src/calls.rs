//! The C library calls the shim stands in for. Each looks at its
//! arguments, hands what concerns `.reach` names and the pool to the
//! agent, and passes everything else to the C library's own function
//! (found with `dlsym(RTLD_NEXT)`), unchanged.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::{AtomicPtr, Ordering};

use libc::{addrinfo, sockaddr, sockaddr_in, socklen_t};
use reach_shim_wire::{in_pool, is_reach_name, ErrorKind, Reply, Request};

use crate::peers;
use crate::talk::{agent_socket, ask};

type GetaddrinfoFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const addrinfo,
    *mut *mut addrinfo,
) -> c_int;
type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type BindFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type AcceptFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type Dup2Fn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;

/// The C library's function `name`, looked up once.
fn next(cache: &AtomicPtr<c_void>, name: &CStr) -> *mut c_void {
    let p = cache.load(Ordering::Acquire);
    if !p.is_null() {
        return p;
    }
    // SAFETY: dlsym with a valid, NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if p.is_null() {
        eprintln!("reach run: the C library has no {name:?}; the shim cannot work here");
        std::process::abort();
    }
    cache.store(p, Ordering::Release);
    p
}

macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static CACHE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
        let p = next(&CACHE, $name);
        // SAFETY: the symbol is the C library's function of this type.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

fn set_errno(e: c_int) {
    // SAFETY: the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

/// `getaddrinfo`: a `.reach` name resolves to its pool address (asked of
/// the agent); an unknown one fails with `EAI_NONAME`, as an unknown host
/// name does, and an agent that cannot be asked with `EAI_AGAIN`.
///
/// # Safety
/// As the C function: valid pointers or null where C allows it.
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    let real = real!(c"getaddrinfo", GetaddrinfoFn);
    if node.is_null() || agent_socket().is_none() {
        return real(node, service, hints, res);
    }
    let Ok(name) = CStr::from_ptr(node).to_str() else {
        return real(node, service, hints, res);
    };
    if !is_reach_name(name) {
        return real(node, service, hints, res);
    }
    let hints = hints.as_ref();
    let family = hints.map_or(libc::AF_UNSPEC, |h| h.ai_family);
    if family != libc::AF_UNSPEC && family != libc::AF_INET {
        // Pool addresses are IPv4.
        return libc::EAI_NONAME;
    }
    let socktype = match hints.map_or(0, |h| h.ai_socktype) {
        0 => libc::SOCK_STREAM,
        t => t,
    };
    let protocol = match socktype {
        libc::SOCK_STREAM => libc::IPPROTO_TCP,
        libc::SOCK_DGRAM => libc::IPPROTO_UDP,
        _ => return libc::EAI_SOCKTYPE,
    };
    let flags = hints.map_or(0, |h| h.ai_flags);
    let Some(port) = service_port(service, flags, socktype) else {
        return libc::EAI_SERVICE;
    };
    let ip = match ask(&Request::Resolve(name.to_string())) {
        Ok(Reply::Address(ip)) => ip,
        Ok(Reply::Error(ErrorKind::NoName, _)) => return libc::EAI_NONAME,
        Ok(_) | Err(_) => return libc::EAI_AGAIN,
    };
    // One block for the entry and its address, as the C library's
    // `freeaddrinfo` frees them (the canonical name apart).
    let size = size_of::<addrinfo>() + size_of::<sockaddr_in>();
    let block = libc::calloc(1, size).cast::<u8>();
    if block.is_null() {
        return libc::EAI_MEMORY;
    }
    let sin = block.add(size_of::<addrinfo>()).cast::<sockaddr_in>();
    sin.write(sockaddr_in_of(SocketAddrV4::new(ip, port)));
    let canon = if flags & libc::AI_CANONNAME != 0 {
        libc::strdup(node)
    } else {
        std::ptr::null_mut()
    };
    let ai = block.cast::<addrinfo>();
    ai.write(addrinfo {
        ai_flags: flags,
        ai_family: libc::AF_INET,
        ai_socktype: socktype,
        ai_protocol: protocol,
        ai_addrlen: size_of::<sockaddr_in>() as socklen_t,
        ai_addr: sin.cast::<sockaddr>(),
        ai_canonname: canon,
        ai_next: std::ptr::null_mut(),
    });
    *res = ai;
    0
}

/// The port `service` names: a number, or a service name the C library
/// knows (not with `AI_NUMERICSERV`); 0 for none.
unsafe fn service_port(service: *const c_char, flags: c_int, socktype: c_int) -> Option<u16> {
    if service.is_null() {
        return Some(0);
    }
    let text = CStr::from_ptr(service).to_str().ok()?;
    if let Ok(n) = text.parse::<u16>() {
        return Some(n);
    }
    if flags & libc::AI_NUMERICSERV != 0 {
        return None;
    }
    let proto = if socktype == libc::SOCK_DGRAM {
        c"udp"
    } else {
        c"tcp"
    };
    let entry = libc::getservbyname(service, proto.as_ptr());
    entry
        .as_ref()
        .map(|e| u16::from_be(u16::try_from(e.s_port & 0xffff).unwrap_or(0)))
}

fn sockaddr_in_of(a: SocketAddrV4) -> sockaddr_in {
    sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The IPv4 address `addr` holds, if it is one.
unsafe fn ipv4_of(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddrV4> {
    if addr.is_null() || (len as usize) < size_of::<sockaddr_in>() {
        return None;
    }
    if c_int::from((*addr).sa_family) != libc::AF_INET {
        return None;
    }
    let sin = addr.cast::<sockaddr_in>().read_unaligned();
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// `connect`: to a pool address, the agent sets up a reach stream to the
/// node behind it first, then the socket is connected to the agent's
/// relay on loopback; a setup that fails returns its errno
/// (`ECONNREFUSED`, `ETIMEDOUT`, `EHOSTUNREACH`, `EACCES`, `EAGAIN`, and
/// `ENETUNREACH` when the agent cannot be asked). The setup blocks the
/// call even on a non-blocking socket (it takes a few milliseconds on a
/// direct path). Every other address goes to the C library.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let real = real!(c"connect", ConnectFn);
    let Some(target) = ipv4_of(addr, len).filter(|a| in_pool(*a.ip())) else {
        return real(fd, addr, len);
    };
    if agent_socket().is_none() {
        return real(fd, addr, len);
    }
    match broker(fd, target) {
        Ok(relay) => {
            let sin = sockaddr_in_of(relay);
            let r = real(
                fd,
                (&raw const sin).cast::<sockaddr>(),
                size_of::<sockaddr_in>() as socklen_t,
            );
            let e = *libc::__errno_location();
            if r == 0 || e == libc::EINPROGRESS {
                peers::set(fd, target);
            }
            set_errno(e);
            r
        }
        Err(errno) => {
            set_errno(errno);
            -1
        }
    }
}

/// Asks the agent for a stream to `target` for socket `fd`: the relay
/// address to connect the socket to, or the errno to fail with.
unsafe fn broker(fd: c_int, target: SocketAddrV4) -> Result<SocketAddrV4, c_int> {
    let Some(kind) = socket_type(fd) else {
        return Err(*libc::__errno_location());
    };
    if kind != libc::SOCK_STREAM && kind != libc::SOCK_DGRAM {
        eprintln!("reach run: only TCP and UDP reach {target}");
        return Err(libc::ENETUNREACH);
    }
    // The relay admits the socket by its loopback port: bind it first.
    let mut local = local_addr(fd)?;
    if local.port() == 0 {
        let any = sockaddr_in_of(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let r = libc::bind(
            fd,
            (&raw const any).cast::<sockaddr>(),
            size_of::<sockaddr_in>() as socklen_t,
        );
        if r != 0 {
            return Err(*libc::__errno_location());
        }
        local = local_addr(fd)?;
    }
    // A non-blocking socket gets its answer at once and the setup goes on
    // while it connects (an event loop must not stall on one setup).
    let flags = libc::fcntl(fd, libc::F_GETFL);
    let request = if kind == libc::SOCK_DGRAM {
        // A UDP socket: its datagrams go to a relay socket of the agent's.
        Request::Udp {
            pool_ip: *target.ip(),
            port: target.port(),
            local_port: local.port(),
        }
    } else if flags >= 0 && flags & libc::O_NONBLOCK != 0 {
        Request::Open {
            pool_ip: *target.ip(),
            port: target.port(),
            local_port: local.port(),
        }
    } else {
        Request::Connect {
            pool_ip: *target.ip(),
            port: target.port(),
            local_port: local.port(),
        }
    };
    match ask(&request) {
        Ok(Reply::Relay(port)) => Ok(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        Ok(Reply::Error(kind, _)) => Err(match kind {
            ErrorKind::Refused => libc::ECONNREFUSED,
            ErrorKind::TimedOut => libc::ETIMEDOUT,
            ErrorKind::Unreachable | ErrorKind::NoName => libc::EHOSTUNREACH,
            ErrorKind::Denied => libc::EACCES,
            ErrorKind::Busy => libc::EAGAIN,
        }),
        Ok(Reply::Address(_) | Reply::Done) | Err(_) => Err(libc::ENETUNREACH),
    }
}

/// The socket's own IPv4 address.
unsafe fn local_addr(fd: c_int) -> Result<SocketAddrV4, c_int> {
    let mut sin: sockaddr_in = std::mem::zeroed();
    let mut len = size_of::<sockaddr_in>() as socklen_t;
    if libc::getsockname(fd, (&raw mut sin).cast::<sockaddr>(), &raw mut len) != 0 {
        return Err(*libc::__errno_location());
    }
    ipv4_of((&raw const sin).cast::<sockaddr>(), len).ok_or(libc::EAFNOSUPPORT)
}

/// `listen`: the C library's, then a TCP socket's port is served on the
/// reach network (the agent is told where it listens). The program's call
/// succeeds or fails as the C library says, whatever the agent answers.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let real = real!(c"listen", ListenFn);
    let r = real(fd, backlog);
    if r != 0 || agent_socket().is_none() || socket_type(fd) != Some(libc::SOCK_STREAM) {
        return r;
    }
    let saved = *libc::__errno_location();
    if let Some(addr) = bound_addr(fd) {
        match ask(&Request::Listen(addr)) {
            Ok(Reply::Done) => peers::mark_listening(fd),
            Ok(Reply::Error(_, why)) => eprintln!(
                "reach run: port {} is not on the reach network: {why}",
                addr.port()
            ),
            _ => {}
        }
    }
    set_errno(saved);
    r
}

/// `bind`: the C library's, then a UDP socket bound to a port of its own
/// choosing has that port served on the reach network (a UDP server has
/// no `listen`). The program's call succeeds or fails as the C library
/// says; why a port is not served is said once a process.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let r = real!(c"bind", BindFn)(fd, addr, len);
    // A port of the kernel's choosing (0) is a client's, not a server's.
    let asked_port = if addr.is_null() || (len as usize) < size_of::<sockaddr_in>() {
        0
    } else {
        // sin_port and sin6_port sit at the same place.
        u16::from_be(addr.cast::<sockaddr_in>().read_unaligned().sin_port)
    };
    if r != 0
        || asked_port == 0
        || agent_socket().is_none()
        || socket_type(fd) != Some(libc::SOCK_DGRAM)
    {
        return r;
    }
    let saved = *libc::__errno_location();
    if let Some(bound) = bound_addr(fd).filter(|a| a.port() != 0) {
        if let Ok(Reply::Error(_, why)) = ask(&Request::ListenUdp(bound)) {
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "reach run: UDP port {} is not on the reach network: {why}",
                    bound.port()
                );
            }
        }
    }
    set_errno(saved);
    r
}

/// The socket's type (`SOCK_STREAM`, ...).
unsafe fn socket_type(fd: c_int) -> Option<c_int> {
    let mut kind: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    let got = libc::getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_TYPE,
        (&raw mut kind).cast::<c_void>(),
        &raw mut len,
    );
    (got == 0).then_some(kind)
}

/// The address an IPv4 or IPv6 socket is bound to.
unsafe fn bound_addr(fd: c_int) -> Option<SocketAddr> {
    let mut ss: libc::sockaddr_storage = std::mem::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as socklen_t;
    if libc::getsockname(fd, (&raw mut ss).cast::<sockaddr>(), &raw mut len) != 0 {
        return None;
    }
    sockaddr_any(&ss, len)
}

/// `accept`: on a served listening socket, a connection the agent carries
/// from another node is answered with that node's pool address (the
/// program sees who connected, and can connect back to it by it).
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let conn = real!(c"accept", AcceptFn)(fd, addr, len);
    after_accept(fd, conn, addr, len)
}

/// `accept4`: as [`accept`].
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let conn = real!(c"accept4", Accept4Fn)(fd, addr, len, flags);
    after_accept(fd, conn, addr, len)
}

/// Asks the agent which node an accepted connection from its loopback
/// side carries, and remembers (and reports in `addr`) its pool address.
unsafe fn after_accept(
    listener: c_int,
    conn: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    if conn < 0 || !peers::is_listening(listener) {
        return conn;
    }
    let saved = *libc::__errno_location();
    let mut ss: libc::sockaddr_storage = std::mem::zeroed();
    let mut sslen = size_of::<libc::sockaddr_storage>() as socklen_t;
    let getpeer = real!(c"getpeername", GetpeernameFn);
    let from = if getpeer(conn, (&raw mut ss).cast::<sockaddr>(), &raw mut sslen) == 0 {
        sockaddr_any(&ss, sslen)
    } else {
        None
    };
    // The agent connects from loopback; anyone else is not its.
    if let Some(from) = from.filter(|f| loopback(f.ip())) {
        if let Ok(Reply::Address(ip)) = ask(&Request::Peer(from.port())) {
            let peer = SocketAddrV4::new(ip, from.port());
            peers::set(conn, peer);
            if !addr.is_null() && !len.is_null() {
                write_addr(conn, peer, addr, len);
            }
        }
    }
    set_errno(saved);
    conn
}

fn loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// An IPv4 or IPv6 socket address.
unsafe fn sockaddr_any(ss: &libc::sockaddr_storage, len: socklen_t) -> Option<SocketAddr> {
    let p: *const libc::sockaddr_storage = ss;
    match c_int::from(ss.ss_family) {
        libc::AF_INET => ipv4_of(p.cast::<sockaddr>(), len).map(SocketAddr::V4),
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            let sin6 = p.cast::<libc::sockaddr_in6>().read();
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `peer` into a caller's `addr` of `*len` bytes as the socket's
/// own family has it (IPv4, or IPv4-mapped IPv6), cut to fit as the C
/// library does; `*len` says the full size.
unsafe fn write_addr(fd: c_int, peer: SocketAddrV4, addr: *mut sockaddr, len: *mut socklen_t) {
    let mut domain: c_int = libc::AF_INET;
    let mut dlen = size_of::<c_int>() as socklen_t;
    libc::getsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_DOMAIN,
        (&raw mut domain).cast::<c_void>(),
        &raw mut dlen,
    );
    let room = *len as usize;
    if domain == libc::AF_INET6 {
        let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = peer.port().to_be();
        sin6.sin6_addr.s6_addr = peer.ip().to_ipv6_mapped().octets();
        let n = room.min(size_of::<libc::sockaddr_in6>());
        std::ptr::copy_nonoverlapping((&raw const sin6).cast::<u8>(), addr.cast::<u8>(), n);
        *len = size_of::<libc::sockaddr_in6>() as socklen_t;
    } else {
        let sin = sockaddr_in_of(peer);
        let n = room.min(size_of::<sockaddr_in>());
        std::ptr::copy_nonoverlapping((&raw const sin).cast::<u8>(), addr.cast::<u8>(), n);
        *len = size_of::<sockaddr_in>() as socklen_t;
    }
}

/// `getpeername`: a brokered socket's peer is the pool address the
/// program connected to, not the relay.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let real = real!(c"getpeername", GetpeernameFn);
    let Some(peer) = peers::get(fd) else {
        return real(fd, addr, len);
    };
    if addr.is_null() || len.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    // Answered only while the socket is still connected.
    let r = real(fd, addr, len);
    if r != 0 {
        return r;
    }
    write_addr(fd, peer, addr, len);
    0
}

/// `dup`: the duplicate of a brokered socket answers `getpeername` alike.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    let r = real!(c"dup", DupFn)(old);
    if r >= 0 {
        peers::copy(old, r);
    }
    r
}

/// `dup2`: as [`dup`], onto `new` (which no longer stands for what it did).
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let r = real!(c"dup2", Dup2Fn)(old, new);
    if r >= 0 && old != new {
        peers::copy(old, new);
    }
    r
}

/// `dup3`: as [`dup2`].
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let r = real!(c"dup3", Dup3Fn)(old, new, flags);
    if r >= 0 {
        peers::copy(old, new);
    }
    r
}

/// `close`: forgets a brokered socket's peer, then closes.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    let real = real!(c"close", CloseFn);
    peers::clear(fd);
    real(fd)
}

extern "C" {
    /// The calling thread's `h_errno` (glibc).
    fn __h_errno_location() -> *mut c_int;
}

/// `h_errno`'s "no such host".
const HOST_NOT_FOUND: c_int = 1;
/// `h_errno`'s "try again later".
const TRY_AGAIN: c_int = 2;

/// A `.reach` name's pool address: Ok(None) when `name` is not a reach
/// name (the C library's business), Err(h_errno) when it cannot be had.
unsafe fn reach_host(name: *const c_char) -> Result<Option<Ipv4Addr>, c_int> {
    if name.is_null() || agent_socket().is_none() {
        return Ok(None);
    }
    let Ok(text) = CStr::from_ptr(name).to_str() else {
        return Ok(None);
    };
    if !is_reach_name(text) {
        return Ok(None);
    }
    match ask(&Request::Resolve(text.to_string())) {
        Ok(Reply::Address(ip)) => Ok(Some(ip)),
        Ok(Reply::Error(ErrorKind::NoName, _)) => Err(HOST_NOT_FOUND),
        Ok(_) | Err(_) => Err(TRY_AGAIN),
    }
}

/// What `gethostbyname` returns points into this, one per thread, valid
/// until the thread's next call (as the C library's static result is).
struct HostResult {
    entry: libc::hostent,
    name: std::ffi::CString,
    aliases: [*mut c_char; 1],
    addr: [u8; 4],
    addrs: [*mut c_char; 2],
}

thread_local! {
    static HOST: std::cell::RefCell<Option<Box<HostResult>>> = const { std::cell::RefCell::new(None) };
}

/// `gethostbyname`: a `.reach` name resolves to its pool address (an
/// unknown one fails with `HOST_NOT_FOUND`, an agent that cannot be asked
/// with `TRY_AGAIN`); every other name is the C library's.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut libc::hostent {
    type GethostbynameFn = unsafe extern "C" fn(*const c_char) -> *mut libc::hostent;
    let real = real!(c"gethostbyname", GethostbynameFn);
    let ip = match reach_host(name) {
        Ok(None) => return real(name),
        Ok(Some(ip)) => ip,
        Err(h) => {
            *__h_errno_location() = h;
            return std::ptr::null_mut();
        }
    };
    HOST.with(|slot| {
        let mut r = Box::new(HostResult {
            // SAFETY: hostent is plain data; every field is set below.
            entry: std::mem::zeroed(),
            name: CStr::from_ptr(name).to_owned(),
            aliases: [std::ptr::null_mut()],
            addr: ip.octets(),
            addrs: [std::ptr::null_mut(); 2],
        });
        r.addrs[0] = r.addr.as_mut_ptr().cast::<c_char>();
        r.entry = libc::hostent {
            h_name: r.name.as_ptr().cast_mut(),
            h_aliases: r.aliases.as_mut_ptr(),
            h_addrtype: libc::AF_INET,
            h_length: 4,
            h_addr_list: r.addrs.as_mut_ptr(),
        };
        let p: *mut libc::hostent = &mut r.entry;
        *slot.borrow_mut() = Some(r);
        p
    })
}

/// `gethostbyname_r`: as [`gethostbyname`], into the caller's buffers
/// (`ERANGE` when `buf` is too small for the name and the address).
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut libc::hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut libc::hostent,
    h_errnop: *mut c_int,
) -> c_int {
    type GethostbynameRFn = unsafe extern "C" fn(
        *const c_char,
        *mut libc::hostent,
        *mut c_char,
        libc::size_t,
        *mut *mut libc::hostent,
        *mut c_int,
    ) -> c_int;
    let real = real!(c"gethostbyname_r", GethostbynameRFn);
    let ip = match reach_host(name) {
        Ok(None) => return real(name, ret, buf, buflen, result, h_errnop),
        Ok(Some(ip)) => ip,
        Err(h) => {
            *result = std::ptr::null_mut();
            *h_errnop = h;
            return 0;
        }
    };
    // buf: [aliases: 1 pointer][addrs: 2 pointers][address: 4][name\0]
    let ptr = size_of::<*mut c_char>();
    let name_len = CStr::from_ptr(name).to_bytes_with_nul().len();
    let align = buf.align_offset(ptr);
    let need = align + 3 * ptr + 4 + name_len;
    if ret.is_null() || buf.is_null() || buflen < need {
        *result = std::ptr::null_mut();
        return libc::ERANGE;
    }
    let base = buf.add(align);
    let aliases = base.cast::<*mut c_char>();
    aliases.write(std::ptr::null_mut());
    let addrs = aliases.add(1);
    let addr = base.add(3 * ptr);
    std::ptr::copy_nonoverlapping(ip.octets().as_ptr().cast::<c_char>(), addr, 4);
    addrs.write(addr);
    addrs.add(1).write(std::ptr::null_mut());
    let name_copy = addr.add(4);
    std::ptr::copy_nonoverlapping(name, name_copy, name_len);
    ret.write(libc::hostent {
        h_name: name_copy,
        h_aliases: aliases,
        h_addrtype: libc::AF_INET,
        h_length: 4,
        h_addr_list: addrs,
    });
    *result = ret;
    0
}

/// `gethostbyname2`: as [`gethostbyname`] for `AF_INET`; a `.reach` name
/// has no IPv6 address (`HOST_NOT_FOUND`).
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, af: c_int) -> *mut libc::hostent {
    type Gethostbyname2Fn = unsafe extern "C" fn(*const c_char, c_int) -> *mut libc::hostent;
    if af == libc::AF_INET {
        return gethostbyname(name);
    }
    match reach_host(name) {
        Ok(None) => real!(c"gethostbyname2", Gethostbyname2Fn)(name, af),
        Ok(Some(_)) => {
            *__h_errno_location() = HOST_NOT_FOUND;
            std::ptr::null_mut()
        }
        Err(h) => {
            *__h_errno_location() = h;
            std::ptr::null_mut()
        }
    }
}
