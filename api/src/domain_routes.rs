//! The merge domain routes: `PUT|GET|DELETE /domains/{domain_name}` and
//! `GET /domains`. A domain is declared with its policy before any VM may name
//! it in `merge.domain` (see `vmm::domains` for who may share with whom).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::channel::{ApiAction, ApiReply};
use crate::error::Error;
use crate::extract::{DomainName, JsonBody};
use crate::state::{unexpected, AppState};
use crate::types::{DomainInfo, DomainList, DomainPolicy, FaultResponse};

/// Declares a merge domain with its policy. Again with the same policy: nothing
/// changes (204); with another: 409 (delete it first, once it has no VMs).
#[utoipa::path(put, path = "/domains/{domain_name}", tag = "domains",
    params(("domain_name" = String, Path, description = "Domain name: 1..=64 characters of [A-Za-z0-9_-]",
        pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = DomainPolicy,
    responses(
        (status = 204, description = "Domain declared (or already declared with this policy)"),
        (status = 400, description = "Invalid name or body", body = FaultResponse),
        (status = 409, description = "The domain exists with another policy, or 4096 domains exist", body = FaultResponse),
    ))]
async fn put_domain(
    State(s): State<AppState>,
    DomainName(domain_name): DomainName,
    JsonBody(policy): JsonBody<DomainPolicy>,
) -> Result<StatusCode, Error> {
    match s.call(ApiAction::PutDomain { domain_name, policy }).await? {
        ApiReply::Empty => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected("PutDomain", &other)),
    }
}

/// A merge domain: its policy and how many VMs are its members.
#[utoipa::path(get, path = "/domains/{domain_name}", tag = "domains",
    params(("domain_name" = String, Path, description = "Domain name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The domain", body = DomainInfo),
        (status = 400, description = "Invalid name", body = FaultResponse),
        (status = 404, description = "No such domain", body = FaultResponse),
    ))]
async fn get_domain(State(s): State<AppState>, DomainName(name): DomainName) -> Result<Json<DomainInfo>, Error> {
    match s.call(ApiAction::GetDomain(name)).await? {
        ApiReply::Domain(d) => Ok(Json(d)),
        other => Err(unexpected("GetDomain", &other)),
    }
}

/// Deletes a merge domain that has no member VMs.
#[utoipa::path(delete, path = "/domains/{domain_name}", tag = "domains",
    params(("domain_name" = String, Path, description = "Domain name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 204, description = "Domain deleted"),
        (status = 400, description = "Invalid name", body = FaultResponse),
        (status = 404, description = "No such domain", body = FaultResponse),
        (status = 409, description = "VMs are members of the domain", body = FaultResponse),
    ))]
async fn delete_domain(State(s): State<AppState>, DomainName(name): DomainName) -> Result<StatusCode, Error> {
    match s.call(ApiAction::DeleteDomain(name)).await? {
        ApiReply::Empty => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected("DeleteDomain", &other)),
    }
}

/// Every merge domain, with its member count.
#[utoipa::path(get, path = "/domains", tag = "domains",
    responses(
        (status = 200, description = "All domains", body = DomainList),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn list_domains(State(s): State<AppState>) -> Result<Json<DomainList>, Error> {
    match s.call(ApiAction::ListDomains).await? {
        ApiReply::Domains(domains) => Ok(Json(DomainList { domains })),
        other => Err(unexpected("ListDomains", &other)),
    }
}

/// Adds the domain routes (and their documentation) to `router`.
pub fn add(router: OpenApiRouter<AppState>) -> OpenApiRouter<AppState> {
    router.routes(routes!(list_domains)).routes(routes!(get_domain, put_domain, delete_domain))
}
