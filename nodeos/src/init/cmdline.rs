//! The node's boot configuration: `nodeos.*` parameters of the kernel command
//! line, and the same keys in an optional file of the image
//! ([`CONFIG_FILE`], `key=value` lines, `#` comments, the `nodeos.` prefix
//! optional there).
//!
//! | key | value | default |
//! |---|---|---|
//! | `nodeos.pool` | pool name: 1..=63 of `a-z0-9-`, not starting with `-` | none: the daemon does not start |
//! | `nodeos.key` | the pool key text, 16..=4096 bytes | none: the daemon does not start |
//! | `nodeos.bootstrap_expect` | nodes to wait for before a new pool forms, 1..=64 | the daemon's (3) |
//! | `nodeos.seeds` | `host:port,...` of other nodes | none (multicast discovery only) |
//! | `nodeos.ip` | `dhcp`, or `ADDR/PREFIX[,GATEWAY]` | `dhcp` |
//! | `nodeos.dns` | `ADDR,...` name servers (with a static address) | from DHCP |
//! | `nodeos.iface` | management interface name | the first ethernet link with carrier |
//! | `nodeos.hostname` | host name (labels of `a-zA-Z0-9-`, at most 64 bytes) | `nodeos-` + the last 3 bytes of the first ethernet MAC |
//! | `nodeos.data` | ext4 label of the data disk (1..=16 bytes), or `ram` | `nodeos-data` |
//! | `nodeos.image` | the image hash the node reports | none |
//! | `nodeos.debug` | flag, or `=0/1` | off |
//! | `nodeos.nbd_public` | flag, or `=0/1`: serve the volumes' NBD exports on the management address, not only on loopback (unauthenticated: labs and tests only) | off |
//!
//! The command line wins over the file; within one source the last mention
//! wins; `-` and `_` are the same in key names, as for every kernel parameter.
//! A bad value is reported and ignored (the key keeps the file's value or its
//! default), an unknown `nodeos.*` key is reported and ignored. The pool key
//! never appears in a message or a `Debug` print.

use std::fmt;
use std::net::Ipv4Addr;

use nodeos_types::auth::{MAX_POOL_KEY_LEN, MIN_POOL_KEY_LEN, PoolKey};

/// The configuration file in the image.
pub const CONFIG_FILE: &str = "/etc/nodeos/node.conf";
/// ext4 volume label of the data disk when `nodeos.data` is not given.
pub const DEFAULT_DATA_LABEL: &str = "nodeos-data";
/// Longest ext4 volume label.
pub const MAX_LABEL_LEN: usize = 16;
/// Longest host name Linux accepts.
const MAX_HOSTNAME_LEN: usize = 64;
/// Longest image hash accepted.
const MAX_IMAGE_LEN: usize = 128;

const KEYS: &[&str] = &[
    "pool",
    "key",
    "bootstrap_expect",
    "seeds",
    "ip",
    "dns",
    "iface",
    "hostname",
    "data",
    "image",
    "debug",
    "nbd_public",
];

/// The pool key text. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// How the management interface gets its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpConfig {
    Dhcp,
    Static { addr: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr> },
}

/// Where the node keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataConfig {
    /// The ext4 file system with this volume label; RAM when none is found.
    Label(String),
    /// RAM on purpose: no disk is looked for.
    Ram,
}

/// The validated boot configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    pub pool: Option<String>,
    pub key: Option<Secret>,
    pub bootstrap_expect: Option<u16>,
    pub seeds: Vec<String>,
    pub ip: IpConfig,
    pub dns: Vec<Ipv4Addr>,
    pub iface: Option<String>,
    pub hostname: Option<String>,
    pub data: DataConfig,
    pub image: Option<String>,
    pub debug: bool,
    pub nbd_public: bool,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            pool: None,
            key: None,
            bootstrap_expect: None,
            seeds: Vec::new(),
            ip: IpConfig::Dhcp,
            dns: Vec::new(),
            iface: None,
            hostname: None,
            data: DataConfig::Label(DEFAULT_DATA_LABEL.to_owned()),
            image: None,
            debug: false,
            nbd_public: false,
        }
    }
}

/// Where a setting came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cmdline,
    File { line: usize },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Cmdline => f.write_str("kernel command line"),
            Origin::File { line } => write!(f, "{CONFIG_FILE} line {line}"),
        }
    }
}

/// A setting that was ignored, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: unknown key nodeos.{key} ignored (known: {})", KEYS.join(", "))]
    Unknown { origin: Origin, key: String },
    #[error("{origin}: nodeos.{key} {why}; ignored")]
    Invalid { origin: Origin, key: &'static str, why: String },
    #[error("{origin}: {text:?} is not key=value; ignored")]
    Syntax { origin: Origin, text: String },
}

/// Splits a kernel command line into parameters as the kernel does: blanks
/// separate them except inside double quotes, which are dropped.
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// Parses the configuration: `file` (the text of [`CONFIG_FILE`], if any)
/// first, then the command line over it. Returns the configuration and
/// every setting that was ignored.
pub fn parse(cmdline: &str, file: Option<&str>) -> (InitConfig, Vec<ConfigError>) {
    let mut cfg = InitConfig::default();
    let mut problems = Vec::new();
    for (i, raw) in file.unwrap_or_default().lines().enumerate() {
        let origin = Origin::File { line: i + 1 };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
            None => (line, None),
        };
        let key = key.strip_prefix("nodeos.").unwrap_or(key);
        if key.is_empty() || key.contains(char::is_whitespace) {
            problems.push(ConfigError::Syntax { origin, text: line.to_owned() });
            continue;
        }
        if let Err(e) = apply(&mut cfg, origin, key, value) {
            problems.push(e);
        }
    }
    for param in split_cmdline(cmdline) {
        let Some(rest) = param.strip_prefix("nodeos.") else { continue };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (rest, None),
        };
        if let Err(e) = apply(&mut cfg, Origin::Cmdline, key, value) {
            problems.push(e);
        }
    }
    (cfg, problems)
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

fn apply(cfg: &mut InitConfig, origin: Origin, key: &str, value: Option<&str>) -> Result<(), ConfigError> {
    let norm = key.replace('-', "_");
    let Some(&key) = KEYS.iter().find(|k| **k == norm) else {
        return Err(ConfigError::Unknown { origin, key: key.to_owned() });
    };
    let invalid = |why: String| ConfigError::Invalid { origin, key, why };
    if key == "debug" || key == "nbd_public" {
        let on = match value {
            None | Some("1" | "true" | "yes" | "on") => true,
            Some("0" | "false" | "no" | "off") => false,
            Some(v) => return Err(invalid(format!("is {v:?}; it takes no value, or one of 0, 1, on, off"))),
        };
        if key == "debug" {
            cfg.debug = on
        } else {
            cfg.nbd_public = on
        }
        return Ok(());
    }
    let Some(v) = value else { return Err(invalid("needs a value (key=value)".into())) };
    match key {
        "pool" => {
            if !valid_pool_name(v) {
                return Err(invalid(format!(
                    "{v:?} must be 1..=63 characters of a-z, 0-9 and '-', not starting with '-'"
                )));
            }
            cfg.pool = Some(v.to_owned());
        }
        "key" => {
            // The daemon's own check, without showing the key.
            if PoolKey::from_secret(v.as_bytes()).is_err() {
                return Err(invalid(format!(
                    "is {} bytes after trimming; a pool key is {MIN_POOL_KEY_LEN}..={MAX_POOL_KEY_LEN} bytes",
                    v.trim().len()
                )));
            }
            cfg.key = Some(Secret(v.to_owned()));
        }
        "bootstrap_expect" => match v.parse::<u16>() {
            Ok(n) if (1..=64).contains(&n) => cfg.bootstrap_expect = Some(n),
            _ => return Err(invalid(format!("is {v:?}; it must be a number of nodes in 1..=64"))),
        },
        "seeds" => {
            let seeds: Vec<String> =
                v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
            if let Some(bad) = seeds.iter().find(|s| !valid_seed(s)) {
                return Err(invalid(format!("entry {bad:?} is not host:port")));
            }
            cfg.seeds = seeds;
        }
        "ip" => cfg.ip = parse_ip(v).map_err(invalid)?,
        "dns" => {
            let mut dns = Vec::new();
            for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match s.parse::<Ipv4Addr>() {
                    Ok(a) if unicast(a) => dns.push(a),
                    _ => return Err(invalid(format!("entry {s:?} is not a unicast IPv4 address"))),
                }
            }
            cfg.dns = dns;
        }
        "iface" => {
            if v.is_empty()
                || v.len() > 15
                || v.bytes().any(|b| b == b'/' || b == b':' || !b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "{v:?} is not an interface name (1..=15 printable characters, no '/' or ':')"
                )));
            }
            cfg.iface = Some(v.to_owned());
        }
        "hostname" => {
            if !valid_hostname(v) {
                return Err(invalid(format!(
                    "{v:?} is not a host name (dot-separated labels of a-z, A-Z, 0-9 and '-', at most {MAX_HOSTNAME_LEN} bytes)"
                )));
            }
            cfg.hostname = Some(v.to_owned());
        }
        "data" => {
            if v == "ram" {
                cfg.data = DataConfig::Ram;
            } else if v.is_empty() || v.len() > MAX_LABEL_LEN || v.contains('\0') {
                return Err(invalid(format!(
                    "{v:?} is not an ext4 label (1..={MAX_LABEL_LEN} bytes) or \"ram\""
                )));
            } else {
                cfg.data = DataConfig::Label(v.to_owned());
            }
        }
        "image" => {
            if v.is_empty()
                || v.len() > MAX_IMAGE_LEN
                || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
            {
                return Err(invalid(format!(
                    "{v:?} is not an image hash (1..={MAX_IMAGE_LEN} characters of a-z, A-Z, 0-9, ':', '.', '_', '-')"
                )));
            }
            cfg.image = Some(v.to_owned());
        }
        _ => return Err(ConfigError::Unknown { origin, key: key.to_owned() }),
    }
    Ok(())
}

/// Pool names: what a hostname label allows (the daemon checks the same).
fn valid_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

fn valid_seed(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HOSTNAME_LEN
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn unicast(a: Ipv4Addr) -> bool {
    !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast()
}

/// `dhcp`, or `ADDR/PREFIX[,GATEWAY]`.
fn parse_ip(v: &str) -> Result<IpConfig, String> {
    if v == "dhcp" {
        return Ok(IpConfig::Dhcp);
    }
    let shape = || {
        format!("is {v:?}; it must be \"dhcp\" or ADDR/PREFIX[,GATEWAY] (for example 10.0.0.5/24,10.0.0.1)")
    };
    let (cidr, gateway) = match v.split_once(',') {
        Some((c, g)) => (c, Some(g)),
        None => (v, None),
    };
    let (addr, prefix) = cidr.split_once('/').ok_or_else(shape)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| shape())?;
    let prefix: u8 = prefix.parse().map_err(|_| shape())?;
    if !(1..=32).contains(&prefix) {
        return Err(format!("prefix /{prefix} is out of range; it must be 1..=32"));
    }
    if !unicast(addr) || addr.is_loopback() {
        return Err(format!("address {addr} is not a unicast address"));
    }
    let gateway = match gateway {
        None => None,
        Some(g) => {
            let g: Ipv4Addr = g.parse().map_err(|_| shape())?;
            if !unicast(g) || g == addr {
                return Err(format!("gateway {g} is not another unicast address"));
            }
            if !same_subnet(addr, g, prefix) {
                return Err(format!("gateway {g} is outside {addr}/{prefix}"));
            }
            Some(g)
        }
    };
    Ok(IpConfig::Static { addr, prefix, gateway })
}

/// Whether `a` and `b` share the first `prefix` bits.
pub fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123";

    #[test]
    fn split_follows_the_kernel() {
        assert_eq!(split_cmdline("  a b=c\t\nd "), vec!["a", "b=c", "d"]);
        assert_eq!(split_cmdline(r#"x="a b" "y=c d" z"#), vec!["x=a b", "y=c d", "z"]);
        assert_eq!(split_cmdline(r#"e="""#), vec!["e="]);
        assert!(split_cmdline("").is_empty());
    }

    #[test]
    fn a_full_command_line() {
        let line = format!(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 nodeos.pool=lab nodeos.key={KEY} nodeos.bootstrap_expect=5 \
             nodeos.seeds=10.0.0.2:7700,node3:7700 nodeos.ip=10.0.0.5/24,10.0.0.1 nodeos.dns=10.0.0.53 \
             nodeos.iface=eth1 nodeos.hostname=n1.lab nodeos.data=fast-disk nodeos.image=b3:abc123 nodeos.debug nodeos.nbd-public=on quiet"
        );
        let (cfg, problems) = parse(&line, None);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cfg.pool.as_deref(), Some("lab"));
        assert_eq!(cfg.key.as_ref().map(Secret::expose), Some(KEY));
        assert_eq!(cfg.bootstrap_expect, Some(5));
        assert_eq!(cfg.seeds, vec!["10.0.0.2:7700", "node3:7700"]);
        assert_eq!(
            cfg.ip,
            IpConfig::Static {
                addr: Ipv4Addr::new(10, 0, 0, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1))
            }
        );
        assert_eq!(cfg.dns, vec![Ipv4Addr::new(10, 0, 0, 53)]);
        assert_eq!(cfg.iface.as_deref(), Some("eth1"));
        assert_eq!(cfg.hostname.as_deref(), Some("n1.lab"));
        assert_eq!(cfg.data, DataConfig::Label("fast-disk".into()));
        assert_eq!(cfg.image.as_deref(), Some("b3:abc123"));
        assert!(cfg.debug);
        assert!(cfg.nbd_public);
    }

    #[test]
    fn defaults_without_parameters() {
        let (cfg, problems) = parse("root=/dev/sda1 ro nodeosx.pool=a", None);
        assert!(problems.is_empty());
        assert_eq!(cfg, InitConfig::default());
        assert_eq!(cfg.data, DataConfig::Label(DEFAULT_DATA_LABEL.into()));
        assert_eq!(cfg.ip, IpConfig::Dhcp);
    }

    #[test]
    fn dashes_and_underscores_are_the_same() {
        let (cfg, problems) = parse("nodeos.bootstrap-expect=1", None);
        assert!(problems.is_empty());
        assert_eq!(cfg.bootstrap_expect, Some(1));
    }

    #[test]
    fn unknown_keys_are_reported_and_ignored() {
        let (cfg, problems) = parse("nodeos.pool=lab nodeos.colour=blue", None);
        assert_eq!(cfg.pool.as_deref(), Some("lab"));
        assert_eq!(problems.len(), 1);
        let msg = problems[0].to_string();
        assert!(msg.contains("unknown key nodeos.colour"), "{msg}");
        assert!(msg.contains("bootstrap_expect"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_range() {
        let cases = [
            ("nodeos.pool=Lab", "nodeos.pool \"Lab\" must be 1..=63"),
            ("nodeos.key=short", "nodeos.key is 5 bytes after trimming; a pool key is 16..=4096 bytes"),
            ("nodeos.bootstrap_expect=0", "1..=64"),
            ("nodeos.bootstrap_expect=65", "1..=64"),
            ("nodeos.seeds=a:1,b", "entry \"b\" is not host:port"),
            ("nodeos.seeds=a:0", "entry \"a:0\" is not host:port"),
            ("nodeos.ip=10.0.0.5", "must be \"dhcp\" or ADDR/PREFIX"),
            ("nodeos.ip=10.0.0.5/33", "prefix /33 is out of range; it must be 1..=32"),
            ("nodeos.ip=10.0.0.5/24,10.0.1.1", "gateway 10.0.1.1 is outside 10.0.0.5/24"),
            ("nodeos.ip=224.0.0.1/24", "not a unicast address"),
            ("nodeos.dns=foo", "entry \"foo\" is not a unicast IPv4 address"),
            ("nodeos.iface=eth0/1", "not an interface name"),
            ("nodeos.hostname=-bad", "not a host name"),
            ("nodeos.data=seventeen-bytes-x", "not an ext4 label (1..=16 bytes)"),
            ("nodeos.image=a/b", "not an image hash"),
            ("nodeos.debug=maybe", "it takes no value, or one of 0, 1, on, off"),
            ("nodeos.pool", "nodeos.pool needs a value"),
        ];
        for (line, want) in cases {
            let (cfg, problems) = parse(line, None);
            assert_eq!(problems.len(), 1, "{line}: {problems:?}");
            let msg = problems[0].to_string();
            assert!(msg.contains(want), "{line}: {msg}");
            assert!(msg.starts_with("kernel command line: "), "{msg}");
            assert!(msg.ends_with("; ignored"), "{msg}");
            // The bad value left the default in place.
            assert_eq!(cfg, InitConfig { debug: cfg.debug, ..InitConfig::default() }, "{line}");
        }
    }

    #[test]
    fn the_key_is_never_shown() {
        let secret = "a-very-secret-pool-key-text";
        let (cfg, problems) = parse(&format!("nodeos.key={secret}"), None);
        assert!(problems.is_empty());
        assert!(!format!("{cfg:?}").contains(secret));
        let (_, problems) = parse("nodeos.key=tiny-secret", None);
        assert!(!problems[0].to_string().contains("tiny-secret"));
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let file = format!(
            "# the image's defaults\n\npool=base\nnodeos.key = \"{KEY}\"\nbootstrap_expect=3\nseeds=a:1\n"
        );
        let (cfg, problems) = parse("nodeos.pool=lab nodeos.seeds=b:2", Some(&file));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(cfg.pool.as_deref(), Some("lab"));
        assert_eq!(cfg.key.as_ref().map(Secret::expose), Some(KEY));
        assert_eq!(cfg.bootstrap_expect, Some(3));
        assert_eq!(cfg.seeds, vec!["b:2"]);
    }

    #[test]
    fn a_bad_command_line_value_keeps_the_file_value() {
        let (cfg, problems) = parse("nodeos.pool=BAD", Some("pool=base"));
        assert_eq!(cfg.pool.as_deref(), Some("base"));
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn file_problems_name_the_line() {
        let (_, problems) = parse("", Some("pool=lab\nthis is not a setting\ncolour=red\n"));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].to_string().starts_with("/etc/nodeos/node.conf line 2: "), "{}", problems[0]);
        assert!(problems[1].to_string().contains("line 3: unknown key nodeos.colour"), "{}", problems[1]);
    }

    #[test]
    fn ram_data_and_dhcp_are_words() {
        let (cfg, problems) = parse("nodeos.ip=10.0.0.5/24 nodeos.ip=dhcp nodeos.data=ram", None);
        assert!(problems.is_empty());
        assert_eq!(cfg.ip, IpConfig::Dhcp);
        assert_eq!(cfg.data, DataConfig::Ram);
    }

    #[test]
    fn subnets() {
        let a = Ipv4Addr::new(192, 168, 1, 7);
        assert!(same_subnet(a, Ipv4Addr::new(192, 168, 1, 254), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(192, 168, 2, 1), 24));
        assert!(same_subnet(a, Ipv4Addr::new(192, 168, 2, 1), 16));
        assert!(same_subnet(a, a, 32));
    }
}
