//! The four ways reach sets up a stream, in the setup driver's default
//! order: their names, order and text form (the `--modules` list, the
//! module cache's file, `StreamInfo::module`). A leaf: every other module
//! may name a [`SetupModule`] without depending on how any of them works.

/// How a stream was set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
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
