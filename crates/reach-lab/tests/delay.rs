//! The userspace delay hop adds the declared delay to every round trip.
//! Needs root, iproute2 and nftables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reach_lab::probe::{self, Outcome};
use reach_lab::{Lab, Topology};

#[test]
fn a_delayed_site_adds_its_delay_to_every_round_trip() {
    let text = r#"
        name = "delay"
        [[site]]
        name = "far"
        gateway = "nat"
        delay_ms = 20
        [[site.host]]
        name = "h"
        [[site]]
        name = "near"
        gateway = "open"
        [[site.host]]
        name = "web"
    "#;
    let lab = Lab::up(&Topology::from_toml(text).expect("topology")).expect("lab up");
    let tools = PathBuf::from(env!("CARGO_BIN_EXE_reach-lab"))
        .parent()
        .expect("dir")
        .to_path_buf();
    let _web = probe::spawn_server(&lab, &tools, "web", &[7000]).expect("server");
    let web = SocketAddr::from((lab.host("web").lan, 7000));
    // A probe takes two round trips (connect, then the greeting), each of which
    // crosses the 20 ms hop twice: at least 80 ms. The delay can only add time,
    // so this lower bound holds however loaded the machine is.
    for _ in 0..3 {
        match probe::connect_from(&lab, &tools, "h", web, Duration::from_secs(5), None) {
            Outcome::Ok { ms, .. } => {
                assert!(ms >= 78.0, "{ms} ms is less than two delayed round trips")
            }
            other => panic!("probe through the delayed link: {other:?}"),
        }
    }
}
