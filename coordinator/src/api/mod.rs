//! The tonic `Coordinator` service: authenticates the caller by its client certificate or bearer token (gRPC
//! metadata, or the HTTP front end's request), checks its role,
//! and translates requests into engine calls and engine errors into statuses (one mapping, here).

use std::pin::Pin;

use gridforge_proto::v1::coordinator_server::Coordinator;
use gridforge_proto::v1::{
    AddNodeRequest, ControlVmRequest, CordonNodeRequest, CreateVmRequest, CreateVmResponse, DeleteVmRequest,
    ExplainVmRequest, Explanation, GetNodeRequest, GetOperationRequest, GetVmRequest, ListNodesRequest,
    ListNodesResponse, ListOperationsRequest, ListOperationsResponse, ListVmsRequest, ListVmsResponse, Node,
    Operation, OperationEvent, RemoveNodeRequest, RemoveNodeResponse, ResizeVmRequest, SnapshotVmRequest, Vm,
    WatchOperationRequest,
};
use gridforge_proto::v1::{
    AddUserRequest, CoordinatorStatusRequest, CoordinatorStatusResponse, CreateTokenRequest,
    CreateTokenResponse, DrainNodeRequest, FenceNodeRequest, GridUser, ListUsersRequest, ListUsersResponse,
    MigrateVmRequest, RemoveUserRequest, RemoveUserResponse,
};
use gridforge_proto::v1::{
    GetGroupRequest, GetTenantRequest, Group, GroupStatus, ListDecisionsRequest, ListDecisionsResponse,
    ListTenantsRequest, ListTenantsResponse, PutGroupRequest, PutTenantRequest, RemoveGroupRequest,
    RemoveTenantRequest, SetVmScalingRequest, Tenant,
};
use gridforge_proto::v1::{
    ListNetworksRequest, ListNetworksResponse, PutNetworkRequest, RemoveNetworkRequest, TenantNetwork,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::AuthConfig;
use crate::grid::{GridState, VmState, is_finished};
use crate::ops::{Engine, OpError, explain, network_view, schedule_request, tenant_view, users};
use crate::store::StoreError;

pub use crate::auth::Role;

/// The caller: certificate CN, role, and the tenant it is scoped to (None: the whole grid).
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Option<Role>,
    pub tenant: Option<String>,
}

impl Caller {
    /// Whether the caller may see and change what belongs to `tenant` (an unscoped caller: everything).
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }
}

/// The client certificate of a call that did not come through tonic's own TLS (the HTTP/JSON front end puts
/// it in the request's extensions), DER.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Vec<u8>);

/// The bearer token of `metadata`'s `authorization`, if it has one; UNAUTHENTICATED for one that is not
/// `Bearer TOKEN`.
fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else { return Ok(None) };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| Some(t.trim()))
        .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer TOKEN\""))
}

/// Name for callers without TLS (plaintext on loopback, development only): an admin.
pub const LOCAL_CALLER: &str = "local";

/// The caller of `request` and its role: from the grid view's users (`grid_role`), else the configuration's
/// `[auth.users]`, else the certificate's OU (when `auth.role_from_ou`), else `auth.default_role`.
pub fn caller<T>(
    request: &Request<T>,
    auth: &AuthConfig,
    tls: bool,
    grid_role: impl FnOnce(&str) -> Option<(Role, Option<String>)>,
) -> Caller {
    let cert = request
        .peer_certs()
        .and_then(|c| c.first().map(|c| c.to_vec()))
        .or_else(|| request.extensions().get::<PeerCertificate>().map(|c| c.0.clone()));
    let Some(cert) = cert else {
        return Caller {
            name: LOCAL_CALLER.into(),
            role: if tls { None } else { Some(Role::Admin) },
            tenant: None,
        };
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&cert) else {
        return Caller { name: "unknown client".into(), role: None, tenant: None };
    };
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let name = first(&mut cert.subject().iter_common_name()).unwrap_or_else(|| cert.subject().to_string());
    let ou = first(&mut cert.subject().iter_organizational_unit());
    if let Some((role, tenant)) = grid_role(&name) {
        return Caller { name, role: Some(role), tenant };
    }
    let role = auth
        .users
        .get(&name)
        .and_then(|r| r.parse().ok())
        .or_else(|| if auth.role_from_ou { ou.and_then(|o| o.parse().ok()) } else { None })
        .or_else(|| auth.default_role.parse().ok());
    Caller { name, role, tenant: None }
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Status {
        let message = e.to_string();
        match e {
            OpError::NotFound(_) => Status::not_found(message),
            OpError::AlreadyExists(_) => Status::already_exists(message),
            OpError::Invalid(_) => Status::invalid_argument(message),
            OpError::Precondition(_) => Status::failed_precondition(message),
            OpError::Unschedulable(_) | OpError::Quota(_) => Status::resource_exhausted(message),
            OpError::Unavailable(_) => Status::unavailable(message),
            OpError::Unimplemented(_) => Status::unimplemented(message),
            OpError::Store(e @ (StoreError::Unavailable(_) | StoreError::NotLeader(_))) => {
                Status::unavailable(format!("nothing was changed: {}", crate::error_chain(&e)))
            }
            OpError::Store(e) => Status::internal(crate::error_chain(&e)),
        }
    }
}

pub struct CoordinatorService {
    engine: Engine,
    auth: AuthConfig,
    tls: bool,
}

impl CoordinatorService {
    pub fn new(engine: Engine, auth: AuthConfig, tls: bool) -> Self {
        CoordinatorService { engine, auth, tls }
    }

    /// The caller, if its role allows `need`; PERMISSION_DENIED naming both otherwise.
    fn allow<T>(&self, request: &Request<T>, need: Role, what: &str) -> Result<Caller, Status> {
        let scope = |u: &GridUser| Some(u.tenant.clone()).filter(|t| !t.is_empty());
        let c = match bearer_token(request.metadata())? {
            Some(token) => {
                let u = self.engine.token_user(token).ok_or_else(|| {
                    Status::unauthenticated("the bearer token is not known (mistyped, replaced or revoked)")
                })?;
                Caller { role: u.role.parse().ok(), tenant: scope(&u), name: u.name }
            }
            None => {
                // A certificate never names a token user.
                let users = |name: &str| {
                    self.engine.view().read(|s| {
                        let u = s.users.get(name).filter(|u| u.token_sha256.is_empty())?;
                        Some((u.role.parse().ok()?, scope(u)))
                    })
                };
                caller(request, &self.auth, self.tls, users)
            }
        };
        match c.role {
            Some(r) if r >= need && need > Role::Viewer && !self.engine.cluster().is_leader() => {
                let cluster = self.engine.cluster();
                let mut status = Status::unavailable(cluster.not_leader());
                // Always present on this refusal (empty while no leader is known): gridctl tries again.
                let leader = cluster.leader().filter(|l| l.name != cluster.me().name).map(|l| l.address);
                if let Ok(address) = leader.unwrap_or_default().parse() {
                    status.metadata_mut().insert(crate::ha::LEADER_HEADER, address);
                }
                Err(status)
            }
            Some(r) if r >= need => Ok(c),
            Some(r) => Err(Status::permission_denied(
                format!("{} is {r:?}; {what} needs {need:?}", c.name).to_lowercase(),
            )),
            None => Err(Status::permission_denied(format!(
                "{} has no role (auth.users, or the certificate's OU admin/operator/viewer)",
                c.name
            ))),
        }
    }

    /// As [`allow`](Self::allow), for what only a caller of the whole grid (no tenant scope) may do.
    fn allow_grid<T>(&self, request: &Request<T>, need: Role, what: &str) -> Result<Caller, Status> {
        let c = self.allow(request, need, what)?;
        match &c.tenant {
            Some(t) => Err(Status::permission_denied(format!(
                "{} is scoped to tenant {t}; {what} needs a user of the whole grid",
                c.name
            ))),
            None => Ok(c),
        }
    }

    /// As [`allow`](Self::allow), for something done to the VM `name`: a tenant-scoped caller finds only its
    /// tenant's VMs (any other is, to it, not there).
    fn allow_vm<T>(
        &self,
        request: &Request<T>,
        need: Role,
        what: &str,
        name: &str,
    ) -> Result<Caller, Status> {
        let c = self.allow(request, need, what)?;
        if c.tenant.is_some() {
            let tenant = self.engine.view().read(|s| s.vms.get(name).map(|v| v.tenant.clone()));
            if !tenant.is_some_and(|t| c.sees(&t)) {
                return Err(Status::not_found(format!("no vm {name:?}")));
            }
        }
        Ok(c)
    }

    /// As [`allow`](Self::allow), for something of the tenant `tenant`.
    fn allow_tenant<T>(
        &self,
        request: &Request<T>,
        need: Role,
        what: &str,
        tenant: &str,
    ) -> Result<Caller, Status> {
        let c = self.allow(request, need, what)?;
        if !c.sees(tenant) {
            return Err(Status::not_found(format!("no tenant {tenant:?}")));
        }
        Ok(c)
    }
}

/// The node as `c` sees it: a tenant-scoped caller sees only its own VMs there.
fn node_view(s: &GridState, name: &str, c: &Caller) -> Option<Node> {
    let mut n = s.nodes.get(name)?.clone();
    n.allocated = Some(s.allocated(name));
    n.vms = s.vms_on(name).filter(|v| c.sees(&v.tenant)).map(|v| v.name.clone()).collect();
    if c.tenant.is_some() {
        n.drift.retain(|d| s.vms.get(&d.vm).is_some_and(|v| c.sees(&v.tenant)));
    }
    Some(n)
}

/// Whether `c` sees operation `o`: a tenant-scoped caller sees only its own VMs' operations.
fn op_visible(s: &GridState, o: &Operation, c: &Caller) -> bool {
    c.tenant.is_none() || s.vms.get(&o.vm).is_some_and(|v| c.sees(&v.tenant))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OperationEvent, Status>> + Send>>;
type VmStream = Pin<Box<dyn Stream<Item = Result<Vm, Status>> + Send>>;

/// How often a VM watch looks at the VM.
const VM_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a watcher of the VM is told about `now` after `before`: anything but the timestamp of the update.
fn vm_changed(before: &Vm, now: &Vm) -> bool {
    let strip = |v: &Vm| Vm { updated: None, ..v.clone() };
    strip(before) != strip(now)
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow_grid(&request, Role::Admin, "node add")?;
        Ok(Response::new(self.engine.add_node(request.into_inner()).await?))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.allow_grid(&request, Role::Admin, "node remove")?;
        let req = request.into_inner();
        Ok(Response::new(self.engine.remove_node(&req.name, req.force).await?))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "node list")?;
        let dc = request.into_inner().datacenter;
        let nodes = self.engine.view().read(|s| {
            s.nodes
                .values()
                .filter(|n| dc.is_empty() || n.datacenter == dc)
                .filter_map(|n| node_view(s, &n.name, &c))
                .collect()
        });
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let c = self.allow(&request, Role::Viewer, "node show")?;
        let name = request.into_inner().name;
        self.engine
            .view()
            .read(|s| node_view(s, &name, &c))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no node {name:?}")))
    }

    async fn cordon_node(&self, request: Request<CordonNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow_grid(&request, Role::Operator, "node cordon")?;
        Ok(Response::new(self.engine.set_cordon(&request.into_inner().name, true).await?))
    }

    async fn uncordon_node(&self, request: Request<CordonNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow_grid(&request, Role::Operator, "node uncordon")?;
        Ok(Response::new(self.engine.set_cordon(&request.into_inner().name, false).await?))
    }

    async fn fence_node(&self, request: Request<FenceNodeRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "node fence")?;
        Ok(Response::new(self.engine.fence_node(&request.into_inner().name, &c.name).await?))
    }

    async fn confirm_fenced(&self, request: Request<FenceNodeRequest>) -> Result<Response<Node>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "node fenced")?;
        let name = request.into_inner().name;
        let node = self.engine.confirm_fenced(&name).await?;
        tracing::warn!(node = %name, by = %c.name, "confirmed fenced");
        Ok(Response::new(node))
    }

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow_grid(&request, Role::Operator, "node drain")?;
        Ok(Response::new(self.engine.drain_node(request.into_inner(), &c.name).await?))
    }

    async fn create_vm(
        &self,
        request: Request<CreateVmRequest>,
    ) -> Result<Response<CreateVmResponse>, Status> {
        let need = if request.get_ref().dry_run { Role::Viewer } else { Role::Operator };
        let c = self.allow(&request, need, "vm create")?;
        let mut req = request.into_inner();
        match &c.tenant {
            Some(t) if req.tenant.is_empty() => req.tenant = t.clone(),
            Some(t) if req.tenant != *t => {
                return Err(Status::permission_denied(format!(
                    "{} is scoped to tenant {t}: it creates VMs of that tenant only, not of {}",
                    c.name, req.tenant
                )));
            }
            _ => {}
        }
        Ok(Response::new(self.engine.create_vm(req, &c.name).await?))
    }

    async fn list_vms(&self, request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "vm list")?;
        let req = request.into_inner();
        let vms = self.engine.view().read(|s| {
            let vms = s
                .vms
                .values()
                .filter(|v| req.all || v.state() != VmState::Deleted)
                .filter(|v| req.node.is_empty() || v.node == req.node)
                .filter(|v| c.sees(&v.tenant))
                .filter(|v| req.tenant.is_empty() || v.tenant == req.tenant)
                .filter(|v| req.group.is_empty() || v.group == req.group);
            self.engine.with_usages(s, vms.cloned())
        });
        Ok(Response::new(ListVmsResponse { vms }))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let name = request.get_ref().name.clone();
        self.allow_vm(&request, Role::Viewer, "vm show", &name)?;
        self.engine
            .view()
            .read(|s| s.vms.get(&name).map(|v| self.engine.with_usage(s, v.clone())))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no vm {name:?}")))
    }

    async fn delete_vm(&self, request: Request<DeleteVmRequest>) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm delete", &name)?;
        Ok(Response::new(self.engine.delete_vm(request.into_inner(), &c.name).await?))
    }

    async fn control_vm(&self, request: Request<ControlVmRequest>) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm control", &name)?;
        Ok(Response::new(self.engine.control_vm(request.into_inner(), &c.name).await?))
    }

    async fn resize_vm(&self, request: Request<ResizeVmRequest>) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm resize", &name)?;
        Ok(Response::new(self.engine.resize_vm(request.into_inner(), &c.name).await?))
    }

    async fn snapshot_vm(&self, request: Request<SnapshotVmRequest>) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm snapshot", &name)?;
        Ok(Response::new(self.engine.snapshot_vm(request.into_inner(), &c.name).await?))
    }

    async fn migrate_vm(&self, request: Request<MigrateVmRequest>) -> Result<Response<Operation>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm migrate", &name)?;
        Ok(Response::new(self.engine.migrate_vm(request.into_inner(), &c.name).await?))
    }

    async fn explain_vm(&self, request: Request<ExplainVmRequest>) -> Result<Response<Explanation>, Status> {
        let name = request.get_ref().name.clone();
        self.allow_vm(&request, Role::Viewer, "vm why", &name)?;
        let e = self.engine.view().read(|s| {
            let vm = s.vms.get(&name)?;
            let spec = vm.spec.clone().unwrap_or_default();
            let req = schedule_request(&spec, &vm.placement.clone().unwrap_or_default());
            // The VM's own reservation is taken out, so that its node is judged as it was when it was placed.
            let mut e = explain(&s.snapshot, &req);
            if crate::grid::holds_allocation(vm) {
                let mut snap = s.snapshot.clone();
                let group = vm.placement.as_ref().map(|p| p.spread_group.as_str()).filter(|g| !g.is_empty());
                snap.release(&vm.node, &crate::grid::to_sched(&vm.resources.unwrap_or_default()), group);
                e = explain(&snap, &req);
            }
            e.summary = format!(
                "{} is on {}. {}",
                name,
                if vm.node.is_empty() { "no node" } else { &vm.node },
                e.summary
            );
            e.chosen = vm.node.clone();
            Some(e)
        });
        e.map(Response::new).ok_or_else(|| Status::not_found(format!("no vm {name:?}")))
    }

    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "op list")?;
        let req = request.into_inner();
        let mut operations: Vec<Operation> = self.engine.view().read(|s| {
            s.ops
                .values()
                .rev()
                .filter(|o| c.tenant.is_none() || op_visible(s, o, &c))
                .filter(|o| req.vm.is_empty() || o.vm == req.vm)
                .filter(|o| !req.active || !is_finished(o))
                .take(if req.limit == 0 { usize::MAX } else { req.limit as usize })
                .cloned()
                .collect()
        });
        operations.reverse();
        Ok(Response::new(ListOperationsResponse { operations }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Viewer, "op show")?;
        let id = request.into_inner().id;
        self.engine
            .view()
            .read(|s| s.ops.get(&id).filter(|o| op_visible(s, o, &c)).cloned())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id:?}")))
    }

    type WatchOperationStream = EventStream;

    async fn watch_operation(
        &self,
        request: Request<WatchOperationRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let c = self.allow(&request, Role::Viewer, "op watch")?;
        let id = request.into_inner().id;
        if !self.engine.view().read(|s| s.ops.get(&id).is_some_and(|o| op_visible(s, o, &c))) {
            return Err(Status::not_found(format!("no operation {id:?}")));
        }
        let (op, rx) = self.engine.watch(&id)?;
        let first = OperationEvent {
            operation: op.id.clone(),
            state: op.state,
            message: op.summary.clone(),
            time: Some(crate::grid::now()),
            snapshot: Some(op),
            ..Default::default()
        };
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let Some(mut rx) = rx else { return };
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let last = ev.snapshot.is_some();
                        if tx.send(Ok(ev)).await.is_err() || last {
                            return;
                        }
                    }
                    // Slow watcher: some progress events were dropped; the end still arrives.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    type WatchVmStream = VmStream;

    async fn watch_vm(&self, request: Request<GetVmRequest>) -> Result<Response<VmStream>, Status> {
        let name = request.get_ref().name.clone();
        self.allow_vm(&request, Role::Viewer, "vm watch", &name)?;
        let read = {
            let engine = self.engine.clone();
            move || engine.view().read(|s| s.vms.get(&name).map(|v| engine.with_usage(s, v.clone())))
        };
        let Some(first) = read() else {
            return Err(Status::not_found(format!("no vm {:?}", request.get_ref().name)));
        };
        let (tx, out) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            // The grid view is in memory: reading it twice a second is cheap, and the poller's load samples
            // come no faster.
            let mut tick = tokio::time::interval(VM_WATCH_INTERVAL);
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tx.closed() => return,
                }
                let Some(vm) = read() else { return };
                if vm_changed(&last, &vm) {
                    let gone = vm.state() == VmState::Deleted;
                    if tx.send(Ok(vm.clone())).await.is_err() || gone {
                        return;
                    }
                    last = vm;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }

    async fn add_user(&self, request: Request<AddUserRequest>) -> Result<Response<GridUser>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "user add")?;
        let req = request.into_inner();
        Ok(Response::new(self.engine.add_user(&req.name, &req.role, &req.tenant, &c.name).await?))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "token create")?;
        let req = request.into_inner();
        let (user, token) = self.engine.create_token(&req.name, &req.role, &req.tenant, &c.name).await?;
        tracing::info!(token = %user.name, role = %user.role, by = %c.name, "token created");
        Ok(Response::new(CreateTokenResponse { user: Some(user), token }))
    }

    async fn remove_user(
        &self,
        request: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "user remove")?;
        let name = request.into_inner().name;
        let removed = self.engine.remove_user(&name, &c.name).await.map_err(|e| match e {
            OpError::NotFound(m) if self.auth.users.contains_key(&name) => Status::not_found(format!(
                "{m}; {name}'s role comes from the configuration ([auth.users]): change it there"
            )),
            e => e.into(),
        })?;
        Ok(Response::new(RemoveUserResponse { removed: Some(removed) }))
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.allow(&request, Role::Viewer, "user list")?;
        let users = self.engine.view().read(|s| s.users.values().cloned().map(users::public).collect());
        let configured = self.auth.users.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Ok(Response::new(ListUsersResponse { users, configured }))
    }

    async fn coordinator_status(
        &self,
        request: Request<CoordinatorStatusRequest>,
    ) -> Result<Response<CoordinatorStatusResponse>, Status> {
        self.allow(&request, Role::Viewer, "coordinator status")?;
        Ok(Response::new(self.engine.cluster().status()))
    }

    async fn put_tenant(&self, request: Request<PutTenantRequest>) -> Result<Response<Tenant>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "tenant add")?;
        let req = request.into_inner();
        let t = self.engine.put_tenant(&req.name, req.quota.unwrap_or_default()).await?;
        tracing::info!(tenant = %t.name, by = %c.name, "tenant put");
        Ok(Response::new(t))
    }

    async fn remove_tenant(&self, request: Request<RemoveTenantRequest>) -> Result<Response<Tenant>, Status> {
        let c = self.allow_grid(&request, Role::Admin, "tenant remove")?;
        let name = request.into_inner().name;
        let t = self.engine.remove_tenant(&name).await?;
        tracing::info!(tenant = %name, by = %c.name, "tenant removed");
        Ok(Response::new(t))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "tenant list")?;
        let tenants = self
            .engine
            .view()
            .read(|s| s.tenants.keys().filter(|t| c.sees(t)).filter_map(|t| tenant_view(s, t)).collect());
        Ok(Response::new(ListTenantsResponse { tenants }))
    }

    async fn get_tenant(&self, request: Request<GetTenantRequest>) -> Result<Response<Tenant>, Status> {
        let name = request.get_ref().name.clone();
        self.allow_tenant(&request, Role::Viewer, "tenant show", &name)?;
        self.engine
            .view()
            .read(|s| tenant_view(s, &name))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no tenant {name:?}")))
    }

    async fn put_group(&self, request: Request<PutGroupRequest>) -> Result<Response<Group>, Status> {
        let tenant = request.get_ref().group.as_ref().map(|g| g.tenant.clone()).unwrap_or_default();
        let c = self.allow_tenant(&request, Role::Operator, "group put", &tenant)?;
        let g = request.into_inner().group.ok_or_else(|| Status::invalid_argument("group: required"))?;
        let g = self.engine.put_group(g).await?;
        tracing::info!(tenant = %g.tenant, group = %g.name, by = %c.name, "group put");
        Ok(Response::new(g))
    }

    async fn remove_group(&self, request: Request<RemoveGroupRequest>) -> Result<Response<Group>, Status> {
        let tenant = request.get_ref().tenant.clone();
        let c = self.allow_tenant(&request, Role::Operator, "group remove", &tenant)?;
        let req = request.into_inner();
        let g = self.engine.remove_group(&req.tenant, &req.name).await?;
        tracing::info!(tenant = %req.tenant, group = %req.name, by = %c.name, "group removed");
        Ok(Response::new(g))
    }

    async fn get_group(&self, request: Request<GetGroupRequest>) -> Result<Response<GroupStatus>, Status> {
        let tenant = request.get_ref().tenant.clone();
        self.allow_tenant(&request, Role::Viewer, "group show", &tenant)?;
        let req = request.into_inner();
        Ok(Response::new(self.engine.group_status(&req.tenant, &req.name)?))
    }

    async fn set_vm_scaling(&self, request: Request<SetVmScalingRequest>) -> Result<Response<Vm>, Status> {
        let name = request.get_ref().name.clone();
        let c = self.allow_vm(&request, Role::Operator, "vm scaling", &name)?;
        let req = request.into_inner();
        let vm = self.engine.set_vm_scaling(&req.name, req.scaling).await?;
        tracing::info!(vm = %name, scaling = vm.scaling.is_some(), by = %c.name, "vm scaling set");
        Ok(Response::new(vm))
    }

    async fn list_decisions(
        &self,
        request: Request<ListDecisionsRequest>,
    ) -> Result<Response<ListDecisionsResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "scaling log")?;
        let mut req = request.into_inner();
        if let Some(t) = &c.tenant {
            if !req.tenant.is_empty() && req.tenant != *t {
                return Err(Status::not_found(format!("no tenant {:?}", req.tenant)));
            }
            req.tenant = t.clone();
        }
        let decisions = self.engine.decisions(req.plan, &req.tenant, req.limit as usize);
        Ok(Response::new(ListDecisionsResponse { decisions }))
    }

    async fn put_network(
        &self,
        request: Request<PutNetworkRequest>,
    ) -> Result<Response<TenantNetwork>, Status> {
        let tenant = request.get_ref().tenant.clone();
        let c = self.allow_tenant(&request, Role::Operator, "network put", &tenant)?;
        let req = request.into_inner();
        let n = self.engine.put_network(&req.tenant, &req.name, req.uplink_vlans).await?;
        tracing::info!(tenant = %n.tenant, network = %n.name, vlan = n.vlan_id, by = %c.name, "network put");
        Ok(Response::new(n))
    }

    async fn remove_network(
        &self,
        request: Request<RemoveNetworkRequest>,
    ) -> Result<Response<TenantNetwork>, Status> {
        let tenant = request.get_ref().tenant.clone();
        let c = self.allow_tenant(&request, Role::Operator, "network remove", &tenant)?;
        let req = request.into_inner();
        let n = self.engine.remove_network(&req.tenant, &req.name).await?;
        tracing::info!(tenant = %n.tenant, network = %n.name, vlan = n.vlan_id, by = %c.name, "network removed");
        Ok(Response::new(n))
    }

    async fn list_networks(
        &self,
        request: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        let c = self.allow(&request, Role::Viewer, "network list")?;
        let tenant = request.into_inner().tenant;
        let bridge = self.engine.tenant_bridge().to_string();
        let networks = self.engine.view().read(|s| {
            s.tenants
                .values()
                .filter(|t| c.sees(&t.name) && (tenant.is_empty() || t.name == tenant))
                .flat_map(|t| t.networks.iter().map(|n| network_view(s, &bridge, n)))
                .collect()
        });
        Ok(Response::new(ListNetworksResponse { networks }))
    }
}
