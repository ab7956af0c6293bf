//! NATs that forget: sites whose NAT drops a TCP mapping after 20 idle
//! seconds (the kernel's conntrack at one site, the lab's userspace NAT at
//! the other). A reach stream left idle for 30 s still carries data both
//! ways afterwards (its TCP keepalives, every 10 s of silence, keep the
//! mapping); a plain TCP connection left idle as long, beside it, is cut by
//! the NAT, which shows the NAT does forget. Needs root, iproute2,
//! nftables, socat and the `reach` binary built beside `reach-lab`.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use reach_lab::lab::Process;
use reach_lab::{Lab, Topology};

mod common;

/// Idle longer than the NATs' TCP timeout (20 s), and longer than reach's
/// keepalive idle time (10 s) plus a probe interval.
const IDLE: Duration = Duration::from_secs(30);

const TOPOLOGY: &str = r#"
    name = "forgetful"
    [[site]]
    name = "kernel"
    gateway = "nat"
    tcp_timeout_s = 20
    udp_timeout_s = 20
    [[site.host]]
    name = "k"
    [[site]]
    name = "userspace"
    gateway = "nat"
    filtering = "endpoint-independent"
    tcp_timeout_s = 20
    udp_timeout_s = 20
    [[site.host]]
    name = "u"
    [[site]]
    name = "far"
    gateway = "open"
    [[site.host]]
    name = "s"
"#;

/// A process in the lab with its stdin, and its stdout's lines.
struct Piped {
    _proc: Process,
    input: ChildStdin,
    lines: Receiver<String>,
}

fn piped(mut cmd: Command, log: &std::path::Path) -> Piped {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn");
    let input = child.stdin.take().expect("stdin");
    let out: ChildStdout = child.stdout.take().expect("stdout");
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Piped {
        _proc: Process::new(child),
        input,
        lines,
    }
}

impl Piped {
    fn say(&mut self, line: &str) {
        writeln!(self.input, "{line}").expect("write");
        self.input.flush().expect("flush");
    }

    /// The next line within `within`, if one came.
    fn heard(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }
}

/// A reach stream from `client` to a listener on `s` and a plain TCP
/// connection (socat) beside it, each checked once before and once after
/// `IDLE` of silence; returns what arrived after the idle time over each.
fn idle_both(lab: &Lab, client: &str, dir: &std::path::Path) -> (Option<String>, Option<String>) {
    let reach = common::tools_with_reach().join("reach");
    let addr_file = dir.join(format!("{client}.addr"));
    let mut listen = lab.command("s", &reach);
    listen
        .arg("--state-dir")
        .arg(dir.join(format!("listen-{client}")))
        .args(["-v", "listen", "--open", "--addr-file"])
        .arg(&addr_file);
    let mut listener = piped(listen, &dir.join(format!("listen-{client}.log")));
    let vaddr =
        reach_lab::wait::for_file(&addr_file, Duration::from_secs(20)).expect("listener address");
    let mut connect = lab.command(client, &reach);
    connect
        .arg("--state-dir")
        .arg(dir.join(format!("connect-{client}")))
        .args(["-v", "connect", "--modules", "direct"])
        .arg(&vaddr);
    let mut connector = piped(connect, &dir.join(format!("connect-{client}.log")));

    // The control: plain TCP through the same NAT, no keepalive.
    let port = if client == "k" { 7101 } else { 7102 };
    let mut server = lab.command("s", "socat");
    server.args([
        "-u".into(),
        "STDIN".into(),
        format!("TCP-LISTEN:{port},reuseaddr"),
    ]);
    let mut tcp_server = piped(server, &dir.join(format!("socat-s-{client}.log")));
    let s_ip = lab.host("s").lan;
    // Sent once the connection is up; until then it waits in the pipe.
    tcp_server.say("hello");
    let tcp_client = (0..50)
        .find_map(|_| {
            let mut c = lab.command(client, "socat");
            c.args(["-u".into(), format!("TCP:{s_ip}:{port}"), "STDOUT".into()]);
            let p = piped(c, &dir.join(format!("socat-{client}.log")));
            // The server may not listen yet: a refused connect ends this
            // socat, and the next one tries again.
            p.heard(Duration::from_millis(500)).map(|_| p)
        })
        .expect("plain TCP through the NAT before the idle time");

    connector.say("before");
    assert_eq!(
        listener.heard(Duration::from_secs(20)).as_deref(),
        Some("before"),
        "{client}: the reach stream carries data before the idle time"
    );
    // The scenario itself: both connections stay silent for IDLE (nothing
    // to wait for; time must pass).
    std::thread::sleep(IDLE);
    listener.say("after");
    tcp_server.say("after");
    let over_reach = connector.heard(Duration::from_secs(10));
    let over_tcp = tcp_client.heard(Duration::from_secs(5));
    (over_reach, over_tcp)
}

#[test]
fn a_reach_stream_outlives_a_nat_that_forgets_idle_mappings() {
    let t = Topology::from_toml(TOPOLOGY).expect("topology");
    let lab = Lab::up(&t).expect("lab up");
    let dir = lab.record().state_dir().join("idle");
    std::fs::create_dir_all(&dir).expect("dir");
    let (kernel, userspace) = std::thread::scope(|s| {
        let k = s.spawn(|| idle_both(&lab, "k", &dir));
        let u = s.spawn(|| idle_both(&lab, "u", &dir));
        (k.join(), u.join())
    });
    for (site, got) in [("kernel", kernel), ("userspace", userspace)] {
        let (over_reach, over_tcp) = got.unwrap_or_else(|_| panic!("{site}: the check panicked"));
        assert_eq!(
            over_reach.as_deref(),
            Some("after"),
            "{site} NAT: the reach stream lost its mapping while idle"
        );
        assert_eq!(
            over_tcp, None,
            "{site} NAT: a plain TCP connection survived {IDLE:?} of silence, so the NAT did not forget it"
        );
    }
}
