//! `reach run` on loopback: unmodified programs (curl, python3) started
//! under the shim reach a service exposed at a node by its `.reach` name,
//! other names and addresses behave as without the shim, and an agent
//! that dies makes connects fail with an errno instead of a hang. Needs
//! the shim built (`cargo build -p reach-shim`; scripts/test.sh does).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{HubProc, Listener, DEADLINE};

const PAGE: &str = "hello through reach run";

/// A tiny HTTP server on loopback answering every request with [`PAGE`].
fn web_service() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{PAGE}",
                    PAGE.len()
                );
            });
        }
    });
    addr
}

/// The shim beside the `reach` binary, or a failure that says how to
/// build it.
fn shim() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_reach"));
    let shim = exe.with_file_name("libreach_shim.so");
    assert!(
        shim.is_file(),
        "{} is missing: build it with `cargo build -p reach-shim` (scripts/test.sh does)",
        shim.display()
    );
    shim
}

/// `reach run --hub HUB -- PROGRAM ARGS...` with state in `state`.
fn run(state: &Path, hub: &str, program: &[&str]) -> Output {
    let mut cmd = common::reach();
    cmd.arg("--state-dir")
        .arg(state)
        .args(["-v", "run", "--shim"])
        .arg(shim())
        .args(["--hub", hub, "--"])
        .args(program)
        .stdin(Stdio::null());
    output_within(cmd)
}

/// Runs `cmd` to its end within the tests' deadline.
fn output_within(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not end within {DEADLINE:?}");
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A hub and the web service exposed at a node's virtual port 8000: the
/// hub, the exposing node (kept alive) and its NodeId.
fn exposed_web(dir: &Path) -> (HubProc, Listener, String) {
    let service = web_service().to_string();
    let hub = HubProc::start(&dir.join("hub"), &[]);
    let state = dir.join("server");
    let empty = common::random_file(dir, "empty", 0);
    let server = Listener::start_with(
        None,
        &state,
        &empty,
        &["expose", &service],
        &[
            "--open",
            "--port",
            "8000",
            "--virtual-only",
            "--hub",
            &hub.target,
        ],
    );
    let node = common::reach_id(&state);
    (hub, server, node)
}

#[test]
fn unmodified_programs_reach_reach_names_and_nothing_else_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hub, _server, node) = exposed_web(dir.path());
    let client = dir.path().join("client");
    // curl resolves NODEID.reach and its connection is carried to the
    // node's virtual port 8000.
    let url = format!("http://{node}.reach:8000/");
    let out = run(&client, &hub.target, &["curl", "-sS", "-m", "20", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), PAGE, "{}", text(&out));
    // An unknown .reach name fails as an unknown host does: curl's 6.
    let out = run(
        &client,
        &hub.target,
        &["curl", "-sS", "-m", "20", "http://nosuchnode.reach:8000/"],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    // Perl's gethostbyname (the C library's gethostbyname or _r): the pool
    // address, an unknown name undefined, other names as ever.
    let script = format!(
        "my @h = gethostbyname('{node}.reach'); print join('.', unpack('C4', $h[4])), qq(\\n);\n\
         print defined(gethostbyname('nosuchnode.reach')) ? qq(found\\n) : qq(unknown\\n);\n\
         my @l = gethostbyname('localhost'); print join('.', unpack('C4', $l[4])), qq(\\n);\n"
    );
    let out = run(&client, &hub.target, &["perl", "-e", &script]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("127.77.0.")),
        "{}",
        text(&out)
    );
    assert_eq!(&lines[1..], ["unknown", "127.0.0.1"], "{}", text(&out));
    // gethostbyname2 (through ctypes): a .reach name has an IPv4 address,
    // no IPv6 one.
    let ctypes = format!(
        "import ctypes, socket\n\
         libc = ctypes.CDLL(None)\n\
         libc.gethostbyname2.restype = ctypes.c_void_p\n\
         print(libc.gethostbyname2(b'{node}.reach', socket.AF_INET) is not None,\n\
               libc.gethostbyname2(b'{node}.reach', socket.AF_INET6) is None)\n"
    );
    let out = run(&client, &hub.target, &["python3", "-c", &ctypes]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "True True",
        "{}",
        text(&out)
    );
    // Addresses that are not the pool's are the C library's business.
    let plain = web_service();
    let out = run(
        &client,
        &hub.target,
        &["curl", "-sS", "-m", "20", &format!("http://{plain}/")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), PAGE);
    // Python's socket module: blocking and non-blocking connects, and the
    // peer is the address the program connected to.
    let script = format!(
        "import os, socket, select\n\
         s = socket.create_connection(('{node}.reach', 8000))\n\
         print(s.getpeername()[0].startswith('127.77.'))\n\
         d = socket.socket(fileno=os.dup2(s.fileno(), 200))\n\
         print(d.getpeername() == s.getpeername())\n\
         d.detach()\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         print(s.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode())\n\
         s.close()\n\
         n = socket.socket()\n\
         n.setblocking(False)\n\
         ip = socket.getaddrinfo('{node}.reach', 8000)[0][4][0]\n\
         r = n.connect_ex((ip, 8000))\n\
         select.select([], [n], [], 20)\n\
         print(r in (0, 115), n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), n.getpeername())\n"
    );
    let out = run(&client, &hub.target, &["python3", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.first(), Some(&"True"), "{}", text(&out));
    assert_eq!(lines.get(1), Some(&"True"), "dup: {}", text(&out));
    assert_eq!(lines.get(2), Some(&PAGE), "{}", text(&out));
    assert!(
        lines
            .get(3)
            .is_some_and(|l| l.starts_with("True 0 ('127.77.")),
        "{}",
        text(&out)
    );
    // A node that is nowhere: a blocking connect fails with an errno; a
    // non-blocking one returns at once and the failed setup then resets
    // the socket (an event loop does not stall on it).
    let absent = common::reach_id(&dir.path().join("absent"));
    let script = format!(
        "import errno, socket, select, time\n\
         ip = socket.getaddrinfo('{absent}.reach', 80)[0][4][0]\n\
         b = socket.socket()\n\
         print(errno.errorcode.get(b.connect_ex((ip, 80)), 'ok'))\n\
         n = socket.socket()\n\
         n.setblocking(False)\n\
         t = time.monotonic()\n\
         r = n.connect_ex((ip, 80))\n\
         print(r in (0, 115), time.monotonic() - t < 1.0)\n\
         select.select([n], [], [], 30)\n\
         try:\n    print(n.recv(10))\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    let out = run(&client, &hub.target, &["python3", "-c", &script]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines,
        ["EHOSTUNREACH", "True True", "ECONNRESET"],
        "{}",
        text(&out)
    );
}

#[test]
fn an_agent_that_dies_makes_connects_fail_with_an_errno_not_a_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (hub, _server, node) = exposed_web(dir.path());
    let result = dir.path().join("result");
    // The program resolves the name, kills its agent (`reach run`, its
    // parent), then connects: the connect must fail at once, with an
    // errno, and the shim must say why on stderr.
    let script = format!(
        "import os, signal, socket, sys, time\n\
         ip = socket.getaddrinfo('{node}.reach', 8000)[0][4][0]\n\
         os.kill(os.getppid(), signal.SIGKILL)\n\
         time.sleep(0.2)\n\
         t = time.monotonic()\n\
         try:\n    socket.create_connection((ip, 8000), timeout=30)\n    r = 'connected'\n\
         except OSError as e:\n    r = 'errno %d' % e.errno\n\
         open('{}', 'w').write('%s %.1f' % (r, time.monotonic() - t))\n",
        result.display()
    );
    let out = run(
        &dir.path().join("client"),
        &hub.target,
        &["python3", "-c", &script],
    );
    // `reach run` itself was killed.
    assert_eq!(out.status.code(), None, "{}", text(&out));
    let said = common::until(|| {
        std::fs::read_to_string(&result)
            .ok()
            .filter(|s| !s.is_empty())
    })
    .expect("the orphaned program wrote its result");
    let (what, secs) = said.rsplit_once(' ').expect("result and time");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reach run: the agent at") && err.contains("did not answer"),
        "{}",
        text(&out)
    );
    assert_eq!(
        what,
        format!("errno {}", 101),
        "ENETUNREACH expected: {said}"
    );
    assert!(
        secs.parse::<f64>().expect("seconds") < 5.0,
        "the failure took {secs} s"
    );
}

/// A background `reach run`, killed when the test ends, however it ends.
struct Background {
    child: std::process::Child,
    err: PathBuf,
}

impl Background {
    /// `reach run FLAGS -- PROGRAM...` with state in `state`, stderr in
    /// STATE.err; waits for `ready` on its stderr.
    fn start(state: &Path, flags: &[&str], program: &[&str], ready: &str) -> Self {
        let err = state.with_extension("err");
        let mut child = common::reach();
        child
            .arg("--state-dir")
            .arg(state)
            .args(["-v", "run", "--shim"])
            .arg(shim())
            .args(flags)
            .arg("--")
            .args(program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("err"));
        // A process group of its own: the program goes with it at the end.
        std::os::unix::process::CommandExt::process_group(&mut child, 0);
        let child = child.spawn().expect("spawn reach run");
        let me = Self { child, err };
        let seen = common::until(|| me.stderr().contains(ready).then_some(()));
        assert!(seen.is_some(), "no {ready:?}:\n{}", me.stderr());
        me
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP port free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[test]
fn a_program_that_listens_is_served_at_its_node_and_on_the_hubs_proxy_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, range) = {
        let low = free_port();
        (low, format!("{low}-{low}"))
    };
    let hub = HubProc::start(&dir.path().join("hub"), &["--proxy-ports", &range]);
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("page.txt"), PAGE).expect("page");
    let port = free_port().to_string();
    let site_arg = site.to_string_lossy().to_string();
    let web = [
        "python3",
        "-m",
        "http.server",
        &port,
        "--bind",
        "127.0.0.1",
        "--directory",
        &site_arg,
    ];
    // Without a policy nobody may connect: the port is not served, and
    // the program is told why on its stderr (it runs on regardless).
    let closed_state = dir.path().join("closed");
    let closed = Background::start(
        &closed_state,
        &["--hub", &hub.target],
        &web,
        "is not on the reach network",
    );
    assert!(
        closed.stderr().contains("no node may connect"),
        "{}",
        closed.stderr()
    );
    drop(closed);
    // With --open: served at the node's virtual port and the hub's proxy
    // port.
    let server_state = dir.path().join("server");
    let server = Background::start(
        &server_state,
        &["--open", "--hub", &hub.target],
        &web,
        "exposed at",
    );
    let node = common::reach_id(&server_state);
    let url = format!("http://{node}.reach:{port}/page.txt");
    let out = run(
        &dir.path().join("client"),
        &hub.target,
        &["curl", "-sS", "-m", "20", &url],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), server.stderr());
    assert_eq!(String::from_utf8_lossy(&out.stdout), PAGE);
    // The server saw the client node at its pool address (accept's peer),
    // as its log of the request says.
    let seen = common::until(|| {
        server
            .stderr()
            .lines()
            .any(|l| l.starts_with("127.77.0.") && l.contains("GET /page.txt"))
            .then_some(())
    });
    assert!(seen.is_some(), "{}", server.stderr());
    // Plain curl, without reach, through the hub's proxy port.
    let public = server
        .stderr()
        .lines()
        .find_map(|l| l.split("exposed at ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .expect("the proxy port")
        .to_string();
    let mut plain = Command::new("curl");
    plain.args(["-sS", "-m", "20", &format!("http://{public}/page.txt")]);
    let out = output_within(plain);
    assert!(out.status.success(), "{}\n{}", text(&out), server.stderr());
    assert_eq!(String::from_utf8_lossy(&out.stdout), PAGE);
    // reach status lists the run like an exposure: the program, its port,
    // the virtual address and the hub's proxy port, the connections; reach
    // stop ends the program.
    let mut status = common::reach();
    status
        .arg("--state-dir")
        .arg(&server_state)
        .args(["status", "--json"]);
    let out = output_within(status);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let runs: Vec<&serde_json::Value> = v["proxies"]
        .as_array()
        .expect("proxies")
        .iter()
        .filter(|p| p["kind"] == "run")
        .collect();
    assert_eq!(runs.len(), 1, "{v}");
    let r = runs[0];
    let local = r["local"].as_str().unwrap_or_default();
    assert!(
        local.starts_with("python3") && local.ends_with(&format!("listening on {port}")),
        "{r}"
    );
    let vaddr = r["vaddr"].as_str().unwrap_or_default();
    assert!(vaddr.starts_with(&format!("{node}:{port}")), "{r}");
    assert!(
        r["public"].as_str().unwrap_or_default().contains(&public),
        "{r}"
    );
    assert!(r["counters"]["connections"].as_u64() >= Some(2), "{r}");
    let mut stop = common::reach();
    stop.arg("--state-dir")
        .arg(&server_state)
        .args(["stop", "all"]);
    let out = output_within(stop);
    assert!(out.status.success(), "{}", text(&out));
    let mut server = server;
    let ended = common::until(|| server.child.try_wait().ok().flatten());
    assert!(
        ended.is_some(),
        "reach stop did not end the run:\n{}",
        server.stderr()
    );
}

#[test]
fn udp_sockets_reach_a_udp_server_under_reach_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = HubProc::start(&dir.path().join("hub"), &[]);
    // A UDP server (no listen: its bind is what is served) answering each
    // datagram in capitals.
    let server_state = dir.path().join("server");
    let port = free_port().to_string();
    let server_script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {port}))\n\
         while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d.upper(), a)\n"
    );
    let server = Background::start(
        &server_state,
        &["--open", "--hub", &hub.target],
        &["python3", "-c", &server_script],
        &format!("UDP port {port} served at"),
    );
    let node = common::reach_id(&server_state);
    let client_script = format!(
        "import socket\n\
         c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         c.settimeout(20)\n\
         c.connect(('{node}.reach', {port}))\n\
         print(c.getpeername()[0].startswith('127.77.'))\n\
         for w in (b'first', b'second datagram'):\n    c.send(w)\n    print(c.recv(2048).decode())\n"
    );
    let out = run(
        &dir.path().join("client"),
        &hub.target,
        &["python3", "-c", &client_script],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), server.stderr());
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["True", "FIRST", "SECOND DATAGRAM"],
        "{}",
        text(&out)
    );
    // The client's own socket (bound by the shim to a port of the
    // kernel's choosing) is not announced as a server.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("is not on the reach network"),
        "{}",
        text(&out)
    );
}
