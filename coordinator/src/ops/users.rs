//! The API's users in the grid view: a certificate CN and its role, changed only by an admin, never by the
//! user it names.

use crate::auth::Role;
use crate::grid::{Change, GridUser, now};

use super::{Engine, OpError};

/// Longest user name accepted (a certificate CN is at most 64 characters; a DN-like name may be longer).
const MAX_NAME: usize = 128;

fn check_name(name: &str) -> Result<(), OpError> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(OpError::Invalid(format!(
            "user name {name:?}: 1-{MAX_NAME} characters without control characters (the certificate's CN)"
        )));
    }
    Ok(())
}

impl Engine {
    /// Adds `name` with `role`, or changes the role of a known name. `by` is the admin asking.
    /// A `tenant` scopes the user to that tenant's VMs and groups.
    pub async fn add_user(
        &self,
        name: &str,
        role: &str,
        tenant: &str,
        by: &str,
    ) -> Result<GridUser, OpError> {
        check_name(name)?;
        let role: Role = role
            .parse()
            .map_err(|()| OpError::Invalid(format!("role {role:?} is not admin, operator or viewer")))?;
        if name == by {
            return Err(OpError::Precondition(format!("{by} cannot change its own role")));
        }
        let user = GridUser {
            name: name.into(),
            role: role.as_str().into(),
            added_by: by.into(),
            updated: Some(now()),
            tenant: tenant.into(),
        };
        self.view()
            .update(|s| {
                if !tenant.is_empty() {
                    super::tenants::tenant_of(s, tenant)?;
                }
                Ok((user.clone(), vec![Change::PutUser(user.clone())]))
            })
            .await
    }

    /// Removes `name` from the grid view's users; its certificate then gets what the configuration gives it.
    pub async fn remove_user(&self, name: &str, by: &str) -> Result<GridUser, OpError> {
        if name == by {
            return Err(OpError::Precondition(format!("{by} cannot remove itself")));
        }
        self.view()
            .update(|s| {
                let user = s.users.get(name).cloned().ok_or_else(|| {
                    OpError::NotFound(format!("no user {name:?} in the grid view (gridctl user list)"))
                })?;
                Ok((user, vec![Change::RemoveUser(name.into())]))
            })
            .await
    }
}
