//! The tonic `Coordinator` service: authenticates the caller by its client certificate, checks its role,
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
    AddUserRequest, CoordinatorStatusRequest, CoordinatorStatusResponse, DrainNodeRequest, FenceNodeRequest,
    GridUser, ListUsersRequest, ListUsersResponse, MigrateVmRequest, RemoveUserRequest, RemoveUserResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::AuthConfig;
use crate::grid::{GridState, VmState, is_finished};
use crate::ops::{Engine, OpError, explain, schedule_request};
use crate::store::StoreError;

pub use crate::auth::Role;

/// The caller: certificate CN and role.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub role: Option<Role>,
}

/// Name for callers without TLS (plaintext on loopback, development only): an admin.
pub const LOCAL_CALLER: &str = "local";

/// The caller of `request` and its role: from the grid view's users (`grid_role`), else the configuration's
/// `[auth.users]`, else the certificate's OU (when `auth.role_from_ou`), else `auth.default_role`.
pub fn caller<T>(
    request: &Request<T>,
    auth: &AuthConfig,
    tls: bool,
    grid_role: impl FnOnce(&str) -> Option<Role>,
) -> Caller {
    let cert = request.peer_certs().and_then(|c| c.first().cloned());
    let Some(cert) = cert else {
        return Caller { name: LOCAL_CALLER.into(), role: if tls { None } else { Some(Role::Admin) } };
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Caller { name: "unknown client".into(), role: None };
    };
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let name = first(&mut cert.subject().iter_common_name()).unwrap_or_else(|| cert.subject().to_string());
    let ou = first(&mut cert.subject().iter_organizational_unit());
    let role = grid_role(&name)
        .or_else(|| auth.users.get(&name).and_then(|r| r.parse().ok()))
        .or_else(|| if auth.role_from_ou { ou.and_then(|o| o.parse().ok()) } else { None })
        .or_else(|| auth.default_role.parse().ok());
    Caller { name, role }
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Status {
        let message = e.to_string();
        match e {
            OpError::NotFound(_) => Status::not_found(message),
            OpError::AlreadyExists(_) => Status::already_exists(message),
            OpError::Invalid(_) => Status::invalid_argument(message),
            OpError::Precondition(_) => Status::failed_precondition(message),
            OpError::Unschedulable(_) => Status::resource_exhausted(message),
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
        let users =
            |name: &str| self.engine.view().read(|s| s.users.get(name).and_then(|u| u.role.parse().ok()));
        let c = caller(request, &self.auth, self.tls, users);
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
}

fn node_view(s: &GridState, name: &str) -> Option<Node> {
    let mut n = s.nodes.get(name)?.clone();
    n.allocated = Some(s.allocated(name));
    n.vms = s.vms_on(name).map(|v| v.name.clone()).collect();
    Some(n)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OperationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow(&request, Role::Admin, "node add")?;
        Ok(Response::new(self.engine.add_node(request.into_inner()).await?))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        self.allow(&request, Role::Admin, "node remove")?;
        let req = request.into_inner();
        Ok(Response::new(self.engine.remove_node(&req.name, req.force).await?))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.allow(&request, Role::Viewer, "node list")?;
        let nodes = self.engine.view().read(|s| s.nodes.keys().filter_map(|n| node_view(s, n)).collect());
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow(&request, Role::Viewer, "node show")?;
        let name = request.into_inner().name;
        self.engine
            .view()
            .read(|s| node_view(s, &name))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no node {name:?}")))
    }

    async fn cordon_node(&self, request: Request<CordonNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow(&request, Role::Operator, "node cordon")?;
        Ok(Response::new(self.engine.set_cordon(&request.into_inner().name, true).await?))
    }

    async fn uncordon_node(&self, request: Request<CordonNodeRequest>) -> Result<Response<Node>, Status> {
        self.allow(&request, Role::Operator, "node uncordon")?;
        Ok(Response::new(self.engine.set_cordon(&request.into_inner().name, false).await?))
    }

    async fn fence_node(&self, request: Request<FenceNodeRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Admin, "node fence")?;
        Ok(Response::new(self.engine.fence_node(&request.into_inner().name, &c.name).await?))
    }

    async fn confirm_fenced(&self, request: Request<FenceNodeRequest>) -> Result<Response<Node>, Status> {
        let c = self.allow(&request, Role::Admin, "node fenced")?;
        let name = request.into_inner().name;
        let node = self.engine.confirm_fenced(&name).await?;
        tracing::warn!(node = %name, by = %c.name, "confirmed fenced");
        Ok(Response::new(node))
    }

    async fn drain_node(&self, request: Request<DrainNodeRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "node drain")?;
        Ok(Response::new(self.engine.drain_node(request.into_inner(), &c.name).await?))
    }

    async fn create_vm(
        &self,
        request: Request<CreateVmRequest>,
    ) -> Result<Response<CreateVmResponse>, Status> {
        let need = if request.get_ref().dry_run { Role::Viewer } else { Role::Operator };
        let c = self.allow(&request, need, "vm create")?;
        Ok(Response::new(self.engine.create_vm(request.into_inner(), &c.name).await?))
    }

    async fn list_vms(&self, request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        self.allow(&request, Role::Viewer, "vm list")?;
        let req = request.into_inner();
        let vms = self.engine.view().read(|s| {
            s.vms
                .values()
                .filter(|v| req.all || v.state() != VmState::Deleted)
                .filter(|v| req.node.is_empty() || v.node == req.node)
                .cloned()
                .collect()
        });
        Ok(Response::new(ListVmsResponse { vms }))
    }

    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        self.allow(&request, Role::Viewer, "vm show")?;
        let name = request.into_inner().name;
        self.engine
            .view()
            .read(|s| s.vms.get(&name).cloned())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no vm {name:?}")))
    }

    async fn delete_vm(&self, request: Request<DeleteVmRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "vm delete")?;
        Ok(Response::new(self.engine.delete_vm(request.into_inner(), &c.name).await?))
    }

    async fn control_vm(&self, request: Request<ControlVmRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "vm control")?;
        Ok(Response::new(self.engine.control_vm(request.into_inner(), &c.name).await?))
    }

    async fn resize_vm(&self, request: Request<ResizeVmRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "vm resize")?;
        Ok(Response::new(self.engine.resize_vm(request.into_inner(), &c.name).await?))
    }

    async fn snapshot_vm(&self, request: Request<SnapshotVmRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "vm snapshot")?;
        Ok(Response::new(self.engine.snapshot_vm(request.into_inner(), &c.name).await?))
    }

    async fn migrate_vm(&self, request: Request<MigrateVmRequest>) -> Result<Response<Operation>, Status> {
        let c = self.allow(&request, Role::Operator, "vm migrate")?;
        Ok(Response::new(self.engine.migrate_vm(request.into_inner(), &c.name).await?))
    }

    async fn explain_vm(&self, request: Request<ExplainVmRequest>) -> Result<Response<Explanation>, Status> {
        self.allow(&request, Role::Viewer, "vm why")?;
        let name = request.into_inner().name;
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
        self.allow(&request, Role::Viewer, "op list")?;
        let req = request.into_inner();
        let mut operations: Vec<Operation> = self.engine.view().read(|s| {
            s.ops
                .values()
                .rev()
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
        self.allow(&request, Role::Viewer, "op show")?;
        let id = request.into_inner().id;
        self.engine
            .view()
            .read(|s| s.ops.get(&id).cloned())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id:?}")))
    }

    type WatchOperationStream = EventStream;

    async fn watch_operation(
        &self,
        request: Request<WatchOperationRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.allow(&request, Role::Viewer, "op watch")?;
        let id = request.into_inner().id;
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

    async fn add_user(&self, request: Request<AddUserRequest>) -> Result<Response<GridUser>, Status> {
        let c = self.allow(&request, Role::Admin, "user add")?;
        let req = request.into_inner();
        Ok(Response::new(self.engine.add_user(&req.name, &req.role, &c.name).await?))
    }

    async fn remove_user(
        &self,
        request: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        let c = self.allow(&request, Role::Admin, "user remove")?;
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
        let users = self.engine.view().read(|s| s.users.values().cloned().collect());
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
}
