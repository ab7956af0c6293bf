//! `reach doctor` in the NAT zoo: from behind each gateway it names the
//! gateway's mapping and filtering behaviour, and for a target behind a firewall it says which
//! setup modules reach it and why Direct cannot.

mod common;

use reach_lab::Lab;

/// `reach doctor --json ARGS...` in `host`, parsed.
fn doctor(lab: &Lab, host: &str, state: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = lab
        .command(host, common::tools_with_reach().join("reach"))
        .arg("--state-dir")
        .arg(state)
        .args(["doctor", "--json", "--no-port-mapping"])
        .args(args)
        .output()
        .expect("run reach doctor");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{host}: {stderr}");
    assert!(
        !stderr.contains("ETA"),
        "no progress bar off a terminal: {stderr}"
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{host}: {e}: {text}"))
}

#[test]
fn doctor_names_every_zoo_gateway_and_why_direct_cannot_reach_a_dropping_firewall() {
    let (_t, lab, tools, state, hubs) = common::lab_with_hubs("nat-zoo");

    for host in &lab.record().matrix {
        let hub = &hubs.attach[host];
        let r = doctor(&lab, host, &state.path().join(host), &["--hub", hub]);
        let h = &r["hubs"][0];
        assert_eq!(h["reachable"], true, "{host}: {r}");
        assert!(
            h["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{host}: {r}"
        );
        assert!(r["interfaces"].as_array().is_some_and(|i| !i.is_empty()));
        assert_eq!(r["udp"]["gets_out"], true, "{host}: {r}");
        let nat = &r["nat"];
        let (mapping, allocation) = (&nat["mapping"], &nat["allocation"]);
        let summary = nat["summary"].as_str().unwrap_or_default();
        match host.as_str() {
            "open" | "fw-drop" | "fw-reject" => {
                assert_eq!(nat["behind_nat"], false, "{host}: {r}");
                assert_eq!(mapping, "no-nat", "{host}: {r}");
                assert!(summary.starts_with("no NAT"), "{host}: {summary}");
            }
            // The echo on the hub's second address (learned from its
            // dial-back) tells an address-dependent mapping apart.
            "nat-eim" | "nat-eim-2" | "nat-eif" | "nat-hairpin" => {
                assert_eq!(nat["behind_nat"], true, "{host}: {r}");
                assert_eq!(mapping, "endpoint-independent", "{host}: {r}");
                assert_eq!(
                    nat["mapping_behaviour"], "endpoint-independent",
                    "{host}: {r}"
                );
                assert_eq!(allocation, "preserved", "{host}: {r}");
                assert!(
                    summary.contains("towards both of the hub's addresses"),
                    "{host}: {summary}"
                );
            }
            "nat-adm" => {
                assert_eq!(nat["behind_nat"], true, "{host}: {r}");
                assert_eq!(nat["mapping_behaviour"], "address-dependent", "{host}: {r}");
                assert!(
                    summary.contains("one external port per destination address"),
                    "{host}: {summary}"
                );
            }
            "nat-apdm-seq" | "nat-apdm-seq-2" => {
                assert_eq!(mapping, "dependent", "{host}: {r}");
                assert_eq!(
                    nat["mapping_behaviour"], "address-and-port-dependent",
                    "{host}: {r}"
                );
                assert_eq!(allocation["sequential"]["step"], 1, "{host}: {r}");
            }
            "nat-apdm-rand" => {
                assert_eq!(mapping, "dependent", "{host}: {r}");
                assert_eq!(
                    nat["mapping_behaviour"], "address-and-port-dependent",
                    "{host}: {r}"
                );
                assert_eq!(allocation, "random", "{host}: {r}");
                let splice = nat["splice"].as_str().unwrap_or_default();
                assert!(splice.contains("cannot be predicted"), "{host}: {splice}");
            }
            other => panic!("a zoo host this test does not know: {other}"),
        }
        // Filtering, from the hub's dial-backs: its own address from a
        // port the host never contacted, then its second address.
        let f = &r["filtering"];
        println!("{host:>15}  NAT: {}", nat["summary"]);
        println!("{host:>15}  inbound: {}", f["summary"]);
        let (want, other_port) = match host.as_str() {
            "open" | "nat-eif" | "nat-hairpin" => ("endpoint-independent", "admitted"),
            "fw-drop" => ("address-and-port-dependent", "dropped"),
            "fw-reject" => ("address-and-port-dependent", "refused"),
            // The kernel NATs and the userspace ones of RFC 4787's default
            // filtering: kept out, dropped or refused as the NAT does it.
            _ => ("address-and-port-dependent", ""),
        };
        assert_eq!(f["filtering"], want, "{host}: {f}");
        if !other_port.is_empty() {
            assert_eq!(f["other_port"]["result"], other_port, "{host}: {f}");
        }
        if want == "endpoint-independent" {
            assert_eq!(f["other_address"]["result"], "admitted", "{host}: {f}");
            assert_ne!(
                f["other_address"]["from"]
                    .as_str()
                    .map(|a| a.split(':').next()),
                f["other_port"]["from"]
                    .as_str()
                    .map(|a| a.split(':').next()),
                "{host}: the second dial-back comes from another address: {f}"
            );
        }
        let words = f["summary"].as_str().unwrap_or_default();
        match host.as_str() {
            "fw-drop" => assert!(
                words.contains("firewall") && words.contains("dropped"),
                "{host}: {words}"
            ),
            "fw-reject" => assert!(
                words.contains("firewall") && words.contains("refused"),
                "{host}: {words}"
            ),
            "nat-eif" | "nat-hairpin" => assert!(words.contains("full cone"), "{host}: {words}"),
            _ => {}
        }
    }

    // On a terminal (a pty from script(1)) a progress bar with an ETA
    // runs while the checks do, and leaves the report behind.
    let reach = common::tools_with_reach().join("reach");
    let command = format!(
        "{} --state-dir {} doctor --no-port-mapping --hub {}",
        reach.display(),
        state.path().join("open").display(),
        hubs.attach["open"]
    );
    let out = lab
        .command("open", "script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("run script");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains("reach doctor [") && screen.contains("ETA"),
        "a progress bar: {screen}"
    );
    assert!(screen.contains("inbound:"), "and the report: {screen}");

    // Address-dependent filtering (a zoo host outside the matrix): the
    // hub's other port gets in, its second address does not.
    let hub = hubs.target(&lab, "nat-adf", "hub").expect("hub target");
    let r = doctor(
        &lab,
        "nat-adf",
        &state.path().join("nat-adf"),
        &["--hub", &hub],
    );
    let f = &r["filtering"];
    println!("{:>15}  inbound: {}", "nat-adf", f["summary"]);
    assert_eq!(f["filtering"], "address-dependent", "{f}");
    assert_eq!(f["other_port"]["result"], "admitted", "{f}");
    assert_eq!(f["other_address"]["result"], "dropped", "{f}");
    assert!(
        f["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("address-dependent filtering")),
        "{f}"
    );

    // Targets behind the two firewalls, checked from the open host.
    let verdicts = |target: &str| {
        let dir = state.path().join(format!("{target}-listener"));
        let (_l, vaddr, _) = common::listener(&lab, target, &hubs.attach[target], &dir, &[]);
        let r = doctor(
            &lab,
            "open",
            &state.path().join("open"),
            &[
                "--hub",
                &hubs.attach["open"],
                "--module-timeout",
                "3",
                &vaddr,
            ],
        );
        let modules = r["target"]["modules"].as_array().cloned().expect("modules");
        let by = |m: &str| {
            modules
                .iter()
                .find(|v| v["module"] == m)
                .cloned()
                .unwrap_or_else(|| panic!("{m} missing: {r}"))
        };
        // The same in words, as a user reads it.
        let out = lab
            .command("open", tools.join("reach"))
            .arg("--state-dir")
            .arg(state.path().join("open"))
            .args([
                "doctor",
                "--no-port-mapping",
                "--module-timeout",
                "3",
                "--hub",
            ])
            .arg(&hubs.attach["open"])
            .arg(&vaddr)
            .output()
            .expect("run reach doctor");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        println!("reach doctor in open, target in {target}:\n{text}");
        assert!(text.contains("direct   cannot work: "), "{text}");
        assert!(text.contains("routed   works"), "{text}");
        (by("direct"), by("routed"), r)
    };
    let (direct, routed, r) = verdicts("fw-drop");
    assert_eq!(direct["works"], false, "{r}");
    let why = direct["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("dropped on the way") && why.contains("drops inbound connections"),
        "Direct to a dropping firewall says why: {why}"
    );
    assert_eq!(routed["works"], true, "the hubs still carry it: {r}");
    let (direct, _, r) = verdicts("fw-reject");
    assert_eq!(direct["works"], false, "{r}");
    let why = direct["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("refused the connection: a firewall"),
        "Direct to a rejecting firewall says why: {why}"
    );
}
