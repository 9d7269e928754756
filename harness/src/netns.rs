//! The test network: a switch namespace holding a bridge, and one namespace
//! per host and per client, each joined to the bridge by its own veth pair —
//! its own address and its own cable. Nothing is added to the caller's
//! namespace; everything is removed by `Net::destroy` (also on drop). Chaos
//! builds its worlds in it; with a [`crate::relay`] in front of each host it
//! holds cities on one machine.
//!
//! Addresses live in 10.199.0.0/16, which exists only inside these
//! namespaces: the switch is .0.1, host i is .1.(i+1), client i .2.(i+1),
//! a host moved to a new address gets .3.(n).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

pub struct Net {
    run: String,
    hosts: usize,
    clients: usize,
    /// Current address of each host.
    pub host_ips: Vec<String>,
    /// Blackhole routes in place: (namespace, destination).
    cuts: Vec<(String, String)>,
    next_moved: u32,
    destroyed: bool,
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process can build namespaces: root and iproute2.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("iproute2 (`ip`) is missing: apt-get install iproute2".into()),
    }
}

impl Net {
    pub fn ns_path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }
    pub fn switch(&self) -> String {
        format!("{}-sw", self.run)
    }
    pub fn host_ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.run)
    }
    pub fn client_ns(&self, i: usize) -> String {
        format!("{}-c{i}", self.run)
    }
    pub fn client_ip(&self, i: usize) -> String {
        format!("10.199.2.{}", i + 1)
    }

    /// Builds the switch and one namespace per host and client, all named
    /// `prefix` + this process's pid + `-`... (so [`stale_namespaces`] can
    /// tell the leftovers of runs that are gone).
    pub fn create(prefix: &str, hosts: usize, clients: usize) -> anyhow::Result<Net> {
        let run = format!("{prefix}{}", std::process::id());
        let net = Net {
            run,
            hosts,
            clients,
            host_ips: (0..hosts).map(|i| format!("10.199.1.{}", i + 1)).collect(),
            cuts: Vec::new(),
            next_moved: 1,
            destroyed: false,
        };
        // On error, drop removes whatever was built.
        let sw = net.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "addr", "add", "10.199.0.1/16", "dev", "br0"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ip_addr = net.host_ips[i].clone();
            net.attach(&net.host_ns(i), &format!("h{i}"), &ip_addr)?;
        }
        for i in 0..clients {
            net.attach(&net.client_ns(i), &format!("c{i}"), &net.client_ip(i))?;
        }
        Ok(net)
    }

    fn attach(&self, ns: &str, port: &str, addr: &str) -> anyhow::Result<()> {
        let sw = self.switch();
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", port, "master", "br0"])?;
        ip(&["-n", &sw, "link", "set", port, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/16"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Builds the namespace of one more host; returns its index.
    pub fn add_host(&mut self) -> anyhow::Result<usize> {
        let i = self.hosts;
        let addr = format!("10.199.1.{}", i + 1);
        self.hosts += 1;
        self.host_ips.push(addr.clone());
        self.attach(&self.host_ns(i), &format!("h{i}"), &addr)?;
        Ok(i)
    }

    /// Pulls host i's cable (or plugs it back in).
    pub fn set_cable(&self, i: usize, plugged: bool) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.host_ns(i),
            "link",
            "set",
            "eth0",
            if plugged { "up" } else { "down" },
        ])
    }

    /// Drops what namespace `a` sends to address `dst`, one way only: what
    /// `dst` sends still arrives (an asymmetric route failure: requests get
    /// through, their answers are lost). Removed by [`Net::heal`].
    pub fn cut_one_way(&mut self, a: &str, dst: &str) -> anyhow::Result<()> {
        ip(&["-n", a, "route", "add", "blackhole", &format!("{dst}/32")])?;
        self.cuts.push((a.to_string(), dst.to_string()));
        Ok(())
    }

    /// Drops all traffic between namespace `a` and address `b_ip` both ways
    /// (`b_ns` is the namespace holding `b_ip`), as a cut line between cities would.
    pub fn cut(&mut self, a: &str, a_ip: &str, b: &str, b_ip: &str) -> anyhow::Result<()> {
        for (ns, dst) in [(a, b_ip), (b, a_ip)] {
            ip(&["-n", ns, "route", "add", "blackhole", &format!("{dst}/32")])?;
            self.cuts.push((ns.to_string(), dst.to_string()));
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for (ns, dst) in std::mem::take(&mut self.cuts) {
            ip(&["-n", &ns, "route", "del", "blackhole", &format!("{dst}/32")])?;
        }
        Ok(())
    }

    /// Gives host i a new address (its old one disappears); returns it.
    pub fn move_host(&mut self, i: usize) -> anyhow::Result<String> {
        let ns = self.host_ns(i);
        let new = format!("10.199.3.{}", self.next_moved);
        self.next_moved += 1;
        ip(&["-n", &ns, "addr", "flush", "dev", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{new}/16"),
            "dev",
            "eth0",
        ])?;
        self.host_ips[i] = new.clone();
        Ok(new)
    }

    /// Deletes every namespace (and with them the veth pairs and the bridge).
    pub fn destroy(&mut self) {
        if self.destroyed {
            return;
        }
        self.destroyed = true;
        let mut names: Vec<String> = (0..self.hosts).map(|i| self.host_ns(i)).collect();
        names.extend((0..self.clients).map(|i| self.client_ns(i)));
        names.push(self.switch());
        for n in names {
            if Net::ns_path(&n).exists() {
                if let Err(e) = ip(&["netns", "del", &n]) {
                    eprintln!("failsafe-chaos: removing namespace {n}: {e}");
                }
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Namespaces named `prefix` + pid left by runs whose process is gone (a
/// run killed with -9).
pub fn stale_namespaces(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            let Some(rest) = n.strip_prefix(prefix) else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            pid.parse::<u32>()
                .is_ok_and(|p| !PathBuf::from(format!("/proc/{p}")).exists())
        })
        .collect()
}

/// Makes the calling thread — and every thread and child it starts later —
/// live in namespace `name`. Call before starting any other thread.
pub fn enter(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(Net::ns_path(name))
        .with_context(|| format!("opening namespace {name}"))?;
    // SAFETY: setns(2) on an fd we own; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
