//! reach gateway: a daemon for a Linux NAT gateway that opens port
//! forwards on demand and closes them when their lease ends, as DPF did
//! for Condor (`../shared/papers/dpf-gcb-condor.txt`, section 3), spoken
//! as the protocols clients already have: NAT-PMP (RFC 6886) and PCP
//! (RFC 6887, MAP).
//!
//! ```text
//! LAN client --NAT-PMP/PCP (UDP 5351)--> daemon --> table (policy, leases)
//!                                          |--> journal (append, sync)
//!                                          '--> nftables: table ip reach_gateway
//!                                                 DNAT + matching accept
//! ```
//!
//! Three representations are kept consistent in DPF's order (add: table,
//! journal, kernel; delete: table, kernel, journal) and reconciled from
//! the journal at every start, so a `kill -9` or a reboot loses nothing
//! and duplicates nothing; rules outside the gateway's own table are
//! never touched.
//!
//! Modules: [`natpmp`] and [`pcp`] (wire formats, property-tested),
//! [`table`] (mappings and policy, sans-IO), [`probe`] (DPF's probe of
//! clients that are gone, sans-IO), [`journal`] (the mirror
//! file), [`nft`] (the kernel table), [`service`] (requests to changes,
//! sans-IO but for its journal and rules), [`daemon`] (sockets and
//! timers).

pub mod daemon;
pub mod journal;
pub mod natpmp;
pub mod nft;
pub mod pcp;
pub mod probe;
pub mod service;
pub mod table;
pub mod upnp;
pub mod upnp_io;

pub use daemon::{Config, Gateway, PORT};
