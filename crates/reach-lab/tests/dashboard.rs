//! The hub dashboard in a real headless Chromium (Debian's chromium and
//! chromium-driver, driven over WebDriver with curl): a federation of four
//! hubs in a ring, the page on the first hub's metrics port draws every hub
//! and link; one hub is killed and the page, without a reload, drops its
//! links and then shows it gone. A screenshot is kept in the test's target
//! directory. Needs root, iproute2, nftables, chromium, chromedriver and the
//! `reach` binary built beside `reach-lab`.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};
use serde_json::{json, Value};

const DRIVER: &str = "/usr/bin/chromedriver";
const DRIVER_PORT: u16 = 9515;

/// One WebDriver call from inside `host`'s namespace: its `value`.
fn webdriver(lab: &Lab, host: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut cmd = lab.command(host, "curl");
    cmd.args(["-sS", "--max-time", "60", "-X", method])
        .arg(format!("http://127.0.0.1:{DRIVER_PORT}{path}"));
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data"])
            .arg(b.to_string());
    }
    let out = cmd.output().expect("run curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "WebDriver {method} {path}: not JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if v["value"]["error"].is_string() {
        panic!("WebDriver {method} {path}: {}", v["value"]);
    }
    v["value"].clone()
}

/// What the page draws: hubs with whether they are reachable, and links as
/// (from, to).
#[derive(Debug, serde::Deserialize)]
struct Drawn {
    hubs: Vec<(String, bool)>,
    links: BTreeSet<(String, String)>,
    state: String,
}

const READ_PAGE: &str = r#"
    const hubs = [...document.querySelectorAll('#overlay g.hub')]
        .map((g) => [g.dataset.hub, g.dataset.reachable === 'true']);
    const links = [...document.querySelectorAll('#overlay g.link')]
        .map((g) => [g.dataset.from, g.dataset.to]);
    return { hubs, links, state: document.getElementById('state').className };
"#;

fn read_page(lab: &Lab, host: &str, session: &str) -> Drawn {
    let v = webdriver(
        lab,
        host,
        "POST",
        &format!("/session/{session}/execute/sync"),
        Some(json!({ "script": READ_PAGE, "args": [] })),
    );
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("the page read as {v}: {e}"))
}

#[test]
fn the_dashboard_draws_the_federation_in_chromium_and_follows_a_hub_that_dies() {
    assert!(
        std::path::Path::new(DRIVER).exists() && std::path::Path::new("/usr/bin/chromium").exists(),
        "chromium and chromedriver are needed: apt-get install chromium chromium-driver (scripts/test.sh does)"
    );
    let t = Topology::from_toml(
        r#"
        name = "dashboard"
        [[site]]
        name = "fed"
        gateway = "open"
        [[site.host]]
        name = "hub1"
        [[site.host]]
        name = "hub2"
        [[site.host]]
        name = "hub3"
        [[site.host]]
        name = "hub4"
        "#,
    )
    .expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let state = tempfile::tempdir().expect("tempdir");
    let secret = state.path().join("hub.secret");
    std::fs::write(&secret, "the dashboard federation's hub secret\n").expect("secret");
    let secret = secret.to_str().expect("utf-8 path").to_string();
    let peer = |h: &str| format!("{}:7700", lab.host(h).lan);
    // A ring: 2 dials 1, 3 dials 2, 4 dials 3 and 1.
    let rings: [(&str, Vec<String>); 4] = [
        ("hub1", vec![]),
        ("hub2", vec![peer("hub1")]),
        ("hub3", vec![peer("hub2")]),
        ("hub4", vec![peer("hub3"), peer("hub1")]),
    ];
    let mut hubs: Vec<(String, Option<Process>, String)> = Vec::new();
    for (host, peers) in &rings {
        let mut flags: Vec<String> = vec![
            "--hub-secret-file".into(),
            secret.clone(),
            "--no-learned-links".into(),
            "--gossip-interval".into(),
            "0.5".into(),
        ];
        for p in peers {
            flags.extend(["--peer".into(), p.clone()]);
        }
        if *host == "hub1" {
            flags.extend(["--metrics".into(), "127.0.0.1:9107".into()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (proc, target) = common::hub(&lab, host, &state.path().join(host), &flags);
        let id = target.split_once('@').expect("NODEID@").0.to_string();
        hubs.push((host.to_string(), Some(proc), id));
    }
    let id = |h: &str| hubs.iter().find(|x| x.0 == h).expect("hub").2.clone();
    let ring: BTreeSet<(String, String)> = [
        ("hub2", "hub1"),
        ("hub3", "hub2"),
        ("hub4", "hub3"),
        ("hub4", "hub1"),
    ]
    .iter()
    .map(|(a, b)| (id(a), id(b)))
    .collect();

    let _driver = common::spawn_until(
        {
            let mut c = lab.command("hub1", DRIVER);
            c.arg(format!("--port={DRIVER_PORT}")).stdin(Stdio::null());
            c
        },
        &state.path().join("chromedriver.log"),
        "started successfully",
    );
    let session = webdriver(
        &lab,
        "hub1",
        "POST",
        "/session",
        Some(
            json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1200,1300"],
            }}}}),
        ),
    );
    let session = session["sessionId"]
        .as_str()
        .expect("a WebDriver session")
        .to_string();
    webdriver(
        &lab,
        "hub1",
        "POST",
        &format!("/session/{session}/url"),
        Some(json!({ "url": "http://127.0.0.1:9107/" })),
    );

    // Every hub and every link of the ring, with who dialled.
    let all: BTreeSet<String> = hubs.iter().map(|h| h.2.clone()).collect();
    let whole = reach_lab::wait::until(Duration::from_secs(60), || {
        let d = read_page(&lab, "hub1", &session);
        let drawn: BTreeSet<String> = d.hubs.iter().map(|h| h.0.clone()).collect();
        (drawn == all && d.links == ring && d.hubs.iter().all(|h| h.1) && d.state == "ok")
            .then_some(d)
    });
    let last = read_page(&lab, "hub1", &session);
    assert!(
        whole.is_some(),
        "the page never drew the ring; it shows {last:?}, the ring is {ring:?}"
    );
    let shot = webdriver(
        &lab,
        "hub1",
        "GET",
        &format!("/session/{session}/screenshot"),
        None,
    );
    let png = shot.as_str().expect("a base64 screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let mut decode = std::process::Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&path).expect("screenshot file"))
        .spawn()
        .expect("base64");
    use std::io::Write;
    decode
        .stdin
        .take()
        .expect("stdin")
        .write_all(png.as_bytes())
        .expect("write");
    assert!(decode.wait().expect("base64").success());
    assert!(
        std::fs::metadata(&path).expect("screenshot").len() > 10_000,
        "a screenshot of the page"
    );
    eprintln!("screenshot: {}", path.display());

    // hub3 dies: the page drops its links, then shows it unreachable or
    // gone, without a reload.
    let dead = id("hub3");
    hubs.iter_mut().find(|h| h.0 == "hub3").expect("hub3").1 = None;
    let without: BTreeSet<(String, String)> = ring
        .iter()
        .filter(|(a, b)| *a != dead && *b != dead)
        .cloned()
        .collect();
    let changed = reach_lab::wait::until(Duration::from_secs(60), || {
        let d = read_page(&lab, "hub1", &session);
        let shown_alive = d.hubs.iter().any(|h| h.0 == dead && h.1);
        (d.links == without && !shown_alive && d.hubs.len() >= 3).then_some(d)
    });
    let last = read_page(&lab, "hub1", &session);
    assert!(
        changed.is_some(),
        "the page did not follow hub3's death; it shows {last:?}"
    );
    webdriver(&lab, "hub1", "DELETE", &format!("/session/{session}"), None);
}
