//! The vpn's UDP data plane, sans-IO: datagrams sealed per packet with a
//! replay window ([`datagram`], [`replay`]). Keys come from the peers'
//! reach stream; the driver does the socket I/O.

pub mod datagram;
pub mod paths;
pub mod replay;
