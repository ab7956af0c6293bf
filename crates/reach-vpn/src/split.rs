//! Cutting a frame from the device (an offload header and a TCP segment
//! of up to 64 KiB) into the packets that UDP datagrams carry, each whole
//! with its checksums, the way a network card does TSO. Segments are
//! written into one reusable buffer, each in a slot of the same size
//! ([`Splitter::stride`]) with room in front for the datagram header and an
//! offload header and behind for the tag, so that sealing needs no further
//! copy and the sealed datagrams, all of one size but the last, go out
//! with one UDP GSO send.

use std::io;

use tun_rs::{gso_split, VirtioNetHdr};

use crate::vnet;

/// Most packets one frame is cut into.
pub const MAX_SEGMENTS: usize = 128;

/// A reusable output buffer.
pub struct Splitter {
    batch: Vec<u8>,
    sizes: Vec<usize>,
    offset: usize,
    tail: usize,
    stride: usize,
    max_packet: usize,
}

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_UDP_L4: u8 = 5;

/// Completes a partial checksum (the field holds the pseudo-header sum):
/// the one's complement sum of everything from `start`, stored at
/// `start + offset`.
fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> io::Result<()> {
    let at = start + offset;
    if at + 2 > pkt.len() || start > pkt.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "checksum offsets outside the packet",
        ));
    }
    let sum = ones_complement_sum(&pkt[start..], 0);
    pkt[at..at + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

/// The 16-bit one's complement sum of `bytes` (RFC 1071), folded, added to
/// `initial`.
fn ones_complement_sum(bytes: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

impl Splitter {
    /// Slots for packets of up to `max_packet` bytes, each written after
    /// `offset` bytes and followed by `tail` spare bytes.
    pub fn new(offset: usize, max_packet: usize, tail: usize) -> Self {
        Self {
            batch: vec![0u8; (offset + max_packet + tail) * MAX_SEGMENTS],
            sizes: vec![0; MAX_SEGMENTS],
            offset,
            tail,
            stride: offset + max_packet + tail,
            max_packet,
        }
    }

    /// The slot size of the last split: every packet but the last fills
    /// its slot exactly (offset, packet, tail).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The first `len` bytes of the slots, as one buffer.
    pub fn slots(&self, len: usize) -> &[u8] {
        &self.batch[..len]
    }

    /// Slots of `stride` bytes over the buffer, for one split.
    fn slots_of(&mut self, stride: usize) -> io::Result<Vec<&mut [u8]>> {
        if stride <= self.offset + self.tail || stride > self.offset + self.max_packet + self.tail {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "packet larger than the path's packets",
            ));
        }
        self.stride = stride;
        let count = (self.batch.len() / stride).min(MAX_SEGMENTS);
        Ok(self.batch[..count * stride].chunks_mut(stride).collect())
    }

    /// Cuts `frame` (offload header in wire order, then the packet) into
    /// packets; returns how many. Packet `i` is `self.packet(i)`.
    pub fn split(&mut self, frame: &mut [u8]) -> io::Result<usize> {
        if frame.len() <= vnet::LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame without a packet",
            ));
        }
        vnet::wire_to_device(frame);
        let (h, pkt) = frame.split_at_mut(vnet::LEN);
        let mut hdr = VirtioNetHdr::decode(h)?;
        let (offset, tail) = (self.offset, self.tail);
        if hdr.gso_type == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(
                    pkt,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )?;
            }
            let len = pkt.len();
            let mut slots = self.slots_of(offset + len + tail)?;
            let out = slots
                .first_mut()
                .and_then(|s| s.get_mut(offset..offset + len))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no slot"))?;
            out.copy_from_slice(pkt);
            drop(slots);
            self.sizes[0] = len;
            return Ok(1);
        }
        let is_v6 = pkt.first().map(|b| b >> 4) == Some(6);
        // The kernel's hdr_len may cover the whole first packet on a
        // forwarding path: take the transport header's own length.
        let start = usize::from(hdr.csum_start);
        let transport = if hdr.gso_type & 0x7f == GSO_UDP_L4 {
            8
        } else {
            let off = pkt.get(start + 12).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "TCP header cut short")
            })?;
            usize::from(off >> 4) * 4
        };
        hdr.hdr_len = u16::try_from(start + transport)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "header length overflow"))?;
        let stride = offset + usize::from(hdr.hdr_len) + usize::from(hdr.gso_size) + tail;
        let mut sizes = std::mem::take(&mut self.sizes);
        let n = {
            let mut slots = self.slots_of(stride)?;
            gso_split(pkt, hdr, &mut slots, &mut sizes, offset, is_v6)
        };
        self.sizes = sizes;
        n
    }

    /// The slot of packet `i` (offset, packet, tail) and the packet's
    /// length.
    pub fn packet(&mut self, i: usize) -> (&mut [u8], usize) {
        let at = i * self.stride;
        (&mut self.batch[at..at + self.stride], self.sizes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet with a payload of `n` bytes and a correct
    /// checksum; and the same packet with only the pseudo-header sum in
    /// its checksum field (as the kernel hands it over with offloads).
    fn tcp4(n: usize) -> (Vec<u8>, Vec<u8>) {
        let total = 20 + 20 + n;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 77, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[32] = 5 << 4;
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        // Pseudo-header: addresses, protocol, TCP length.
        let mut pseudo: u64 = 0;
        for w in p[12..20].chunks(2) {
            pseudo += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        pseudo += 6 + (total as u64 - 20);
        while pseudo > 0xffff {
            pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        }
        let mut partial = p.clone();
        partial[36..38].copy_from_slice(&(pseudo as u16).to_be_bytes());
        let mut full = partial.clone();
        complete_checksum(&mut full, 20, 16).unwrap();
        (full, partial)
    }

    /// The checksum a receiver computes over the pseudo-header and the
    /// segment: 0xffff (or 0) when the stored checksum is right.
    fn verifies(p: &[u8]) -> bool {
        let pseudo = u64::from(ones_complement_sum(&p[12..20], 6 + (p.len() as u64 - 20)));
        ones_complement_sum(&p[20..], pseudo) == 0xffff
    }

    #[test]
    fn a_partial_checksum_is_completed_for_a_single_packet() {
        let (_, partial) = tcp4(101);
        let mut frame = vec![0u8; vnet::LEN];
        frame[0] = F_NEEDS_CSUM;
        frame[6..8].copy_from_slice(&20u16.to_le_bytes());
        frame[8..10].copy_from_slice(&16u16.to_le_bytes());
        frame.extend_from_slice(&partial);
        let mut s = Splitter::new(23, 1500, 16);
        assert_eq!(s.split(&mut frame).unwrap(), 1);
        let (buf, len) = s.packet(0);
        assert!(verifies(&buf[23..23 + len]));
    }

    #[test]
    fn a_tso_segment_is_cut_into_packets_that_verify() {
        let (_, partial) = tcp4(4000);
        let mut frame = vec![0u8; vnet::LEN];
        frame[0] = F_NEEDS_CSUM;
        frame[1] = 1; // TCPv4
        frame[2..4].copy_from_slice(&40u16.to_le_bytes());
        frame[4..6].copy_from_slice(&1360u16.to_le_bytes());
        frame[6..8].copy_from_slice(&20u16.to_le_bytes());
        frame[8..10].copy_from_slice(&16u16.to_le_bytes());
        frame.extend_from_slice(&partial);
        let mut s = Splitter::new(23, 1500, 16);
        let n = s.split(&mut frame).unwrap();
        assert_eq!(n, 3, "4000 bytes in segments of 1360");
        let mut payload = 0;
        for i in 0..n {
            let (buf, len) = s.packet(i);
            let p = &buf[23..23 + len];
            assert!(verifies(p), "segment {i}");
            assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), len);
            payload += len - 40;
        }
        assert_eq!(payload, 4000);
    }

    #[test]
    fn a_frame_too_large_for_the_buffers_is_an_error() {
        let (_, partial) = tcp4(3000);
        let mut frame = vec![0u8; vnet::LEN];
        frame.extend_from_slice(&partial);
        let mut s = Splitter::new(23, 1500, 16);
        assert!(s.split(&mut frame).is_err());
        assert!(s.split(&mut [0u8; 5]).is_err());
    }
}
