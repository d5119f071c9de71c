//! The merge domain requests (`PUT|GET|DELETE /domains/{domain_name}`,
//! `GET /domains`) against the Host's registry ([`vmm::domains`]).

use api::types::DomainPolicy;
use api::{ApiAction, ApiError, ApiReply};
use vmm::host::Host;

use super::host_error;

/// Answers a domain request; `None` when `action` is not one.
pub fn answer(host: &mut Host, action: &ApiAction) -> Option<Result<ApiReply, ApiError>> {
    Some(match action {
        ApiAction::PutDomain { domain_name, policy } => put(host, domain_name, *policy),
        ApiAction::ListDomains => Ok(ApiReply::Domains(host.domains())),
        ApiAction::GetDomain(name) => host.domain(name).map(ApiReply::Domain).map_err(host_error),
        ApiAction::DeleteDomain(name) => host.remove_domain(name).map(|()| ApiReply::Empty).map_err(host_error),
        _ => return None,
    })
}

/// `PUT /domains/{domain_name}`: 204 whether created or found as asked
/// ([`vmm::domains::Declared`]).
fn put(host: &mut Host, name: &str, policy: DomainPolicy) -> Result<ApiReply, ApiError> {
    host.declare_domain(name, policy).map(|_| ApiReply::Empty).map_err(host_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::domains::{DomainInfo, Error};
    use vmm::host;

    #[test]
    fn domain_errors_have_their_statuses() {
        let e = |d: Error| host_error(host::Error::Domain(d)).kind;
        assert_eq!(e(Error::Undeclared("a".into())), api::ErrorKind::BadRequest);
        assert_eq!(e(Error::NotFound("a".into())), api::ErrorKind::NotFound);
        assert_eq!(e(Error::HasMembers { name: "a".into(), vms: vec!["v".into()] }), api::ErrorKind::Conflict);
        let p = DomainPolicy::default();
        let conflict = host_error(host::Error::Domain(Error::PolicyConflict {
            name: "a".into(),
            existing: p,
            requested: DomainPolicy { max_vms: 2, ..p },
        }));
        assert_eq!(conflict.kind, api::ErrorKind::Conflict);
        assert!(conflict.fault_message.contains("max_vms: 2"), "{}", conflict.fault_message);
        let info = DomainInfo { domain_name: "a".into(), policy: p, vm_count: 3 };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"domain_name": "a", "policy": {"merge_across_vms": true, "max_vms": 65536}, "vm_count": 3})
        );
    }
}
