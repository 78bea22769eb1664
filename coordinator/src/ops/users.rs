//! The API's users in the grid view: a certificate CN and its role, changed only by an admin, never by the
//! user it names.

use crate::auth::Role;
use crate::grid::{Change, GridUser, now};

use super::{Engine, OpError};

/// Longest user name accepted (a certificate CN is at most 64 characters; a DN-like name may be longer).
const MAX_NAME: usize = 128;

/// Names of token users start with this; certificate names never match a token user.
pub const TOKEN_PREFIX: &str = "token:";

/// The user as answers show it: without its token's hash.
pub fn public(mut user: GridUser) -> GridUser {
    user.token_sha256.clear();
    user
}

fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

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
        if name.starts_with(TOKEN_PREFIX) {
            return Err(OpError::Invalid(format!(
                "user name {name:?}: names starting with {TOKEN_PREFIX:?} are tokens' (gridctl token create)"
            )));
        }
        self.put_user(name, role, tenant, by, String::new()).await
    }

    /// A bearer token named `name` with `role` (and `tenant`): the user `token:NAME`, of which only the
    /// token's hash is kept. Returns the user (hash cleared) and the token, which nothing else holds.
    pub async fn create_token(
        &self,
        name: &str,
        role: &str,
        tenant: &str,
        by: &str,
    ) -> Result<(GridUser, String), OpError> {
        check_name(name)?;
        let token = format!("gft_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let user =
            self.put_user(&format!("{TOKEN_PREFIX}{name}"), role, tenant, by, token_hash(&token)).await?;
        Ok((user, token))
    }

    /// The token user whose token `token` is, if any.
    pub fn token_user(&self, token: &str) -> Option<GridUser> {
        use subtle::ConstantTimeEq;
        let hash = token_hash(token);
        self.view().read(|s| {
            s.users
                .values()
                .find(|u| {
                    !u.token_sha256.is_empty() && bool::from(u.token_sha256.as_bytes().ct_eq(hash.as_bytes()))
                })
                .cloned()
        })
    }

    async fn put_user(
        &self,
        name: &str,
        role: &str,
        tenant: &str,
        by: &str,
        token_sha256: String,
    ) -> Result<GridUser, OpError> {
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
            token_sha256,
        };
        self.view()
            .update(|s| {
                if !tenant.is_empty() {
                    super::tenants::tenant_of(s, tenant)?;
                }
                Ok((user.clone(), vec![Change::PutUser(user.clone())]))
            })
            .await
            .map(public)
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
                Ok((public(user), vec![Change::RemoveUser(name.into())]))
            })
            .await
    }
}
