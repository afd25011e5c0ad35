//! Who a certificate names: a node of the pool, or an operator with a role
//! and perhaps a tenant.

use std::fmt;
use std::str::FromStr;

use rcgen::{DistinguishedName, DnType};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Longest name or tenant accepted in a credential.
pub const MAX_NAME_LEN: usize = 64;

/// What a holder may do. Operator roles are ordered: an admin may do all an
/// operator may, an operator all a reader may. `Node` is a member of the pool:
/// it speaks the peer protocol and forwards operators' calls, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Reader,
    Operator,
    Admin,
    Node,
    /// A node's VM worker: speaks the replica protocol for its VM's volumes, nothing else.
    Worker,
}

impl Role {
    pub const OPERATOR_ROLES: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Worker => "worker",
        }
    }

    /// Whether a holder of `self` may call what needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Node, n) => n == Role::Node,
            (Role::Worker, _) | (_, Role::Node | Role::Worker) => false,
            (have, n) => have >= n,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            "node" => Ok(Role::Node),
            "worker" => Ok(Role::Worker),
            other => Err(format!("no role {other:?}: one of admin, operator, reader")),
        }
    }
}

const ROLE_PREFIX: &str = "nodeos:";
const TENANT_PREFIX: &str = "tenant:";

/// What a certificate is issued to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub role: Role,
    /// `None`: the whole pool. `Some(t)`: only tenant `t`'s resources.
    pub tenant: Option<String>,
}

impl Subject {
    /// Checks a name or tenant given by an operator: 1 to 64 of `[A-Za-z0-9._@-]`.
    pub fn check_label(what: &str, s: &str) -> Result<(), String> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!("{what} {s:?} must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_', '@' or '-'"))
        }
    }

    pub(crate) fn distinguished_name(&self) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.name.clone());
        dn.push(DnType::OrganizationName, format!("{ROLE_PREFIX}{}", self.role));
        if let Some(t) = &self.tenant {
            dn.push(DnType::OrganizationalUnitName, format!("{TENANT_PREFIX}{t}"));
        }
        dn
    }
}

/// The holder of a certificate the pool's CA signed, as read from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub subject: Subject,
    /// The certificate's serial number, hex: what `auth revoke` names.
    pub serial: String,
    /// Seconds since the epoch after which the certificate is refused.
    pub not_after_s: i64,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.subject.name, self.subject.role)?;
        if let Some(t) = &self.subject.tenant {
            write!(f, ", tenant {t}")?;
        }
        write!(f, ")")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be read: {0}")]
    Parse(String),
    #[error("the certificate names no {0}")]
    Missing(&'static str),
    #[error("the certificate's {what} {value:?} is not valid: {why}")]
    Invalid { what: &'static str, value: String, why: String },
}

/// Reads the holder of a certificate (DER). Only the subject is read: the
/// signature and validity were checked by the TLS handshake.
pub fn identity(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let one = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_owned)
    };
    let name = one(&mut subject.iter_common_name()).ok_or(IdentityError::Missing("name (CN)"))?;
    let org = one(&mut subject.iter_organization()).ok_or(IdentityError::Missing("role (O)"))?;
    let role = org
        .strip_prefix(ROLE_PREFIX)
        .ok_or_else(|| IdentityError::Invalid {
            what: "role",
            value: org.clone(),
            why: "not nodeos:ROLE".into(),
        })?
        .parse::<Role>()
        .map_err(|why| IdentityError::Invalid { what: "role", value: org.clone(), why })?;
    let tenant = match one(&mut subject.iter_organizational_unit()) {
        None => None,
        Some(ou) => Some(
            ou.strip_prefix(TENANT_PREFIX)
                .ok_or_else(|| IdentityError::Invalid {
                    what: "tenant",
                    value: ou.clone(),
                    why: "not tenant:NAME".into(),
                })?
                .to_owned(),
        ),
    };
    Ok(Identity {
        subject: Subject { name, role, tenant },
        serial: hex::encode(cert.raw_serial()),
        not_after_s: cert.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_nodes_are_apart() {
        assert!(Role::Admin.allows(Role::Reader));
        assert!(Role::Operator.allows(Role::Operator));
        assert!(!Role::Reader.allows(Role::Operator));
        assert!(!Role::Admin.allows(Role::Node));
        assert!(!Role::Node.allows(Role::Reader));
        assert!(Role::Node.allows(Role::Node));
        assert!(!Role::Worker.allows(Role::Reader));
    }

    #[test]
    fn labels_are_checked() {
        assert!(Subject::check_label("name", "alice@example.com").is_ok());
        assert!(Subject::check_label("name", "").is_err());
        assert!(Subject::check_label("name", "a,b").is_err());
        assert!(Subject::check_label("name", &"x".repeat(65)).is_err());
    }
}
