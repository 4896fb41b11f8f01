//! Building the namespaces: the public segment, NAT routers, hosts; and tearing them down.

use crate::impair::{ImpairConfig, StageStats};
use crate::nfqueue::Stage;
use crate::{rules, LabError, NatType};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where `ip netns` keeps its named namespaces (iproute2's NETNS_RUN_DIR).
const NETNS_DIR: &str = "/var/run/netns";
/// The public segment and its "internet core" router (in the core namespace).
const PUBLIC_NET: [u8; 3] = [203, 0, 113];
const CORE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// Public hosts get 203.0.113.1..=100, NAT routers' WAN sides 203.0.113.101..=200.
const MAX_PUBLIC_HOSTS: u8 = 100;
const MAX_NATS: usize = 100;
/// Hosts behind a `Public` router get a /28 of 198.51.100.0/24: 16 such routers at most.
const MAX_PUBLIC_ROUTERS: u8 = 16;

/// Distinguishes several labs in one process (tests run in parallel threads).
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// What the lab needs from the machine, as found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Environment {
    pub root: bool,
    /// `nft --version`, when nft runs.
    pub nft: Option<String>,
    /// `ip -V`, when ip runs.
    pub ip: Option<String>,
    /// `iptables -V`, when iptables runs (needed only for delay and jitter).
    pub iptables: Option<String>,
}

impl Environment {
    /// The first missing requirement, as the error a user should see.
    pub fn require(&self) -> Result<(), LabError> {
        if !self.root {
            return Err(LabError::NotRoot);
        }
        if self.ip.is_none() {
            return Err(LabError::MissingTool {
                tool: "iproute2",
                package: "iproute2",
            });
        }
        if self.nft.is_none() {
            return Err(LabError::MissingTool {
                tool: "nftables",
                package: "nftables",
            });
        }
        Ok(())
    }

    /// What the impairment stage needs on top of [`Environment::require`].
    pub fn require_iptables(&self) -> Result<(), LabError> {
        self.require()?;
        if self.iptables.is_none() {
            return Err(LabError::MissingTool {
                tool: "iptables (for the NFQUEUE delay and jitter stage)",
                package: "iptables",
            });
        }
        Ok(())
    }
}

pub fn check_environment() -> Environment {
    let version = |program: &str, arg: &str| {
        let out = Command::new(program).arg(arg).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        out.status
            .success()
            .then(|| text.lines().next().unwrap_or("").trim().to_owned())
    };
    Environment {
        root: rustix::process::geteuid().is_root(),
        nft: version("nft", "--version"),
        ip: version("ip", "-V"),
        iptables: version("iptables", "-V"),
    }
}

/// Options of one NAT router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatOptions {
    /// Drop unsolicited new traffic addressed to the router itself (`iifname wan ct state
    /// new drop`), as every real home router does. `false` gives the harsher NAT of LAB.md's
    /// conntrack quirk, worth keeping as an extra case.
    pub wan_filter: bool,
    /// Random loss on everything the router forwards, both directions (0-100).
    pub loss_percent: u8,
}

impl Default for NatOptions {
    fn default() -> Self {
        NatOptions {
            wan_filter: true,
            loss_percent: 0,
        }
    }
}

/// A machine of the lab: one network namespace with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `ip netns exec NETNS program`: add arguments and spawn as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, program)
    }

    pub fn socket_addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, port)
    }

    /// A UDP socket bound to 0.0.0.0:`port` inside the host (0: any port).
    pub fn udp_bind(&self, port: u16) -> Result<UdpSocket, LabError> {
        in_netns(&self.netns, || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        })
    }

    pub fn tcp_listen(&self, port: u16) -> Result<TcpListener, LabError> {
        in_netns(&self.netns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        })
    }

    /// Connects from inside the host; the error is the connection's (refused, timed out).
    pub fn tcp_connect(&self, to: SocketAddr, timeout: Duration) -> Result<TcpStream, LabError> {
        in_netns(&self.netns, || TcpStream::connect_timeout(&to, timeout))
    }
}

/// A router namespace: `wan` on the public segment, a `lan` bridge for its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nat {
    pub name: String,
    pub nat_type: NatType,
    pub netns: String,
    pub wan_addr: Ipv4Addr,
    /// The router's LAN address: its hosts' default gateway.
    pub lan_addr: Ipv4Addr,
    pub lan_prefix_len: u8,
    /// Position in the lab (1-based): the N of 10.N.0.0/24.
    pub index: usize,
}

impl Nat {
    /// Changes the random loss on this router's forwarded traffic (0 removes it).
    pub fn set_loss(&self, percent: u8) -> Result<(), LabError> {
        if percent > 100 {
            return Err(LabError::Invalid(format!("loss of {percent}% (0-100)")));
        }
        nft(&self.netns, &rules::set_loss(percent))
    }

    /// `ip netns exec` in the router (for `nft list ruleset`, `conntrack -L` and the like).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&self.netns, program)
    }
}

struct NatSlot {
    netns: String,
    /// The NFQUEUE delay/jitter/loss stage, while one runs.
    stage: Option<Stage>,
    lan_base: u32,
    next_host: u32,
    last_host: u32,
}

/// A running lab. Dropping it kills whatever still runs in its namespaces and deletes them
/// (the veths go with them: the lab creates nothing in the root namespace).
pub struct Lab {
    base: String,
    core: String,
    namespaces: Vec<String>,
    next_public: u8,
    next_port: u32,
    public_routers: u8,
    nats: Vec<NatSlot>,
}

impl Lab {
    /// Checks root, `ip` and `nft`, then creates the public segment: a bridge `br0` in the
    /// namespace `{prefix}{pid}-{seq}-core`, which also routes to 198.51.100.0/24 (hosts
    /// behind `Public` routers) at 203.0.113.254.
    pub fn new(prefix: &str) -> Result<Lab, LabError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !prefix.ends_with(|c: char| c.is_ascii_digit());
        if !valid {
            // A trailing digit would run into the pid and defeat `cleanup_stale`.
            return Err(LabError::Invalid(format!(
                "lab prefix {prefix:?}: 1-32 of A-Z a-z 0-9 - _, not ending in a digit"
            )));
        }
        check_environment().require()?;
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut lab = Lab {
            base: format!("{prefix}{}-{seq}-", std::process::id()),
            core: String::new(),
            namespaces: Vec::new(),
            next_public: 1,
            next_port: 0,
            public_routers: 0,
            nats: Vec::new(),
        };
        // From here on, an early return drops `lab`, which removes what was made.
        lab.core = lab.add_netns("core")?;
        let core = lab.core.clone();
        // The core forwards 203.0.113.x <-> 198.51.100.x back out of the same bridge:
        // redirects would only teach hosts a shortcut and make paths differ between runs.
        sysctl(&core, "net/ipv4/ip_forward", "1")?;
        sysctl(&core, "net/ipv4/conf/all/send_redirects", "0")?;
        sysctl(&core, "net/ipv4/conf/default/send_redirects", "0")?;
        ip(&["-n", &core, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &core,
            "addr",
            "add",
            &format!("{CORE_ADDR}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &core, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// Every namespace this lab made, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A host on the public segment: 203.0.113.1, .2, ... in order of creation.
    pub fn add_public_host(&mut self, name: &str) -> Result<Host, LabError> {
        if self.next_public > MAX_PUBLIC_HOSTS {
            return Err(LabError::Invalid(format!(
                "at most {MAX_PUBLIC_HOSTS} public hosts"
            )));
        }
        let addr = public_addr(self.next_public);
        let netns = self.add_netns(name)?;
        self.next_public += 1;
        self.attach_public(&netns, "eth0", addr)?;
        Ok(Host {
            name: name.to_owned(),
            netns,
            addr,
        })
    }

    pub fn add_nat(&mut self, name: &str, nat_type: NatType) -> Result<Nat, LabError> {
        self.add_nat_with(name, nat_type, NatOptions::default())
    }

    /// A router on the public segment at 203.0.113.(100+N), LAN 10.N.0.1/24 (N = 1, 2, ...
    /// in order of creation), forwarding on, nftables rules of `nat_type`. A `Public` router
    /// translates nothing: its LAN is the next free 198.51.100.x/28, routed by the core.
    pub fn add_nat_with(
        &mut self,
        name: &str,
        nat_type: NatType,
        options: NatOptions,
    ) -> Result<Nat, LabError> {
        let index = self.nats.len() + 1;
        if index > MAX_NATS {
            return Err(LabError::Invalid(format!("at most {MAX_NATS} NAT routers")));
        }
        if options.loss_percent > 100 {
            return Err(LabError::Invalid(format!(
                "loss of {}% (0-100)",
                options.loss_percent
            )));
        }
        let (lan_base, prefix_len, last_host) = if nat_type == NatType::Public {
            if self.public_routers >= MAX_PUBLIC_ROUTERS {
                return Err(LabError::Invalid(format!(
                    "at most {MAX_PUBLIC_ROUTERS} public routers"
                )));
            }
            let base = u32::from(Ipv4Addr::new(198, 51, 100, 16 * self.public_routers));
            (base, 28, base + 14)
        } else {
            // index <= 100, so it fits the second octet.
            let base = u32::from(Ipv4Addr::new(10, index as u8, 0, 0));
            (base, 24, base + 254)
        };
        let wan_addr = public_addr(100 + index as u8);
        let lan_addr = Ipv4Addr::from(lan_base + 1);
        let netns = self.add_netns(name)?;
        self.nats.push(NatSlot {
            netns: netns.clone(),
            stage: None,
            lan_base,
            next_host: lan_base + 2,
            last_host,
        });
        self.attach_public(&netns, "wan", wan_addr)?;
        ip(&["-n", &netns, "link", "add", "lan", "type", "bridge"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{lan_addr}/{prefix_len}"),
            "dev",
            "lan",
        ])?;
        ip(&["-n", &netns, "link", "set", "lan", "up"])?;
        sysctl(&netns, "net/ipv4/ip_forward", "1")?;
        nft(&netns, &rules::ruleset(nat_type, &options))?;
        if nat_type == NatType::Public {
            self.public_routers += 1;
            let lan = format!("{}/{prefix_len}", Ipv4Addr::from(lan_base));
            ip(&[
                "-n",
                &self.core,
                "route",
                "add",
                &lan,
                "via",
                &wan_addr.to_string(),
            ])?;
        }
        Ok(Nat {
            name: name.to_owned(),
            nat_type,
            netns,
            wan_addr,
            lan_addr,
            lan_prefix_len: prefix_len,
            index,
        })
    }

    /// A host on `nat`'s LAN: 10.N.0.2, .3, ... (198.51.100.x behind a `Public` router), its
    /// default route via the router. Hosts behind one router reach each other directly.
    pub fn add_host_behind(&mut self, nat: &Nat, name: &str) -> Result<Host, LabError> {
        let slot = self
            .nats
            .get(nat.index.wrapping_sub(1))
            .filter(|s| s.netns == nat.netns)
            .ok_or_else(|| LabError::Invalid(format!("NAT {} is not of this lab", nat.name)))?;
        if slot.next_host > slot.last_host {
            return Err(LabError::Invalid(format!("NAT {}'s LAN is full", nat.name)));
        }
        let addr = Ipv4Addr::from(slot.next_host);
        let port = format!("h{}", slot.next_host - slot.lan_base);
        let netns = self.add_netns(name)?;
        if let Some(slot) = self.nats.get_mut(nat.index - 1) {
            slot.next_host += 1;
        }
        // Both ends are created directly in their namespaces: nothing in the root one.
        ip(&[
            "link", "add", "name", "eth0", "netns", &netns, "type", "veth", "peer", "name", &port,
            "netns", &nat.netns,
        ])?;
        ip(&[
            "-n", &nat.netns, "link", "set", &port, "master", "lan", "up",
        ])?;
        let cidr = format!("{addr}/{}", nat.lan_prefix_len);
        ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        let gateway = nat.lan_addr.to_string();
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway])?;
        Ok(Host {
            name: name.to_owned(),
            netns,
            addr,
        })
    }

    /// Delay, jitter and a loss model on everything `nat` forwards (both directions), from
    /// a user-space NFQUEUE stage in the router's namespace (there is no netem here). Every
    /// draw comes from `seed`. Replaces a stage already there; nftables loss
    /// ([`Nat::set_loss`]) applies as well, after the stage. Needs iptables.
    pub fn set_impairment(
        &mut self,
        nat: &Nat,
        config: ImpairConfig,
        seed: u64,
    ) -> Result<(), LabError> {
        check_environment().require_iptables()?;
        let old = self.slot_mut(nat)?.stage.take();
        if let Some(old) = old {
            old.stop()?;
        }
        let stage = Stage::start(&nat.netns, config, seed)?;
        self.slot_mut(nat)?.stage = Some(stage);
        Ok(())
    }

    /// Stops `nat`'s stage (what it holds is let through) and returns what it did.
    pub fn clear_impairment(&mut self, nat: &Nat) -> Result<Option<StageStats>, LabError> {
        match self.slot_mut(nat)?.stage.take() {
            Some(stage) => stage.stop().map(Some),
            None => Ok(None),
        }
    }

    /// What `nat`'s stage has done so far, if one runs.
    pub fn impairment_stats(&self, nat: &Nat) -> Option<StageStats> {
        self.nats
            .get(nat.index.wrapping_sub(1))
            .filter(|s| s.netns == nat.netns)
            .and_then(|s| s.stage.as_ref())
            .map(Stage::stats)
    }

    fn slot_mut(&mut self, nat: &Nat) -> Result<&mut NatSlot, LabError> {
        self.nats
            .get_mut(nat.index.wrapping_sub(1))
            .filter(|s| s.netns == nat.netns)
            .ok_or_else(|| LabError::Invalid(format!("NAT {} is not of this lab", nat.name)))
    }

    fn add_netns(&mut self, name: &str) -> Result<String, LabError> {
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(LabError::Invalid(format!(
                "name {name:?}: 1-32 of A-Z a-z 0-9 - _"
            )));
        }
        let netns = format!("{}{name}", self.base);
        ip(&["netns", "add", &netns])?;
        self.namespaces.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A veth from `netns` (named `ifname`) to a port of the public bridge, with `addr`/24
    /// and a default route via the core.
    fn attach_public(&mut self, netns: &str, ifname: &str, addr: Ipv4Addr) -> Result<(), LabError> {
        let port = format!("p{}", self.next_port);
        self.next_port += 1;
        ip(&[
            "link", "add", "name", ifname, "netns", netns, "type", "veth", "peer", "name", &port,
            "netns", &self.core,
        ])?;
        ip(&[
            "-n", &self.core, "link", "set", &port, "master", "br0", "up",
        ])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            ifname,
        ])?;
        ip(&["-n", netns, "link", "set", ifname, "up"])?;
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &CORE_ADDR.to_string(),
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Stage threads first: they hold queues bound inside the namespaces.
        for slot in &mut self.nats {
            drop(slot.stage.take());
        }
        for netns in self.namespaces.iter().rev() {
            if let Err(e) = remove_netns(netns) {
                eprintln!("peerline-lab: cleanup: {e}");
            }
        }
    }
}

/// Removes namespaces left by crashed runs: those named `{prefix}{pid}-...` whose pid is no
/// longer a running process (a reused pid keeps its namespaces: run again later). Returns
/// the names removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, LabError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LabError::io(format!("reading {NETNS_DIR}"))(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let name = entry
            .map_err(LabError::io(format!("reading {NETNS_DIR}")))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive =
            pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            remove_netns(&name)?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Kills what still runs inside `netns` (processes callers spawned there), then deletes it.
fn remove_netns(netns: &str) -> Result<(), LabError> {
    let path = format!("{NETNS_DIR}/{netns}");
    let id = std::fs::metadata(&path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(LabError::io(format!("reading {path}")))?;
    kill_processes_in(id);
    ip(&["netns", "del", netns])?;
    // `ip netns exec` opens the namespace before entering it: one spawned just before the
    // first scan may have entered since. After the delete no new one can open it.
    kill_processes_in(id);
    Ok(())
}

/// SIGKILLs every process whose network namespace is `id` (device, inode), as `ip netns
/// pids` finds them.
fn kill_processes_in(id: (u64, u64)) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let inside =
            std::fs::metadata(entry.path().join("ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == id);
        if let (true, Some(pid)) = (inside, rustix::process::Pid::from_raw(pid)) {
            // Gone already is fine.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

fn public_addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(PUBLIC_NET[0], PUBLIC_NET[1], PUBLIC_NET[2], last)
}

fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(program);
    command
}

/// Runs `f` on a fresh thread moved into `netns`. Sockets keep the namespace they were made
/// in, so they can be used from any thread afterwards; the thread ends with `f`, so the
/// caller's own threads never change namespace.
pub(crate) fn in_netns<T: Send>(
    netns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> Result<T, LabError> {
    let path = format!("{NETNS_DIR}/{netns}");
    let file = File::open(&path).map_err(LabError::io(format!("opening {path}")))?;
    let joined = std::thread::scope(|s| {
        s.spawn(|| {
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))?;
            f()
        })
        .join()
    });
    match joined {
        Ok(result) => result.map_err(LabError::io(format!("in namespace {netns}"))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// /proc/sys/net answers for the namespace of the thread that opens it.
fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), LabError> {
    in_netns(netns, || std::fs::write(format!("/proc/sys/{key}"), value))
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    run("ip", args, None).map(drop)
}

/// `ip netns exec NETNS args..` to completion (stdout, or an error quoting stderr).
pub(crate) fn run_in(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["netns", "exec", netns];
    all.extend_from_slice(args);
    run("ip", &all, None)
}

fn nft(netns: &str, script: &str) -> Result<(), LabError> {
    run(
        "ip",
        &["netns", "exec", netns, "nft", "-f", "-"],
        Some(script),
    )
    .map(drop)
}

/// Runs a command to completion; its stdout, or an error quoting the command and stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let command_line = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(LabError::io(format!("running `{command_line}`")))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(LabError::io(format!("writing to `{command_line}`")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(LabError::io(format!("running `{command_line}`")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: command_line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
