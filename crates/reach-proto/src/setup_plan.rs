//! The setup driver's decisions, sans-IO: which modules to try in which
//! order, which to skip and why, and how long each may take.
//!
//! ```text
//!  cached module, configured order --order()--> [Direct, Reverse, Splice, Routed]
//!  for each: Facts (target's addresses, hub session, where the hubs see us
//!            and the target) --plan()--> Run { budget } | Skip(reason)
//! ```
//! The driver (`reach`'s `setup` module) gathers the facts (a directory
//! lookup, the session's state), asks [`plan`], runs what it says with I/O,
//! and caches the winner. Better than the SmartSockets driver: a module that
//! cannot work is skipped instead of burning its timeout, and a Direct
//! attempt at only other networks' private addresses gets a short budget.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::candidates::{classify, plausibly_reachable, AddrClass, LocalAddr};

/// How a stream was set up. Exhaustive on purpose: every driver must
/// handle every module, so a new one is a breaking change anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SetupModule {
    /// A TCP connection to one of the target's advertised addresses.
    Direct,
    /// The target connected back to us, asked through the hubs.
    Reverse,
    /// A TCP simultaneous open through both sides' NATs or firewalls,
    /// arranged through the hubs.
    Splice,
    /// Multiplexed over hub links; works whenever a hub path exists.
    Routed,
}

impl SetupModule {
    /// Every module, in the default order of the setup driver.
    pub const ALL: [SetupModule; 4] = [
        SetupModule::Direct,
        SetupModule::Reverse,
        SetupModule::Splice,
        SetupModule::Routed,
    ];
}

impl std::str::FromStr for SetupModule {
    type Err = UnknownModule;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(SetupModule::Direct),
            "reverse" => Ok(SetupModule::Reverse),
            "splice" => Ok(SetupModule::Splice),
            "routed" => Ok(SetupModule::Routed),
            other => Err(UnknownModule(other.to_string())),
        }
    }
}

impl std::fmt::Display for SetupModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetupModule::Direct => "direct",
            SetupModule::Reverse => "reverse",
            SetupModule::Splice => "splice",
            SetupModule::Routed => "routed",
        })
    }
}

/// A name that is not a setup module's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown setup module {0:?}: expected direct, reverse, splice or routed")]
pub struct UnknownModule(pub String);

/// The driver's order: the cached module first, then the configured order
/// without it.
pub fn order(cached: Option<SetupModule>, configured: &[SetupModule]) -> Vec<SetupModule> {
    cached
        .into_iter()
        .chain(configured.iter().copied().filter(|m| Some(*m) != cached))
        .collect()
}

/// Direct's budget when the target advertises only private addresses of
/// networks this host is not on: enough for a routed private network (a
/// campus, a VPN), far less than a dropped SYN's timeout.
pub const UNLIKELY_DIRECT_BUDGET: Duration = Duration::from_millis(500);

/// Each module's time budget when it is not the last to try (the last one
/// gets whatever time is left).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Direct.
    pub direct: Duration,
    /// Reverse.
    pub reverse: Duration,
    /// Splice.
    pub splice: Duration,
}

/// Where this node stands: its interface addresses, what it advertises, and
/// where its hub sees it.
#[derive(Clone, Debug, Default)]
pub struct Site {
    /// This host's interface addresses.
    pub local: Vec<LocalAddr>,
    /// The addresses this node advertises (for connect-backs).
    pub advertised: Vec<SocketAddr>,
    /// Where the hub sees this node's session, if attached.
    pub seen_at: Option<SocketAddr>,
}

impl Site {
    /// Whether this node is behind a NAT with only private addresses to
    /// advertise: the hub sees it at an address that is not its own.
    pub fn behind_nat(&self) -> bool {
        let Some(ours) = self.seen_at else {
            return false;
        };
        let natted = !self.local.iter().any(|l| l.ip == ours.ip());
        natted
            && self
                .advertised
                .iter()
                .all(|a| matches!(classify(a.ip()), AddrClass::Private | AddrClass::Shared))
    }

    /// Whether the target could connect back to an address this node
    /// advertises. Not when it is behind a NAT with private addresses only
    /// and the target's hub sees the target at another public address
    /// (another site): the LAN addresses are useless there, and the attempt
    /// would cost the whole Reverse budget.
    pub fn reverse_plausible(&self, target_seen_at: Option<SocketAddr>) -> bool {
        match (self.seen_at, target_seen_at) {
            (Some(ours), Some(theirs)) => !(self.behind_nat() && ours.ip() != theirs.ip()),
            _ => true,
        }
    }

    /// Whether Reverse needs the directory's word on where the target is
    /// before it can decide (this node is behind a NAT and that is unknown).
    pub fn reverse_needs_target_site(&self, target_seen_at: Option<SocketAddr>) -> bool {
        target_seen_at.is_none() && self.behind_nat()
    }
    /// The public addresses of the NAT in front of this node: where the
    /// hub sees it, and the port mapping it advertises (a global address
    /// that is none of its interfaces'). Empty when it is not behind one.
    pub fn nat_public_ips(&self) -> Vec<IpAddr> {
        let own = |ip: IpAddr| self.local.iter().any(|l| l.ip == ip);
        let mut out: Vec<IpAddr> = Vec::new();
        let seen = self.seen_at.map(|a| a.ip());
        let mapped = self
            .advertised
            .iter()
            .map(|a| a.ip())
            .filter(|ip| classify(*ip) == AddrClass::Global);
        for ip in seen.into_iter().chain(mapped) {
            if !own(ip) && !out.contains(&ip) {
                out.push(ip);
            }
        }
        out
    }

    /// The target addresses that are public addresses of this node's own
    /// NAT: the target is behind the same gateway, which seldom forwards
    /// its own public address back inside (hairpinning), so these are
    /// worth asking the gateway about (DPF's same-network query) for the
    /// internal endpoint they stand for.
    pub fn at_own_nat(&self, target_addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        let ours = self.nat_public_ips();
        target_addrs
            .iter()
            .copied()
            .filter(|a| ours.contains(&a.ip()))
            .collect()
    }
}

/// What the driver knows when a module's turn comes.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Where this node stands.
    pub site: &'a Site,
    /// The target's direct addresses (from its virtual address, or the
    /// directory).
    pub target_addrs: &'a [SocketAddr],
    /// Where the target's hub sees it, if the directory said.
    pub target_seen_at: Option<SocketAddr>,
    /// Whether a hub session is up.
    pub hub_session: bool,
}

/// Why a module is not tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Skip {
    /// Direct has no address to try.
    #[error("skipped: no direct address known")]
    NoDirectAddress,
    /// Reverse, Splice and Routed need the hubs.
    #[error("skipped: no hub session")]
    NoHubSession,
    /// Reverse needs an address the target can connect back to.
    #[error("skipped: this node advertises no address to connect back to")]
    NothingToConnectBackTo,
    /// Reverse from behind a NAT to a target on another network.
    #[error("skipped: this node is behind a NAT and the target is not on its network")]
    TargetOnAnotherNetwork,
}

/// Whether `module` runs now, and for how long: `remaining` is the time
/// left of the whole connect, `last` whether no module comes after it.
pub fn plan(
    module: SetupModule,
    facts: &Facts<'_>,
    remaining: Duration,
    last: bool,
    budgets: &Budgets,
) -> Result<Duration, Skip> {
    let cap = |budget: Duration| {
        if last {
            remaining
        } else {
            remaining.min(budget)
        }
    };
    match module {
        SetupModule::Direct if facts.target_addrs.is_empty() => Err(Skip::NoDirectAddress),
        SetupModule::Direct => {
            let plausible = facts
                .target_addrs
                .iter()
                .any(|a| plausibly_reachable(a.ip(), &facts.site.local));
            Ok(match (last, plausible) {
                (true, _) => remaining,
                (false, true) => remaining.min(budgets.direct),
                // Only other networks' private addresses (a target behind a
                // NAT, seen from outside its LAN): such attempts fail at
                // once or are dropped, so they get a short budget.
                (false, false) => remaining.min(budgets.direct).min(UNLIKELY_DIRECT_BUDGET),
            })
        }
        _ if !facts.hub_session => Err(Skip::NoHubSession),
        SetupModule::Reverse if facts.site.advertised.is_empty() => {
            Err(Skip::NothingToConnectBackTo)
        }
        SetupModule::Reverse if !facts.site.reverse_plausible(facts.target_seen_at) => {
            Err(Skip::TargetOnAnotherNetwork)
        }
        SetupModule::Reverse => Ok(cap(budgets.reverse)),
        SetupModule::Splice => Ok(cap(budgets.splice)),
        SetupModule::Routed => Ok(remaining),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Budgets = Budgets {
        direct: Duration::from_secs(2),
        reverse: Duration::from_secs(3),
        splice: Duration::from_secs(4),
    };
    const LEFT: Duration = Duration::from_secs(10);

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn lan_host() -> Site {
        Site {
            local: vec![LocalAddr {
                ip: "10.1.0.5".parse().expect("ip"),
                prefix_len: 24,
            }],
            advertised: vec![addr("10.1.0.5:4000")],
            // The hub sees us at the NAT's public address.
            seen_at: Some(addr("203.0.113.7:61000")),
        }
    }

    /// A host with a public address of its own, where the hub sees it.
    fn public_host() -> Site {
        Site {
            local: vec![LocalAddr {
                ip: "192.0.2.10".parse().expect("ip"),
                prefix_len: 24,
            }],
            advertised: vec![addr("192.0.2.10:4000")],
            seen_at: Some(addr("192.0.2.10:51000")),
        }
    }

    fn facts<'a>(site: &'a Site, addrs: &'a [SocketAddr]) -> Facts<'a> {
        Facts {
            site,
            target_addrs: addrs,
            target_seen_at: None,
            hub_session: true,
        }
    }

    #[test]
    fn the_cached_module_goes_first_and_once() {
        let all = SetupModule::ALL;
        assert_eq!(order(None, &all), all.to_vec());
        assert_eq!(
            order(Some(SetupModule::Splice), &all),
            vec![
                SetupModule::Splice,
                SetupModule::Direct,
                SetupModule::Reverse,
                SetupModule::Routed
            ]
        );
        // A cached module the configuration leaves out is still tried first.
        let direct_only = [SetupModule::Direct];
        assert_eq!(
            order(Some(SetupModule::Routed), &direct_only),
            vec![SetupModule::Routed, SetupModule::Direct]
        );
    }

    #[test]
    fn modules_that_cannot_work_are_skipped_with_the_reason() {
        let site = lan_host();
        let none: [SocketAddr; 0] = [];
        let f = facts(&site, &none);
        assert_eq!(
            plan(SetupModule::Direct, &f, LEFT, false, &B),
            Err(Skip::NoDirectAddress)
        );
        let no_hub = Facts {
            hub_session: false,
            ..f
        };
        for m in [
            SetupModule::Reverse,
            SetupModule::Splice,
            SetupModule::Routed,
        ] {
            assert_eq!(plan(m, &no_hub, LEFT, false, &B), Err(Skip::NoHubSession));
        }
        let silent = Site {
            advertised: vec![],
            ..lan_host()
        };
        assert_eq!(
            plan(
                SetupModule::Reverse,
                &facts(&silent, &none),
                LEFT,
                false,
                &B
            ),
            Err(Skip::NothingToConnectBackTo)
        );
        // Behind a NAT, target seen at another public address.
        let elsewhere = Facts {
            target_seen_at: Some(addr("198.51.100.9:5000")),
            ..f
        };
        assert_eq!(
            plan(SetupModule::Reverse, &elsewhere, LEFT, false, &B),
            Err(Skip::TargetOnAnotherNetwork)
        );
        assert_eq!(
            Skip::TargetOnAnotherNetwork.to_string(),
            "skipped: this node is behind a NAT and the target is not on its network"
        );
        // Same NAT (same public address): worth a try.
        let same_nat = Facts {
            target_seen_at: Some(addr("203.0.113.7:62000")),
            ..f
        };
        assert_eq!(
            plan(SetupModule::Reverse, &same_nat, LEFT, false, &B),
            Ok(B.reverse)
        );
    }

    #[test]
    fn budgets_cap_each_module_but_the_last_gets_what_is_left() {
        let site = lan_host();
        let ours = [addr("10.1.0.9:4000")];
        let f = facts(&site, &ours);
        assert_eq!(plan(SetupModule::Direct, &f, LEFT, false, &B), Ok(B.direct));
        assert_eq!(plan(SetupModule::Direct, &f, LEFT, true, &B), Ok(LEFT));
        assert_eq!(plan(SetupModule::Splice, &f, LEFT, false, &B), Ok(B.splice));
        assert_eq!(plan(SetupModule::Splice, &f, LEFT, true, &B), Ok(LEFT));
        assert_eq!(plan(SetupModule::Routed, &f, LEFT, false, &B), Ok(LEFT));
        let short = Duration::from_secs(1);
        assert_eq!(plan(SetupModule::Reverse, &f, short, false, &B), Ok(short));
        // Another network's private address: a short try, unless it is last.
        let theirs = [addr("172.16.5.5:4000")];
        let g = facts(&site, &theirs);
        assert_eq!(
            plan(SetupModule::Direct, &g, LEFT, false, &B),
            Ok(UNLIKELY_DIRECT_BUDGET)
        );
        assert_eq!(plan(SetupModule::Direct, &g, LEFT, true, &B), Ok(LEFT));
    }

    #[test]
    fn a_host_with_its_own_public_address_is_not_behind_a_nat() {
        let public = public_host();
        assert!(!public.behind_nat());
        assert!(!public.reverse_needs_target_site(None));
        assert!(lan_host().behind_nat());
        assert!(lan_host().reverse_needs_target_site(None));
        assert!(
            !Site::default().behind_nat(),
            "not attached: unknown, not behind"
        );
    }

    #[test]
    fn addresses_of_the_own_nat_are_told_apart() {
        let mut site = lan_host();
        let target = [
            addr("10.1.0.9:4000"),
            addr("203.0.113.7:40001"),
            addr("198.51.100.3:40001"),
        ];
        // Seen by the hub at the NAT's address: a target there is behind
        // the same gateway.
        assert_eq!(site.at_own_nat(&target), vec![addr("203.0.113.7:40001")]);
        // The port mapping it advertises says the same without a hub.
        site.seen_at = None;
        assert!(site.at_own_nat(&target).is_empty());
        site.advertised.push(addr("198.51.100.3:40000"));
        assert_eq!(site.at_own_nat(&target), vec![addr("198.51.100.3:40001")]);
        // A host with a public address of its own is behind no NAT.
        let public = public_host();
        assert!(public.nat_public_ips().is_empty());
        assert!(public.at_own_nat(&[addr("192.0.2.10:4001")]).is_empty());
    }

    #[test]
    fn module_names_round_trip_and_unknown_ones_are_refused() {
        for m in SetupModule::ALL {
            assert_eq!(m.to_string().parse::<SetupModule>(), Ok(m));
        }
        let err = "carrier-pigeon"
            .parse::<SetupModule>()
            .expect_err("unknown");
        assert_eq!(err, UnknownModule("carrier-pigeon".into()));
    }
}
