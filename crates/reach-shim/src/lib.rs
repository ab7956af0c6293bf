//! The shim `reach run` preloads into the programs it starts (GCB's layer
//! between the program and the C library): it stands in for a few socket
//! calls and hands what concerns the reach network to the run's agent
//! over a private Unix socket; everything else goes to the C library
//! untouched. It never does crypto or hub I/O itself.
//!
//! ```text
//! getaddrinfo("NODEID.reach")  --resolve-->  agent: a pool address 127.77.x.y
//! connect(fd, 127.77.x.y:P)    --connect-->  agent: a reach stream to NODEID:P
//!     <-- ok RELAY_PORT: the socket is connected to the agent's relay on
//!         127.0.0.1, which carries it over the stream: the program holds an
//!         ordinary connected TCP socket (poll, epoll, fork all work)
//! getpeername(fd)              --> 127.77.x.y:P, what the program asked for
//! listen(fd) on port P         --listen-->   agent: NODEID:P (and a hub proxy
//!                                            port) carried to the socket
//! ```
//!
//! Without the agent's socket in the environment (`REACH_RUN_SOCKET`),
//! every call goes straight to the C library.

// The crate's whole point is to stand in for C library functions.
#![allow(unsafe_code)]

mod calls;
mod peers;
mod talk;

pub use calls::{
    accept, accept4, bind, close, connect, dup, dup2, dup3, getaddrinfo, gethostbyname,
    gethostbyname2, gethostbyname_r, getpeername, listen,
};
