//! Merge domains: the named groups of VMs that may share frames, declared
//! before any VM joins them (`PUT /domains/{domain_name}`).
//!
//! Who may share with whom: a VM without a domain is alone in a domain of its
//! own (its pages merge only with each other); a VM that names a domain must
//! name one declared here, and shares frames with the other members only if the
//! domain's policy has `merge_across_vms`. Zero pages may be dropped in any
//! domain (they then map the zero region, which holds no VM's data). Any client of the API may declare a domain or
//! name one; the API's access control (socket permissions, the TCP bearer
//! token) is what keeps tenants apart.
//!
//! Each declaration gets a numeric id for the memory manager, handed out in
//! order from [`FIRST_NAMED_DOMAIN`] and never reused (a domain deleted and
//! declared again gets a new id), so a named domain never collides with a VM's
//! own domain (its memory-manager id, always below [`FIRST_NAMED_DOMAIN`]) nor
//! with an earlier domain of the same name.

use std::collections::BTreeMap;

use memory::DomainId;
use serde::{Deserialize, Serialize};

/// First numeric id of a named domain; a VM's own domain (its memory-manager
/// id) is always below it.
pub const FIRST_NAMED_DOMAIN: DomainId = 1 << 31;

/// Most member VMs a domain may allow.
pub const MAX_DOMAIN_VMS: u32 = 65536;

/// Most domains a host holds at once (each costs a few dozen bytes; the bound
/// keeps a client from growing the registry without end).
pub const MAX_DOMAINS: usize = 4096;

/// Longest domain name.
pub const MAX_DOMAIN_NAME_LEN: usize = 64;

/// Errors of the domain registry.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A VM names a domain nobody declared.
    #[error(
        "merge.domain {0:?} is not declared: create it first with PUT /domains/{0} (a VM without a domain \
         merges only with itself)"
    )]
    Undeclared(String),
    /// No domain of that name (`GET`/`DELETE`).
    #[error("no merge domain {0:?}")]
    NotFound(String),
    /// The domain exists with another policy.
    #[error(
        "merge domain {name:?} exists with policy {existing:?}, not {requested:?}; delete it (when it has no VMs) \
         to change its policy"
    )]
    PolicyConflict {
        /// The domain.
        name: String,
        /// Its policy.
        existing: DomainPolicy,
        /// The policy asked for.
        requested: DomainPolicy,
    },
    /// The domain still has member VMs.
    #[error("merge domain {name:?} has {} member VM(s) ({}); delete them first", .vms.len(), .vms.join(", "))]
    HasMembers {
        /// The domain.
        name: String,
        /// Its members.
        vms: Vec<String>,
    },
    /// The domain has as many VMs as its policy allows.
    #[error("merge domain {name:?} is full: it has {max_vms} VM(s), its policy's max_vms")]
    Full {
        /// The domain.
        name: String,
        /// Its maximum.
        max_vms: u32,
    },
    /// A policy value out of its range.
    #[error("{field}: must be in {min}..={max}, got {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A domain name that breaks the naming rules.
    #[error("domain name {0:?}: must be 1..=64 characters of A-Z, a-z, 0-9, '_' and '-'")]
    BadName(String),
    /// The host holds [`MAX_DOMAINS`] domains.
    #[error("too many merge domains: {} exist; delete one first", MAX_DOMAINS)]
    TooMany,
    /// Every numeric id was handed out (2^31 declarations).
    #[error("no merge domain ids left (2^31 declarations since the daemon started)")]
    OutOfIds,
}

impl Error {
    /// True when the request itself is wrong (a 400): an undeclared domain, a bad
    /// name or policy.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::Undeclared(_) | Error::OutOfRange { .. } | Error::BadName(_))
    }
}

fn default_true() -> bool {
    true
}

fn default_max_vms() -> u32 {
    MAX_DOMAIN_VMS
}

/// A domain's policy: the body of `PUT /domains/{domain_name}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Whether the member VMs share frames with each other (default true); false:
    /// each member merges only its own pages, as a VM without a domain does.
    #[serde(default = "default_true")]
    #[cfg_attr(feature = "openapi", schema(default = true))]
    pub merge_across_vms: bool,
    /// Most member VMs at once, 1..=65536 (default 65536); a VM joining a full
    /// domain is refused (409).
    #[serde(default = "default_max_vms")]
    #[cfg_attr(feature = "openapi", schema(default = 65536, minimum = 1, maximum = 65536))]
    pub max_vms: u32,
}

impl Default for DomainPolicy {
    fn default() -> Self {
        DomainPolicy { merge_across_vms: true, max_vms: MAX_DOMAIN_VMS }
    }
}

impl DomainPolicy {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_vms == 0 || self.max_vms > MAX_DOMAIN_VMS {
            return Err(Error::OutOfRange {
                field: "max_vms",
                value: u64::from(self.max_vms),
                min: 1,
                max: u64::from(MAX_DOMAIN_VMS),
            });
        }
        Ok(())
    }
}

/// A domain as `GET /domains[/{domain_name}]` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DomainInfo {
    /// The domain's name.
    pub domain_name: String,
    /// Its policy.
    pub policy: DomainPolicy,
    /// Its member VMs (counting those being created or deleted).
    pub vm_count: u32,
}

/// Whether a declaration created the domain or found it as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// The domain is new.
    Created,
    /// The domain existed with this policy; nothing changed.
    Unchanged,
}

#[derive(Debug)]
struct Domain {
    policy: DomainPolicy,
    id: DomainId,
    members: u32,
}

/// The declared domains and which VM belongs to which.
#[derive(Debug)]
pub struct Domains {
    by_name: BTreeMap<String, Domain>,
    /// VM id -> its domain's name.
    member_of: BTreeMap<String, String>,
    next_id: DomainId,
}

impl Default for Domains {
    fn default() -> Self {
        Domains { by_name: BTreeMap::new(), member_of: BTreeMap::new(), next_id: FIRST_NAMED_DOMAIN }
    }
}

/// Checks a domain name: 1..=64 characters of `[A-Za-z0-9_-]` (the VM id rules).
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (1..=MAX_DOMAIN_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

impl Domains {
    /// Declares domain `name` with `policy`; declaring it again with the same
    /// policy changes nothing, with another is a [`Error::PolicyConflict`].
    pub fn declare(&mut self, name: &str, policy: DomainPolicy) -> Result<Declared, Error> {
        check_name(name)?;
        policy.validate()?;
        if let Some(d) = self.by_name.get(name) {
            if d.policy == policy {
                return Ok(Declared::Unchanged);
            }
            return Err(Error::PolicyConflict { name: name.to_string(), existing: d.policy, requested: policy });
        }
        if self.by_name.len() >= MAX_DOMAINS {
            return Err(Error::TooMany);
        }
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(Error::OutOfIds)?;
        self.by_name.insert(name.to_string(), Domain { policy, id, members: 0 });
        Ok(Declared::Created)
    }

    /// Domain `name`.
    pub fn get(&self, name: &str) -> Result<DomainInfo, Error> {
        let d = self.by_name.get(name).ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(info(name, d))
    }

    /// Every domain, by name.
    pub fn list(&self) -> Vec<DomainInfo> {
        self.by_name.iter().map(|(n, d)| info(n, d)).collect()
    }

    /// Deletes domain `name`, which must have no member VMs.
    pub fn remove(&mut self, name: &str) -> Result<(), Error> {
        let d = self.by_name.get(name).ok_or_else(|| Error::NotFound(name.to_string()))?;
        if d.members > 0 {
            let vms = self.member_of.iter().filter(|(_, n)| *n == name).map(|(vm, _)| vm.clone()).collect();
            return Err(Error::HasMembers { name: name.to_string(), vms });
        }
        self.by_name.remove(name);
        Ok(())
    }

    /// Makes VM `vm` a member of domain `name` (until [`Domains::leave`]) and
    /// returns the memory manager's domain for it: the domain's id, or
    /// `own` (the VM's own domain) when the policy does not merge across VMs.
    pub fn join(&mut self, vm: &str, name: &str, own: DomainId) -> Result<DomainId, Error> {
        let d = self.by_name.get(name).ok_or_else(|| Error::Undeclared(name.to_string()))?;
        if d.members >= d.policy.max_vms {
            return Err(Error::Full { name: name.to_string(), max_vms: d.policy.max_vms });
        }
        if let Some(old) = self.member_of.insert(vm.to_string(), name.to_string()) {
            // A VM id is a member once; the host never joins one twice.
            tracing::warn!(vm, "joined merge domain {name:?} while a member of {old:?}");
            if let Some(o) = self.by_name.get_mut(&old) {
                o.members = o.members.saturating_sub(1);
            }
        }
        let d = self.by_name.get_mut(name).ok_or_else(|| Error::Undeclared(name.to_string()))?;
        d.members += 1;
        Ok(if d.policy.merge_across_vms { d.id } else { own })
    }

    /// VM `vm` leaves its domain (if it has one): it was deleted or its
    /// creation failed.
    pub fn leave(&mut self, vm: &str) {
        if let Some(name) = self.member_of.remove(vm) {
            if let Some(d) = self.by_name.get_mut(&name) {
                d.members = d.members.saturating_sub(1);
            }
        }
    }
}

fn info(name: &str, d: &Domain) -> DomainInfo {
    DomainInfo { domain_name: name.to_string(), policy: d.policy, vm_count: d.members }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(merge_across_vms: bool, max_vms: u32) -> DomainPolicy {
        DomainPolicy { merge_across_vms, max_vms }
    }

    #[test]
    fn declare_is_idempotent_and_refuses_another_policy() {
        let mut d = Domains::default();
        assert_eq!(d.declare("a", DomainPolicy::default()), Ok(Declared::Created));
        assert_eq!(d.declare("a", DomainPolicy::default()), Ok(Declared::Unchanged));
        let e = d.declare("a", policy(false, 4)).unwrap_err();
        assert!(matches!(e, Error::PolicyConflict { .. }), "{e}");
        assert!(!e.is_invalid_input());
        assert_eq!(d.get("a").unwrap().policy, DomainPolicy::default());
        assert_eq!(d.list().len(), 1);
    }

    #[test]
    fn policies_and_names_are_checked() {
        let mut d = Domains::default();
        for max in [0, MAX_DOMAIN_VMS + 1] {
            let e = d.declare("a", policy(true, max)).unwrap_err();
            assert_eq!(e.to_string(), format!("max_vms: must be in 1..=65536, got {max}"));
            assert!(e.is_invalid_input());
        }
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            assert!(matches!(d.declare(bad, DomainPolicy::default()), Err(Error::BadName(_))), "{bad}");
        }
        assert!(d.declare(&"x".repeat(64), policy(true, 1)).is_ok());
        assert!(d.list().iter().all(|i| i.domain_name.len() == 64));
        let p: DomainPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, DomainPolicy::default());
        assert!(serde_json::from_str::<DomainPolicy>(r#"{"max_vm": 2}"#).is_err());
    }

    #[test]
    fn members_are_counted_and_block_deletion() {
        let mut d = Domains::default();
        assert_eq!(d.join("vm1", "a", 1).unwrap_err(), Error::Undeclared("a".into()));
        assert!(Error::Undeclared("a".into()).is_invalid_input());
        d.declare("a", policy(true, 2)).unwrap();
        let id = d.join("vm1", "a", 1).unwrap();
        assert!(id >= FIRST_NAMED_DOMAIN);
        assert_eq!(d.join("vm2", "a", 2), Ok(id));
        assert_eq!(d.get("a").unwrap().vm_count, 2);
        assert!(matches!(d.join("vm3", "a", 3), Err(Error::Full { max_vms: 2, .. })));
        let e = d.remove("a").unwrap_err();
        assert_eq!(e, Error::HasMembers { name: "a".into(), vms: vec!["vm1".into(), "vm2".into()] });
        d.leave("vm1");
        d.leave("vm1");
        d.leave("never-joined");
        assert_eq!(d.get("a").unwrap().vm_count, 1);
        assert!(d.remove("a").is_err());
        d.leave("vm2");
        assert_eq!(d.remove("a"), Ok(()));
        assert_eq!(d.get("a").unwrap_err(), Error::NotFound("a".into()));
        assert_eq!(d.remove("a").unwrap_err(), Error::NotFound("a".into()));
    }

    #[test]
    fn ids_never_collide_with_own_domains_nor_get_reused() {
        let mut d = Domains::default();
        let mut seen = std::collections::BTreeSet::new();
        for round in 0..3 {
            for name in ["a", "b"] {
                d.declare(name, DomainPolicy::default()).unwrap();
                let id = d.join(&format!("{name}{round}"), name, 5).unwrap();
                assert!(id >= FIRST_NAMED_DOMAIN, "{id}");
                assert!(seen.insert(id), "id {id} reused");
                d.leave(&format!("{name}{round}"));
                d.remove(name).unwrap();
            }
        }
        // Without merging across VMs, each member keeps its own domain.
        d.declare("solo", policy(false, 8)).unwrap();
        assert_eq!(d.join("x", "solo", 41), Ok(41));
        assert_eq!(d.join("y", "solo", 42), Ok(42));
        assert_eq!(d.get("solo").unwrap().vm_count, 2);
        // At most MAX_DOMAINS at once.
        for i in d.by_name.len()..MAX_DOMAINS {
            d.declare(&format!("n{i}"), DomainPolicy::default()).unwrap();
        }
        assert_eq!(d.declare("one-more", DomainPolicy::default()), Err(Error::TooMany));
        assert_eq!(d.declare("n7", DomainPolicy::default()), Ok(Declared::Unchanged));
        d.remove("n7").unwrap();
        // The last id is handed out; after it, declarations are refused.
        d.next_id = DomainId::MAX;
        assert_eq!(d.declare("last", DomainPolicy::default()), Err(Error::OutOfIds));
        assert!(d.get("last").is_err());
    }
}
