//! The CLI's config file: credentials and endpoints by context, kubectl
//! style. `nodeos config use-context NAME` picks the current one; `--context`
//! picks one for a single command. Each context lists several endpoints,
//! tried in turn until one answers.
//!
//! The file is `--config`, else `$NODEOS_CONFIG`, else
//! `$XDG_CONFIG_HOME/nodeos/config.json` (`~/.config/nodeos/config.json`),
//! written mode 0600: it holds private keys.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::{Deserialize, Serialize};

use super::output::print;
use super::{CliError, Format};

/// Writes `text` to `path`, readable by its owner only (mode 0600, also when
/// the file was there); `replace`: overwrite a file there, else refuse it.
pub fn write_private(path: &Path, text: &[u8], replace: bool) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::Status(format!("cannot write {}: {e}", path.display()));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if replace {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(path).map_err(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    f.write_all(text).and_then(|()| f.sync_all()).map_err(fail)
}

/// One pool as this CLI reaches it: where, and with which credential.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    pub endpoints: Vec<String>,
    /// CA certificates the pool's nodes are checked against.
    pub ca_pem: String,
    /// This operator's certificate and private key.
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the config file is.
pub fn path(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os("NODEOS_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|p| !p.is_empty()) {
            Some(h) => PathBuf::from(h).join(".config"),
            None => return Err(CliError::Status("no HOME: give --config FILE".into())),
        },
    };
    Ok(base.join("nodeos").join("config.json"))
}

impl Config {
    /// The file at `path`; an empty config when there is none.
    pub fn load(path: &Path) -> Result<Config, CliError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CliError::Status(format!("config file {} is not valid: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(CliError::Status(format!("cannot read config file {}: {e}", path.display()))),
        }
    }

    /// Writes the file whole (a temporary file renamed over it), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let fail =
            |e: std::io::Error| CliError::Status(format!("cannot write config file {}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let text = serde_json::to_vec_pretty(self).map_err(|e| CliError::Output(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        write_private(&tmp, &text, true)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }

    /// The context named, else the current one; `None` when neither.
    pub fn pick(&self, name: Option<&str>) -> Result<Option<(String, Context)>, CliError> {
        let Some(name) = name.or(self.current_context.as_deref()) else { return Ok(None) };
        match self.contexts.get(name) {
            Some(c) => Ok(Some((name.to_owned(), c.clone()))),
            None => Err(CliError::Status(format!(
                "no context {name:?} in the config file (have: {})",
                self.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Make NAME the context commands use.
    UseContext { name: String },
    /// The context commands use now.
    CurrentContext,
    /// Every context: its endpoints and whose credential it holds.
    GetContexts,
    /// Add a credential file (`nodeos auth issue --out FILE`) as a context.
    Import {
        file: PathBuf,
        /// Context name (default: the file's name without extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// Set the endpoints of a context, tried in this order.
    SetEndpoints {
        name: String,
        #[arg(required = true, value_delimiter = ',')]
        endpoints: Vec<String>,
    },
    /// Remove a context.
    DeleteContext { name: String },
    /// Write a context's credential as PEM files for other gRPC clients
    /// (grpcurl, Python's grpcio): DIR/ca.pem, DIR/cert.pem, DIR/key.pem (0600).
    ExportPem {
        /// Context (default: the current one).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Who a context's certificate names, for listings.
fn holder(c: &Context) -> String {
    nodeos_auth::tls::certs("credential", &c.cert_pem)
        .ok()
        .and_then(|d| d.first().and_then(|c| nodeos_auth::identity::identity(c).ok()))
        .map_or_else(|| "(unreadable certificate)".into(), |i| i.to_string())
}

pub fn run(config_path: Option<&Path>, output: Format, cmd: ConfigCmd) -> Result<(), CliError> {
    let path = path(config_path)?;
    let mut cfg = Config::load(&path)?;
    match cmd {
        ConfigCmd::UseContext { name } => {
            cfg.pick(Some(&name))?;
            cfg.current_context = Some(name.clone());
            cfg.save(&path)?;
            println!("using context {name}");
        }
        ConfigCmd::CurrentContext => match &cfg.current_context {
            Some(c) => println!("{c}"),
            None => return Err(CliError::Status(format!("no current context in {}", path.display()))),
        },
        ConfigCmd::GetContexts => {
            let rows: Vec<Vec<String>> = cfg
                .contexts
                .iter()
                .map(|(n, c)| {
                    let cur = if cfg.current_context.as_deref() == Some(n) { "*" } else { "" };
                    vec![cur.to_owned(), n.clone(), holder(c), c.endpoints.join(",")]
                })
                .collect();
            let json: Vec<serde_json::Value> = cfg
                .contexts
                .iter()
                .map(|(n, c)| {
                    serde_json::json!({
                        "name": n, "current": cfg.current_context.as_deref() == Some(n),
                        "holder": holder(c), "endpoints": c.endpoints,
                    })
                })
                .collect();
            print(output, &json, &["CURRENT", "NAME", "HOLDER", "ENDPOINTS"], rows)?;
        }
        ConfigCmd::Import { file, name } => {
            let text = std::fs::read(&file)
                .map_err(|e| CliError::Status(format!("cannot read {}: {e}", file.display())))?;
            let ctx: Context = serde_json::from_slice(&text)
                .map_err(|e| CliError::Status(format!("{} is not a credential file: {e}", file.display())))?;
            nodeos_auth::tls::certs("credential", &ctx.cert_pem)
                .map_err(|e| CliError::Status(e.to_string()))?;
            let name = name
                .or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .ok_or_else(|| CliError::Status("give --name".into()))?;
            cfg.contexts.insert(name.clone(), ctx);
            if cfg.current_context.is_none() {
                cfg.current_context = Some(name.clone());
            }
            cfg.save(&path)?;
            println!("context {name} added to {}", path.display());
        }
        ConfigCmd::SetEndpoints { name, endpoints } => {
            let c = cfg
                .contexts
                .get_mut(&name)
                .ok_or_else(|| CliError::Status(format!("no context {name:?}")))?;
            c.endpoints = endpoints;
            cfg.save(&path)?;
        }
        ConfigCmd::ExportPem { name, dir } => {
            let (name, ctx) = cfg
                .pick(name.as_deref())?
                .ok_or_else(|| CliError::Status(format!("no current context in {}", path.display())))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| CliError::Status(format!("cannot make {}: {e}", dir.display())))?;
            for (file, text) in
                [("ca.pem", &ctx.ca_pem), ("cert.pem", &ctx.cert_pem), ("key.pem", &ctx.key_pem)]
            {
                write_private(&dir.join(file), text.as_bytes(), true)?;
            }
            println!(
                "context {name}: {}/{{ca,cert,key}}.pem written (verify nodes as \"nodeos\")",
                dir.display()
            );
        }
        ConfigCmd::DeleteContext { name } => {
            if cfg.contexts.remove(&name).is_none() {
                return Err(CliError::Status(format!("no context {name:?}")));
            }
            if cfg.current_context.as_deref() == Some(&name) {
                cfg.current_context = None;
            }
            cfg.save(&path)?;
        }
    }
    Ok(())
}
