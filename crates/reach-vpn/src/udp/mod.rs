//! The vpn's UDP data plane, sans-IO: datagrams sealed per packet with a
//! replay window ([`datagram`], [`replay`]), under keys renewed every two
//! minutes ([`keyring`]). Keys come from the peers' reach stream; the
//! driver does the socket I/O.

pub mod datagram;
pub mod keyring;
pub mod paths;
pub mod replay;
