//! The HTTP routes: one handler per endpoint, each annotated for the OpenAPI document,
//! and the router built from exactly those annotations (so the document and the routes
//! cannot drift apart).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::channel::{ApiAction, ApiReply};
use crate::error::{self, Error};
use crate::extract::{JsonBody, VmId};
use crate::metrics;
use crate::openapi::ApiDoc;
use crate::state::{unexpected, AppState};
use crate::types::{
    CompactionActionRequest, CompactionConfig, CompactionConfigPatch, CompactionReport, FaultResponse, HostMemoryStats,
    InfoReply, MergeActionRequest, MergeConfig, MergeConfigPatch, VmActionRequest, VmConfig, VmInfo, VmList,
    VmMemoryStats,
};

/// Number of per-VM memory requests `GET /metrics` keeps in flight at once.
const METRICS_BATCH: usize = 32;

/// Asks the VMM for `action` and expects an empty answer: 204.
pub(crate) async fn empty(state: &AppState, action: ApiAction) -> Result<StatusCode, Error> {
    let name = action.name();
    match state.call(action).await? {
        ApiReply::Empty => Ok(StatusCode::NO_CONTENT),
        other => Err(unexpected(name, &other)),
    }
}

/// Version and host facts.
#[utoipa::path(get, path = "/", tag = "host",
    responses(
        (status = 200, description = "Version and host facts", body = InfoReply),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_info(State(s): State<AppState>) -> Result<Json<InfoReply>, Error> {
    match s.call(ApiAction::GetInfo).await? {
        ApiReply::Info(i) => Ok(Json(i)),
        other => Err(unexpected("GetInfo", &other)),
    }
}

/// Every VM.
#[utoipa::path(get, path = "/vms", tag = "vms",
    responses(
        (status = 200, description = "All VMs", body = VmList),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn list_vms(State(s): State<AppState>) -> Result<Json<VmList>, Error> {
    match s.call(ApiAction::ListVms).await? {
        ApiReply::Vms(vms) => Ok(Json(VmList { vms })),
        other => Err(unexpected("ListVms", &other)),
    }
}

/// Creates a VM.
#[utoipa::path(put, path = "/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id: 1..=64 characters of [A-Za-z0-9_-]",
        pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = VmConfig,
    responses(
        (status = 204, description = "VM created"),
        (status = 400, description = "Invalid id or body", body = FaultResponse),
        (status = 409, description = "A VM with this id exists", body = FaultResponse),
        (status = 413, description = "Body too large", body = FaultResponse),
    ))]
async fn put_vm(
    State(s): State<AppState>,
    VmId(vm_id): VmId,
    JsonBody(config): JsonBody<VmConfig>,
) -> Result<StatusCode, Error> {
    empty(&s, ApiAction::PutVm { vm_id, config }).await
}

/// A VM's state, configuration and workload progress.
#[utoipa::path(get, path = "/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 400, description = "Invalid id", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn get_vm(State(s): State<AppState>, VmId(id): VmId) -> Result<Json<VmInfo>, Error> {
    match s.call(ApiAction::GetVm(id)).await? {
        ApiReply::Vm(v) => Ok(Json(*v)),
        other => Err(unexpected("GetVm", &other)),
    }
}

/// Stops (if needed) and removes a VM.
#[utoipa::path(delete, path = "/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 204, description = "VM removed"),
        (status = 400, description = "Invalid id", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
        (status = 409, description = "The VM cannot be removed now", body = FaultResponse),
    ))]
async fn delete_vm(State(s): State<AppState>, VmId(id): VmId) -> Result<StatusCode, Error> {
    empty(&s, ApiAction::DeleteVm(id)).await
}

/// Starts, pauses, resumes or stops a VM.
#[utoipa::path(put, path = "/vms/{vm_id}/actions", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body = VmActionRequest,
    responses(
        (status = 204, description = "Action done"),
        (status = 400, description = "Invalid id or body", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
        (status = 409, description = "The VM's state does not allow the action", body = FaultResponse),
    ))]
async fn vm_action(
    State(s): State<AppState>,
    VmId(vm_id): VmId,
    JsonBody(req): JsonBody<VmActionRequest>,
) -> Result<StatusCode, Error> {
    let action = req.action_type;
    empty(&s, ApiAction::VmAction { vm_id, action }).await
}

/// A VM's memory statistics.
#[utoipa::path(get, path = "/vms/{vm_id}/memory", tag = "memory",
    params(("vm_id" = String, Path, description = "VM id", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The VM's memory", body = VmMemoryStats),
        (status = 400, description = "Invalid id", body = FaultResponse),
        (status = 404, description = "No such VM", body = FaultResponse),
    ))]
async fn get_vm_memory(State(s): State<AppState>, VmId(id): VmId) -> Result<Json<VmMemoryStats>, Error> {
    match s.call(ApiAction::GetVmMemory(id)).await? {
        ApiReply::VmMemory(m) => Ok(Json(m)),
        other => Err(unexpected("GetVmMemory", &other)),
    }
}

/// Host-wide memory and merging statistics.
#[utoipa::path(get, path = "/memory", tag = "memory",
    responses(
        (status = 200, description = "Host memory statistics", body = HostMemoryStats),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_memory(State(s): State<AppState>) -> Result<Json<HostMemoryStats>, Error> {
    s.host_memory().await.map(Json)
}

/// The merger's settings.
#[utoipa::path(get, path = "/memory/merge", tag = "memory",
    responses(
        (status = 200, description = "Merge settings", body = MergeConfig),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_merge_config(State(s): State<AppState>) -> Result<Json<MergeConfig>, Error> {
    match s.call(ApiAction::GetMergeConfig).await? {
        ApiReply::MergeConfig(c) => Ok(Json(c)),
        other => Err(unexpected("GetMergeConfig", &other)),
    }
}

/// Changes some of the merger's settings; answers with the resulting settings.
#[utoipa::path(patch, path = "/memory/merge", tag = "memory",
    request_body = MergeConfigPatch,
    responses(
        (status = 200, description = "Settings after the change", body = MergeConfig),
        (status = 400, description = "Invalid body", body = FaultResponse),
        (status = 409, description = "The change is not possible now", body = FaultResponse),
    ))]
async fn patch_merge_config(
    State(s): State<AppState>,
    JsonBody(patch): JsonBody<MergeConfigPatch>,
) -> Result<Json<MergeConfig>, Error> {
    match s.call(ApiAction::PatchMergeConfig(patch)).await? {
        ApiReply::MergeConfig(c) => Ok(Json(c)),
        other => Err(unexpected("PatchMergeConfig", &other)),
    }
}

/// Host-wide merge actions (`UnmergeAll`).
#[utoipa::path(put, path = "/memory/merge/actions", tag = "memory",
    request_body = MergeActionRequest,
    responses(
        (status = 204, description = "Action done"),
        (status = 400, description = "Invalid body", body = FaultResponse),
        (status = 409, description = "The action is not possible now", body = FaultResponse),
    ))]
async fn merge_action(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<MergeActionRequest>,
) -> Result<StatusCode, Error> {
    empty(&s, ApiAction::MergeAction(req.action_type)).await
}

/// The compactor's settings.
#[utoipa::path(get, path = "/memory/compaction", tag = "memory",
    responses(
        (status = 200, description = "Compaction settings", body = CompactionConfig),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_compaction_config(State(s): State<AppState>) -> Result<Json<CompactionConfig>, Error> {
    match s.call(ApiAction::GetCompactionConfig).await? {
        ApiReply::CompactionConfig(c) => Ok(Json(c)),
        other => Err(unexpected("GetCompactionConfig", &other)),
    }
}

/// Changes some of the compactor's settings; answers with the resulting settings.
#[utoipa::path(patch, path = "/memory/compaction", tag = "memory",
    request_body = CompactionConfigPatch,
    responses(
        (status = 200, description = "Settings after the change", body = CompactionConfig),
        (status = 400, description = "Invalid body", body = FaultResponse),
    ))]
async fn patch_compaction_config(
    State(s): State<AppState>,
    JsonBody(patch): JsonBody<CompactionConfigPatch>,
) -> Result<Json<CompactionConfig>, Error> {
    match s.call(ApiAction::PatchCompactionConfig(patch)).await? {
        ApiReply::CompactionConfig(c) => Ok(Json(c)),
        other => Err(unexpected("PatchCompactionConfig", &other)),
    }
}

/// Host-wide compaction actions (`Compact`: one pass at full rate; answers with its
/// report). One pass requested over the API at a time.
#[utoipa::path(put, path = "/memory/compaction/actions", tag = "memory",
    request_body = CompactionActionRequest,
    responses(
        (status = 200, description = "What the pass did", body = CompactionReport),
        (status = 400, description = "Invalid body", body = FaultResponse),
        (status = 409, description = "A pass requested over the API is running", body = FaultResponse),
        (status = 503, description = "VMM unavailable, or the pass outlasted the VMM timeout \
            (it goes on; its totals show in GET /memory)", body = FaultResponse),
    ))]
async fn compaction_action(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CompactionActionRequest>,
) -> Result<Json<CompactionReport>, Error> {
    match s.call(ApiAction::CompactionAction(req.action_type)).await? {
        ApiReply::CompactionReport(r) => Ok(Json(r)),
        other => Err(unexpected("CompactionAction", &other)),
    }
}

/// Statistics in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "host",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4",
         body = String, content_type = "text/plain"),
        (status = 503, description = "VMM unavailable", body = FaultResponse),
    ))]
async fn get_metrics(State(s): State<AppState>) -> Result<Response, Error> {
    let host = s.host_memory().await?;
    let vms = match s.call(ApiAction::ListVms).await? {
        ApiReply::Vms(v) => v,
        other => return Err(unexpected("ListVms", &other)),
    };
    let mut rows = Vec::with_capacity(vms.len());
    let mut vms = vms.into_iter().peekable();
    while vms.peek().is_some() {
        let batch: Vec<_> = vms.by_ref().take(METRICS_BATCH).collect();
        let mut pending = Vec::with_capacity(batch.len());
        for vm in &batch {
            let mem = s.send(ApiAction::GetVmMemory(vm.vm_id.clone()))?;
            let balloon = match vm.config.balloon {
                Some(_) => Some(s.send(ApiAction::GetBalloon(vm.vm_id.clone()))?),
                None => None,
            };
            pending.push((mem, balloon));
        }
        for (vm, (p, b)) in batch.into_iter().zip(pending) {
            let mem = match s.wait("GetVmMemory", p).await {
                Ok(ApiReply::VmMemory(m)) => Some(m),
                Ok(other) => return Err(unexpected("GetVmMemory", &other)),
                // Deleted since the list was taken.
                Err(e) if e.status == StatusCode::NOT_FOUND => None,
                Err(e) => return Err(e),
            };
            let balloon = match b {
                None => None,
                Some(b) => match s.wait("GetBalloon", b).await {
                    Ok(ApiReply::Balloon(b)) => Some(*b),
                    Ok(other) => return Err(unexpected("GetBalloon", &other)),
                    // Deleted, or replaced without a balloon, since the list was taken.
                    Err(e) if matches!(e.status, StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST) => None,
                    Err(e) => return Err(e),
                },
            };
            rows.push(metrics::VmRow { vm, memory: mem, balloon });
        }
    }
    let policy = match s.call(ApiAction::GetBalloonPolicy).await? {
        ApiReply::BalloonPolicy(p) => *p,
        other => return Err(unexpected("GetBalloonPolicy", &other)),
    };
    let mut text = metrics::render(&host, &rows);
    text.push_str(&metrics::balloon_policy(&policy));
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "host",
    responses((status = 200, description = "OpenAPI document", body = Object)))]
async fn get_openapi(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], s.openapi_json.as_str().to_owned()).into_response()
}

/// The routes (without state, fallback and middleware) and the OpenAPI document
/// describing exactly them.
pub fn router_parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let router = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(get_info))
        .routes(routes!(list_vms))
        .routes(routes!(get_vm, put_vm, delete_vm))
        .routes(routes!(vm_action))
        .routes(routes!(get_vm_memory))
        .routes(routes!(get_memory))
        .routes(routes!(get_merge_config, patch_merge_config))
        .routes(routes!(merge_action))
        .routes(routes!(get_compaction_config, patch_compaction_config))
        .routes(routes!(compaction_action))
        .routes(routes!(get_metrics))
        .routes(routes!(get_openapi));
    crate::domain_routes::add(crate::balloon_routes::add(router)).split_for_parts()
}

/// The complete application: routes, JSON 404 fallback and JSON error middleware.
pub fn app(state: AppState) -> Router {
    let (router, _) = router_parts();
    let inner = router.fallback(error::not_found).with_state(state);
    // The middleware wraps the whole inner router so that it sees the final responses
    // (axum adds the `Allow` header of a 405 outside the route's own layers).
    Router::new().fallback_service(inner).layer(axum::middleware::from_fn(error::json_errors))
}
