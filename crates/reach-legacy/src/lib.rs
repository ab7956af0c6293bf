//! reach for programs that do not know it: plain TCP and UDP on one side,
//! reach streams on the other.
//!
//! ```text
//!  forward:  app --TCP/UDP--> LISTEN --[reach stream to VADDR]--> expose --TCP/UDP--> service
//!  socks:    app --SOCKS5 CONNECT NODEID.reach:PORT--> reach stream to NODEID:PORT
//! ```
//! [`proxy`] carries TCP ([`proxy::expose`], [`proxy::forward`],
//! [`proxy::socks`]) and counts what moves ([`proxy::ProxyStats`]);
//! [`udp_proxy`] carries datagrams over streams; [`run_agent`] serves
//! `reach run`'s preloaded shim. The `reach` CLI's
//! `expose`, `forward` and `socks` commands and the hub's proxy ports are
//! built on them; the core library (`reach`) does not depend on this crate.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod limits;
pub mod proxy;
pub mod run_agent;
pub mod udp_proxy;
