//! Merge domain types: `PUT|GET|DELETE /domains/{domain_name}`, `GET /domains`.
//!
//! The policy and a domain's description are the VMM's types
//! ([`vmm::domains`]), re-exported here; only the list is the API's own.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Error, Validate};

/// A domain as `GET /domains[/{domain_name}]` shows it: the VMM's
/// [`vmm::domains::DomainInfo`].
pub use vmm::domains::DomainInfo;
/// Body of `PUT /domains/{domain_name}`: the VMM's [`vmm::domains::DomainPolicy`].
pub use vmm::domains::DomainPolicy;
/// Most member VMs a domain may allow.
pub use vmm::domains::MAX_DOMAIN_VMS;

impl Validate for DomainPolicy {
    /// The policy's own range check ([`vmm::domains::DomainPolicy::validate`]),
    /// with the API's error shape.
    fn validate(&self) -> Result<(), Error> {
        DomainPolicy::validate(self).map_err(|e| match e {
            vmm::domains::Error::OutOfRange { field, value, min, max } => {
                Error::new(field, format!("must be in {min}..={max}, got {value}"))
            }
            other => Error::new("policy", other.to_string()),
        })
    }
}

/// `GET /domains`: every merge domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DomainList {
    /// The domains, by name.
    pub domains: Vec<DomainInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_ranges() {
        let p: DomainPolicy = serde_json::from_str(r#"{"max_vms": 0}"#).unwrap();
        let e = Validate::validate(&p).unwrap_err();
        assert_eq!(e.to_string(), "max_vms: must be in 1..=65536, got 0");
        let p: DomainPolicy = serde_json::from_str(r#"{"merge_across_vms": false, "max_vms": 65536}"#).unwrap();
        assert!(Validate::validate(&p).is_ok());
        assert!(serde_json::from_str::<DomainPolicy>(r#"{"max_vms": -1}"#).is_err());
    }
}
