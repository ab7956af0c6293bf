//! Helpers for running the `reach` binary in tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Every wait in these tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A `reach` command.
pub fn reach() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reach"))
}

/// A `reach` command run inside a network namespace (or directly when `None`).
pub fn reach_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_reach")]);
            c
        }
        None => reach(),
    }
}

/// The NodeId of the identity in `state`.
pub fn reach_id(state: &Path) -> String {
    let out = reach()
        .arg("--state-dir")
        .arg(state)
        .arg("id")
        .output()
        .expect("run reach id");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

/// Writes `len` pseudo-random bytes (deterministic per name) to `dir/name`.
pub fn random_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    let mut state: u64 = name.bytes().fold(0x9e37_79b9_7f4a_7c15, |h, b| {
        h.rotate_left(5) ^ u64::from(b)
    });
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        // xorshift64*: fast, and enough to make every block distinct.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        data.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(&path, data).expect("write data");
    path
}

/// SHA-256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).expect("read");
    format!("{:x}", Sha256::digest(&data))
}

/// Checks `condition` every 20 ms until it yields a value or [`DEADLINE`]
/// passes (then `None`).
pub fn until<T>(condition: impl FnMut() -> Option<T>) -> Option<T> {
    until_within(DEADLINE, condition)
}

/// [`until`] with its own deadline.
pub fn until_within<T>(deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = condition() {
            return Some(v);
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` (named `what`) to write its address to `path`
/// (atomically, by rename); panics with its stderr if it exits first.
fn wait_for_addr(child: &mut Child, path: &Path, stderr: &Path, what: &str) -> String {
    let addr = until(|| {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Some(Ok(text.trim().to_string()));
            }
        }
        child.try_wait().ok().flatten().map(Err)
    });
    match addr {
        Some(Ok(addr)) => addr,
        Some(Err(status)) => panic!(
            "{what} exited with {status}: {}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        ),
        None => panic!("{what} did not write its address within {DEADLINE:?}"),
    }
}

/// A running `reach listen`.
pub struct Listener {
    child: Option<Child>,
    pub vaddr: String,
    pub out_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Listener {
    /// Starts `reach listen` with stdin from `input`, waiting for its address.
    pub fn start(netns: Option<&str>, state: &Path, input: &Path, extra: &[&str]) -> Self {
        Self::start_with(netns, state, input, &["listen"], extra)
    }

    /// Starts `reach COMMAND...` (`listen`, `expose SERVICE`) with stdin
    /// from `input`, waiting for the virtual address it serves.
    pub fn start_with(
        netns: Option<&str>,
        state: &Path,
        input: &Path,
        command: &[&str],
        extra: &[&str],
    ) -> Self {
        std::fs::create_dir_all(state).expect("state dir");
        let addr_file = state.join("addr.txt");
        let out_path = state.join("listener.out");
        let stderr_path = state.join("listener.err");
        // Outside a test namespace, listen on loopback only, so tests never dial
        // this machine's other interface addresses.
        let bind: &[&str] = if netns.is_none() {
            &["--bind", "127.0.0.1"]
        } else {
            &[]
        };
        let child = reach_in(netns)
            .arg("--state-dir")
            .arg(state)
            .args(command)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(bind)
            .args(extra)
            .stdin(std::fs::File::open(input).expect("input"))
            .stdout(std::fs::File::create(&out_path).expect("out"))
            .stderr(std::fs::File::create(&stderr_path).expect("err"))
            .spawn()
            .expect("spawn reach listen");
        let mut l = Self {
            child: Some(child),
            vaddr: String::new(),
            out_path,
            stderr_path,
        };
        l.vaddr = l.wait_for_addr(&addr_file);
        l
    }

    fn wait_for_addr(&mut self, path: &Path) -> String {
        let child = self.child.as_mut().expect("running");
        wait_for_addr(child, path, &self.stderr_path, "reach listen")
    }

    /// The first direct address in the listener's virtual address.
    pub fn first_direct(&self) -> SocketAddr {
        let hints = self.vaddr.split("/a=").nth(1).expect("direct hints");
        let first = hints.split(['/', ',']).next().expect("one address");
        first.parse().expect("socket addr")
    }

    /// Waits for the listener to exit successfully; returns what it received.
    pub fn finish(mut self) -> PathBuf {
        let mut child = self.child.take().expect("running");
        let status = wait_deadline(&mut child);
        let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        assert!(status.success(), "reach listen failed: {err}");
        self.out_path.clone()
    }

    /// Stops the listener.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a child with the test deadline, killing it if it overruns.
pub fn wait_deadline(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("process did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `reach connect` with stdin from `input` and stdout to `output`.
pub fn connect(
    netns: Option<&str>,
    state: &Path,
    vaddr: &str,
    input: &Path,
    output: &Path,
    extra: &[&str],
) -> ExitStatus {
    let err_path = output.with_extension("err");
    let mut child = reach_in(netns)
        .arg("--state-dir")
        .arg(state)
        .arg("connect")
        .args(extra)
        .arg(vaddr)
        .stdin(std::fs::File::open(input).expect("input"))
        .stdout(std::fs::File::create(output).expect("output"))
        .stderr(std::fs::File::create(&err_path).expect("err"))
        .spawn()
        .expect("spawn reach connect");
    let status = wait_deadline(&mut child);
    if !status.success() {
        eprintln!(
            "reach connect stderr: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    status
}

/// Where each end of an exchange runs and with which extra flags.
pub struct Side<'a> {
    /// Network namespace, or `None` for the current one.
    pub netns: Option<&'a str>,
    /// Extra arguments to `listen` or `connect`.
    pub args: &'a [&'a str],
}

/// Runs `reach listen` on one side and `reach connect` on the other, sending
/// `up` bytes to the listener and `down` bytes back at the same time, and checks
/// both arrive intact (sha256). Returns the listener's virtual address.
pub fn exchange(dir: &Path, listen: Side, connect_from: Side, up: usize, down: usize) -> String {
    let up_file = random_file(dir, "up.bin", up);
    let down_file = random_file(dir, "down.bin", down);
    let listener = Listener::start(listen.netns, &dir.join("a"), &down_file, listen.args);
    let vaddr = listener.vaddr.clone();
    let got_down = dir.join("got_down.bin");
    let status = connect(
        connect_from.netns,
        &dir.join("b"),
        &vaddr,
        &up_file,
        &got_down,
        connect_from.args,
    );
    assert!(status.success(), "reach connect failed");
    let got_up = listener.finish();
    assert_eq!(sha256(&got_up), sha256(&up_file), "connector to listener");
    assert_eq!(
        sha256(&got_down),
        sha256(&down_file),
        "listener to connector"
    );
    vaddr
}

/// A running `reach hub` on loopback, killed when dropped.
pub struct HubProc {
    child: Option<Child>,
    /// `NODEID@127.0.0.1:PORT`, as the hub printed it.
    pub target: String,
    pub stderr_path: PathBuf,
}

impl HubProc {
    /// Starts `reach hub` on a free loopback port with `extra` flags and waits
    /// for its address.
    pub fn start(state: &Path, extra: &[&str]) -> Self {
        Self::start_on(state, 0, extra)
    }

    /// Starts `reach hub` on loopback TCP port `port` (0: any free one).
    pub fn start_on(state: &Path, port: u16, extra: &[&str]) -> Self {
        std::fs::create_dir_all(state).expect("state dir");
        let addr_file = state.join("hub.txt");
        // A restarted hub must not be taken for ready by its predecessor's file.
        let _ = std::fs::remove_file(&addr_file);
        let stderr_path = state.join("hub.err");
        let child = reach()
            .arg("--state-dir")
            .arg(state)
            .args([
                "hub",
                "--bind",
                "127.0.0.1",
                "--tcp-port",
                &port.to_string(),
                "--addr-file",
            ])
            .arg(&addr_file)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("err"))
            .spawn()
            .expect("spawn reach hub");
        let mut child = child;
        let target = wait_for_addr(&mut child, &addr_file, &stderr_path, "reach hub");
        Self {
            child: Some(child),
            target,
            stderr_path,
        }
    }

    /// The hub process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The hub's `HOST:PORT`, without its NodeId.
    pub fn host_port(&self) -> &str {
        self.target.split_once('@').expect("NODEID@HOST:PORT").1
    }

    /// What the hub wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The hub's TCP port.
    pub fn port(&self) -> u16 {
        self.host_port()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port")
    }

    /// Kills the hub at once (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits for the hub to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        wait_deadline(&mut child)
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
