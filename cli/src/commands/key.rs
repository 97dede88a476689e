//! `key create|list|revoke`.

use sluice_proto::v1 as pb;

use crate::args::KeyCommand;
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};
use crate::time::to_timestamp;

pub async fn run(command: KeyCommand, connection: &Connection, out: &Output) -> Result<(), Error> {
    let mut admin = connection.admin().await?;
    match command {
        KeyCommand::Create {
            name,
            allowed_models,
            rpm,
            expires,
        } => {
            let request = pb::CreateClientKeyRequest {
                name,
                allowed_models,
                rpm_limit: rpm,
                expire_time: expires.map(to_timestamp),
            };
            let response = connection.call(admin.create_client_key(request)).await?;
            out.print(&response, render::created_client_key)
        }
        KeyCommand::List => {
            let response = connection
                .call(admin.list_client_keys(pb::ListClientKeysRequest {}))
                .await?;
            out.print(&response, render::client_keys)
        }
        KeyCommand::Revoke { key } => {
            let request = pb::RevokeClientKeyRequest { id: key.clone() };
            let response = connection.call(admin.revoke_client_key(request)).await?;
            out.print(&response, |_| format!("Revoked client key {key:?}."))
        }
    }
}
