//! `cooldown list|reset`.

use sluice_proto::v1 as pb;

use crate::args::CooldownCommand;
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};

pub async fn run(
    command: CooldownCommand,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    let mut admin = connection.admin().await?;
    match command {
        CooldownCommand::List => {
            let response = connection
                .call(admin.list_cooldowns(pb::ListCooldownsRequest {}))
                .await?;
            out.print(&response, render::cooldowns)
        }
        CooldownCommand::Reset { backend, model } => {
            let request = pb::ResetCooldownRequest {
                backend_id: backend.clone(),
                model: model.clone().unwrap_or_default(),
            };
            let response = connection
                .call(admin.reset_cooldown(request))
                .await
                .map_err(|err| err.of_change("see `sluicectl cooldown list`"))?;
            out.print(&response, |_| match &model {
                Some(model) => format!(
                    "Cleared the cooldown of model {model:?} at backend {backend:?} on every data plane."
                ),
                None => format!(
                    "Cleared the cooldown of backend {backend:?} and its models on every data plane."
                ),
            })
        }
    }
}
