//! Hub graphs for the simulator: which hubs are configured peers of which,
//! and how far apart they are.
//!
//! A topology is a list of undirected edges between hub indices, each with a
//! one-way latency; the lower index dials (it has the other as a configured
//! peer). Every topology is connected, so a converged federation routes
//! between every pair of hubs.

use std::time::Duration;

use reach_proto::rng::Rng;

/// The shape of the hub graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A random spanning tree plus as many random extra edges as hubs
    /// (average degree about four), latencies 5-80 ms.
    Random,
    /// Each hub peers with the next: the longest paths (diameter N/2).
    Ring,
    /// A binary tree: hub i peers with hub (i-1)/2.
    Tree,
    /// Sites of ten hubs, each hub peering with its site's front-end over
    /// a LAN (0.2 ms); front-ends form a random graph over the WAN
    /// (10-80 ms), like the SmartSockets testbed's clusters.
    Sites,
}

/// One configured peering between two hubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    /// The hub that dials.
    pub dialer: usize,
    /// The hub dialled.
    pub listener: usize,
    /// One-way latency.
    pub latency: Duration,
}

/// Hubs per site in [`Shape::Sites`].
pub const SITE_SIZE: usize = 10;

/// The edges of `shape` over `hubs` hubs.
pub fn edges(shape: Shape, hubs: usize, rng: &mut Rng) -> Vec<Edge> {
    let mut out = Vec::new();
    let mut add = |a: usize, b: usize, latency: Duration| {
        if a != b {
            out.push(Edge {
                dialer: a.min(b),
                listener: a.max(b),
                latency,
            });
        }
    };
    match shape {
        Shape::Random => {
            for (a, b) in random_graph(hubs, rng) {
                add(a, b, wan_latency(rng, 5));
            }
        }
        Shape::Ring => {
            for i in 0..hubs {
                if hubs > 2 || i + 1 < hubs {
                    add(i, (i + 1) % hubs, wan_latency(rng, 5));
                }
            }
        }
        Shape::Tree => {
            for i in 1..hubs {
                add(i, (i - 1) / 2, wan_latency(rng, 5));
            }
        }
        Shape::Sites => {
            let fronts: Vec<usize> = (0..hubs).step_by(SITE_SIZE).collect();
            for i in 0..hubs {
                let front = i - i % SITE_SIZE;
                add(i, front, Duration::from_micros(200));
            }
            for (a, b) in random_graph(fronts.len(), rng) {
                add(fronts[a], fronts[b], wan_latency(rng, 10));
            }
        }
    }
    out.sort_by_key(|e| (e.dialer, e.listener));
    out.dedup_by_key(|e| (e.dialer, e.listener));
    out
}

/// A connected random graph on `n` vertices: a random spanning tree plus
/// `n` random extra edges.
fn random_graph(n: usize, rng: &mut Rng) -> Vec<(usize, usize)> {
    let mut edges = Vec::new();
    for i in 1..n {
        edges.push((i, rng.below(i as u64) as usize));
    }
    if n > 2 {
        for _ in 0..n {
            let a = rng.below(n as u64) as usize;
            let b = rng.below(n as u64) as usize;
            if a != b {
                edges.push((a, b));
            }
        }
    }
    edges
}

/// A one-way WAN latency between `min_ms` and 80 ms.
fn wan_latency(rng: &mut Rng, min_ms: u64) -> Duration {
    Duration::from_millis(min_ms + rng.below(80 - min_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(n: usize, edges: &[Edge]) -> bool {
        let mut seen = vec![false; n];
        let mut stack = vec![0];
        while let Some(v) = stack.pop() {
            if std::mem::replace(&mut seen[v], true) {
                continue;
            }
            for e in edges {
                if e.dialer == v {
                    stack.push(e.listener);
                } else if e.listener == v {
                    stack.push(e.dialer);
                }
            }
        }
        seen.iter().all(|s| *s)
    }

    #[test]
    fn every_shape_is_connected_and_has_no_self_or_duplicate_edges() {
        for shape in [Shape::Random, Shape::Ring, Shape::Tree, Shape::Sites] {
            for n in [1, 2, 3, 10, 57] {
                let e = edges(shape, n, &mut Rng::new(3));
                assert!(connected(n, &e), "{shape:?} with {n} hubs");
                assert!(e.iter().all(|e| e.dialer < e.listener));
                let mut keys: Vec<_> = e.iter().map(|e| (e.dialer, e.listener)).collect();
                keys.dedup();
                assert_eq!(keys.len(), e.len());
            }
        }
    }
}
